// Torch binding: CUDA implementations of the lowra:: ops whose schemas, fake kernels and CPU references live in
// lowra/sdk/quant/ops.py (defined once there; this file only registers TORCH_LIBRARY_IMPL(lowra, CUDA)).
//
// Matmul strategy (env LOWRA_CUDA_MATMUL, read per call so a benchmark can A/B in one process):
//   "auto"    (default) batch 1 -> GEMV kernel; larger batches and every input gradient -> "chunked". Chosen from the
//             H200 device check (docs/CUDA_KERNELS.md): at 512 tokens on 11008x4096 the chunked path ran 5.3x
//             faster than the fused kernel, and a 7B-shaped LoRA step 0.90x bf16's time against 1.16x fused.
//   "fused"   batch 1 -> GEMV kernel; float16/bfloat16 -> fused WMMA kernels (weight decoded per tile in shared
//             memory); float32 -> "chunked" (no fp32 tensor-core kernel here).
//   "chunked" decode at most kChunkBytes of rows at a time into a scratch buffer and multiply with cuBLAS (torch's
//             mm): the whole weight never exists at once, but a chunk does in global memory. Batch 1 too.
#include <torch/library.h>

// Per-op ATen headers instead of <ATen/ATen.h>: the same API, a third of the parse time (the CI syntax check).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "lowbit_kernels.cuh"

namespace {

using lowra_cuda::Dtype;
using lowra_cuda::LowBitWeight;

// Scratch for one decoded chunk in the "chunked" strategy: big enough that every LLaMA-7B layer decodes in one or two
// chunks, small next to the activations of a training step.
constexpr int64_t kChunkBytes = int64_t(128) << 20;

Dtype dtype_of(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return Dtype::kFloat32;
    case at::kHalf:
      return Dtype::kFloat16;
    case at::kBFloat16:
      return Dtype::kBFloat16;
    default:
      TORCH_CHECK(false, "lowra CUDA kernels: ", what, " is ", t.scalar_type(),
                  "; expected float32, float16 or bfloat16");
  }
  return Dtype::kFloat32;
}

void check_cuda_ok(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "lowra CUDA kernel ", what, " failed: ", cudaGetErrorString(err));
}

void check_buffer(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim, const at::Device& device) {
  TORCH_CHECK(t.scalar_type() == dtype && t.dim() == dim, "lowra CUDA kernels: low-bit buffer ", name, " is ",
              t.scalar_type(), " with ", t.dim(), " dims; expected ", dtype, " with ", dim,
              " (build the buffers with LowBitLinear.from_quantized)");
  TORCH_CHECK(t.device() == device, "lowra CUDA kernels: low-bit buffer ", name, " is on ", t.device(),
              "; expected every tensor on ", device);
}

// Validated, contiguous views of the packed buffers; keeps the contiguous copies alive while kernels run.
struct Buffers {
  at::Tensor codes, codebooks, scales, widths, code_offsets, level_offsets;
  LowBitWeight weight{};
};

Buffers make_buffers(const at::Tensor& codes, const at::Tensor& codebooks, const at::Tensor& scales,
                     const at::Tensor& widths, const at::Tensor& row_code_offsets,
                     const at::Tensor& row_level_offsets, int64_t in_features, int64_t group_size,
                     const at::Device& device) {
  check_buffer(codes, "codes", at::kByte, 1, device);
  check_buffer(codebooks, "codebooks", at::kHalf, 1, device);
  check_buffer(scales, "scales", at::kHalf, 2, device);
  check_buffer(widths, "widths", at::kByte, 1, device);
  check_buffer(row_code_offsets, "row_code_offsets", at::kLong, 1, device);
  check_buffer(row_level_offsets, "row_level_offsets", at::kLong, 1, device);
  const int64_t out_features = widths.size(0);
  TORCH_CHECK(in_features >= 1 && group_size >= 0 && out_features >= 1, "lowra CUDA kernels: out_features=",
              out_features, ", in_features=", in_features, ", group_size=", group_size,
              "; expected out_features >= 1, in_features >= 1, group_size >= 0");
  const int64_t n_groups = group_size == 0 ? 0 : (in_features + group_size - 1) / group_size;
  TORCH_CHECK(scales.size(0) == out_features && scales.size(1) == n_groups, "lowra CUDA kernels: scales are [",
              scales.size(0), ", ", scales.size(1), "]; expected [", out_features, ", ", n_groups, "]");
  TORCH_CHECK(row_code_offsets.size(0) == out_features + 1 && row_level_offsets.size(0) == out_features + 1,
              "lowra CUDA kernels: row offsets need out_features + 1 = ", out_features + 1, " entries");
  Buffers b{codes.contiguous(),   codebooks.contiguous(),        scales.contiguous(),
            widths.contiguous(),  row_code_offsets.contiguous(), row_level_offsets.contiguous()};
  b.weight.codes = b.codes.data_ptr<uint8_t>();
  b.weight.codebooks = b.codebooks.data_ptr();
  b.weight.scales = b.scales.data_ptr();
  b.weight.widths = b.widths.data_ptr<uint8_t>();
  b.weight.row_code_offsets = b.code_offsets.data_ptr<int64_t>();
  b.weight.row_level_offsets = b.level_offsets.data_ptr<int64_t>();
  b.weight.out_features = out_features;
  b.weight.in_features = in_features;
  b.weight.group_size = group_size;
  b.weight.n_groups = n_groups;
  return b;
}

