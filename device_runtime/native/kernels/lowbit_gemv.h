/* lowra low-bit CPU kernels: y = W x (GEMV, one token) and Y = X W^T (GEMM, prefill) straight from the packed rows
 * of a lowra quantized layer, without ever expanding W to float.
 *
 * The layer is docs/FORMAT.md "Quantized base" (lowra.device_runtime.formats.quantized_weight is the reference):
 *   W[r, j] = codebook_r[code[r, j]] * scale[r, j / group_size]        (scale 1 when group_size == 0)
 * row r has widths[r] in {1, 2, 4} bits per code, packed LSB-first, each row starting on a byte boundary; its
 * 2^w float16 levels ascend; scales are float16 [out, ceil(in / group_size)].
 *
 * Before the first product, lowra_lowbit_repack rewrites the codes once, in place, to the kernels' layout (2-bit
 * rows become bit-planar within each byte; 1- and 4-bit rows are unchanged), so the working set stays exactly the
 * file's bytes: no offsets, no float copy. Verify checksums/fingerprints before repacking. lowra_lowbit_block then
 * reorders those bytes (same size) so the one-token product reads each layer as one sequential stream instead of
 * gathering from 8 rows at once (LOWRA_LOWBIT_LAYOUT_BLOCKED: what exported programs store).
 *
 * Plain C ABI: no allocation owned across calls, every function returns a lowra_lowbit_status and never lets a C++
 * exception out. Work is split over a process-wide pool of worker threads (started on first use); every call waits
 * for its own work; results do not depend on the thread count (bit-identical), nor on the row split.
 */
#ifndef LOWRA_LOWBIT_GEMV_H
#define LOWRA_LOWBIT_GEMV_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum lowra_lowbit_isa {
  LOWRA_LOWBIT_ISA_AUTO = 0,   /* the best this CPU runs (AVX512, else AVX2 + FMA + F16C on x86-64, else scalar) */
  LOWRA_LOWBIT_ISA_SCALAR = 1, /* portable C++, any CPU; the same algorithm as the vector path */
  LOWRA_LOWBIT_ISA_AVX2 = 2,   /* x86-64 AVX2 + FMA + F16C (refused with ISA_UNAVAILABLE elsewhere) */
  LOWRA_LOWBIT_ISA_AVX512 = 3  /* the AVX2 kernels with AVX-512VL's two-table permute for the table lookups */
} lowra_lowbit_isa;

typedef enum lowra_lowbit_status {
  LOWRA_LOWBIT_OK = 0,
  LOWRA_LOWBIT_INVALID_ARGUMENT = 1, /* a null pointer, a non-positive size, a negative group size or thread count */
  LOWRA_LOWBIT_BAD_WIDTH = 2,        /* a row width other than 1, 2 or 4 */
  LOWRA_LOWBIT_ISA_UNAVAILABLE = 3,  /* the requested instruction set is not compiled in or not on this CPU */
  LOWRA_LOWBIT_OUT_OF_MEMORY = 4,    /* the per-call scratch (tables, padded inputs) could not be allocated */
  LOWRA_LOWBIT_PLAN_MISMATCH = 5     /* a plan used with a layer of another shape, group size, layout or widths */
} lowra_lowbit_status;

/* How a layer's codes are laid out (both keep the file's size: a permutation of its bytes). */
typedef enum lowra_lowbit_layout {
  /* Rows concatenated in row order, as the file stores them, 2-bit rows bit-planar per byte (lowra_lowbit_repack). */
  LOWRA_LOWBIT_LAYOUT_ROWS = 0,
  /* The same bytes in the order the GEMV reads them, so a layer is one sequential stream (lowra_lowbit_block): rows
   * sorted by width (1, 2, then 4 bits; row order within a width), cut into blocks of LOWRA_LOWBIT_BLOCK_ROWS rows
   * (the last block of a width may hold fewer, `count`). A block of 1- or 2-bit rows interleaves its rows' 32-bit
   * words: word k of lane i at 4 * k * count + 4 * i; a row's last, partial word of t < 4 bytes at
   * 4 * k * count + t * i. A block of 4-bit rows stores its rows one after another. Blocks follow each other. */
  LOWRA_LOWBIT_LAYOUT_BLOCKED = 1
} lowra_lowbit_layout;

