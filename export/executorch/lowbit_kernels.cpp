// Native ExecuTorch kernels for lowra's ops: lowra::dequantize.out, lowra::lowbit_linear.out, lowra::f16_linear.out.
//
// Schemas (sdk/quant/ops.py is the source of truth):
//   dequantize.out(Tensor codes, Tensor codebooks, Tensor scales, Tensor widths, Tensor row_code_offsets,
//                  Tensor row_level_offsets, int in_features, int group_size, *, Tensor(a!) out) -> Tensor(a!)
//   lowbit_linear.out(Tensor x, <same buffers>, Tensor? bias, *, Tensor(a!) out) -> Tensor(a!)
//   lowbit_linear_planar.out(<the same>): codes already in the kernels' ROWS layout (2-bit rows bit-planar per byte)
//   lowbit_linear_planar_lora.out(Tensor x, <buffers>, Tensor? bias, Tensor down, Tensor up, *, Tensor(a!) out):
//     the planar product plus a LoRA side branch (x @ down^T) @ up^T, down [rank, in], up [out, rank], both float32
//     or both float16
//   lowbit_linear_blocked_lora4.out(..., bias?, down_codes, down_books, up_codes, up_books, *, out): the blocked
//     product plus the side branch with the factors as 4-bit codes (uint8 [rank, ceil(n / 2)]) and float16 books
//     [rank, 16] (sdk/quant/ops.py)
//   lowbit_linear_blocked.out / lowbit_linear_blocked_lora.out (<the same>): codes in the kernels' BLOCKED layout
//     (lowbit_gemv.h: each layer one sequential stream), what the exporter writes
//   f16_linear.out(Tensor x, Tensor weight, Tensor? bias, *, Tensor(a!) out) -> Tensor(a!)   (weight float16 [N, K])
//   q8_linear.out(Tensor x, Tensor weight, Tensor scales, Tensor? bias, *, Tensor(a!) out) -> Tensor(a!)
//   q8_embedding.out(Tensor weight, Tensor scales, Tensor indices, *, Tensor(a!) out) -> Tensor(a!)
//     (8-bit rows: weight int8 [N, K], scales float16 [N, K / 32]; device_runtime/formats/int8_rows.py)
//   rms_norm.out(Tensor x, Tensor weight, float eps, *, Tensor(a!) out) -> Tensor(a!)   (export/executorch/norm.py)
//   rope.out(Tensor x, Tensor cos, Tensor sin, *, Tensor(a!) out) -> Tensor(a!)   (export/executorch/pointwise.py:
//     x [B, H, S, D], cos = sin [B|1, S, D]; x * cos + rotate_half(x) * sin)
//   silu_mul.out(Tensor gate, Tensor up, *, Tensor(a!) out) -> Tensor(a!)   (silu(gate) * up; pointwise.py)
//   attention.out(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, *, Tensor(a!) out) -> Tensor(a!)
//     (export/executorch/attention.py: q [B, H, Q, D], k = v [B, KV, S, D], mask bool/float [B|1, H|1, Q, S] or
//     none = causal from the top left when Q > 1; out [B, Q, H, D])
//
// Layout (device_runtime/quantized_weight.py): row r has widths[r] in {1, 2, 4} bits per element, its codes
// start at byte row_code_offsets[r] packed LSB-first, its 2**w float16 levels start at row_level_offsets[r];
// W[r, j] = float(level[code]) * float(scale[r, j / group_size]) (no scale when group_size == 0). The decode is
// the numpy reference's float32 arithmetic exactly (one float32 multiply per element), so dequantize.out is
// bit-exact against QuantizedWeight.dequantize().
//
// lowbit_linear runs lowra's low-bit CPU kernels (device_runtime/native/kernels/lowbit_gemv.cpp, compiled into this
// library): one token through the lookup-table GEMV over bit-planes, several tokens (prefill) through the blocked
// GEMM that decodes each row once per call. The kernels read a repacked copy of the layer's codes (2-bit rows
// bit-planar per byte), made once per layer on its first call and kept for the program's life: the working set is
// the codes' bytes again, never a float32 weight. No [out, in] float32 weight ever exists (the point of a low-bit
// base on a device). Threads: LOWRA_ET_THREADS (default: hardware threads, at most 8).
// dequantize.out decodes rows in parallel, bit-exact against QuantizedWeight.dequantize().

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/core/exec_aten/util/tensor_util.h>
#include <executorch/runtime/kernel/kernel_includes.h>

#include "lowbit_gemv.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <tuple>
#include <vector>

namespace lowra_et {

using executorch::aten::Half;
using executorch::aten::ScalarType;
using executorch::aten::SizesType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;

struct LowBitWeight {
  const uint8_t* codes;
  const Half* codebooks;
  const Half* scales;
  const uint8_t* widths;
  const int64_t* code_offsets;
  const int64_t* level_offsets;
  int64_t out_features;
  int64_t in_features;
  int64_t group_size;
  int64_t n_groups;
};

// Decode row r into dst[in_features] (float32), matching the numpy reference bit for bit.
static void decode_row(const LowBitWeight& w, int64_t r, float* dst) {
  const int width = w.widths[r];
  const uint8_t* packed = w.codes + w.code_offsets[r];
  const Half* book_h = w.codebooks + w.level_offsets[r];
  float book[16];
  const int n_levels = 1 << width;
  for (int k = 0; k < n_levels; ++k) {
    book[k] = static_cast<float>(book_h[k]);
  }
  const int per_byte = 8 / width;
  const int mask = n_levels - 1;
  const int64_t n = w.in_features;
  int64_t j = 0;
  for (int64_t b = 0; j < n; ++b) {
    const unsigned byte = packed[b];
    for (int k = 0; k < per_byte && j < n; ++k, ++j) {
      dst[j] = book[(byte >> (k * width)) & mask];
    }
  }
  if (w.group_size > 0) {
    const Half* row_scales = w.scales + r * w.n_groups;
    for (int64_t g = 0; g < w.n_groups; ++g) {
      const float s = static_cast<float>(row_scales[g]);
      const int64_t end = std::min(n, (g + 1) * w.group_size);
      for (int64_t i = g * w.group_size; i < end; ++i) {
        dst[i] *= s;
      }
    }
  }
}

static float dot(const float* a, const float* b, int64_t n) {
  // Eight independent partial sums: lets the compiler vectorize without -ffast-math.
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) {
      acc[k] += a[i + k] * b[i + k];
    }
  }
  float tail = 0;
  for (; i < n; ++i) {
    tail += a[i] * b[i];
  }
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail;
}

