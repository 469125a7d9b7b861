/* The part of onnxruntime-genai's C API that llama-chat calls.
 *
 * The onnxruntime-genai wheel ships libonnxruntime-genai.so without a header, so this project declares the calls
 * it uses, following the library's documented C API (onnxruntime-genai 0.5 and later). Every call that can fail
 * returns an OgaResult: NULL on success, otherwise an error to read with OgaResultGetError and free with
 * OgaDestroyResult. */
#ifndef LLAMA_EXPORT_OGA_API_H
#define LLAMA_EXPORT_OGA_API_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct OgaResult OgaResult;
typedef struct OgaModel OgaModel;
typedef struct OgaTokenizer OgaTokenizer;
typedef struct OgaTokenizerStream OgaTokenizerStream;
typedef struct OgaSequences OgaSequences;
typedef struct OgaGeneratorParams OgaGeneratorParams;
typedef struct OgaGenerator OgaGenerator;

const char *OgaResultGetError(const OgaResult *result);
void OgaDestroyResult(OgaResult *result);

OgaResult *OgaCreateModel(const char *config_path, OgaModel **out);
void OgaDestroyModel(OgaModel *model);

OgaResult *OgaCreateTokenizer(const OgaModel *model, OgaTokenizer **out);
void OgaDestroyTokenizer(OgaTokenizer *tokenizer);
OgaResult *OgaTokenizerEncode(const OgaTokenizer *tokenizer, const char *text, OgaSequences *sequences);
/* The chunk written to *out belongs to the stream and stays valid until its next call. */
OgaResult *OgaCreateTokenizerStream(const OgaTokenizer *tokenizer, OgaTokenizerStream **out);
OgaResult *OgaTokenizerStreamDecode(OgaTokenizerStream *stream, int32_t token, const char **out);
void OgaDestroyTokenizerStream(OgaTokenizerStream *stream);

OgaResult *OgaCreateSequences(OgaSequences **out);
size_t OgaSequencesGetSequenceCount(const OgaSequences *sequences, size_t sequence_index);
void OgaDestroySequences(OgaSequences *sequences);

OgaResult *OgaCreateGeneratorParams(const OgaModel *model, OgaGeneratorParams **out);
OgaResult *OgaGeneratorParamsSetSearchNumber(OgaGeneratorParams *params, const char *name, double value);
OgaResult *OgaGeneratorParamsSetSearchBool(OgaGeneratorParams *params, const char *name, bool value);
void OgaDestroyGeneratorParams(OgaGeneratorParams *params);

OgaResult *OgaCreateGenerator(const OgaModel *model, const OgaGeneratorParams *params, OgaGenerator **out);
OgaResult *OgaGenerator_AppendTokenSequences(OgaGenerator *generator, const OgaSequences *sequences);
bool OgaGenerator_IsDone(const OgaGenerator *generator);
OgaResult *OgaGenerator_GenerateNextToken(OgaGenerator *generator);
/* One token per sequence in the batch; the array belongs to the generator until its next call. */
OgaResult *OgaGenerator_GetNextTokens(const OgaGenerator *generator, const int32_t **out, size_t *out_count);
void OgaDestroyGenerator(OgaGenerator *generator);

void OgaShutdown(void);

#ifdef __cplusplus
}
#endif

#endif
