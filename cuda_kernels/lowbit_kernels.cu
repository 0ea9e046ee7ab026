// lowra CUDA kernels: quantize (codes + scales), dequantize, batch-1 GEMV, and fused low-bit GEMMs (forward and input
// gradient) that decode the weight tile by tile into shared memory. No torch headers here (see lowbit_kernels.cuh).
//
// Exactness contract (tests/cuda_kernels, bench/gpu_check.py): quantize codes/scales and float32 dequantize equal the
// CPU reference bit for bit (one IEEE float32 multiply / divide / compare each, no fast-math); the matmuls accumulate
// in float32 and agree within the tolerances stated in the tests.
#include "lowbit_kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

namespace lowra_cuda {
namespace {

// ------------------------------------------------------------------------------------------------ element helpers
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ const __half* books_of(const LowBitWeight& w) {
  return static_cast<const __half*>(w.codebooks);
}
__device__ __forceinline__ const __half* scales_of(const LowBitWeight& w) {
  return static_cast<const __half*>(w.scales);
}

__device__ __forceinline__ int64_t row_bytes_of(int64_t in_features, int width) {
  return (in_features * width + 7) / 8;
}

// Eight consecutive weights W[r, j0 .. j0 + 8) (j0 % 8 == 0) as float32: the `width` bytes holding their codes are
// read once, each code looked up in the row's float16 codebook and scaled. Elements past in_features decode to 0.
__device__ __forceinline__ void decode8(const LowBitWeight& w, int64_t r, int width, int64_t j0, float v[8]) {
  const uint8_t* row = w.codes + w.row_code_offsets[r];
  const __half* book = books_of(w) + w.row_level_offsets[r];
  const int64_t nbytes = row_bytes_of(w.in_features, width);
  const int64_t b0 = (j0 >> 3) * width;
  uint32_t bits = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (i < width && b0 + i < nbytes) bits |= uint32_t(__ldg(row + b0 + i)) << (8 * i);
  }
  const uint32_t mask = (1u << width) - 1u;
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const int64_t j = j0 + e;
    float value = 0.f;
    if (j < w.in_features) {
      value = __half2float(book[(bits >> (e * width)) & mask]);
      if (w.group_size > 0) value *= __half2float(scales_of(w)[r * w.n_groups + j / w.group_size]);
    }
    v[e] = value;
  }
}

// ------------------------------------------------------------------------------------------------ dequantize
// One block per row (a slice of 1024 columns per blockIdx.y), 8 outputs per thread (one 16- or 32-byte store).
// Codebook and scale reads hit L1 (a row's codebook is at most 32 bytes); the kernel is bound by its output writes.
constexpr int kDequantThreads = 128;