// out = float32 [..., n_out] with x's leading dimensions (every linear-like op's output).
static bool resize_rows(Tensor& out, const Tensor& x, int64_t n_out) {
  SizesType sizes[executorch::runtime::kTensorDimensionLimit];
  for (ssize_t d = 0; d + 1 < x.dim(); ++d) sizes[d] = x.size(d);
  sizes[x.dim() - 1] = static_cast<SizesType>(n_out);
  return executorch::runtime::resize_tensor(out, {sizes, static_cast<size_t>(x.dim())}) == Error::Ok &&
         out.scalar_type() == ScalarType::Float;
}

// x float32 [..., in_features] and an optional float32 bias [n_out] of a linear-like op (`op` names it in the
// message); false, with the context failed, when they are not.
static bool linear_inputs_ok(KernelRuntimeContext& ctx, const char* op, const Tensor& x, int64_t in_features,
                             const std::optional<Tensor>& bias, int64_t n_out, const float** bias_data) {
  ET_KERNEL_CHECK_MSG(ctx, x.scalar_type() == ScalarType::Float && x.dim() >= 1 && x.size(x.dim() - 1) == in_features,
                      InvalidArgument, false, "%s: x must be float32 [..., %lld]", op,
                      static_cast<long long>(in_features));
  *bias_data = nullptr;
  if (bias.has_value()) {
    ET_KERNEL_CHECK_MSG(ctx, bias->scalar_type() == ScalarType::Float && bias->numel() == n_out, InvalidArgument, false,
                        "%s: bias must be float32 [out_features]", op);
    *bias_data = bias->const_data_ptr<float>();
  }
  return true;
}

// ys[m, n_out] += bias (none: nothing).
static void add_bias(float* ys, const float* bias, int64_t m, int64_t n_out) {
  if (bias == nullptr) return;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t r = 0; r < n_out; ++r) ys[i * n_out + r] += bias[r];
  }
}

// LOWRA_ET_LOWBIT=decode selects the previous kernel (decode a row into a buffer, dot it with every token), read
// per call so one process can A/B the two (bench/bench_et_lowbit_op.py); anything else runs lowra's kernels.
static bool decode_kernel_selected() {
  const char* env = std::getenv("LOWRA_ET_LOWBIT");
  return env != nullptr && std::strcmp(env, "decode") == 0;
}

static int thread_count(int64_t work) {
  static const int configured = [] {
    const char* env = std::getenv("LOWRA_ET_THREADS");
    int n = env ? std::atoi(env) : static_cast<int>(std::thread::hardware_concurrency());
    return std::max(1, std::min(n, 8));
  }();
  // Below ~64k multiply-adds a thread launch costs more than it saves.
  return work < (1 << 16) ? 1 : configured;
}

template <typename F>
static void parallel_rows(int64_t rows, int64_t work, F fn) {
  const int n = static_cast<int>(std::min<int64_t>(thread_count(work), rows));
  if (n <= 1) {
    fn(0, rows);
    return;
  }
  std::vector<std::thread> pool;
  const int64_t chunk = (rows + n - 1) / n;
  for (int t = 1; t < n; ++t) {
    const int64_t begin = t * chunk, end = std::min(rows, begin + chunk);
    if (begin < end) pool.emplace_back(fn, begin, end);
  }
  fn(0, std::min(rows, chunk));
  for (auto& th : pool) th.join();
}

static bool read_weight(
    KernelRuntimeContext& ctx, const Tensor& codes, const Tensor& codebooks, const Tensor& scales,
    const Tensor& widths, const Tensor& row_code_offsets, const Tensor& row_level_offsets, int64_t in_features,
    int64_t group_size, LowBitWeight* w) {
  const bool dtypes_ok = codes.scalar_type() == ScalarType::Byte && codebooks.scalar_type() == ScalarType::Half &&
      scales.scalar_type() == ScalarType::Half && widths.scalar_type() == ScalarType::Byte &&
      row_code_offsets.scalar_type() == ScalarType::Long && row_level_offsets.scalar_type() == ScalarType::Long;
  if (!dtypes_ok) {
    ET_LOG(Error, "lowra low-bit op: buffer dtypes must be uint8 codes/widths, float16 codebooks/scales, int64 offsets");
    return false;
  }
  w->codes = codes.const_data_ptr<uint8_t>();
  w->codebooks = codebooks.const_data_ptr<Half>();
  w->scales = scales.const_data_ptr<Half>();
  w->widths = widths.const_data_ptr<uint8_t>();
  w->code_offsets = row_code_offsets.const_data_ptr<int64_t>();
  w->level_offsets = row_level_offsets.const_data_ptr<int64_t>();
  w->out_features = widths.numel();
  w->in_features = in_features;
  w->group_size = group_size;
  w->n_groups = group_size > 0 ? (in_features + group_size - 1) / group_size : 0;
  if (row_code_offsets.numel() != w->out_features + 1 || row_level_offsets.numel() != w->out_features + 1 ||
      in_features < 1 || group_size < 0 || (group_size > 0 && scales.numel() != w->out_features * w->n_groups)) {
    ET_LOG(Error, "lowra low-bit op: offsets, scales or in_features do not match %lld rows",
           static_cast<long long>(w->out_features));
    return false;
  }
  // One branch-free pass of byte arithmetic (vectorized; it runs on every call): 1, 2 and 4 are the powers of two
  // in [1, 4]. The message then looks for the row.
  uint8_t bad = 0;
  for (int64_t r = 0; r < w->out_features; ++r) {
    const uint8_t width = w->widths[r];
    bad |= static_cast<uint8_t>(((width - 1) & width) | (width == 0) | (width > 4));
  }
  if (bad) {
    for (int64_t r = 0; r < w->out_features; ++r) {
      const int width = w->widths[r];
      if (width != 1 && width != 2 && width != 4) {
        ET_LOG(Error, "lowra low-bit op: row %lld has width %d, expected 1, 2 or 4", static_cast<long long>(r), width);
        return false;
      }
    }
  }
  if (w->code_offsets[w->out_features] != codes.numel() || w->level_offsets[w->out_features] != codebooks.numel()) {
    ET_LOG(Error, "lowra low-bit op: codes/codebooks sizes do not match the row offsets");
    return false;
  }
  (void)ctx;
  return true;
}