enum class Strategy { kAuto, kFused, kChunked };

Strategy matmul_strategy() {
  const char* value = std::getenv("LOWRA_CUDA_MATMUL");
  if (value == nullptr || value[0] == '\0' || std::strcmp(value, "auto") == 0) return Strategy::kAuto;
  if (std::strcmp(value, "fused") == 0) return Strategy::kFused;
  TORCH_CHECK(std::strcmp(value, "chunked") == 0, "LOWRA_CUDA_MATMUL=", value,
              " is not a strategy; expected 'auto' (default), 'fused' or 'chunked'");
  return Strategy::kChunked;
}

int64_t chunk_rows(const LowBitWeight& w, at::ScalarType dtype) {
  const int64_t row_bytes = w.in_features * int64_t(at::elementSize(dtype));
  return std::max<int64_t>(1, std::min<int64_t>(w.out_features, kChunkBytes / row_bytes));
}

at::Tensor decode_rows(const LowBitWeight& w, int64_t row_begin, int64_t rows, at::ScalarType dtype,
                       const at::TensorOptions& options, cudaStream_t stream) {
  at::Tensor out = at::empty({rows, w.in_features}, options.dtype(dtype));
  check_cuda_ok(lowra_cuda::launch_dequantize(w, row_begin, rows, out.data_ptr(), dtype_of(out, "output"), stream),
                "dequantize");
  return out;
}

// ------------------------------------------------------------------------------------------------ ops
at::Tensor dequantize_cuda(const at::Tensor& codes, const at::Tensor& codebooks, const at::Tensor& scales,
                           const at::Tensor& widths, const at::Tensor& row_code_offsets,
                           const at::Tensor& row_level_offsets, int64_t in_features, int64_t group_size) {
  const c10::cuda::CUDAGuard guard(codes.device());
  Buffers b = make_buffers(codes, codebooks, scales, widths, row_code_offsets, row_level_offsets, in_features,
                           group_size, codes.device());
  return decode_rows(b.weight, 0, b.weight.out_features, at::kFloat, codes.options(),
                     c10::cuda::getCurrentCUDAStream());
}

at::Tensor lowbit_linear_cuda(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebooks,
                              const at::Tensor& scales, const at::Tensor& widths, const at::Tensor& row_code_offsets,
                              const at::Tensor& row_level_offsets, int64_t in_features, int64_t group_size,
                              const std::optional<at::Tensor>& bias) {
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, "lowbit_linear input has last dimension ",
              x.dim() ? x.size(-1) : 0, "; expected in_features = ", in_features);
  Buffers b = make_buffers(codes, codebooks, scales, widths, row_code_offsets, row_level_offsets, in_features,
                           group_size, x.device());
  const LowBitWeight& w = b.weight;
  const Dtype dtype = dtype_of(x, "lowbit_linear input");
  const at::Tensor x2d = x.reshape({-1, in_features}).contiguous();
  const int64_t m = x2d.size(0);
  at::Tensor bias_t;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.out_features, "lowbit_linear bias has shape ",
                bias->sizes(), "; expected [", w.out_features, "]");
    bias_t = bias->to(x.device(), x.scalar_type()).contiguous();
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = w.out_features;
  at::Tensor y = at::empty({m, w.out_features}, x.options());
  if (m == 0) return y.reshape(out_shape);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const void* bias_ptr = bias_t.defined() ? bias_t.data_ptr() : nullptr;
  const Strategy strategy = matmul_strategy();
  if (m == 1 && strategy != Strategy::kChunked) {
    const cudaError_t err = lowra_cuda::launch_lowbit_gemv(w, x2d.data_ptr(), bias_ptr, y.data_ptr(), dtype, stream);
    if (err == cudaSuccess) return y.reshape(out_shape);
    // cudaErrorInvalidValue: in_features too wide for the GEMV's shared memory; use a GEMM path below.
    TORCH_CHECK(err == cudaErrorInvalidValue, "lowra CUDA kernel gemv failed: ", cudaGetErrorString(err));
    (void)cudaGetLastError();
  }
  if (strategy == Strategy::kFused && dtype != Dtype::kFloat32) {
    check_cuda_ok(lowra_cuda::launch_lowbit_gemm(w, x2d.data_ptr(), m, bias_ptr, y.data_ptr(), dtype, stream),
                  "gemm");
    return y.reshape(out_shape);
  }
  const int64_t rows = chunk_rows(w, x.scalar_type());
  for (int64_t r0 = 0; r0 < w.out_features; r0 += rows) {
    const int64_t n = std::min(rows, w.out_features - r0);
    const at::Tensor chunk = decode_rows(w, r0, n, x.scalar_type(), x.options(), stream);
    if (n == w.out_features) {
      at::mm_out(y, x2d, chunk.t());
    } else {
      y.narrow(1, r0, n).copy_(at::mm(x2d, chunk.t()));
    }
  }
  if (bias_t.defined()) y.add_(bias_t);
  return y.reshape(out_shape);
}