template <typename OutT>
__global__ void __launch_bounds__(kDequantThreads)
    dequantize_kernel(LowBitWeight w, int64_t row_begin, OutT* __restrict__ out, bool vector_store) {
  const int64_t local_row = blockIdx.x;
  const int64_t r = row_begin + local_row;
  const int width = w.widths[r];
  const int64_t K = w.in_features;
  const int64_t j0 = (int64_t(blockIdx.y) * kDequantThreads + threadIdx.x) * 8;
  if (j0 >= K) return;
  float v[8];
  decode8(w, r, width, j0, v);
  OutT* dst = out + local_row * K + j0;
  if (vector_store && j0 + 8 <= K) {
    if constexpr (sizeof(OutT) == 4) {
      reinterpret_cast<float4*>(dst)[0] = make_float4(v[0], v[1], v[2], v[3]);
      reinterpret_cast<float4*>(dst)[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
      __align__(16) OutT packed[8];  // read back as one uint4: must be 16-byte aligned
#pragma unroll
      for (int e = 0; e < 8; ++e) packed[e] = from_float<OutT>(v[e]);
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(packed);
    }
  } else {
    for (int e = 0; e < 8 && j0 + e < K; ++e) dst[e] = from_float<OutT>(v[e]);
  }
}

// ------------------------------------------------------------------------------------------------ GEMV (batch 1)
// Lane l of every warp owns the input slice [l * S, (l + 1) * S) (S a multiple of 32): the packed bytes of a row
// for that slice are contiguous, so a warp streams a row with coalesced loads. x is staged once per block in shared
// memory as float, with a one-float pad per lane slice (stride S + 1) so the 32 lanes reading "their" element t hit
// 32 different banks. Each warp owns up to kMaxRowsPerWarp rows and walks the slice in 32-element chunks: a chunk of
// x is read into registers once and used for all of the warp's rows, so shared memory serves the codebook lookups
// (2- and 4-bit rows) and little else. 1-bit rows need no lookup at all:
//   sum_j level[c_j] x_j = level0 * sum_j x_j + (level1 - level0) * sum_{j: c_j = 1} x_j.
constexpr int kGemvWarps = 8;
constexpr int kMaxRowsPerWarp = 4;

template <int W>
__device__ __forceinline__ void load_code_chunk(const uint8_t* row, int64_t byte_off, int64_t nbytes,
                                                uint32_t words[W]) {
  const uint8_t* p = row + byte_off;
  const bool fast = byte_off + 4 * W <= nbytes && (reinterpret_cast<uintptr_t>(p) % (4 * W)) == 0;
  if (fast) {
    if constexpr (W == 1) {
      words[0] = __ldg(reinterpret_cast<const unsigned int*>(p));
    } else if constexpr (W == 2) {
      const uint2 q = __ldg(reinterpret_cast<const uint2*>(p));
      words[0] = q.x;
      words[1] = q.y;
    } else {
      const uint4 q = __ldg(reinterpret_cast<const uint4*>(p));
      words[0] = q.x;
      words[1] = q.y;
      words[2] = q.z;
      words[3] = q.w;
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < W; ++i) words[i] = 0;
  for (int i = 0; i < 4 * W; ++i) {
    if (byte_off + i < nbytes) words[i >> 2] |= uint32_t(p[i]) << (8 * (i & 3));
  }
}

template <int W>
__device__ __forceinline__ float dot_lookup(const uint32_t words[W], const float* book, const float xr[32]) {
  constexpr uint32_t mask = (1u << W) - 1u;
  float part = 0.f;
#pragma unroll
  for (int e = 0; e < 32; ++e) {
    const int bit = e * W;
    part += book[(words[bit >> 5] >> (bit & 31)) & mask] * xr[e];
  }
  return part;
}

__device__ __forceinline__ float dot_1bit(uint32_t word, float level0, float level1, const float xr[32], float xsum) {
  float ones = 0.f;
#pragma unroll
  for (int e = 0; e < 32; ++e) ones += ((word >> e) & 1u) ? xr[e] : 0.f;
  return level0 * xsum + (level1 - level0) * ones;
}

__device__ __forceinline__ float load_as_float(const void* p, int64_t i, Dtype dtype) {
  switch (dtype) {
    case Dtype::kFloat16:
      return __half2float(static_cast<const __half*>(p)[i]);
    case Dtype::kBFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_from_float(void* p, int64_t i, float v, Dtype dtype) {
  switch (dtype) {
    case Dtype::kFloat16:
      static_cast<__half*>(p)[i] = __float2half_rn(v);
      break;
    case Dtype::kBFloat16:
      static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
      break;
    default:
      static_cast<float*>(p)[i] = v;
  }
}

// One kernel for every activation dtype (converted while staging x and when writing y): the unrolled body is large
// and three instantiations tripled the build. Rows need group_size == 0 or a multiple of 32 (one scale per
// 32-element chunk); the launcher refuses other group sizes and the caller uses a GEMM path.
__global__ void __launch_bounds__(kGemvWarps * 32)
    gemv_kernel(LowBitWeight w, const void* __restrict__ x, const void* __restrict__ bias, void* __restrict__ y,
                Dtype dtype, int slice, int rows_per_warp) {
  extern __shared__ float xs[];  // [32][slice + 1]
  __shared__ float books[kGemvWarps][kMaxRowsPerWarp][16];
  const int64_t K = w.in_features, N = w.out_features;
  const int stride = slice + 1;
  for (int i = threadIdx.x; i < 32 * slice; i += blockDim.x) {
    const int lane_of = i / slice;
    const int t = i - lane_of * slice;
    xs[lane_of * stride + t] = i < K ? load_as_float(x, i, dtype) : 0.f;
  }
  __syncthreads();  // the only block-wide barrier: warps may leave early below
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t first = (int64_t(blockIdx.x) * kGemvWarps + warp) * rows_per_warp;
  const int64_t remaining = N - first;
  const int nrows = remaining <= 0 ? 0 : static_cast<int>(remaining < rows_per_warp ? remaining : int64_t(rows_per_warp));
  if (nrows == 0) return;

  int width[kMaxRowsPerWarp];
  const uint8_t* row[kMaxRowsPerWarp];
  float level0[kMaxRowsPerWarp], level1[kMaxRowsPerWarp], acc[kMaxRowsPerWarp];
#pragma unroll
  for (int k = 0; k < kMaxRowsPerWarp; ++k) {
    width[k] = 0;
    row[k] = nullptr;
    level0[k] = level1[k] = acc[k] = 0.f;
    if (k < nrows) {
      const int64_t r = first + k;
      width[k] = w.widths[r];
      row[k] = w.codes + w.row_code_offsets[r];
      const __half* book = books_of(w) + w.row_level_offsets[r];
      if (lane < (1 << width[k])) books[warp][k][lane] = __half2float(book[lane]);
      level0[k] = __half2float(book[0]);
      level1[k] = __half2float(book[1]);
    }
  }
  __syncwarp();

  const float* xl = xs + lane * stride;
  const int64_t lane_j0 = int64_t(lane) * slice;
  for (int t = 0; t < slice && lane_j0 + t < K; t += 32) {  // lane-dependent bound: no warp collectives inside
    float xr[32];
    float xsum = 0.f;
#pragma unroll
    for (int e = 0; e < 32; ++e) {
      xr[e] = xl[t + e];
      xsum += xr[e];
    }
    const int64_t j0 = lane_j0 + t;
#pragma unroll
    for (int k = 0; k < kMaxRowsPerWarp; ++k) {
      if (k < nrows) {
        const int64_t r = first + k;
        const float* book = books[warp][k];
        const int64_t nbytes = row_bytes_of(K, width[k]);
        const int64_t byte_off = j0 / 8 * width[k];
        float part;
        if (width[k] == 1) {
          uint32_t words[1];
          load_code_chunk<1>(row[k], byte_off, nbytes, words);
          part = dot_1bit(words[0], level0[k], level1[k], xr, xsum);
        } else if (width[k] == 2) {
          uint32_t words[2];
          load_code_chunk<2>(row[k], byte_off, nbytes, words);
          part = dot_lookup<2>(words, book, xr);
        } else {
          uint32_t words[4];
          load_code_chunk<4>(row[k], byte_off, nbytes, words);
          part = dot_lookup<4>(words, book, xr);
        }
        if (w.group_size > 0) part *= __half2float(scales_of(w)[r * w.n_groups + j0 / w.group_size]);
        acc[k] += part;
      }
    }
  }
#pragma unroll
  for (int k = 0; k < kMaxRowsPerWarp; ++k) {
    if (k < nrows) {  // warp-uniform
      float v = acc[k];
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
      if (lane == 0) {
        const int64_t r = first + k;
        if (bias != nullptr) v += load_as_float(bias, r, dtype);
        store_from_float(y, r, v, dtype);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------ fused GEMMs
// Block tile 128 (activation rows) x 64 (weight rows or input features), 8 warps in a 4 x 2 grid, each warp 32x32 =
// 2x2 WMMA 16x16x16 fragments with float32 accumulators. The weight tile is decoded from the packed codes straight
// into shared memory in the activation dtype: deq(W) never exists in global memory. Every block decodes its weight
// tile once per M tile, so the tall M tile halves the decode work per multiply-add compared with 64x64 (by count,
// decoding is as costly as the tensor-core work at 64 rows). Single-buffered; a cp.async pipeline is the next step
// once the device check shows where the time goes.
constexpr int kBlockM = 128;
constexpr int kBlockN = 64;
constexpr int kStep = 32;
constexpr int kPad = 8;  // keeps WMMA row strides a multiple of 16 bytes and spreads banks
constexpr int kGemmThreads = 256;
constexpr int kEpiloguePad = 4;

// Rows [row0, row0 + 128) x cols [col0, col0 + 32) of a row-major [rows, cols] activation matrix into dst[128][40];
// zero outside the matrix.
template <typename T>
__device__ __forceinline__ void load_activation_tile(const T* __restrict__ src, int64_t rows, int64_t cols,
                                                     int64_t row0, int64_t col0, T (*dst)[kStep + kPad],
                                                     bool vector_ok) {
  for (int v = threadIdx.x; v < kBlockM * (kStep / 8); v += kGemmThreads) {
    const int rr = v / (kStep / 8);
    const int cc = (v % (kStep / 8)) * 8;
    const int64_t gr = row0 + rr;
    const int64_t gc = col0 + cc;
    if (vector_ok && gr < rows && gc + 8 <= cols) {
      *reinterpret_cast<uint4*>(&dst[rr][cc]) = __ldg(reinterpret_cast<const uint4*>(src + gr * cols + gc));
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        dst[rr][cc + e] = (gr < rows && gc + e < cols) ? src[gr * cols + gc + e] : from_float<T>(0.f);
      }
    }
  }
}

template <typename T>
__device__ __forceinline__ void store8(T* dst, const float v[8]) {
  __align__(16) T packed[8];  // read back as one uint4: must be 16-byte aligned
#pragma unroll
  for (int e = 0; e < 8; ++e) packed[e] = from_float<T>(v[e]);
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(packed);
}

// Writes a warp's 32x32 accumulator block at (row0, col0) of out[rows, cols] (+ bias[col] when given) through a
// per-warp 16x16 float staging tile: no block-wide shared buffer (it would not fit next to the operand tiles).
template <typename T>
__device__ __forceinline__ void store_warp_tile(
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> (&acc)[2][2],
    float (*stage)[16 + kEpiloguePad], T* __restrict__ out, int64_t rows, int64_t cols, int64_t row0, int64_t col0,
    const T* __restrict__ bias) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      nvcuda::wmma::store_matrix_sync(&stage[0][0], acc[i][j], 16 + kEpiloguePad, nvcuda::wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int rr = e >> 4, cc = e & 15;
        const int64_t r = row0 + 16 * i + rr, c = col0 + 16 * j + cc;
        if (r < rows && c < cols) {
          float value = stage[rr][cc];
          if (bias != nullptr) value += to_float(bias[c]);
          out[r * cols + c] = from_float<T>(value);
        }
      }
      __syncwarp();  // the next fragment overwrites the staging tile
    }
  }
}

// y[M, N] = x[M, K] W^T: block (n tile, m tile); B tile = W[n0 .. n0+64, k .. k+32] stored [n][k] (col-major B).
template <typename T>
__global__ void __launch_bounds__(kGemmThreads)
    gemm_forward_kernel(LowBitWeight w, const T* __restrict__ x, int64_t M, const T* __restrict__ bias,
                        T* __restrict__ y, bool vector_ok) {
  using namespace nvcuda;
  __shared__ __align__(128) T a_tile[kBlockM][kStep + kPad];
  __shared__ __align__(128) T b_tile[kBlockN][kStep + kPad];
  __shared__ __align__(128) float stage[kGemmThreads / 32][16][16 + kEpiloguePad];
  const int64_t N = w.out_features, K = w.in_features;
  const int64_t n0 = int64_t(blockIdx.x) * kBlockN, m0 = int64_t(blockIdx.y) * kBlockM;
  const int warp = threadIdx.x >> 5;
  const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  for (int64_t k0 = 0; k0 < K; k0 += kStep) {
    load_activation_tile<T>(x, M, K, m0, k0, a_tile, vector_ok);
    for (int s = threadIdx.x; s < kBlockN * (kStep / 8); s += kGemmThreads) {
      const int rr = s / (kStep / 8);
      const int cc = (s % (kStep / 8)) * 8;
      const int64_t r = n0 + rr;
      float v[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      if (r < N) decode8(w, r, w.widths[r], k0 + cc, v);
      store8<T>(&b_tile[rr][cc], v);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kStep; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], &a_tile[wm + 16 * i][kk], kStep + kPad);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], &b_tile[wn + 16 * j][kk], kStep + kPad);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
  store_warp_tile<T>(acc, stage[warp], y, M, N, m0 + wm, n0 + wn, bias);
}

// grad_in[M, K] = grad_out[M, N] W: block (k tile, m tile), reduction over n in steps of 32;
// B tile = W[n .. n+32, k0 .. k0+64] stored [n][k] (row-major B).
template <typename T>
__global__ void __launch_bounds__(kGemmThreads)
    gemm_grad_input_kernel(LowBitWeight w, const T* __restrict__ grad_out, int64_t M, T* __restrict__ grad_in,
                           bool vector_ok) {
  using namespace nvcuda;
  __shared__ __align__(128) T a_tile[kBlockM][kStep + kPad];
  __shared__ __align__(128) T b_tile[kStep][kBlockN + kPad];
  __shared__ __align__(128) float stage[kGemmThreads / 32][16][16 + kEpiloguePad];
  const int64_t N = w.out_features, K = w.in_features;
  const int64_t k0 = int64_t(blockIdx.x) * kBlockN, m0 = int64_t(blockIdx.y) * kBlockM;
  const int warp = threadIdx.x >> 5;
  const int wm = (warp >> 1) * 32, wk = (warp & 1) * 32;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  for (int64_t n0 = 0; n0 < N; n0 += kStep) {
    load_activation_tile<T>(grad_out, M, N, m0, n0, a_tile, vector_ok);
    for (int s = threadIdx.x; s < kStep * (kBlockN / 8); s += kGemmThreads) {
      const int rr = s / (kBlockN / 8);
      const int cc = (s % (kBlockN / 8)) * 8;
      const int64_t r = n0 + rr;
      float v[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      if (r < N) decode8(w, r, w.widths[r], k0 + cc, v);
      store8<T>(&b_tile[rr][cc], v);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kStep; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], &a_tile[wm + 16 * i][kk], kStep + kPad);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], &b_tile[kk][wk + 16 * j], kBlockN + kPad);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
  store_warp_tile<T>(acc, stage[warp], grad_in, M, K, m0 + wm, k0 + wk, static_cast<const T*>(nullptr));
}

// ------------------------------------------------------------------------------------------------ quantize
// One block per row: absmax per group (one warp per group) -> float16 scale; then one thread per packed byte
// computes value / scale and counts the row's level midpoints strictly below it (ties go to the lower level,
// like torch.searchsorted(right=False) in the reference).
constexpr int kQuantThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kQuantThreads)
    quantize_codes_kernel(LowBitWeight w, const T* __restrict__ weight, uint8_t* __restrict__ codes,
                          __half* __restrict__ scales) {
  __shared__ float thresholds[15];
  const int64_t r = blockIdx.x;
  const int64_t K = w.in_features;
  const int width = w.widths[r];
  const int levels = 1 << width;
  const T* src = weight + r * K;
  const __half* book = books_of(w) + w.row_level_offsets[r];
  if (threadIdx.x < levels - 1) {
    thresholds[threadIdx.x] = (__half2float(book[threadIdx.x]) + __half2float(book[threadIdx.x + 1])) * 0.5f;
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (w.group_size > 0) {
    for (int64_t g = warp; g < w.n_groups; g += kQuantThreads / 32) {
      float m = 0.f;
      const int64_t end = min((g + 1) * w.group_size, K);
      for (int64_t j = g * w.group_size + lane; j < end; j += 32) m = fmaxf(m, fabsf(to_float(src[j])));
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
      if (lane == 0) scales[r * w.n_groups + g] = __float2half_rn(m);
    }
  }
  __syncthreads();  // thresholds and this row's scales (global writes of this block) are visible from here on
  const int64_t nbytes = row_bytes_of(K, width);
  const int per_byte = 8 / width;
  uint8_t* dst = codes + w.row_code_offsets[r];
  for (int64_t b = threadIdx.x; b < nbytes; b += kQuantThreads) {
    uint32_t byte = 0;
    for (int e = 0; e < per_byte; ++e) {
      const int64_t j = b * per_byte + e;
      if (j >= K) break;
      float value = to_float(src[j]);
      if (w.group_size > 0) {
        const float s = __half2float(scales[r * w.n_groups + j / w.group_size]);
        value = s == 0.f ? 0.f : value / s;
      }
      uint32_t code = 0;
      for (int t = 0; t < levels - 1; ++t) code += thresholds[t] < value ? 1u : 0u;
      byte |= code << (e * width);
    }
    dst[b] = static_cast<uint8_t>(byte);
  }
}

// ------------------------------------------------------------------------------------------------ host helpers
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

int device_sm_count() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 80;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) return 80;
  return sms;
}

