// LlamaChat: greedy continuation of a prompt with a llama-export package, calling onnxruntime-genai's C library
// through P/Invoke (the NuGet wrapper needs a package feed; this needs only the library in the Python wheel).
//
//   mono LlamaChat.exe PACKAGE PROMPT N
//
// prints the N new tokens' text (fewer if the model ends the text) on stdout as they are generated, then a
// newline. Errors go to stderr as one line; the exit status is 2 for bad arguments, 1 for anything else.
using System;
using System.IO;
using System.Runtime.InteropServices;
using System.Text;

static class Native
{
    // NativeLibraries.GenAI and .OnnxRuntime are absolute paths that `make` writes into NativeLibraries.g.cs.
    const string Lib = NativeLibraries.GenAI;

    [DllImport(Lib)] public static extern IntPtr OgaResultGetError(IntPtr result);
    [DllImport(Lib)] public static extern void OgaDestroyResult(IntPtr result);
    [DllImport(Lib)] public static extern IntPtr OgaCreateModel(byte[] configPath, out IntPtr model);
    [DllImport(Lib)] public static extern void OgaDestroyModel(IntPtr model);
    [DllImport(Lib)] public static extern IntPtr OgaCreateTokenizer(IntPtr model, out IntPtr tokenizer);
    [DllImport(Lib)] public static extern void OgaDestroyTokenizer(IntPtr tokenizer);
    [DllImport(Lib)] public static extern IntPtr OgaTokenizerEncode(IntPtr tokenizer, byte[] text, IntPtr sequences);
    [DllImport(Lib)] public static extern IntPtr OgaCreateTokenizerStream(IntPtr tokenizer, out IntPtr stream);
    [DllImport(Lib)] public static extern IntPtr OgaTokenizerStreamDecode(IntPtr stream, int token, out IntPtr text);
    [DllImport(Lib)] public static extern void OgaDestroyTokenizerStream(IntPtr stream);
    [DllImport(Lib)] public static extern IntPtr OgaCreateSequences(out IntPtr sequences);
    [DllImport(Lib)] public static extern UIntPtr OgaSequencesGetSequenceCount(IntPtr sequences, UIntPtr index);
    [DllImport(Lib)] public static extern void OgaDestroySequences(IntPtr sequences);
    [DllImport(Lib)] public static extern IntPtr OgaCreateGeneratorParams(IntPtr model, out IntPtr parameters);
    [DllImport(Lib)] public static extern IntPtr OgaGeneratorParamsSetSearchNumber(IntPtr parameters, byte[] name, double value);
    [DllImport(Lib)] public static extern IntPtr OgaGeneratorParamsSetSearchBool(IntPtr parameters, byte[] name, [MarshalAs(UnmanagedType.I1)] bool value);
    [DllImport(Lib)] public static extern void OgaDestroyGeneratorParams(IntPtr parameters);
    [DllImport(Lib)] public static extern IntPtr OgaCreateGenerator(IntPtr model, IntPtr parameters, out IntPtr generator);
    [DllImport(Lib)] public static extern IntPtr OgaGenerator_AppendTokenSequences(IntPtr generator, IntPtr sequences);
    [DllImport(Lib)] [return: MarshalAs(UnmanagedType.I1)] public static extern bool OgaGenerator_IsDone(IntPtr generator);
    [DllImport(Lib)] public static extern IntPtr OgaGenerator_GenerateNextToken(IntPtr generator);
    [DllImport(Lib)] public static extern IntPtr OgaGenerator_GetNextTokens(IntPtr generator, out IntPtr tokens, out UIntPtr count);
    [DllImport(Lib)] public static extern void OgaDestroyGenerator(IntPtr generator);
    [DllImport(Lib)] public static extern void OgaShutdown();

    // onnxruntime-genai dlopens ONNX Runtime as libonnxruntime.so.1, a name the wheel's file does not have; loaded
    // first by its full path (its soname is libonnxruntime.so.1), the library's dlopen finds it already there.
    [DllImport("libdl.so.2")] static extern IntPtr dlopen(string path, int flags);
    [DllImport("libdl.so.2")] static extern IntPtr dlerror();
    const int RTLD_NOW = 2, RTLD_GLOBAL = 0x100;

    public static void LoadOnnxRuntime()
    {
        if (dlopen(NativeLibraries.OnnxRuntime, RTLD_NOW | RTLD_GLOBAL) == IntPtr.Zero)
            throw new ChatError("cannot load ONNX Runtime (" + NativeLibraries.OnnxRuntime + "): " + Utf8(dlerror()));
    }

    public static byte[] Utf8z(string text) { return Encoding.UTF8.GetBytes(text + "\0"); }

    public static byte[] Bytes(IntPtr text)
    {
        if (text == IntPtr.Zero) return new byte[0];
        int length = 0;
        while (Marshal.ReadByte(text, length) != 0) length++;
        var bytes = new byte[length];
        Marshal.Copy(text, bytes, 0, length);
        return bytes;
    }