at::Tensor lowbit_linear_grad_input_cuda(const at::Tensor& grad_out, const at::Tensor& codes,
                                         const at::Tensor& codebooks, const at::Tensor& scales,
                                         const at::Tensor& widths, const at::Tensor& row_code_offsets,
                                         const at::Tensor& row_level_offsets, int64_t in_features,
                                         int64_t group_size) {
  const c10::cuda::CUDAGuard guard(grad_out.device());
  Buffers b = make_buffers(codes, codebooks, scales, widths, row_code_offsets, row_level_offsets, in_features,
                           group_size, grad_out.device());
  const LowBitWeight& w = b.weight;
  TORCH_CHECK(grad_out.dim() >= 1 && grad_out.size(-1) == w.out_features,
              "lowbit_linear_grad_input: grad_out has last dimension ", grad_out.dim() ? grad_out.size(-1) : 0,
              "; expected out_features = ", w.out_features);
  const Dtype dtype = dtype_of(grad_out, "grad_out");
  const at::Tensor g2d = grad_out.reshape({-1, w.out_features}).contiguous();
  const int64_t m = g2d.size(0);
  std::vector<int64_t> out_shape(grad_out.sizes().begin(), grad_out.sizes().end());
  out_shape.back() = in_features;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (m == 0) return at::empty(out_shape, grad_out.options());
  if (matmul_strategy() == Strategy::kFused && dtype != Dtype::kFloat32) {
    at::Tensor gx = at::empty({m, in_features}, grad_out.options());
    check_cuda_ok(lowra_cuda::launch_lowbit_gemm_grad_input(w, g2d.data_ptr(), m, gx.data_ptr(), dtype, stream),
                  "gemm_grad_input");
    return gx.reshape(out_shape);
  }
  const int64_t rows = chunk_rows(w, grad_out.scalar_type());
  at::Tensor gx;
  for (int64_t r0 = 0; r0 < w.out_features; r0 += rows) {
    const int64_t n = std::min(rows, w.out_features - r0);
    const at::Tensor chunk = decode_rows(w, r0, n, grad_out.scalar_type(), grad_out.options(), stream);
    const at::Tensor part = g2d.narrow(1, r0, n);
    if (!gx.defined()) {
      gx = at::mm(part, chunk);
    } else {
      gx.addmm_(part, chunk);
    }
  }
  return gx.reshape(out_shape);
}

std::tuple<at::Tensor, at::Tensor> quantize_codes_cuda(const at::Tensor& weight, const at::Tensor& codebooks,
                                                       const at::Tensor& widths, const at::Tensor& row_code_offsets,
                                                       const at::Tensor& row_level_offsets, int64_t group_size,
                                                       int64_t n_code_bytes) {
  const c10::cuda::CUDAGuard guard(weight.device());
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == widths.size(0), "quantize_codes: weight has shape ",
              weight.sizes(), "; expected [out_features = ", widths.size(0), ", in_features]");
  const int64_t out_features = weight.size(0), in_features = weight.size(1);
  const int64_t n_groups = group_size == 0 ? 0 : (in_features + group_size - 1) / group_size;
  at::Tensor scales = at::empty({out_features, n_groups}, weight.options().dtype(at::kHalf));
  // codes are not an input: pass an empty byte tensor so the shared checks run on the rest.
  at::Tensor no_codes = at::empty({0}, weight.options().dtype(at::kByte));
  Buffers b = make_buffers(no_codes, codebooks, scales, widths, row_code_offsets, row_level_offsets, in_features,
                           group_size, weight.device());
  // One host read: the kernel writes at the row offsets, so their total must be what the output holds.
  const int64_t total = row_code_offsets[out_features].item<int64_t>();
  TORCH_CHECK(total == n_code_bytes, "quantize_codes: n_code_bytes=", n_code_bytes, " but row_code_offsets[-1]=", total,
              "; pass QuantizedWeight.row_code_offsets[-1]");
  at::Tensor codes = at::empty({n_code_bytes}, weight.options().dtype(at::kByte));
  const at::Tensor src = weight.contiguous();
  check_cuda_ok(lowra_cuda::launch_quantize_codes(b.weight, src.data_ptr(), dtype_of(src, "weight"),
                                                  codes.data_ptr<uint8_t>(), scales.data_ptr(),
                                                  c10::cuda::getCurrentCUDAStream()),
                "quantize_codes");
  return {codes, scales};
}

}  // namespace

TORCH_LIBRARY_IMPL(lowra, CUDA, m) {
  m.impl("dequantize", &dequantize_cuda);
  m.impl("lowbit_linear", &lowbit_linear_cuda);
  m.impl("lowbit_linear_grad_input", &lowbit_linear_grad_input_cuda);
  m.impl("quantize_codes", &quantize_codes_cuda);
}
