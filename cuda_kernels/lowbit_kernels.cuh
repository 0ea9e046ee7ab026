// lowra CUDA kernels: launch API shared by lowbit_kernels.cu (pure CUDA, no torch headers) and the torch binding
// lowbit_ops.cpp. Kept torch-free so nvcc compile-checks the kernels on machines whose torch has no CUDA (CI).
//
// Layout (lowra.device_runtime.quantized_weight, the spec): per output row r a width w_r in {1, 2, 4}; the codes of
// row r are packed LSB-first along the input dimension in ceil(in * w_r / 8) bytes starting at row_code_offsets[r];
// its 2**w_r float16 levels start at row_level_offsets[r]; scales are float16 [out, ceil(in / group_size)] (none when
// group_size == 0).  W[r, j] = float(codebook_r[code[r, j]]) * float(scale[r, j / group_size]).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace lowra_cuda {

// Element types of activations / outputs; codebooks and scales are always float16 (the format).
enum class Dtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct LowBitWeight {
  const uint8_t* codes;
  const void* codebooks;  // float16 (__half), bit-cast
  const void* scales;     // float16 [out, n_groups], or unused when group_size == 0
  const uint8_t* widths;
  const int64_t* row_code_offsets;
  const int64_t* row_level_offsets;
  int64_t out_features;
  int64_t in_features;
  int64_t group_size;
  int64_t n_groups;
};

// out[i, :] = W[row_begin + i, :] for i < row_count, as out_dtype (float32 bit-exact with the numpy reference).
cudaError_t launch_dequantize(const LowBitWeight& w, int64_t row_begin, int64_t row_count, void* out, Dtype out_dtype,
                              cudaStream_t stream);

// y[N] = W x[K] (+ bias), one input vector (batch-1 generation). Activations, bias and y share `dtype`.
// Returns cudaErrorInvalidValue (nothing launched; the caller falls back to a GEMM path) when in_features needs more
// shared memory than the device allows or group_size is not 0 or a multiple of 32.
cudaError_t launch_lowbit_gemv(const LowBitWeight& w, const void* x, const void* bias, void* y, Dtype dtype,
                               cudaStream_t stream);

// y[M, N] = x[M, K] W^T (+ bias), W decoded tile by tile into shared memory (never whole in global memory).
// Tensor cores (WMMA, fp32 accumulate): dtype must be kFloat16 or kBFloat16 (cudaErrorInvalidValue otherwise).
cudaError_t launch_lowbit_gemm(const LowBitWeight& w, const void* x, int64_t m, const void* bias, void* y, Dtype dtype,
                               cudaStream_t stream);

// grad_in[M, K] = grad_out[M, N] W, the input gradient of the layer above, fused the same way (kFloat16/kBFloat16).
cudaError_t launch_lowbit_gemm_grad_input(const LowBitWeight& w, const void* grad_out, int64_t m, void* grad_in,
                                          Dtype dtype, cudaStream_t stream);

// The inverse of the decode for given codebooks: per group absmax -> float16 scale (when group_size > 0), value /
// scale in float32, code = number of the row's level midpoints strictly below the value, packed LSB-first.
// Writes codes (row_code_offsets[out] bytes) and scales (float16 [out, n_groups]); w.codes / w.scales are ignored.
cudaError_t launch_quantize_codes(const LowBitWeight& w, const void* weight, Dtype weight_dtype, uint8_t* codes,
                                  void* scales, cudaStream_t stream);

}  // namespace lowra_cuda