Tensor& dequantize_out(
    KernelRuntimeContext& ctx, const Tensor& codes, const Tensor& codebooks, const Tensor& scales,
    const Tensor& widths, const Tensor& row_code_offsets, const Tensor& row_level_offsets, int64_t in_features,
    int64_t group_size, Tensor& out) {
  LowBitWeight w;
  ET_KERNEL_CHECK(
      ctx,
      read_weight(ctx, codes, codebooks, scales, widths, row_code_offsets, row_level_offsets, in_features,
                  group_size, &w),
      InvalidArgument, out);
  const SizesType sizes[2] = {static_cast<SizesType>(w.out_features), static_cast<SizesType>(in_features)};
  ET_KERNEL_CHECK(
      ctx, executorch::runtime::resize_tensor(out, {sizes, 2}) == Error::Ok && out.scalar_type() == ScalarType::Float,
      InvalidArgument, out);
  float* dst = out.mutable_data_ptr<float>();
  parallel_rows(w.out_features, w.out_features * in_features, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) decode_row(w, r, dst + r * in_features);
  });
  return out;
}

// The kernels' copy of a layer's codes, repacked once (lowra_lowbit_repack) and stored once per layer *content*: a
// user swap loads the program again at new addresses, and a cache keyed by address alone kept one more copy of every
// layer per swap. Every call looks its constants' address up first; a hit is checked against the layer's widths,
// codebooks and first and last code bytes (tens of KB per call, against the megabytes the product reads), as a later
// program can be mapped where an unloaded one was. An address not seen yet is looked up by content (sizes plus a
// hash of those bytes, then a hash of all the codes: ~20 MB per swap on SmolLM2) and shares the copy when equal;
// anything else is repacked afresh.
struct Repacked {
  std::vector<uint8_t> codes;            // the kernels' layout
  std::vector<uint8_t> widths;           // what the entry was made from
  std::vector<uint8_t> codebook_bytes;
  std::vector<uint8_t> head, tail;       // the first and last bytes of the original codes
  uint64_t digest = 0;                   // hash of all the original codes
};

// A 64-bit hash, 8 bytes a step (FNV-1a's constants with a final shift per word): a cache key and a change check, not
// a security boundary (the program file's sha256 is checked against its manifest before it loads). ~20 MB of codes
// are hashed once per program load.
static uint64_t fnv1a(const void* p, size_t n, uint64_t h = 1469598103934665603ull) {
  const auto* b = static_cast<const uint8_t*>(p);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t word;
    std::memcpy(&word, b + i, 8);
    h = (h ^ word) * 1099511628211ull;
    h ^= h >> 29;
  }
  for (; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  return h;
}

static std::vector<uint8_t> copy_bytes(const void* p, size_t n) {
  const auto* b = static_cast<const uint8_t*>(p);
  return std::vector<uint8_t>(b, b + n);
}

static bool same_bytes(const std::vector<uint8_t>& saved, const void* p) {
  return saved.empty() || std::memcmp(saved.data(), p, saved.size()) == 0;
}

static const uint8_t* repacked_codes(const LowBitWeight& w, int64_t n_bytes, int64_t n_levels) {
  static std::mutex mutex;
  // By content (the copies), and by address (the fast path of every call after the first at that address).
  static std::map<std::tuple<int64_t, int64_t, int64_t, uint64_t>, std::unique_ptr<Repacked>> by_content;
  static std::map<std::tuple<const uint8_t*, int64_t, int64_t, int64_t>, Repacked*> by_address;
  const size_t edge = static_cast<size_t>(std::min<int64_t>(n_bytes, 64));
  const size_t book_bytes = static_cast<size_t>(n_levels) * sizeof(Half);
  auto matches = [&](const Repacked& r) {
    return std::memcmp(r.widths.data(), w.widths, r.widths.size()) == 0 && r.codebook_bytes.size() == book_bytes &&
           same_bytes(r.codebook_bytes, w.codebooks) && same_bytes(r.head, w.codes) &&
           same_bytes(r.tail, w.codes + n_bytes - edge);
  };
  const auto address = std::make_tuple(w.codes, n_bytes, w.out_features, w.in_features);
  std::lock_guard<std::mutex> lock(mutex);
  auto seen = by_address.find(address);
  if (seen != by_address.end() && matches(*seen->second)) return seen->second->codes.data();
  uint64_t shape_hash = fnv1a(w.widths, static_cast<size_t>(w.out_features));
  shape_hash = fnv1a(w.codebooks, book_bytes, shape_hash);
  shape_hash = fnv1a(w.codes, edge, shape_hash);
  shape_hash = fnv1a(w.codes + n_bytes - edge, edge, shape_hash);
  const auto key = std::make_tuple(n_bytes, w.out_features, w.in_features, shape_hash);
  const uint64_t digest = fnv1a(w.codes, static_cast<size_t>(n_bytes));
  auto it = by_content.find(key);
  if (it != by_content.end() && it->second->digest == digest && matches(*it->second)) {
    by_address[address] = it->second.get();  // the same layer, mapped at another address (a reloaded program)
    return it->second->codes.data();
  }
  auto entry = std::make_unique<Repacked>();
  entry->codes = copy_bytes(w.codes, static_cast<size_t>(n_bytes));
  if (lowra_lowbit_repack(w.out_features, w.in_features, w.widths, entry->codes.data()) != LOWRA_LOWBIT_OK)
    return nullptr;
  entry->widths = copy_bytes(w.widths, static_cast<size_t>(w.out_features));
  entry->codebook_bytes = copy_bytes(w.codebooks, book_bytes);
  entry->head = copy_bytes(w.codes, edge);
  entry->tail = copy_bytes(w.codes + n_bytes - edge, edge);
  entry->digest = digest;
  Repacked* raw = entry.get();
  if (it != by_content.end()) {  // a different layer under the same key: it replaces the old copy
    for (auto a = by_address.begin(); a != by_address.end();) a = a->second == it->second.get() ? by_address.erase(a) : std::next(a);
    it->second = std::move(entry);
  } else {
    by_content.emplace(key, std::move(entry));
  }
  by_address[address] = raw;
  return raw->codes.data();
}