#define LOWRA_LOWBIT_BLOCK_ROWS 8

/* One quantized linear layer, as pointers into the caller's buffers (the kernels only read them). */
typedef struct lowra_lowbit_layer {
  int64_t out_features;
  int64_t in_features;
  int64_t group_size;         /* inputs per absmax group; 0 = no groups, no scales */
  const uint8_t* widths;      /* [out_features], each 1, 2 or 4 */
  const uint8_t* codes;       /* rows concatenated, ceil(in * w_r / 8) bytes each, after lowra_lowbit_repack */
  const uint16_t* codebooks;  /* float16 bits, 2^w_r levels per row, rows concatenated */
  const uint16_t* scales;     /* float16 bits [out_features, ceil(in / group_size)]; unused (may be NULL) if 0 */
  int64_t layout;             /* a lowra_lowbit_layout: how `codes` is ordered */
} lowra_lowbit_layer;

/* Rewrite the file's codes (rows concatenated) in place into the kernels' layout; call exactly once per buffer.
 * 2-bit rows: in every byte, code bits 0 (b0) of its four elements move to bits 0..3 and code bits 1 (b1) to bits
 * 4..7, so each nibble indexes the 16-entry tables of its four inputs directly. */
int lowra_lowbit_repack(int64_t out_features, int64_t in_features, const uint8_t* widths, uint8_t* codes);

/* Copy codes in the ROWS layout (after lowra_lowbit_repack) to `blocked` (the same size) in the BLOCKED layout. */
int lowra_lowbit_block(int64_t out_features, int64_t in_features, const uint8_t* widths, const uint8_t* rows,
                       uint8_t* blocked);

/* y[out_features] = W x[in_features] (float32, accumulated in float32). */
int lowra_lowbit_gemv(const lowra_lowbit_layer* layer, const float* x, float* y, int threads, int isa);

/* y[n_tokens, out_features] = x[n_tokens, in_features] W^T: rows decoded a tile at a time into a small float buffer
 * that every token of the block reuses (a blocked GEMM), so the decode cost is shared by the whole prompt. */
int lowra_lowbit_gemm(const lowra_lowbit_layer* layer, const float* x, int64_t n_tokens, float* y, int threads,
                      int isa);

/* A plan: the structure of a layer's products (row offsets, task lists), which depends on its shape, group size,
 * layout and widths only, computed once instead of on every call (a decode step multiplies by the same layers every
 * token). It copies the widths and keeps no pointer into the layer; each call passes the layer's buffers again, and a
 * layer whose structure differs from the plan's is refused (LOWRA_LOWBIT_PLAN_MISMATCH). A plan is read-only once
 * made: several threads may use it at once. */
typedef struct lowra_lowbit_plan lowra_lowbit_plan;

int lowra_lowbit_plan_create(const lowra_lowbit_layer* layer, lowra_lowbit_plan** plan);
void lowra_lowbit_plan_destroy(lowra_lowbit_plan* plan); /* NULL is a no-op */
/* lowra_lowbit_gemv / lowra_lowbit_gemm with a plan made for this layer's structure: the same results, bit for bit. */
int lowra_lowbit_plan_gemv(const lowra_lowbit_plan* plan, const lowra_lowbit_layer* layer, const float* x, float* y,
                           int threads, int isa);
int lowra_lowbit_plan_gemm(const lowra_lowbit_plan* plan, const lowra_lowbit_layer* layer, const float* x,
                           int64_t n_tokens, float* y, int threads, int isa);

/* y[n_tokens, out_features] = x[n_tokens, in_features] W^T for a dense float16 weight W [out_features, in_features]
 * (a model's tied embedding / output head, stored once in float16): each row is converted to float32 in registers
 * while it is multiplied, never expanded in memory; accumulated in float32. Each row's sum has a fixed order, so
 * results do not depend on the thread count. */
int lowra_f16_gemm(const uint16_t* weight, int64_t out_features, int64_t in_features, const float* x, int64_t n_tokens,
                   float* y, int threads, int isa);
