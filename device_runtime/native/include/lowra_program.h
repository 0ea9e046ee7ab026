/* lowra_program: run an exported lowra ExecuTorch program (side.pte / merge.pte with one .ptd data file) natively.
 *
 * A separate library from liblowra: it links the ExecuTorch runtime (libexecutorch and its optimized CPU kernels),
 * which liblowra itself never needs. lowra's low-bit kernels (lowra::lowbit_linear, lowra::dequantize) register
 * into the same runtime when their library is loaded (RTLD_GLOBAL) before a custom-op program is opened.
 *
 * The program is transformers' static-cache decoder as lowra's exporter writes it: inputs input_ids [1, n] and
 * cache_position [n] (int64), output logits [1, n, vocab] (float32); position 0 restarts the cache.
 * Conventions as in lowra.h: a lowra_status per call, lowra_program_last_error() says what was wrong (thread-local).
 * A handle is not thread-safe: the app serializes calls on one handle.
 */
#ifndef LOWRA_PROGRAM_H
#define LOWRA_PROGRAM_H

#include "lowra.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct lowra_program lowra_program;

/* The message of the last failed call of this library on this thread ("" after a success). */
LOWRA_API const char* lowra_program_last_error(void);

/* Load a program and its data file (both memory-mapped) and prepare its "forward" method. An operator without a
 * kernel is LOWRA_ERR_KERNEL (load lowra's kernel library first); anything else ExecuTorch refuses is
 * LOWRA_ERR_PROGRAM; a missing file is LOWRA_ERR_BASE_NOT_FOUND. */
LOWRA_API lowra_status lowra_program_open(const char* program_path, const char* data_path, lowra_program** out);

/* Run `n` tokens starting at cache position `start` (0 restarts the cache). Writes the logits the program outputs,
 * float32 rows x vocab (rows = n, or 1 = the last position's for a program exported with logits "last", the
 * manifest's "logits"), to `logits` when `capacity` (in floats) is large enough; `vocab` always receives the
 * vocabulary size, so a call with capacity 0 asks for it. */
LOWRA_API lowra_status lowra_program_forward(lowra_program* program, const int64_t* ids, size_t n, int64_t start,
                                             float* logits, size_t capacity, size_t* vocab);

/* Free the program. Null is accepted. */
LOWRA_API void lowra_program_close(lowra_program* program);

/* 1 when the runtime has a kernel registered for operator `name` (e.g. "lowra::lowbit_linear.out"), else 0. */
LOWRA_API int lowra_program_has_operator(const char* name);

#ifdef __cplusplus
}
#endif

#endif /* LOWRA_PROGRAM_H */