// How a program stores a layer's codes: the file's layout (lowbit_linear: a repacked copy is made once per layer),
// or one of the kernels' layouts, read in place (lowbit_linear_planar*, lowbit_linear_blocked*).
enum class Codes { kFile, kPlanar, kBlocked };

// The kernels' plan for a layer (its structure: row offsets, task lists), kept across calls and shared by the calls
// of every program: found by the address of the layer's widths, and used only if the layer's structure is the one
// it was made for (lowra_lowbit_plan_gemv checks; otherwise it is made again). Bounded: past kMaxPlans layers (many
// programs loaded one after another) the plans are dropped and made again on use.
struct PlanDeleter {
  void operator()(lowra_lowbit_plan* plan) const { lowra_lowbit_plan_destroy(plan); }
};
using SharedPlan = std::shared_ptr<lowra_lowbit_plan>;

static int planned_product(const lowra_lowbit_layer& layer, const float* xs, int64_t m, float* ys, int threads) {
  constexpr size_t kMaxPlans = 4096;
  static std::mutex mutex;
  static std::map<const uint8_t*, SharedPlan> plans;
  auto run = [&](const lowra_lowbit_plan* plan) {
    return m == 1 ? lowra_lowbit_plan_gemv(plan, &layer, xs, ys, threads, LOWRA_LOWBIT_ISA_AUTO)
                  : lowra_lowbit_plan_gemm(plan, &layer, xs, m, ys, threads, LOWRA_LOWBIT_ISA_AUTO);
  };
  SharedPlan plan;
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = plans.find(layer.widths);
    if (it != plans.end()) plan = it->second;
  }
  if (plan) {
    const int status = run(plan.get());
    if (status != LOWRA_LOWBIT_PLAN_MISMATCH) return status;
  }
  lowra_lowbit_plan* made = nullptr;
  if (const int status = lowra_lowbit_plan_create(&layer, &made)) return status;
  plan = SharedPlan(made, PlanDeleter());
  {
    std::lock_guard<std::mutex> lock(mutex);
    if (plans.size() >= kMaxPlans) plans.clear();
    plans[layer.widths] = plan;
  }
  return run(plan.get());
}

static Tensor& lowbit_linear_impl(
    KernelRuntimeContext& ctx, const Tensor& x, const Tensor& codes, const Tensor& codebooks, const Tensor& scales,
    const Tensor& widths, const Tensor& row_code_offsets, const Tensor& row_level_offsets, int64_t in_features,
    int64_t group_size, const std::optional<Tensor>& bias, Tensor& out, Codes kind) {
  LowBitWeight w;
  ET_KERNEL_CHECK(
      ctx,
      read_weight(ctx, codes, codebooks, scales, widths, row_code_offsets, row_level_offsets, in_features,
                  group_size, &w),
      InvalidArgument, out);
  const float* bias_data = nullptr;
  if (!linear_inputs_ok(ctx, "lowra::lowbit_linear", x, in_features, bias, w.out_features, &bias_data)) return out;
  ET_KERNEL_CHECK(ctx, resize_rows(out, x, w.out_features), InvalidArgument, out);
  const int64_t m = x.numel() / in_features;
  const float* xs = x.const_data_ptr<float>();
  float* ys = out.mutable_data_ptr<float>();
  const int64_t n_out = w.out_features;
  if (m == 0) return out;
  if (decode_kernel_selected() && kind == Codes::kFile) {
    parallel_rows(n_out, n_out * in_features * m, [&](int64_t begin, int64_t end) {
      std::vector<float> row(in_features);
      for (int64_t r = begin; r < end; ++r) {
        decode_row(w, r, row.data());
        const float b = bias_data ? bias_data[r] : 0.0f;
        for (int64_t i = 0; i < m; ++i) ys[i * n_out + r] = dot(xs + i * in_features, row.data(), in_features) + b;
      }
    });
    return out;
  }
  const uint8_t* codes_k = kind == Codes::kFile ? repacked_codes(w, codes.numel(), codebooks.numel()) : w.codes;
  ET_KERNEL_CHECK_MSG(ctx, codes_k != nullptr, InvalidArgument, out, "lowra::lowbit_linear: could not repack the codes");
  lowra_lowbit_layer layer;
  layer.out_features = n_out;
  layer.in_features = in_features;
  layer.group_size = group_size;
  layer.widths = w.widths;
  layer.codes = codes_k;
  layer.codebooks = reinterpret_cast<const uint16_t*>(w.codebooks);  // Half is the float16 bit pattern
  layer.scales = group_size > 0 ? reinterpret_cast<const uint16_t*>(w.scales) : nullptr;
  layer.layout = kind == Codes::kBlocked ? LOWRA_LOWBIT_LAYOUT_BLOCKED : LOWRA_LOWBIT_LAYOUT_ROWS;
  const int status = planned_product(layer, xs, m, ys, thread_count(n_out * in_features * m));
  ET_KERNEL_CHECK_MSG(ctx, status == LOWRA_LOWBIT_OK, InvalidArgument, out, "lowra::lowbit_linear: kernel failed: %s",
                      lowra_lowbit_status_name(status));
  add_bias(ys, bias_data, m, n_out);
  return out;
}