template <typename T>
cudaError_t dequantize_as(const LowBitWeight& w, int64_t row_begin, int64_t row_count, void* out, cudaStream_t s) {
  if (row_count <= 0) return cudaSuccess;
  const bool vector_store = w.in_features % 8 == 0 && aligned16(out);
  const dim3 grid(static_cast<unsigned>(row_count),
                  static_cast<unsigned>(ceil_div(w.in_features, int64_t(kDequantThreads) * 8)));
  dequantize_kernel<T><<<grid, kDequantThreads, 0, s>>>(w, row_begin, static_cast<T*>(out), vector_store);
  return cudaGetLastError();
}

cudaError_t gemv(const LowBitWeight& w, const void* x, const void* bias, void* y, Dtype dtype, cudaStream_t s) {
  if (w.group_size % 32 != 0) return cudaErrorInvalidValue;  // one scale per 32-element chunk (see gemv_kernel)
  const int64_t slice = ceil_div(ceil_div(w.in_features, 32), 32) * 32;
  const size_t smem = size_t(32) * size_t(slice + 1) * sizeof(float);
  if (smem > 48 * 1024) {
    int device = 0, limit = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (smem + sizeof(float) * kGemvWarps * kMaxRowsPerWarp * 16 > size_t(limit)) return cudaErrorInvalidValue;
    const cudaError_t err =
        cudaFuncSetAttribute(gemv_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  // About two waves of blocks: more rows per warp reuse each register chunk of x for more rows, but a layer with
  // few rows (4096) needs them spread to fill every SM.
  const int64_t per_warp = ceil_div(w.out_features, int64_t(kGemvWarps) * 2 * device_sm_count());
  const int rows_per_warp = static_cast<int>(per_warp < 1 ? 1 : (per_warp > kMaxRowsPerWarp ? kMaxRowsPerWarp : per_warp));
  const int64_t blocks = ceil_div(w.out_features, int64_t(kGemvWarps) * rows_per_warp);
  gemv_kernel<<<static_cast<unsigned>(blocks), kGemvWarps * 32, smem, s>>>(w, x, bias, y, dtype,
                                                                          static_cast<int>(slice), rows_per_warp);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_dequantize(const LowBitWeight& w, int64_t row_begin, int64_t row_count, void* out, Dtype out_dtype,
                              cudaStream_t stream) {
  switch (out_dtype) {
    case Dtype::kFloat32:
      return dequantize_as<float>(w, row_begin, row_count, out, stream);
    case Dtype::kFloat16:
      return dequantize_as<__half>(w, row_begin, row_count, out, stream);
    case Dtype::kBFloat16:
      return dequantize_as<__nv_bfloat16>(w, row_begin, row_count, out, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_lowbit_gemv(const LowBitWeight& w, const void* x, const void* bias, void* y, Dtype dtype,
                               cudaStream_t stream) {
  return gemv(w, x, bias, y, dtype, stream);
}

cudaError_t launch_lowbit_gemm(const LowBitWeight& w, const void* x, int64_t m, const void* bias, void* y, Dtype dtype,
                               cudaStream_t stream) {
  if (m <= 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(ceil_div(w.out_features, kBlockN)), static_cast<unsigned>(ceil_div(m, kBlockM)));
  const bool vector_ok = w.in_features % 8 == 0 && aligned16(x);
  if (dtype == Dtype::kFloat16) {
    gemm_forward_kernel<__half><<<grid, kGemmThreads, 0, stream>>>(
        w, static_cast<const __half*>(x), m, static_cast<const __half*>(bias), static_cast<__half*>(y), vector_ok);
  } else if (dtype == Dtype::kBFloat16) {
    gemm_forward_kernel<__nv_bfloat16><<<grid, kGemmThreads, 0, stream>>>(
        w, static_cast<const __nv_bfloat16*>(x), m, static_cast<const __nv_bfloat16*>(bias),
        static_cast<__nv_bfloat16*>(y), vector_ok);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launch_lowbit_gemm_grad_input(const LowBitWeight& w, const void* grad_out, int64_t m, void* grad_in,
                                          Dtype dtype, cudaStream_t stream) {
  if (m <= 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(ceil_div(w.in_features, kBlockN)), static_cast<unsigned>(ceil_div(m, kBlockM)));
  const bool vector_ok = w.out_features % 8 == 0 && aligned16(grad_out);
  if (dtype == Dtype::kFloat16) {
    gemm_grad_input_kernel<__half><<<grid, kGemmThreads, 0, stream>>>(
        w, static_cast<const __half*>(grad_out), m, static_cast<__half*>(grad_in), vector_ok);
  } else if (dtype == Dtype::kBFloat16) {
    gemm_grad_input_kernel<__nv_bfloat16><<<grid, kGemmThreads, 0, stream>>>(
        w, static_cast<const __nv_bfloat16*>(grad_out), m, static_cast<__nv_bfloat16*>(grad_in), vector_ok);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launch_quantize_codes(const LowBitWeight& w, const void* weight, Dtype weight_dtype, uint8_t* codes,
                                  void* scales, cudaStream_t stream) {
  if (w.out_features <= 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(w.out_features);
  __half* out_scales = static_cast<__half*>(scales);
  switch (weight_dtype) {
    case Dtype::kFloat32:
      quantize_codes_kernel<float><<<grid, kQuantThreads, 0, stream>>>(w, static_cast<const float*>(weight), codes,
                                                                        out_scales);
      break;
    case Dtype::kFloat16:
      quantize_codes_kernel<__half><<<grid, kQuantThreads, 0, stream>>>(w, static_cast<const __half*>(weight), codes,
                                                                         out_scales);
      break;
    case Dtype::kBFloat16:
      quantize_codes_kernel<__nv_bfloat16><<<grid, kQuantThreads, 0, stream>>>(
          w, static_cast<const __nv_bfloat16*>(weight), codes, out_scales);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace lowra_cuda