/* y[n_tokens, out_features] = x[n_tokens, in_features] W^T for 8-bit rows W = codes * scale per block of 32
 * (device_runtime/formats/int8_rows.py: int8 codes [out, in], float16 scales [out, in / 32]; in_features a multiple
 * of 32): a model's embedding / output head in 8 bits. Codes are converted in registers; accumulated in float32 in a
 * fixed order per row (scalar and AVX2 give the same bits, for any thread count). */
int lowra_q8_gemm(const int8_t* weight, const uint16_t* scales, int64_t out_features, int64_t in_features,
                  const float* x, int64_t n_tokens, float* y, int threads, int isa);

/* y[t] += up (down x[t]) for each of n_tokens tokens: a user's low-rank side branch beside a base product, with
 * float32 factors down [rank, in_features] and up [out_features, rank] (row-major). down x[t] is summed in 8 lanes
 * (input j in lane j % 8, fused multiply-adds in input order, the lanes added as the float16 GEMM adds them), each
 * output's rank products in rank order; scalar and AVX2 give the same bits. A token whose down x[t] is all zeros
 * (no user loaded: zero factors) leaves y[t] as it is and up is not read. Up to two threads (the dots, then the
 * outputs, split between them) where rank x (in + out) >= 4096; the bits do not depend on the count. */
int lowra_lowrank_add(const float* down, const float* up, int64_t rank, int64_t in_features, int64_t out_features,
                      const float* x, int64_t n_tokens, float* y, int threads, int isa);
/* lowra_lowrank_add with float16 factors (uint16_t bits): each value converted exactly, so factors that are float16
 * values give the bits of the float32 call. */
int lowra_lowrank_add_f16(const uint16_t* down, const uint16_t* up, int64_t rank, int64_t in_features,
                          int64_t out_features, const float* x, int64_t n_tokens, float* y, int threads, int isa);

/* lowra_lowrank_add with the factors as 4-bit codes (a user's blob channels, each widened to a 4-bit slot): down row k
 * = float(down_books[16 k + code]) with code j of the row in byte j / 2 of down_codes row k (ceil(in / 2) bytes; low
 * nibble for even j), up column k likewise (up_codes row k: ceil(out / 2) bytes, up_books row k). The same order of
 * sums as lowra_lowrank_add (so the same bits as the decoded factors there); a token whose down x is zero leaves y. */
int lowra_lowrank4_add(const uint8_t* down_codes, const uint16_t* down_books, const uint8_t* up_codes,
                       const uint16_t* up_books, int64_t rank, int64_t in_features, int64_t out_features,
                       const float* x, int64_t n_tokens, float* y, int threads, int isa);

/* out [batch, queries, heads, dim] = softmax(scale q k^T + mask) v for q [batch, heads, queries, dim] and k = v
 * [batch, kv_heads, keys, dim] (heads a multiple of kv_heads: head h reads kv head h / (heads / kv_heads)), all
 * float32, read where they are (a program's KV cache). Mask, at most one of: mask_keep (bytes, 0 = masked) or
 * mask_add (float32, added to the scores; -inf = masked), indexed [b * mask_batch_stride + h * mask_head_stride +
 * i * keys + j] (stride 0 broadcasts); with neither, causal (key j > query i masked) when `causal` is nonzero.
 * Masked keys are skipped; a query with every key masked gets zeros. Each query's scores are dots in 8 lanes (as
 * lowra_lowrank_add's), exp in float32, the weighted sum fused in key order: scalar and AVX2 give the same bits, for
 * any thread count (work is split over (batch, head, query) triples). */
int lowra_attention(const float* q, const float* k, const float* v, int64_t batch, int64_t heads, int64_t queries,
                    int64_t dim, int64_t kv_heads, int64_t keys, const uint8_t* mask_keep, const float* mask_add,
                    int64_t mask_batch_stride, int64_t mask_head_stride, int causal, float scale, float* out,
                    int threads, int isa);

/* 1 when lowra_lowbit_gemv/gemm accept this isa on this CPU (AUTO and SCALAR always do), else 0. */
int lowra_lowbit_isa_available(int isa);

/* A static, human-readable name for a status code ("ok", "invalid argument", ...). */
const char* lowra_lowbit_status_name(int status);

#ifdef __cplusplus
}
#endif

#endif /* LOWRA_LOWBIT_GEMV_H */
