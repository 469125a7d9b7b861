/* llama-chat: greedy continuation of a prompt with a llama-export package, through onnxruntime-genai's C API.
 *
 *   llama-chat PACKAGE PROMPT N
 *
 * prints the N new tokens' text (fewer if the model ends the text) on stdout as they are generated, then a
 * newline. Errors go to stderr as one line; the exit status is 2 for bad arguments, 1 for anything else. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "oga_api.h"

#define MAX_NEW_TOKENS 1000000L

static int usage(const char *message) {
    fprintf(stderr, "llama-chat: %s\nusage: llama-chat PACKAGE PROMPT N   (N: number of new tokens, 1 or more)\n",
            message);
    return 2;
}

/* Reports a failed call as one line and frees its result; returns non-zero when the call failed. */
static int failed(OgaResult *result, const char *what) {
    if (result == NULL) return 0;
    fprintf(stderr, "llama-chat: %s: %s\n", what, OgaResultGetError(result));
    OgaDestroyResult(result);
    return 1;
}

static int is_package(const char *folder) {
    struct stat info;
    char config[4096];
    if (stat(folder, &info) != 0 || !S_ISDIR(info.st_mode)) return 0;
    if (snprintf(config, sizeof config, "%s/genai_config.json", folder) >= (int)sizeof config) return 0;
    return stat(config, &info) == 0 && S_ISREG(info.st_mode);
}

int main(int argc, char **argv) {
    if (argc != 4) return usage("expected 3 arguments");
    const char *package = argv[1], *prompt = argv[2];
    char *end = NULL;
    errno = 0;
    long new_tokens = strtol(argv[3], &end, 10);
    if (errno != 0 || end == argv[3] || *end != '\0' || new_tokens < 1 || new_tokens > MAX_NEW_TOKENS)
        return usage("N must be a whole number from 1 to 1000000");
    if (!is_package(package)) {
        fprintf(stderr, "llama-chat: %s: not a package folder (no genai_config.json)\n", package);
        return 1;
    }

    int status = 1;
    OgaModel *model = NULL;
    OgaTokenizer *tokenizer = NULL;
    OgaTokenizerStream *stream = NULL;
    OgaSequences *prompt_tokens = NULL;
    OgaGeneratorParams *params = NULL;
    OgaGenerator *generator = NULL;

    if (failed(OgaCreateModel(package, &model), "cannot load the package")) goto done;
    if (failed(OgaCreateTokenizer(model, &tokenizer), "cannot load the tokenizer")) goto done;
    if (failed(OgaCreateTokenizerStream(tokenizer, &stream), "cannot create a tokenizer stream")) goto done;
    if (failed(OgaCreateSequences(&prompt_tokens), "out of memory")) goto done;
    if (failed(OgaTokenizerEncode(tokenizer, prompt, prompt_tokens), "cannot tokenize the prompt")) goto done;
    size_t prompt_length = OgaSequencesGetSequenceCount(prompt_tokens, 0);

    if (failed(OgaCreateGeneratorParams(model, &params), "cannot create generator parameters")) goto done;
    if (failed(OgaGeneratorParamsSetSearchBool(params, "do_sample", false), "cannot select greedy search")) goto done;
    if (failed(OgaGeneratorParamsSetSearchNumber(params, "max_length", (double)(prompt_length + new_tokens)),
               "prompt plus N does not fit the package's context")) goto done;
    if (failed(OgaCreateGenerator(model, params, &generator), "cannot create a generator")) goto done;
    if (failed(OgaGenerator_AppendTokenSequences(generator, prompt_tokens), "cannot run the prompt")) goto done;

    while (!OgaGenerator_IsDone(generator)) {
        const int32_t *next = NULL;
        size_t count = 0;
        const char *text = NULL;
        if (failed(OgaGenerator_GenerateNextToken(generator), "generation failed")) goto done;
        if (failed(OgaGenerator_GetNextTokens(generator, &next, &count), "generation failed")) goto done;
        if (count < 1) break;
        if (failed(OgaTokenizerStreamDecode(stream, next[0], &text), "cannot decode a token")) goto done;
        fputs(text, stdout);
        fflush(stdout);
    }
    putchar('\n');
    status = 0;

done:
    if (generator) OgaDestroyGenerator(generator);
    if (params) OgaDestroyGeneratorParams(params);
    if (prompt_tokens) OgaDestroySequences(prompt_tokens);
    if (stream) OgaDestroyTokenizerStream(stream);
    if (tokenizer) OgaDestroyTokenizer(tokenizer);
    if (model) OgaDestroyModel(model);
    OgaShutdown();
    return status;
}