// out = x [..., in] @ W^T (+ bias) for a dense head whose kernel is gemm(xs, m, ys, threads) -> lowra_lowbit_status.
template <typename Gemm>
static Tensor& dense_linear(KernelRuntimeContext& ctx, const char* op, const Tensor& x, int64_t n_out,
                            int64_t in_features, const std::optional<Tensor>& bias, Tensor& out, const Gemm& gemm) {
  const float* bias_data = nullptr;
  if (!linear_inputs_ok(ctx, op, x, in_features, bias, n_out, &bias_data)) return out;
  ET_KERNEL_CHECK(ctx, resize_rows(out, x, n_out), InvalidArgument, out);
  const int64_t m = x.numel() / in_features;
  if (m == 0) return out;
  float* ys = out.mutable_data_ptr<float>();
  const int status = gemm(x.const_data_ptr<float>(), m, ys, thread_count(n_out * in_features * m));
  ET_KERNEL_CHECK_MSG(ctx, status == LOWRA_LOWBIT_OK, InvalidArgument, out, "%s: kernel failed: %s", op,
                      lowra_lowbit_status_name(status));
  add_bias(ys, bias_data, m, n_out);
  return out;
}

// x [..., K] @ float32(weight [N, K])^T (+ bias): the program's float16 embedding / output head, converted in
// registers by lowra_f16_gemm (never a float32 copy of the weight).
Tensor& f16_linear_out(
    KernelRuntimeContext& ctx, const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, Tensor& out) {
  ET_KERNEL_CHECK_MSG(
      ctx, weight.scalar_type() == ScalarType::Half && weight.dim() == 2, InvalidArgument, out,
      "lowra::f16_linear: weight must be float16 [out, in]");
  return dense_linear(ctx, "lowra::f16_linear", x, weight.size(0), weight.size(1), bias, out,
                      [&](const float* xs, int64_t m, float* ys, int threads) {
                        return lowra_f16_gemm(reinterpret_cast<const uint16_t*>(weight.const_data_ptr<Half>()),
                                              weight.size(0), weight.size(1), xs, m, ys, threads, LOWRA_LOWBIT_ISA_AUTO);
                      });
}

// weight * (x * rsqrt(mean(x^2) + eps)) per row of x [..., D] (export/executorch/norm.py; transformers' LlamaRMSNorm
// in float32). The sum of squares uses dot()'s eight partial sums.
Tensor& rms_norm_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& weight, double eps, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, x.scalar_type() == ScalarType::Float && weight.scalar_type() == ScalarType::Float &&
                               weight.dim() == 1 && x.dim() >= 1 && x.size(x.dim() - 1) == weight.size(0),
                      InvalidArgument, out, "lowra::rms_norm: expected float32 x [..., D] and weight [D]");
  const int64_t d = weight.size(0);
  ET_KERNEL_CHECK(ctx, resize_rows(out, x, d), InvalidArgument, out);
  const int64_t rows = d == 0 ? 0 : x.numel() / d;
  const float* xs = x.const_data_ptr<float>();
  const float* ws = weight.const_data_ptr<float>();
  float* os = out.mutable_data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = xs + r * d;
    const float mean = dot(xr, xr, d) / static_cast<float>(d);
    const float inv = 1.0f / std::sqrt(mean + static_cast<float>(eps));
    for (int64_t k = 0; k < d; ++k) os[r * d + k] = ws[k] * (xr[k] * inv);
  }
  return out;
}

// x * cos + rotate_half(x) * sin per head (export/executorch/pointwise.py; transformers' apply_rotary_pos_emb), each
// product rounded, then the sum, as torch computes it: rotate_half(x)[d] = -x[d + D/2] for d < D/2, x[d - D/2] after.
Tensor& rope_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& cos, const Tensor& sin, Tensor& out) {
  const bool ok = x.dim() == 4 && cos.dim() == 3 && sin.dim() == 3 && x.scalar_type() == ScalarType::Float &&
      cos.scalar_type() == ScalarType::Float && sin.scalar_type() == ScalarType::Float && x.size(3) % 2 == 0 &&
      (cos.size(0) == 1 || cos.size(0) == x.size(0)) && cos.size(1) == x.size(2) && cos.size(2) == x.size(3) &&
      sin.size(0) == cos.size(0) && sin.size(1) == cos.size(1) && sin.size(2) == cos.size(2);
  ET_KERNEL_CHECK_MSG(ctx, ok, InvalidArgument, out,
                      "lowra::rope: expected float32 x [B, H, S, D] (D even) and cos = sin [B or 1, S, D]");
  ET_KERNEL_CHECK(ctx, executorch::runtime::resize_tensor(out, x.sizes()) == Error::Ok &&
                           out.scalar_type() == ScalarType::Float, InvalidArgument, out);
  const int64_t B = x.size(0), H = x.size(1), S = x.size(2), D = x.size(3), half = D / 2;
  const float* xs = x.const_data_ptr<float>();
  const float* cs = cos.const_data_ptr<float>();
  const float* ss = sin.const_data_ptr<float>();
  float* os = out.mutable_data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t i = 0; i < S; ++i) {
        const int64_t row = ((b * H + h) * S + i) * D, at = ((cos.size(0) == 1 ? 0 : b) * S + i) * D;
        const float* xr = xs + row;
        const float* c = cs + at;
        const float* sn = ss + at;
        float* o = os + row;
        for (int64_t d = 0; d < half; ++d) {
          const float a = xr[d] * c[d], r = -xr[d + half] * sn[d];
          o[d] = a + r;
        }
        for (int64_t d = half; d < D; ++d) {
          const float a = xr[d] * c[d], r = xr[d - half] * sn[d];
          o[d] = a + r;
        }
      }
    }
  }
  return out;
}