    public static string Utf8(IntPtr text) { return Encoding.UTF8.GetString(Bytes(text)); }

    // A failed call returns an OgaResult holding the message; success returns null.
    public static void Check(IntPtr result, string what)
    {
        if (result == IntPtr.Zero) return;
        string message = Utf8(OgaResultGetError(result));
        OgaDestroyResult(result);
        throw new ChatError(what + ": " + message);
    }
}

class ChatError : Exception
{
    public ChatError(string message) : base(message) { }
}

static class LlamaChat
{
    const string Usage = "usage: mono LlamaChat.exe PACKAGE PROMPT N   (N: number of new tokens, 1 or more)";
    const long MaxNewTokens = 1000000;

    static int Main(string[] args)
    {
        long newTokens;
        if (args.Length != 3)
            return Fail("expected 3 arguments\n" + Usage, 2);
        if (!long.TryParse(args[2], out newTokens) || newTokens < 1 || newTokens > MaxNewTokens)
            return Fail("N must be a whole number from 1 to 1000000\n" + Usage, 2);
        if (!File.Exists(Path.Combine(args[0], "genai_config.json")))
            return Fail(args[0] + ": not a package folder (no genai_config.json)", 1);
        try
        {
            Native.LoadOnnxRuntime();
            Generate(args[0], args[1], newTokens, Console.OpenStandardOutput());
            return 0;
        }
        catch (ChatError error)
        {
            return Fail(error.Message, 1);
        }
        catch (DllNotFoundException error)
        {
            return Fail("cannot load onnxruntime-genai (" + error.Message + "); rebuild with make", 1);
        }
    }

    static int Fail(string message, int status)
    {
        Console.Error.WriteLine("LlamaChat: " + message);
        return status;
    }

    static void Generate(string package, string prompt, long newTokens, Stream output)
    {
        IntPtr model = IntPtr.Zero, tokenizer = IntPtr.Zero, stream = IntPtr.Zero, sequences = IntPtr.Zero;
        IntPtr parameters = IntPtr.Zero, generator = IntPtr.Zero;
        try
        {
            Native.Check(Native.OgaCreateModel(Native.Utf8z(package), out model), "cannot load the package");
            Native.Check(Native.OgaCreateTokenizer(model, out tokenizer), "cannot load the tokenizer");
            Native.Check(Native.OgaCreateTokenizerStream(tokenizer, out stream), "cannot create a tokenizer stream");
            Native.Check(Native.OgaCreateSequences(out sequences), "out of memory");
            Native.Check(Native.OgaTokenizerEncode(tokenizer, Native.Utf8z(prompt), sequences), "cannot tokenize the prompt");
            ulong promptLength = Native.OgaSequencesGetSequenceCount(sequences, UIntPtr.Zero).ToUInt64();

            Native.Check(Native.OgaCreateGeneratorParams(model, out parameters), "cannot create generator parameters");
            Native.Check(Native.OgaGeneratorParamsSetSearchBool(parameters, Native.Utf8z("do_sample"), false),
                         "cannot select greedy search");
            Native.Check(Native.OgaGeneratorParamsSetSearchNumber(parameters, Native.Utf8z("max_length"),
                                                                  (double)(promptLength + (ulong)newTokens)),
                         "prompt plus N does not fit the package's context");
            Native.Check(Native.OgaCreateGenerator(model, parameters, out generator), "cannot create a generator");
            Native.Check(Native.OgaGenerator_AppendTokenSequences(generator, sequences), "cannot run the prompt");

            while (!Native.OgaGenerator_IsDone(generator))
            {
                IntPtr tokens, text;
                UIntPtr count;
                Native.Check(Native.OgaGenerator_GenerateNextToken(generator), "generation failed");
                Native.Check(Native.OgaGenerator_GetNextTokens(generator, out tokens, out count), "generation failed");
                if (count.ToUInt64() < 1) break;
                Native.Check(Native.OgaTokenizerStreamDecode(stream, Marshal.ReadInt32(tokens), out text),
                             "cannot decode a token");
                byte[] chunk = Native.Bytes(text);
                output.Write(chunk, 0, chunk.Length);
                output.Flush();
            }
            output.WriteByte((byte)'\n');
            output.Flush();
        }
        finally
        {
            if (generator != IntPtr.Zero) Native.OgaDestroyGenerator(generator);
            if (parameters != IntPtr.Zero) Native.OgaDestroyGeneratorParams(parameters);
            if (sequences != IntPtr.Zero) Native.OgaDestroySequences(sequences);
            if (stream != IntPtr.Zero) Native.OgaDestroyTokenizerStream(stream);
            if (tokenizer != IntPtr.Zero) Native.OgaDestroyTokenizer(tokenizer);
            if (model != IntPtr.Zero) Native.OgaDestroyModel(model);
            Native.OgaShutdown();
        }
    }
}
