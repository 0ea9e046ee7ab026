/* lowra_model: an exported lowra ExecuTorch model folder on device, natively: verify its files, load lowra's
 * kernels, verify a user's blob against the folder's base, compose that user's program data (side branch: the
 * blob's factors; merge: base + up @ down), and generate tokens from token ids. The app owns tokenization.
 *
 * Part of liblowra_program (CMake, with the ExecuTorch runtime). The spec is docs/FORMAT.md ("ExecuTorch model
 * folder", "Adapter blob"); the Python ExecutorchEngine is the reference these functions are tested against.
 * Errors: a lowra_status per call and lowra_program_last_error() (lowra_program.h). A handle is not thread-safe.
 */
#ifndef LOWRA_MODEL_H
#define LOWRA_MODEL_H

#include "lowra_program.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct lowra_model lowra_model;

/* Open `folder` (manifest.json, the programs, their .ptd templates, the kernel library for custom-op programs) in
 * `mode` "side" (the user is a low-rank side branch; a swap rewrites only the factors) or "merge" (the user's
 * weights are merged at load). With `verify` every file's sha256 is checked against the manifest first. */
LOWRA_API lowra_status lowra_model_open(const char* folder, const char* mode, int verify, lowra_model** out);
LOWRA_API void lowra_model_close(lowra_model* model);

/* Verify a blob (as lowra_user_load does: container, checksum, structure, base binding against the manifest's
 * digests; in side mode its kept rank must fit the program's) and make it the active user. On failure the previous
 * user (or the base) stays active. `info` may be null; its strings live until the next load/unload. */
LOWRA_API lowra_status lowra_model_user_load(lowra_model* model, const uint8_t* blob, size_t blob_size,
                                             lowra_user_info* info);
/* Check users' blobs under `trust` (lowra.h, "Trust"; shared with the app, which may free its handle). Until this
 * is called the model uses the default policy: unsigned blobs accepted, every signed blob LOWRA_ERR_UNTRUSTED_KEY. */
LOWRA_API lowra_status lowra_model_set_trust(lowra_model* model, lowra_trust* trust);
/* lowra_model_user_load of a blob that may be signed and encrypted (see lowra_user_load_signed): `user_id` and
 * `decryption_key` may be null. A signed blob with a base_content claim is refused (LOWRA_ERR_BASE_MISMATCH): a
 * program cannot prove its base's content, as in the Python ExecutorchEngine. */
LOWRA_API lowra_status lowra_model_user_load_signed(lowra_model* model, const uint8_t* blob, size_t blob_size,
                                                    const char* user_id, const uint8_t* decryption_key,
                                                    size_t key_size, lowra_user_info* info);
/* Back to the base, bit-exactly (every user range is rewritten: zeros in side mode, the pristine template weight in
 * merge mode). A swap rewrites the loaded program's data in place: no program reload. */
LOWRA_API lowra_status lowra_model_user_unload(lowra_model* model);

/* Logits of `n` tokens at cache positions start..start+n-1 (start 0 restarts the cache): n rows, or 1 row (the last
 * position's) when the folder's manifest says "logits": "last"; see lowra_program_forward. */
LOWRA_API lowra_status lowra_model_forward(lowra_model* model, const int64_t* ids, size_t n, int64_t start,
                                           float* logits, size_t capacity, size_t* vocab);
/* Greedy generation: up to `max_new` tokens after `prompt` into `out` (capacity `max_new`), stopping before any id of
 * `stop` (not written) or when the program's positions run out; `n_out` receives the count. */
LOWRA_API lowra_status lowra_model_generate(lowra_model* model, const int64_t* prompt, size_t n, size_t max_new,
                                            const int64_t* stop, size_t n_stop, int64_t* out, size_t* n_out);

LOWRA_API size_t lowra_model_vocab_size(const lowra_model* model);
LOWRA_API size_t lowra_model_max_seq_len(const lowra_model* model);

#ifdef __cplusplus
}
#endif

#endif /* LOWRA_MODEL_H */