// silu(gate) * up = gate / (1 + exp(-gate)) * up, elementwise (export/executorch/pointwise.py).
Tensor& silu_mul_out(KernelRuntimeContext& ctx, const Tensor& gate, const Tensor& up, Tensor& out) {
  bool ok = gate.scalar_type() == ScalarType::Float && up.scalar_type() == ScalarType::Float && gate.dim() == up.dim();
  for (int64_t i = 0; ok && i < gate.dim(); ++i) ok = gate.size(i) == up.size(i);
  ET_KERNEL_CHECK_MSG(ctx, ok, InvalidArgument, out, "lowra::silu_mul: expected float32 gate and up of one shape");
  ET_KERNEL_CHECK(ctx, executorch::runtime::resize_tensor(out, gate.sizes()) == Error::Ok &&
                           out.scalar_type() == ScalarType::Float, InvalidArgument, out);
  const float* g = gate.const_data_ptr<float>();
  const float* u = up.const_data_ptr<float>();
  float* o = out.mutable_data_ptr<float>();
  for (int64_t i = 0; i < gate.numel(); ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  return out;
}

// 8-bit rows (device_runtime/formats/int8_rows.py): int8 weight [N, K], float16 scales [N, K / 32].
static bool q8_rows_ok(const Tensor& weight, const Tensor& scales) {
  return weight.scalar_type() == ScalarType::Char && weight.dim() == 2 && weight.size(1) > 0 &&
         weight.size(1) % 32 == 0 && scales.scalar_type() == ScalarType::Half && scales.dim() == 2 &&
         scales.size(0) == weight.size(0) && scales.size(1) == weight.size(1) / 32;
}

// x [..., K] @ dequantize(weight, scales)^T (+ bias): the program's 8-bit output head (lowra_q8_gemm converts the
// codes in registers; no float copy of the weight).
Tensor& q8_linear_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& weight, const Tensor& scales,
                      const std::optional<Tensor>& bias, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, q8_rows_ok(weight, scales), InvalidArgument, out,
                      "lowra::q8_linear: weight must be int8 [out, in] (in a multiple of 32), scales float16 "
                      "[out, in / 32]");
  return dense_linear(ctx, "lowra::q8_linear", x, weight.size(0), weight.size(1), bias, out,
                      [&](const float* xs, int64_t m, float* ys, int threads) {
                        return lowra_q8_gemm(weight.const_data_ptr<int8_t>(),
                                             reinterpret_cast<const uint16_t*>(scales.const_data_ptr<Half>()),
                                             weight.size(0), weight.size(1), xs, m, ys, threads, LOWRA_LOWBIT_ISA_AUTO);
                      });
}

// Rows `indices` (int64, any shape) of dequantize(weight, scales): float32 [*indices.shape, K], each value code *
// scale (one float32 multiply: the numpy reference's value).
Tensor& q8_embedding_out(KernelRuntimeContext& ctx, const Tensor& weight, const Tensor& scales, const Tensor& indices,
                         Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, q8_rows_ok(weight, scales), InvalidArgument, out,
                      "lowra::q8_embedding: weight must be int8 [rows, dim] (dim a multiple of 32), scales float16 "
                      "[rows, dim / 32]");
  ET_KERNEL_CHECK_MSG(ctx, indices.scalar_type() == ScalarType::Long &&
                               indices.dim() < static_cast<ssize_t>(executorch::runtime::kTensorDimensionLimit),
                      InvalidArgument, out, "lowra::q8_embedding: indices must be int64");
  const int64_t rows = weight.size(0), dim = weight.size(1), blocks = dim / 32;
  SizesType sizes[executorch::runtime::kTensorDimensionLimit];
  for (ssize_t d = 0; d < indices.dim(); ++d) sizes[d] = indices.size(d);
  sizes[indices.dim()] = static_cast<SizesType>(dim);
  ET_KERNEL_CHECK(ctx,
                  executorch::runtime::resize_tensor(out, {sizes, static_cast<size_t>(indices.dim() + 1)}) ==
                          Error::Ok &&
                      out.scalar_type() == ScalarType::Float,
                  InvalidArgument, out);
  const int64_t* ids = indices.const_data_ptr<int64_t>();
  const int8_t* codes = weight.const_data_ptr<int8_t>();
  const Half* scale = scales.const_data_ptr<Half>();
  float* os = out.mutable_data_ptr<float>();
  for (int64_t i = 0; i < indices.numel(); ++i) {
    ET_KERNEL_CHECK_MSG(ctx, ids[i] >= 0 && ids[i] < rows, InvalidArgument, out,
                        "lowra::q8_embedding: index %lld outside [0, %lld)", static_cast<long long>(ids[i]),
                        static_cast<long long>(rows));
    for (int64_t b = 0; b < blocks; ++b) {
      const float s = static_cast<float>(scale[ids[i] * blocks + b]);
      for (int64_t k = b * 32; k < (b + 1) * 32; ++k) os[i * dim + k] = static_cast<float>(codes[ids[i] * dim + k]) * s;
    }
  }
  return out;
}

// softmax(scale * q k^T + mask) v straight from the KV cache: no transposed copy of the keys, no repeated heads for
// grouped-query attention, output in the [B, Q, H, D] layout the output projection reads. Masked keys are skipped
// (a static cache is mostly empty while the sequence is short).
Tensor& attention_out(
    KernelRuntimeContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& mask,
    double scale, Tensor& out) {
  const bool shapes_ok = q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.scalar_type() == ScalarType::Float &&
      k.scalar_type() == ScalarType::Float && v.scalar_type() == ScalarType::Float && k.size(0) == q.size(0) &&
      v.size(0) == q.size(0) && k.size(1) == v.size(1) && k.size(2) == v.size(2) && k.size(3) == q.size(3) &&
      v.size(3) == q.size(3) && k.size(1) >= 1 && q.size(1) % k.size(1) == 0;
  ET_KERNEL_CHECK_MSG(ctx, shapes_ok, InvalidArgument, out,
                      "lowra::attention: expected float32 q [B, H, Q, D], k = v [B, KV, S, D], H a multiple of KV");
  const int64_t B = q.size(0), H = q.size(1), Q = q.size(2), D = q.size(3), KV = k.size(1), S = k.size(2);
  const bool* mask_bool = nullptr;
  const float* mask_add = nullptr;
  int64_t mask_b = 0, mask_h = 0;  // strides of the mask's batch and head dimensions (0: broadcast)
  if (mask.has_value()) {
    const Tensor& m = *mask;
    const bool mask_ok = m.dim() == 4 && (m.size(0) == 1 || m.size(0) == B) && (m.size(1) == 1 || m.size(1) == H) &&
        m.size(2) == Q && m.size(3) == S &&
        (m.scalar_type() == ScalarType::Bool || m.scalar_type() == ScalarType::Float);
    ET_KERNEL_CHECK_MSG(ctx, mask_ok, InvalidArgument, out,
                        "lowra::attention: mask must be bool or float32 [1|B, 1|H, Q, S]");
    if (m.scalar_type() == ScalarType::Bool) mask_bool = m.const_data_ptr<bool>();
    else mask_add = m.const_data_ptr<float>();
    mask_h = m.size(1) == 1 ? 0 : Q * S;
    mask_b = m.size(0) == 1 ? 0 : m.size(1) * Q * S;
  }
  const SizesType sizes[4] = {static_cast<SizesType>(B), static_cast<SizesType>(Q), static_cast<SizesType>(H),
                              static_cast<SizesType>(D)};
  ET_KERNEL_CHECK(
      ctx, executorch::runtime::resize_tensor(out, {sizes, 4}) == Error::Ok && out.scalar_type() == ScalarType::Float,
      InvalidArgument, out);
  // lowra's kernel library: vector dots where the CPU has them, (batch, head, query) triples split over threads.
  const int status = lowra_attention(
      q.const_data_ptr<float>(), k.const_data_ptr<float>(), v.const_data_ptr<float>(), B, H, Q, D, KV, S,
      reinterpret_cast<const uint8_t*>(mask_bool), mask_add, mask_b, mask_h, !mask.has_value() && Q > 1,
      static_cast<float>(scale), out.mutable_data_ptr<float>(), thread_count(2 * B * H * Q * S * D),
      LOWRA_LOWBIT_ISA_AUTO);
  ET_KERNEL_CHECK_MSG(ctx, status == LOWRA_LOWBIT_OK, InvalidArgument, out, "lowra::attention: kernel failed: %s",
                      lowra_lowbit_status_name(status));
  return out;
}

// lowbit_linear.out, lowbit_linear_planar.out and lowbit_linear_blocked.out: the same product of codes in three
// layouts.
template <Codes kKind>
Tensor& lowbit_linear_variant_out(
    KernelRuntimeContext& ctx, const Tensor& x, const Tensor& codes, const Tensor& codebooks, const Tensor& scales,
    const Tensor& widths, const Tensor& row_code_offsets, const Tensor& row_level_offsets, int64_t in_features,
    int64_t group_size, const std::optional<Tensor>& bias, Tensor& out) {
  return lowbit_linear_impl(ctx, x, codes, codebooks, scales, widths, row_code_offsets, row_level_offsets, in_features,
                            group_size, bias, out, kKind);
}

// y += (x @ down^T) @ up^T for the m tokens of x: a user's side branch added in the same call as the base product
// (lowbit_linear_planar_lora.out, lowbit_linear_blocked_lora.out).
template <Codes kKind>
Tensor& lowbit_linear_lora_out(
    KernelRuntimeContext& ctx, const Tensor& x, const Tensor& codes, const Tensor& codebooks, const Tensor& scales,
    const Tensor& widths, const Tensor& row_code_offsets, const Tensor& row_level_offsets, int64_t in_features,
    int64_t group_size, const std::optional<Tensor>& bias, const Tensor& down, const Tensor& up, Tensor& out) {
  const int64_t n_out = widths.numel();
  const bool half = down.scalar_type() == ScalarType::Half;
  const bool factors_ok = (half || down.scalar_type() == ScalarType::Float) && up.scalar_type() == down.scalar_type() &&
      down.dim() == 2 && up.dim() == 2 && down.size(1) == in_features && up.size(0) == n_out &&
      up.size(1) == down.size(0);
  ET_KERNEL_CHECK_MSG(ctx, factors_ok, InvalidArgument, out,
                      "lowra::lowbit_linear_*_lora: down must be [rank, in], up [out, rank], both float32 or float16");
  lowbit_linear_impl(ctx, x, codes, codebooks, scales, widths, row_code_offsets, row_level_offsets, in_features,
                     group_size, bias, out, kKind);
  if (ctx.failure_state() != Error::Ok) return out;
  // lowra's kernel library (vector path where the CPU has one); a token with no user (zero factors) costs rank dots.
  const int64_t m = x.numel() / in_features;
  const int threads = thread_count(int64_t{1} << 20);  // the configured count; the kernel splits only enough work
  const int status =
      half ? lowra_lowrank_add_f16(reinterpret_cast<const uint16_t*>(down.const_data_ptr<Half>()),
                                   reinterpret_cast<const uint16_t*>(up.const_data_ptr<Half>()), down.size(0),
                                   in_features, n_out, x.const_data_ptr<float>(), m, out.mutable_data_ptr<float>(),
                                   threads, LOWRA_LOWBIT_ISA_AUTO)
           : lowra_lowrank_add(down.const_data_ptr<float>(), up.const_data_ptr<float>(), down.size(0), in_features,
                               n_out, x.const_data_ptr<float>(), m, out.mutable_data_ptr<float>(), threads,
                               LOWRA_LOWBIT_ISA_AUTO);
  ET_KERNEL_CHECK_MSG(ctx, status == LOWRA_LOWBIT_OK, InvalidArgument, out,
                      "lowra::lowbit_linear_*_lora: kernel failed: %s", lowra_lowbit_status_name(status));
  return out;
}

// y += (x @ down^T) @ up^T with a user's factors as 4-bit codes and float16 books (lowbit_linear_blocked_lora4.out:
// sdk/quant/ops.py): down row k = down_books[k][code], up column k likewise.
Tensor& lowbit_linear_lora4_out(
    KernelRuntimeContext& ctx, const Tensor& x, const Tensor& codes, const Tensor& codebooks, const Tensor& scales,
    const Tensor& widths, const Tensor& row_code_offsets, const Tensor& row_level_offsets, int64_t in_features,
    int64_t group_size, const std::optional<Tensor>& bias, const Tensor& down_codes, const Tensor& down_books,
    const Tensor& up_codes, const Tensor& up_books, Tensor& out) {
  const int64_t n_out = widths.numel(), rank = down_codes.dim() == 2 ? down_codes.size(0) : -1;
  const bool factors_ok = down_codes.scalar_type() == ScalarType::Byte && up_codes.scalar_type() == ScalarType::Byte &&
      down_books.scalar_type() == ScalarType::Half && up_books.scalar_type() == ScalarType::Half && rank >= 1 &&
      down_codes.size(1) == (in_features + 1) / 2 && up_codes.dim() == 2 && up_codes.size(0) == rank &&
      up_codes.size(1) == (n_out + 1) / 2 && down_books.dim() == 2 && down_books.size(0) == rank &&
      down_books.size(1) == 16 && up_books.dim() == 2 && up_books.size(0) == rank && up_books.size(1) == 16;
  ET_KERNEL_CHECK_MSG(ctx, factors_ok, InvalidArgument, out,
                      "lowra::lowbit_linear_blocked_lora4: expected uint8 codes [rank, ceil(in / 2)] and "
                      "[rank, ceil(out / 2)], float16 books [rank, 16]");
  lowbit_linear_impl(ctx, x, codes, codebooks, scales, widths, row_code_offsets, row_level_offsets, in_features,
                     group_size, bias, out, Codes::kBlocked);
  if (ctx.failure_state() != Error::Ok) return out;
  const int status = lowra_lowrank4_add(
      down_codes.const_data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(down_books.const_data_ptr<Half>()),
      up_codes.const_data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(up_books.const_data_ptr<Half>()), rank,
      in_features, n_out, x.const_data_ptr<float>(), x.numel() / in_features, out.mutable_data_ptr<float>(),
      thread_count(int64_t{1} << 20), LOWRA_LOWBIT_ISA_AUTO);
  ET_KERNEL_CHECK_MSG(ctx, status == LOWRA_LOWBIT_OK, InvalidArgument, out,
                      "lowra::lowbit_linear_blocked_lora4: kernel failed: %s", lowra_lowbit_status_name(status));
  return out;
}

}  // namespace lowra_et

EXECUTORCH_LIBRARY(lowra, "lowbit_linear_blocked_lora.out", lowra_et::lowbit_linear_lora_out<lowra_et::Codes::kBlocked>);
EXECUTORCH_LIBRARY(lowra, "lowbit_linear_blocked.out", lowra_et::lowbit_linear_variant_out<lowra_et::Codes::kBlocked>);
EXECUTORCH_LIBRARY(lowra, "lowbit_linear_blocked_lora4.out", lowra_et::lowbit_linear_lora4_out);
EXECUTORCH_LIBRARY(lowra, "lowbit_linear_planar_lora.out", lowra_et::lowbit_linear_lora_out<lowra_et::Codes::kPlanar>);
EXECUTORCH_LIBRARY(lowra, "lowbit_linear_planar.out", lowra_et::lowbit_linear_variant_out<lowra_et::Codes::kPlanar>);
EXECUTORCH_LIBRARY(lowra, "attention.out", lowra_et::attention_out);
EXECUTORCH_LIBRARY(lowra, "f16_linear.out", lowra_et::f16_linear_out);
EXECUTORCH_LIBRARY(lowra, "q8_linear.out", lowra_et::q8_linear_out);
EXECUTORCH_LIBRARY(lowra, "rms_norm.out", lowra_et::rms_norm_out);
EXECUTORCH_LIBRARY(lowra, "rope.out", lowra_et::rope_out);
EXECUTORCH_LIBRARY(lowra, "silu_mul.out", lowra_et::silu_mul_out);
EXECUTORCH_LIBRARY(lowra, "q8_embedding.out", lowra_et::q8_embedding_out);
EXECUTORCH_LIBRARY(lowra, "dequantize.out", lowra_et::dequantize_out);
EXECUTORCH_LIBRARY(lowra, "lowbit_linear.out", lowra_et::lowbit_linear_variant_out<lowra_et::Codes::kFile>);
