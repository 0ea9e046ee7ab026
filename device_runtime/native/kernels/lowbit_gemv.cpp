// lowra low-bit CPU kernels (see lowbit_gemv.h for the contract and README.md for the measured speed).
//
// GEMV (one token) uses lookup tables over bit-planes (T-MAC style) for 1- and 2-bit rows and an in-register decode
// for 4-bit rows:
// - For every group of 4 inputs x[4g..4g+3] one 16-entry table T_g[m] = sum of x[4g+k] over the bits k set in m is
//   built per token (16 floats per 4 inputs, shared by all rows of the layer).
// - A 1-bit row with levels l0 < l1 is W = l0 + (l1 - l0) b, so y = l0 * sum(x) + (l1 - l0) * <b, x>, and <b, x>
//   is one table lookup per 4 inputs: the file's LSB-first byte already holds two nibbles = two table indices.
// - A 2-bit row with levels l0..l3 (code = b0 + 2 b1) is W = l0 + (l1-l0) b0 + (l2-l0) b1 + (l3-l2-l1+l0) b0 b1:
//   three bit-planes, three lookups per 4 inputs into the same table. lowra_lowbit_repack stores each byte
//   bit-planar (b0 of its 4 elements in the low nibble, b1 in the high one), so the indices are byte & 15,
//   byte >> 4 and their AND, and the codes keep the file's size and row offsets.
// - A 4-bit row decodes 64 codes at a time in registers: one load of eight 32-bit words, then per nibble position a
//   shift and a 16-level codebook lookup, multiply-added with x stored in that order (no widening shuffle: the
//   lookups are the bound); four planes would need 15 coefficient tables, more work than the decode.
// - Absmax groups: the bit-plane sums are accumulated per group and the group's scale multiplies its partial result
//   (sum(x) is taken per group too). Group sizes that are multiples of 32 keep every table word inside one group;
//   others (lowra's quantizer uses 32/64/128) take a generic per-element decode, correct but slower.
// - in_features not a multiple of 4/8/32: x is zero-padded to a multiple of 32, so the padding bits of a row's last
//   byte (and the zero bytes loaded past it) meet zero inputs and add nothing.
//
// AVX2 (x86-64, compiled per function with target attributes, chosen at run time): 8 rows of the same width form a
// block, one lane per row; one load brings 32 code bits of each row in the BLOCKED layout (a gather in the ROWS
// layout: lowbit_gemv.h), and a table lookup for 8 rows is two vpermps
// over the table's halves plus a blend on index bit 3, or one vpermt2ps where the CPU has AVX-512VL (the same
// kernels compiled twice from lowbit_lut.inc). Sums go into per-block tree reductions, so one 4-cycle add
// chain per bit-plane and word.
// NEON mapping (the same layout, no repack): a 16-float table is 64 bytes = 4 q registers, so one vqtbl4q_u8 with
// byte indices 4 * nibble + {0, 1, 2, 3} (vshlq_n_u8 + vorrq with a constant, after a vzip of the nibble per lane)
// fetches 4 rows' partial sums; blocks are 4 rows (one 32-bit word per row loaded with vld1q_lane_u32 instead of the
// gather), the 2-bit planes are the same byte & 15 / byte >> 4 / AND, and the 4-bit decode is vqtbl4q_u8 over the
// row's 16 float levels. The scalar path below is the same algorithm element by element.
//
// GEMM (prefill) decodes a tile of 4 rows to float32 (bit-exact with the numpy reference) and multiplies it with the
// tokens 3 at a time (4 x 3 vector accumulators), so each row is decoded once per call however many tokens there are.
//
// Threads: work is cut into fixed tasks (8-row blocks, 4-row tiles) before the split, and the split only assigns
// whole tasks, so every output is computed by the same instructions whatever the thread count: bit-identical.
// The threads are a pool started once per process (a decode step calls the kernels ~200 times: starting threads per
// call cost more than the work it split); between calls a worker spins briefly, then sleeps. Each part builds the
// tables in its own thread and keeps the last ones (see Tables); a kept plan skips the per-call setup.

#include "lowbit_gemv.h"

#include <algorithm>
#include <cmath>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <system_error>
#include <thread>
#include <vector>

#if (defined(__x86_64__) || defined(_M_X64)) && !defined(LOWRA_LOWBIT_NO_AVX2)
#define LOWRA_LOWBIT_HAVE_AVX2 1
#include <immintrin.h>
#define LOWRA_AVX2_FN __attribute__((target("avx2,fma,f16c")))
// The same kernels with AVX-512VL's two-table permute (vpermt2ps on 256-bit vectors) for the 16-entry lookups.
#define LOWRA_AVX512_FN __attribute__((target("avx2,fma,f16c,avx512f,avx512vl")))
#endif

namespace {

constexpr int64_t kPadInputs = 32;  // x and the tables are padded to whole 32-bit words of a 1-bit row
constexpr int kBlockRows = LOWRA_LOWBIT_BLOCK_ROWS;  // GEMV task: rows of one width, one AVX2 lane each
constexpr int kTileRows = 4;        // GEMM task: rows decoded together
constexpr int kTileTokens = 3;      // GEMM micro-kernel: 4 rows x 3 tokens = 12 of the 16 ymm registers
// Software prefetch distance of the dense heads (8-bit and float16 rows) and of 4-bit rows, in bytes ahead of the row
// being read: each is one stream, and fetching ahead measured 1.7x on the 8-bit SmolLM2 head (2.4 -> 1.4 ms, 2
// threads, caches cold) and ~12% on 4-bit rows streamed in a decode step (512 B ahead gained nothing, 4-6 KB less).
// The lookup-table kernels' BLOCKED streams measured no gain from it (compute-bound), so they have none.
#ifndef LOWRA_HEAD_PREFETCH
#define LOWRA_HEAD_PREFETCH 2048
#endif
constexpr int64_t kHeadPrefetch = LOWRA_HEAD_PREFETCH;

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1fu) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal half: normalize (every half is exact in float32)
    exponent = 113;
    while (!(mantissa & 0x400u)) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Code of element j of a row in the kernels' layout (2-bit rows bit-planar per byte, see lowbit_gemv.h).
unsigned code_at(const uint8_t* row, int width, int64_t j) {
  if (width == 2) {
    const unsigned byte = row[j >> 2], k = static_cast<unsigned>(j & 3);
    return ((byte >> k) & 1u) | (((byte >> (4 + k)) & 1u) << 1);
  }
  const int64_t bit = j * width;
  return (row[bit >> 3] >> (bit & 7)) & ((1u << width) - 1);
}

// Byte b of a row inside a BLOCKED block (lowbit_gemv.h): `count` rows of `nbytes` each, the row in lane `lane`.
int64_t blocked_byte(int width, int64_t nbytes, int lane, int count, int64_t b) {
  if (width == 4) return lane * nbytes + b;  // 4-bit rows one after another
  const int64_t word = b / 4, word_bytes = std::min<int64_t>(4, nbytes - 4 * word);
  return 4 * word * count + lane * word_bytes + b % 4;
}

// Calls fn(row, block_offset, lane, count) for every row in the BLOCKED layout's order (widths 1, 2, 4; blocks of
// kBlockRows rows), where block_offset is where the row's block starts in the codes.
template <class Fn>
int for_each_blocked_row(int64_t out, int64_t in, const uint8_t* widths, const Fn& fn) {
  int64_t offset = 0;
  for (int width : {1, 2, 4}) {
    const int64_t nbytes = ceil_div(in * width, 8);
    int64_t rows = 0;
    for (int64_t r = 0; r < out; ++r) rows += widths[r] == width;
    int64_t seen = 0;
    for (int64_t r = 0; r < out; ++r) {
      if (widths[r] != width) continue;
      const int64_t block_start = seen / kBlockRows * kBlockRows;
      const int count = static_cast<int>(std::min<int64_t>(kBlockRows, rows - block_start));
      fn(r, offset + block_start * nbytes, static_cast<int>(seen - block_start), count);
      ++seen;
    }
    offset += rows * nbytes;
  }
  return LOWRA_LOWBIT_OK;
}

// One GEMV task = up to 8 rows of one width (kind 1, 2, 4), or 8 consecutive rows of any width decoded element by
// element (kind 0, when the group size is not a multiple of 32).
struct Task {
  int kind;
  int count;
  int64_t first;  // into Plan::order
};

// The structure of a layer's products, which depends on its shape, group size, layout and widths only: row offsets,
// the GEMV's task lists and their costs. The plain entry points build one per call; lowra_lowbit_plan_create keeps
// one across calls (a decode step multiplies by the same ~200 layers every token).
struct Plan {
  int64_t out = 0, in = 0, group = 0, n_groups = 0, layout = 0, code_bytes = 0;
  bool blocked = false;
  bool lut = false;                          // the table kernels apply (groups a multiple of 32, offsets fit int32)
  std::vector<uint8_t> widths;               // [out], a copy: a plan is only used with the widths it was made for
  std::vector<int64_t> code_off, level_off;  // [out + 1]; code_off: the row's start (ROWS) or its block's (BLOCKED)
  std::vector<uint8_t> lane, count;          // BLOCKED: the row's lane in its block and the block's row count
  std::vector<int32_t> order;                // row ids, grouped by task
  std::vector<Task> tasks;
  std::vector<int64_t> cost;                 // per task, for splitting the work evenly
};

// A validated layer for one call: the plan's structure with the call's buffers.
struct Layer {
  const lowra_lowbit_layer* raw;
  int64_t out, in, group, n_groups;
  bool blocked;
  int64_t code_bytes;  // all rows' codes
  const int64_t* code_off;
  const int64_t* level_off;
  const uint8_t* lane;
  const uint8_t* count;

  Layer(const Plan& plan, const lowra_lowbit_layer* layer)
      : raw(layer), out(plan.out), in(plan.in), group(plan.group), n_groups(plan.n_groups), blocked(plan.blocked),
        code_bytes(plan.code_bytes), code_off(plan.code_off.data()), level_off(plan.level_off.data()),
        lane(plan.lane.data()), count(plan.count.data()) {}

  float scale(int64_t r, int64_t g) const { return group ? half_to_float(raw->scales[r * n_groups + g]) : 1.0f; }
  // Spans the kernels accumulate separately and then scale: the groups, or the whole row when there are none.
  int64_t n_spans() const { return group ? n_groups : 1; }
  int64_t row_bytes(int64_t r) const { return ceil_div(in * raw->widths[r], 8); }
  // Row r's codes in row order: in place (ROWS layout, or a 4-bit row) or de-interleaved into scratch [row_bytes].
  const uint8_t* row_codes(int64_t r, uint8_t* scratch) const {
    const uint8_t* at = raw->codes + code_off[r];
    const int w = raw->widths[r];
    const int64_t nbytes = row_bytes(r);
    if (!blocked) return at;
    if (w == 4) return at + blocked_byte(4, nbytes, lane[r], count[r], 0);
    for (int64_t b = 0; b < nbytes; ++b) scratch[b] = at[blocked_byte(w, nbytes, lane[r], count[r], b)];
    return scratch;
  }
};

// The buffers a call needs (the widths are checked by build_plan, or against a kept plan by plan_matches).
bool layer_pointers_valid(const lowra_lowbit_layer* layer) {
  return layer && layer->widths && layer->codes && layer->codebooks && layer->out_features > 0 &&
         layer->in_features > 0 && layer->group_size >= 0 && (layer->group_size == 0 || layer->scales) &&
         (layer->layout == LOWRA_LOWBIT_LAYOUT_ROWS || layer->layout == LOWRA_LOWBIT_LAYOUT_BLOCKED);
}

void add_tasks(Plan& plan, int kind, int64_t start) {
  // Per input and row, in proportion to the kernels' measured times (SmolLM2's 210 linears streamed from memory, one
  // thread, AVX-512VL: 2.7 / 5.1 / 6.1 ms for all rows at 1 / 2 / 4 bits); index = task kind (0: generic).
  static const int64_t unit_cost[5] = {8, 5, 10, 0, 12};
  for (int64_t i = start; i < static_cast<int64_t>(plan.order.size()); i += kBlockRows) {
    const int count = static_cast<int>(std::min<int64_t>(kBlockRows, plan.order.size() - i));
    plan.tasks.push_back({kind, count, i});
    plan.cost.push_back(count * plan.in * unit_cost[kind]);
  }
}

int build_plan(const lowra_lowbit_layer* layer, Plan& plan) {
  if (!layer_pointers_valid(layer)) return LOWRA_LOWBIT_INVALID_ARGUMENT;
  plan.out = layer->out_features;
  plan.in = layer->in_features;
  plan.group = layer->group_size;
  plan.n_groups = plan.group ? ceil_div(plan.in, plan.group) : 0;
  plan.layout = layer->layout;
  plan.blocked = layer->layout == LOWRA_LOWBIT_LAYOUT_BLOCKED;
  plan.widths.assign(layer->widths, layer->widths + plan.out);
  plan.code_off.resize(plan.out + 1);
  plan.level_off.resize(plan.out + 1);
  plan.code_off[0] = plan.level_off[0] = 0;
  for (int64_t r = 0; r < plan.out; ++r) {
    const int w = plan.widths[r];
    if (w != 1 && w != 2 && w != 4) return LOWRA_LOWBIT_BAD_WIDTH;
    plan.code_off[r + 1] = plan.code_off[r] + ceil_div(plan.in * w, 8);
    plan.level_off[r + 1] = plan.level_off[r] + (int64_t{1} << w);
  }
  plan.code_bytes = plan.code_off[plan.out];
  if (plan.blocked) {
    plan.lane.resize(plan.out);
    plan.count.resize(plan.out);
    for_each_blocked_row(plan.out, plan.in, plan.widths.data(), [&plan](int64_t r, int64_t block, int lane, int count) {
      plan.code_off[r] = block;
      plan.lane[r] = static_cast<uint8_t>(lane);
      plan.count[r] = static_cast<uint8_t>(count);
    });
  }
  // Lanes address codes with int32 offsets; a layer past 2 GiB of codes (none exists) takes the generic path.
  plan.lut = (plan.group == 0 || plan.group % 32 == 0) && plan.code_bytes < (int64_t{1} << 31) - 8;
  plan.order.reserve(plan.out);
  if (!plan.lut) {
    for (int64_t r = 0; r < plan.out; ++r) plan.order.push_back(static_cast<int32_t>(r));
    add_tasks(plan, 0, 0);
    return LOWRA_LOWBIT_OK;
  }
  for (int kind : {1, 2, 4}) {
    const int64_t start = static_cast<int64_t>(plan.order.size());
    for (int64_t r = 0; r < plan.out; ++r) {
      if (plan.widths[r] == kind) plan.order.push_back(static_cast<int32_t>(r));
    }
    add_tasks(plan, kind, start);
  }
  return LOWRA_LOWBIT_OK;
}

// Whether a kept plan was made for this layer's structure (its buffers may be others: only the structure counts).
bool plan_matches(const Plan& plan, const lowra_lowbit_layer* layer) {
  return layer_pointers_valid(layer) && plan.out == layer->out_features && plan.in == layer->in_features &&
         plan.group == layer->group_size && plan.layout == layer->layout &&
         std::memcmp(plan.widths.data(), layer->widths, static_cast<size_t>(plan.out)) == 0;
}

bool isa_supported(int isa) {
  if (isa == LOWRA_LOWBIT_ISA_AUTO || isa == LOWRA_LOWBIT_ISA_SCALAR) return true;
#ifdef LOWRA_LOWBIT_HAVE_AVX2
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (isa == LOWRA_LOWBIT_ISA_AVX2) return avx2;
  if (isa == LOWRA_LOWBIT_ISA_AVX512) {
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
  }
#endif
  return false;
}

// Validates isa and resolves AUTO (the widest available); returns a status. use_avx2: the AVX2 kernels (AVX512
// included), use_permute2: their table lookups in one AVX-512VL vpermt2ps.
int resolve_isa(int isa, bool& use_avx2, bool* use_permute2 = nullptr) {
  if (isa < LOWRA_LOWBIT_ISA_AUTO || isa > LOWRA_LOWBIT_ISA_AVX512) return LOWRA_LOWBIT_INVALID_ARGUMENT;
  if (isa == LOWRA_LOWBIT_ISA_AUTO) {
    isa = isa_supported(LOWRA_LOWBIT_ISA_AVX512) ? LOWRA_LOWBIT_ISA_AVX512
          : isa_supported(LOWRA_LOWBIT_ISA_AVX2) ? LOWRA_LOWBIT_ISA_AVX2 : LOWRA_LOWBIT_ISA_SCALAR;
  }
  if (!isa_supported(isa)) return LOWRA_LOWBIT_ISA_UNAVAILABLE;
  use_avx2 = isa == LOWRA_LOWBIT_ISA_AVX2 || isa == LOWRA_LOWBIT_ISA_AVX512;
  if (use_permute2 != nullptr) *use_permute2 = isa == LOWRA_LOWBIT_ISA_AVX512;
  return LOWRA_LOWBIT_OK;
}

// A process-wide pool of worker threads. run(parts, body) calls body(p) once for every p in [0, parts): the caller
// takes parts too, so a pool that cannot grow (or is busy with another caller's job) still finishes the work inline.
// Which thread runs a part never changes what the part computes.
class WorkerPool {
 public:
  static WorkerPool& instance() {
    static WorkerPool* pool = new WorkerPool();  // never destroyed: workers may outlive static destruction
    return *pool;
  }

  void run(int parts, const std::function<void(int)>& body) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (parts <= 1 || !busy.owns_lock()) {  // one part, or another thread's job in flight: no waiting on it
      for (int p = 0; p < parts; ++p) body(p);
      return;
    }
    grow(parts - 1);
    body_ = &body;
    parts_.store(parts);
    pending_.store(parts);
    next_.store(0);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      generation_.fetch_add(1);
    }
    wake_.notify_all();
    drain();
    while (pending_.load() != 0) pause();  // the workers' last parts: the same order of work as the caller's
  }

 private:
  static void pause() {
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_ia32_pause();
#else
    std::this_thread::yield();
#endif
  }

  // Take unclaimed parts of the current job until none is left.
  void drain() {
    for (int p = next_.fetch_add(1); p < parts_.load(); p = next_.fetch_add(1)) {
      (*body_)(p);
      pending_.fetch_sub(1);
    }
  }

  void grow(int workers) {
    while (static_cast<int>(threads_.size()) < std::min(workers, 7)) {
      try {
        threads_.emplace_back([this] { loop(); });
      } catch (const std::system_error&) {
        return;  // no more threads: the caller drains the rest
      }
    }
  }

  void loop() {
    uint64_t seen = generation_.load();
    for (;;) {
      for (int spin = 0; spin < 20000 && generation_.load() == seen; ++spin) pause();  // ~20-50 us
      if (generation_.load() == seen) {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_.load() != seen; });
      }
      seen = generation_.load();
      drain();
    }
  }

  std::mutex busy_;   // one job at a time
  std::mutex mutex_;  // with wake_: sleeping workers
  std::condition_variable wake_;
  std::vector<std::thread> threads_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> parts_{0}, next_{0}, pending_{0};
  const std::function<void(int)>* body_ = nullptr;
};

// Runs fn(part, begin, end) over contiguous task ranges of about equal cost, one range per part.
template <class Fn>
void parallel_ranges(const std::vector<int64_t>& cost, int parts, const Fn& fn) {
  const size_t n = cost.size();
  int64_t total = 0;
  for (int64_t c : cost) total += c;
  std::vector<size_t> bounds(parts + 1, n);
  bounds[0] = 0;
  size_t t = 0;
  int64_t done = 0;
  for (int p = 1; p < parts; ++p) {
    const int64_t target = total * p / parts;
    while (t < n && done + cost[t] / 2 < target) done += cost[t++];
    bounds[p] = t;
  }
  const std::function<void(int)> body = [&fn, &bounds](int p) { fn(p, bounds[p], bounds[p + 1]); };
  WorkerPool::instance().run(parts, body);
}

// ------------------------------------------------------------------------------------------------ GEMV scratch
// What the table kernels read besides the codes: x zero-padded to padded_in, the 16-entry tables of every 4 inputs
// and the sum of x per scale span. Each thread builds its own (a worker reading the caller's tables across cores
// cost more than building them) and keeps the last ones: consecutive products of the same input (a layer's q, k and
// v projections; gate and up) find them built.
class Tables {
 public:
  // Whether these are the tables of x for a layer of this shape.
  bool hold(const Layer& L, const float* x_raw) const {
    return in_ == L.in && group_ == L.group && std::memcmp(buffer_.data(), x_raw, sizeof(float) * L.in) == 0;
  }

  void build(const Layer& L, const float* x_raw, bool avx2) {
    in_ = group_ = -1;  // invalid until built
    padded_in_ = ceil_div(L.in, kPadInputs) * kPadInputs;
    padded_x4_ = ceil_div(L.in, 64) * 64;
    buffer_.resize(static_cast<size_t>(padded_in_ * 5 + padded_x4_ + L.n_spans()));
    float* x = buffer_.data();
    std::memcpy(x, x_raw, sizeof(float) * L.in);
    std::fill(x + L.in, x + padded_in_, 0.0f);
    float* tables = x + padded_in_;
#ifdef LOWRA_LOWBIT_HAVE_AVX2
    if (avx2) {
      build_tables_avx2(x, padded_in_, tables);
    } else {
      build_tables_scalar(x, padded_in_, tables);
    }
#else
    (void)avx2;
    build_tables_scalar(x, padded_in_, tables);
#endif
    // x for the 4-bit decode: per 64 inputs (a 32-byte chunk of a row), nibble k of each of its eight 32-bit words
    // (input 8 i + k of word i) in lanes i of vector k.
    float* x4 = tables + padded_in_ * 4;
    for (int64_t c = 0; c < padded_x4_ / 64; ++c) {
      for (int k = 0; k < 8; ++k) {
        for (int i = 0; i < 8; ++i) x4[64 * c + 8 * k + i] = 64 * c + 8 * i + k < L.in ? x[64 * c + 8 * i + k] : 0.0f;
      }
    }
    float* sums = x4 + padded_x4_;
    const int64_t span = L.group ? L.group : padded_in_;
    for (int64_t g = 0; g < L.n_spans(); ++g) {  // in order, as the scalar kernels' reference sums
      float sum = 0.0f;
      for (int64_t j = g * span; j < std::min(L.in, (g + 1) * span); ++j) sum += x[j];
      sums[g] = sum;
    }
    in_ = L.in;
    group_ = L.group;
  }

  int64_t padded_in() const { return padded_in_; }
  const float* x() const { return buffer_.data(); }
  const float* tables() const { return buffer_.data() + padded_in_; }
  const float* x4() const { return buffer_.data() + padded_in_ * 5; }
  const float* sums() const { return buffer_.data() + padded_in_ * 5 + padded_x4_; }

  // T[q][m] = sum of x[4q + k] over the bits k of m, summed in the order of k: T[2^k + m] = T[m] + x[4q + k].
  static void build_tables_scalar(const float* x, int64_t padded_in, float* tables) {
    for (int64_t q = 0; q < padded_in / 4; ++q) {
      float* t = tables + q * 16;
      t[0] = 0.0f;
      for (int k = 0; k < 4; ++k) {
        for (int m = 0; m < (1 << k); ++m) t[(1 << k) + m] = t[m] + x[q * 4 + k];
      }
    }
  }

#ifdef LOWRA_LOWBIT_HAVE_AVX2
  // The same floats: entry m < 8 is ((x0 & b0(m)) + (x1 & b1(m))) + (x2 & b2(m)) (adding an exact +0 changes
  // nothing), entry 8 + m is that plus x3, which is the scalar order of additions.
  LOWRA_AVX2_FN static void build_tables_avx2(const float* x, int64_t padded_in, float* tables) {
    const __m256 bit0 = _mm256_castsi256_ps(_mm256_setr_epi32(0, -1, 0, -1, 0, -1, 0, -1));
    const __m256 bit1 = _mm256_castsi256_ps(_mm256_setr_epi32(0, 0, -1, -1, 0, 0, -1, -1));
    const __m256 bit2 = _mm256_castsi256_ps(_mm256_setr_epi32(0, 0, 0, 0, -1, -1, -1, -1));
    for (int64_t q = 0; q < padded_in / 4; ++q) {
      const float* xq = x + 4 * q;
      const __m256 low = _mm256_add_ps(
          _mm256_add_ps(_mm256_and_ps(_mm256_broadcast_ss(xq), bit0), _mm256_and_ps(_mm256_broadcast_ss(xq + 1), bit1)),
          _mm256_and_ps(_mm256_broadcast_ss(xq + 2), bit2));
      _mm256_storeu_ps(tables + 16 * q, low);
      _mm256_storeu_ps(tables + 16 * q + 8, _mm256_add_ps(low, _mm256_broadcast_ss(xq + 3)));
    }
  }
#endif

 private:
  int64_t in_ = -1, group_ = -1, padded_in_ = 0, padded_x4_ = 0;
  std::vector<float> buffer_;
};

// This thread's tables of x for L (built, or found built by its previous product).
const Tables& tables_for(const Layer& L, const float* x, bool avx2) {
  thread_local Tables kept;
  if (!kept.hold(L, x)) kept.build(L, x, avx2);
  return kept;
}

// One part's view of a one-token product.
struct Gemv {
  const Layer* layer;
  const int32_t* order;  // the plan's
  const float* x;        // padded to padded_in with zeros
  const float* tables;   // [padded_in / 4][16]
  const float* x4;       // x in the 4-bit decode's order (Tables::build), zero-padded to a multiple of 64
  const float* sums;     // sum of x per scale span
  int64_t padded_in;
  const float* x_raw;
  float* y;
};

// ------------------------------------------------------------------------------------------------ scalar GEMV
void generic_rows(const Gemv& g, const Task& task) {
  const Layer& L = *g.layer;
  std::vector<uint8_t> scratch(L.blocked ? static_cast<size_t>(ceil_div(L.in * 4, 8)) : 0);
  for (int i = 0; i < task.count; ++i) {
    const int64_t r = g.order[task.first + i];
    const int w = L.raw->widths[r];
    const uint8_t* row = L.row_codes(r, scratch.data());
    const uint16_t* book = L.raw->codebooks + L.level_off[r];
    float total = 0.0f;
    for (int64_t j = 0; j < L.in; ++j) {
      float value = half_to_float(book[code_at(row, w, j)]);
      if (L.group) value *= L.scale(r, j / L.group);
      total += value * g.x_raw[j];
    }
    g.y[r] = total;
  }
}

void lut1_scalar(const Gemv& g, const Task& task) {
  const Layer& L = *g.layer;
  std::vector<uint8_t> scratch(L.blocked ? static_cast<size_t>(ceil_div(L.in * 4, 8)) : 0);
  const int64_t nbytes = ceil_div(L.in, 8), span = L.group ? L.group / 8 : nbytes;
  for (int i = 0; i < task.count; ++i) {
    const int64_t r = g.order[task.first + i];
    const uint8_t* row = L.row_codes(r, scratch.data());
    const uint16_t* book = L.raw->codebooks + L.level_off[r];
    const float l0 = half_to_float(book[0]), c1 = half_to_float(book[1]) - l0;
    float total = 0.0f;
    for (int64_t s = 0; s < L.n_spans(); ++s) {
      float bits = 0.0f;
      for (int64_t b = s * span; b < std::min(nbytes, (s + 1) * span); ++b) {
        const float* t = g.tables + b * 32;
        bits += t[row[b] & 15] + t[16 + (row[b] >> 4)];
      }
      total += L.scale(r, s) * (l0 * g.sums[s] + c1 * bits);
    }
    g.y[r] = total;
  }
}

void lut2_scalar(const Gemv& g, const Task& task) {
  const Layer& L = *g.layer;
  std::vector<uint8_t> scratch(L.blocked ? static_cast<size_t>(ceil_div(L.in * 4, 8)) : 0);
  const int64_t nbytes = ceil_div(L.in, 4), span = L.group ? L.group / 4 : nbytes;
  for (int i = 0; i < task.count; ++i) {
    const int64_t r = g.order[task.first + i];
    const uint8_t* row = L.row_codes(r, scratch.data());
    const uint16_t* book = L.raw->codebooks + L.level_off[r];
    const float l0 = half_to_float(book[0]), l1 = half_to_float(book[1]);
    const float l2 = half_to_float(book[2]), l3 = half_to_float(book[3]);
    const float c1 = l1 - l0, c2 = l2 - l0, c3 = (l3 - l2) - (l1 - l0);
    float total = 0.0f;
    for (int64_t s = 0; s < L.n_spans(); ++s) {
      float plane0 = 0.0f, plane1 = 0.0f, both = 0.0f;
      for (int64_t b = s * span; b < std::min(nbytes, (s + 1) * span); ++b) {
        const float* t = g.tables + b * 16;
        const unsigned lo = row[b] & 15u, hi = row[b] >> 4;
        plane0 += t[lo];
        plane1 += t[hi];
        both += t[lo & hi];
      }
      total += L.scale(r, s) * (l0 * g.sums[s] + c1 * plane0 + c2 * plane1 + c3 * both);
    }
    g.y[r] = total;
  }
}

void decode4_scalar(const Gemv& g, const Task& task) {
  const Layer& L = *g.layer;
  std::vector<uint8_t> scratch(L.blocked ? static_cast<size_t>(ceil_div(L.in * 4, 8)) : 0);
  const int64_t span = L.group ? L.group : g.padded_in;
  for (int i = 0; i < task.count; ++i) {
    const int64_t r = g.order[task.first + i];
    const uint8_t* row = L.row_codes(r, scratch.data());
    float book[16];
    for (int k = 0; k < 16; ++k) book[k] = half_to_float(L.raw->codebooks[L.level_off[r] + k]);
    float total = 0.0f;
    for (int64_t s = 0; s < L.n_spans(); ++s) {
      float partial = 0.0f;
      for (int64_t j = s * span; j < std::min(L.in, (s + 1) * span); ++j) {
        partial += book[(row[j >> 1] >> ((j & 1) * 4)) & 15] * g.x[j];
      }
      total += L.scale(r, s) * partial;
    }
    g.y[r] = total;
  }
}

// ------------------------------------------------------------------------------------------------ packed side branch
// The factors as 4-bit codes: down row k = down_books[k][code], code j of row k in byte j / 2 (low nibble for even j,
// as the blob packs 4-bit channels); up column k likewise over the outputs (up_codes row k, up_books row k). The
// same sums as lowrank_add: low[k] in 8 lanes (input j in lane j % 8, fused, input order), y[r] += fused sum over k.
inline int nibble(const uint8_t* codes, int64_t j) { return (codes[j >> 1] >> ((j & 1) * 4)) & 15; }

float packed_dot_scalar(const uint8_t* codes, const float* book, const float* x, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t j = 0; j < n; ++j) acc[j % 8] = std::fma(book[nibble(codes, j)], x[j], acc[j % 8]);
  return ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
}

void packed_up_scalar(const uint8_t* codes, int64_t code_bytes, const float* books, int64_t rank, const float* low,
                      float* y, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    float t = 0.0f;
    for (int64_t k = 0; k < rank; ++k) t = std::fma(books[16 * k + nibble(codes + k * code_bytes, r)], low[k], t);
    y[r] += t;
  }
}

// ------------------------------------------------------------------------------------------------ AVX2 GEMV
#ifdef LOWRA_LOWBIT_HAVE_AVX2
LOWRA_AVX2_FN inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The lanes of an 8-row block: row ids (the last row repeated to fill), code offsets, per-row coefficients.
// BLOCKED layout: `block` is where the task's block starts (its rows' words interleaved, `count` of them).
struct Lanes {
  int32_t row[kBlockRows];
  alignas(32) int32_t offset[kBlockRows];
  const uint8_t* block;
  int count;
};

Lanes block_lanes(const Gemv& g, const Task& task) {
  Lanes lanes;
  for (int i = 0; i < kBlockRows; ++i) {
    lanes.row[i] = g.order[task.first + std::min(i, task.count - 1)];
    lanes.offset[i] = static_cast<int32_t>(g.layer->code_off[lanes.row[i]]);
  }
  lanes.block = g.layer->raw->codes + g.layer->code_off[lanes.row[0]];
  lanes.count = task.count;
  return lanes;
}

LOWRA_AVX2_FN inline __m256 lane_levels(const Gemv& g, const Lanes& lanes, int level) {
  alignas(16) uint16_t h[kBlockRows];
  for (int i = 0; i < kBlockRows; ++i) h[i] = g.layer->raw->codebooks[g.layer->level_off[lanes.row[i]] + level];
  return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(h)));
}

LOWRA_AVX2_FN inline __m256 lane_scales(const Gemv& g, const Lanes& lanes, int64_t span) {
  alignas(16) uint16_t h[kBlockRows];
  for (int i = 0; i < kBlockRows; ++i) h[i] = g.layer->raw->scales[lanes.row[i] * g.layer->n_groups + span];
  return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(h)));
}

// 32 code bits of every lane's row at byte 4 * word; the row's last word is read byte by byte (zeros past its end)
// so no load leaves the codes buffer.
LOWRA_AVX2_FN inline __m256i lane_words(const Gemv& g, const Lanes& lanes, int64_t word, int64_t nbytes) {
  if (g.layer->blocked) {  // the block's words are contiguous: one load (masked when the block has < 8 rows)
    const uint8_t* at = lanes.block + 4 * word * lanes.count;
    if (4 * word + 4 <= nbytes) {
      if (lanes.count == kBlockRows) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at));
      const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes.count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      return _mm256_maskload_epi32(reinterpret_cast<const int*>(at), live);
    }
    const int64_t tail_bytes = nbytes - 4 * word;
    alignas(32) uint32_t tail[kBlockRows] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int i = 0; i < lanes.count; ++i) std::memcpy(&tail[i], at + i * tail_bytes, static_cast<size_t>(tail_bytes));
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(tail));
  }
  if (4 * word + 4 <= nbytes) {
    const __m256i at = _mm256_add_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(lanes.offset)),
                                        _mm256_set1_epi32(static_cast<int32_t>(4 * word)));
    return _mm256_i32gather_epi32(reinterpret_cast<const int*>(g.layer->raw->codes), at, 1);
  }
  alignas(32) uint32_t tail[kBlockRows];
  for (int i = 0; i < kBlockRows; ++i) {
    tail[i] = 0;
    std::memcpy(&tail[i], g.layer->raw->codes + lanes.offset[i] + 4 * word, static_cast<size_t>(nbytes - 4 * word));
  }
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(tail));
}

LOWRA_AVX2_FN inline void store_lanes(const Gemv& g, const Task& task, __m256 result) {
  alignas(32) float out[kBlockRows];
  _mm256_store_ps(out, result);
  for (int i = 0; i < task.count; ++i) g.y[g.order[task.first + i]] = out[i];
}

// The 8 codes of bytes [b, b + 4) in lanes 0..7, in order (two per byte, the even one in the low nibble): the
// word shifted right by 4 * lane (the lookups read the low 4 bits only).
LOWRA_AVX2_FN inline __m256i nibbles8(const uint8_t* bytes) {
  uint32_t word;
  std::memcpy(&word, bytes, 4);
  return _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
}

namespace lut_avx2 {
#define LOWRA_LUT_FN LOWRA_AVX2_FN
#define LOWRA_LUT_PERMUTE2 0
#include "lowbit_lut.inc"
#undef LOWRA_LUT_FN
#undef LOWRA_LUT_PERMUTE2
}  // namespace lut_avx2

namespace lut_avx512 {
#define LOWRA_LUT_FN LOWRA_AVX512_FN
#define LOWRA_LUT_PERMUTE2 1
#include "lowbit_lut.inc"
#undef LOWRA_LUT_FN
#undef LOWRA_LUT_PERMUTE2
}  // namespace lut_avx512
#endif

void run_gemv_task(const Gemv& g, const Task& task, bool avx2, bool permute2) {
  if (task.kind == 0) return generic_rows(g, task);
#ifdef LOWRA_LOWBIT_HAVE_AVX2
  if (permute2) {
    if (task.kind == 1) return lut_avx512::lut1_avx2(g, task);
    if (task.kind == 2) return lut_avx512::lut2_avx2(g, task);
    return lut_avx512::decode4_avx2(g, task);
  }
  if (avx2) {
    if (task.kind == 1) return lut_avx2::lut1_avx2(g, task);
    if (task.kind == 2) return lut_avx2::lut2_avx2(g, task);
    return lut_avx2::decode4_avx2(g, task);
  }
#else
  (void)avx2;
  (void)permute2;
#endif
  if (task.kind == 1) return lut1_scalar(g, task);
  if (task.kind == 2) return lut2_scalar(g, task);
  decode4_scalar(g, task);
}

// ------------------------------------------------------------------------------------------------ GEMM
// Row r decoded to float32 into dst[padded] exactly as the numpy reference (level * scale), zeros past in_features.
void decode_row_scalar(const Layer& L, int64_t r, float* dst, int64_t padded, uint8_t* scratch) {
  const int w = L.raw->widths[r];
  const uint8_t* row = L.row_codes(r, scratch);
  const uint16_t* book = L.raw->codebooks + L.level_off[r];
  for (int64_t j = 0; j < L.in; ++j) dst[j] = half_to_float(book[code_at(row, w, j)]);
  std::fill(dst + L.in, dst + padded, 0.0f);
  for (int64_t g = 0; g < L.n_groups; ++g) {
    const float s = L.scale(r, g);
    for (int64_t j = g * L.group; j < std::min(L.in, (g + 1) * L.group); ++j) dst[j] *= s;
  }
}

#ifdef LOWRA_LOWBIT_HAVE_AVX2
LOWRA_AVX2_FN void decode_row_avx2(const Layer& L, int64_t r, float* dst, int64_t padded, uint8_t* scratch) {
  const int w = L.raw->widths[r];
  const uint8_t* row = L.row_codes(r, scratch);
  const int64_t nbytes = L.row_bytes(r);
  alignas(16) uint16_t book_h[16] = {0};
  std::memcpy(book_h, L.raw->codebooks + L.level_off[r], sizeof(uint16_t) << w);
  const __m256 book_lo = _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(book_h)));
  const __m256 book_hi = _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(book_h + 8)));
  // 8 elements take w bytes; a 2-bit pair of bytes is bit-planar: b0 of element k at bit k, b1 at bit 4 + k.
  const __m256i shifts = w == 1   ? _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)
                         : w == 2 ? _mm256_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11)
                                  : _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i mask = _mm256_set1_epi32(w == 4 ? 15 : 1), four = _mm256_set1_epi32(4);
  for (int64_t c = 0; c < padded / 8; ++c) {
    uint32_t word = 0;
    if (c * w + 4 <= nbytes) {
      std::memcpy(&word, row + c * w, 4);  // one load; the bits past this chunk's w bytes are shifted out
    } else if (c * w < nbytes) {
      std::memcpy(&word, row + c * w, static_cast<size_t>(std::min<int64_t>(w, nbytes - c * w)));
    }
    const __m256i v = _mm256_set1_epi32(static_cast<int32_t>(word));
    __m256i index = _mm256_and_si256(_mm256_srlv_epi32(v, shifts), mask);
    if (w == 2) {
      const __m256i b1 = _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_add_epi32(shifts, four)), mask);
      index = _mm256_or_si256(index, _mm256_slli_epi32(b1, 1));
    }
    _mm256_storeu_ps(dst + 8 * c, lut_avx2::lookup16(book_lo, book_hi, index));
  }
  std::fill(dst + L.in, dst + padded, 0.0f);
  for (int64_t g = 0; g < L.n_groups; ++g) {
    const float s = L.scale(r, g);
    for (int64_t j = g * L.group; j < std::min(L.in, (g + 1) * L.group); ++j) dst[j] *= s;
  }
}

// y[t][r] for 4 decoded rows x 3 tokens (rows/tokens past the valid count point at copies and are not stored).
LOWRA_AVX2_FN void micro_avx2(const float* const* w, const float* const* x, int64_t padded, float acc_out[kTileRows][kTileTokens]) {
  __m256 acc[kTileRows][kTileTokens];
  for (auto& row : acc) {
    for (auto& a : row) a = _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < padded; k += 8) {
    const __m256 x0 = _mm256_loadu_ps(x[0] + k), x1 = _mm256_loadu_ps(x[1] + k), x2 = _mm256_loadu_ps(x[2] + k);
    for (int i = 0; i < kTileRows; ++i) {
      const __m256 wv = _mm256_loadu_ps(w[i] + k);
      acc[i][0] = _mm256_fmadd_ps(wv, x0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(wv, x1, acc[i][1]);
      acc[i][2] = _mm256_fmadd_ps(wv, x2, acc[i][2]);
    }
  }
  for (int i = 0; i < kTileRows; ++i) {
    for (int t = 0; t < kTileTokens; ++t) acc_out[i][t] = horizontal_sum(acc[i][t]);
  }
}
#endif

void micro_scalar(const float* const* w, const float* const* x, int64_t padded, float acc_out[kTileRows][kTileTokens]) {
  for (int i = 0; i < kTileRows; ++i) {
    for (int t = 0; t < kTileTokens; ++t) {
      float acc = 0.0f;
      for (int64_t k = 0; k < padded; ++k) acc += w[i][k] * x[t][k];
      acc_out[i][t] = acc;
    }
  }
}

// The layer has been checked against the plan (build_plan or plan_matches).
int gemv(const Plan& plan, const lowra_lowbit_layer* layer, const float* x, float* y, int threads, int isa) {
  bool avx2 = false, permute2 = false;
  if (!x || !y || threads < 1) return LOWRA_LOWBIT_INVALID_ARGUMENT;
  if (int status = resolve_isa(isa, avx2, &permute2)) return status;
  const Layer L(plan, layer);
  const int parts = static_cast<int>(std::min<int64_t>(threads, plan.tasks.size()));
  parallel_ranges(plan.cost, parts, [&](int, size_t begin, size_t end) {
    if (begin == end) return;
    const Tables& tables = tables_for(L, x, avx2);
    const Gemv g{&L,          plan.order.data(), tables.x(), tables.tables(), tables.x4(), tables.sums(),
                 tables.padded_in(), x, y};
    for (size_t t = begin; t < end; ++t) run_gemv_task(g, plan.tasks[t], avx2, permute2);
  });
  return LOWRA_LOWBIT_OK;
}

int gemm(const Plan& plan, const lowra_lowbit_layer* layer, const float* x, int64_t n_tokens, float* y, int threads,
         int isa) {
  bool avx2 = false;
  if (!x || !y || threads < 1 || n_tokens < 0) return LOWRA_LOWBIT_INVALID_ARGUMENT;
  if (int status = resolve_isa(isa, avx2)) return status;
  const Layer L(plan, layer);
  if (n_tokens == 0) return LOWRA_LOWBIT_OK;
  const int64_t padded = ceil_div(L.in, 8) * 8;
  std::vector<float> xp(static_cast<size_t>(n_tokens * padded), 0.0f);
  for (int64_t t = 0; t < n_tokens; ++t) std::memcpy(&xp[t * padded], x + t * L.in, sizeof(float) * L.in);
  const int64_t n_tiles = ceil_div(L.out, kTileRows);
  const std::vector<int64_t> cost(n_tiles, 1);
  const int parts = static_cast<int>(std::min<int64_t>(threads, n_tiles));
  std::vector<float> tiles(static_cast<size_t>(parts * (kTileRows + 1) * padded), 0.0f);  // + a zero row
  const int64_t max_row_bytes = ceil_div(L.in * 4, 8);
  std::vector<uint8_t> scratch(L.blocked ? static_cast<size_t>(parts * max_row_bytes) : 0);
  parallel_ranges(cost, parts, [&](int part, size_t begin, size_t end) {
    float* tile = &tiles[part * (kTileRows + 1) * padded];
    uint8_t* row_scratch = L.blocked ? &scratch[part * max_row_bytes] : nullptr;
    const float* zero_row = tile + kTileRows * padded;
    for (size_t tile_id = begin; tile_id < end; ++tile_id) {
      const int64_t r0 = static_cast<int64_t>(tile_id) * kTileRows;
      const int rows = static_cast<int>(std::min<int64_t>(kTileRows, L.out - r0));
      const float* w[kTileRows];
      for (int i = 0; i < kTileRows; ++i) {
        w[i] = i < rows ? tile + i * padded : zero_row;
        if (i >= rows) continue;
#ifdef LOWRA_LOWBIT_HAVE_AVX2
        if (avx2) {
          decode_row_avx2(L, r0 + i, tile + i * padded, padded, row_scratch);
          continue;
        }
#endif
        decode_row_scalar(L, r0 + i, tile + i * padded, padded, row_scratch);
      }
      for (int64_t t0 = 0; t0 < n_tokens; t0 += kTileTokens) {
        const int tokens = static_cast<int>(std::min<int64_t>(kTileTokens, n_tokens - t0));
        const float* xs[kTileTokens];
        for (int t = 0; t < kTileTokens; ++t) xs[t] = &xp[(t0 + std::min(t, tokens - 1)) * padded];
        float acc[kTileRows][kTileTokens];
#ifdef LOWRA_LOWBIT_HAVE_AVX2
        if (avx2) {
          micro_avx2(w, xs, padded, acc);
        } else {
          micro_scalar(w, xs, padded, acc);
        }
#else
        micro_scalar(w, xs, padded, acc);
#endif
        for (int i = 0; i < rows; ++i) {
          for (int t = 0; t < tokens; ++t) y[(t0 + t) * L.out + r0 + i] = acc[i][t];
        }
      }
    }
  });
  return LOWRA_LOWBIT_OK;
}

// ------------------------------------------------------------------------------------------------ float16 GEMM
constexpr int kHalfRows = 4;    // rows of one float16 tile
constexpr int kHalfTokens = 2;  // tokens per pass over a tile: 8 accumulators + 4 rows + 2 inputs fit 16 ymm

// Every row's sum, for every token: 8 strided partial sums over the whole multiples of 8 (fused multiply-adds),
// combined pairwise, then the tail in order. The scalar and AVX2 paths round in this same order (std::fma is one
// instruction on AArch64 and on x86 with FMA; a library call elsewhere, where only the fallback path uses it).
float half_row_dot_scalar(const uint16_t* w, const float* x, int64_t in) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const int64_t body = in / 8 * 8;
  for (int64_t k = 0; k < body; k += 8) {
    for (int l = 0; l < 8; ++l) acc[l] = std::fma(half_to_float(w[k + l]), x[k + l], acc[l]);
  }
  float sum = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
  for (int64_t k = body; k < in; ++k) sum = std::fma(half_to_float(w[k]), x[k], sum);
  return sum;
}

void half_rows_scalar(const uint16_t* w, int64_t in, const float* x, int64_t m, int64_t out, float* y, int64_t begin,
                      int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    for (int64_t t = 0; t < m; ++t) y[t * out + r] = half_row_dot_scalar(w + r * in, x + t * in, in);
  }
}

#ifdef LOWRA_LOWBIT_HAVE_AVX2
// (a0+a4 + a2+a6) + (a1+a5 + a3+a7): the scalar path's order.
LOWRA_AVX2_FN inline float half_sum(__m256 v) {
  const __m128 pair = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));  // a0+a4 .. a3+a7
  const __m128 quad = _mm_add_ps(pair, _mm_movehl_ps(pair, pair));                       // (a0+a4)+(a2+a6), ...
  return _mm_cvtss_f32(_mm_add_ss(quad, _mm_movehdup_ps(quad)));
}

LOWRA_AVX2_FN void half_rows_avx2(const uint16_t* w, int64_t in, const float* x, int64_t m, int64_t out, float* y,
                                  int64_t begin, int64_t end) {
  const int64_t body = in / 8 * 8;
  int64_t r0 = begin;
  for (; r0 + kHalfRows <= end; r0 += kHalfRows) {
    const uint16_t* rows[kHalfRows];
    for (int i = 0; i < kHalfRows; ++i) rows[i] = w + (r0 + i) * in;
    for (int64_t t0 = 0; t0 < m; t0 += kHalfTokens) {
      const int tokens = static_cast<int>(std::min<int64_t>(kHalfTokens, m - t0));
      const float* xs[kHalfTokens];
      for (int t = 0; t < kHalfTokens; ++t) xs[t] = x + (t0 + std::min(t, tokens - 1)) * in;
      __m256 acc[kHalfRows][kHalfTokens];
      for (auto& row : acc) {
        for (auto& a : row) a = _mm256_setzero_ps();
      }
      for (int64_t k = 0; k < body; k += 8) {
        const __m256 x0 = _mm256_loadu_ps(xs[0] + k), x1 = _mm256_loadu_ps(xs[1] + k);
        for (int i = 0; i < kHalfRows; ++i) {
          if (k % 32 == 0) _mm_prefetch(reinterpret_cast<const char*>(rows[i] + k) + kHeadPrefetch, _MM_HINT_T0);
          const __m256 wv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[i] + k)));
          acc[i][0] = _mm256_fmadd_ps(wv, x0, acc[i][0]);
          acc[i][1] = _mm256_fmadd_ps(wv, x1, acc[i][1]);
        }
      }
      for (int i = 0; i < kHalfRows; ++i) {
        for (int t = 0; t < tokens; ++t) {
          float sum = half_sum(acc[i][t]);
          for (int64_t k = body; k < in; ++k) sum = std::fma(half_to_float(rows[i][k]), xs[t][k], sum);
          y[(t0 + t) * out + r0 + i] = sum;
        }
      }
    }
  }
  half_rows_scalar(w, in, x, m, out, y, r0, end);  // the last < 4 rows: the same order of additions
}
#endif

int f16_gemm(const uint16_t* weight, int64_t out, int64_t in, const float* x, int64_t m, float* y, int threads,
             int isa) {
  bool avx2 = false;
  if (!weight || !x || !y || out <= 0 || in <= 0 || m <= 0 || threads < 1) return LOWRA_LOWBIT_INVALID_ARGUMENT;
  if (int status = resolve_isa(isa, avx2)) return status;
  // Parts of whole row tiles, at least ~64k multiply-adds each (below that a hand-off costs more than it saves).
  const int64_t tiles = ceil_div(out, kHalfRows);
  const int64_t min_tiles = std::max<int64_t>(1, (int64_t{1} << 16) / (kHalfRows * in * m));
  const int parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, tiles / min_tiles)));
  const std::function<void(int)> body = [&](int p) {
    const int64_t begin = tiles * p / parts * kHalfRows, end = std::min(out, tiles * (p + 1) / parts * kHalfRows);
#ifdef LOWRA_LOWBIT_HAVE_AVX2
    if (avx2) {
      half_rows_avx2(weight, in, x, m, out, y, begin, end);
      return;
    }
#endif
    half_rows_scalar(weight, in, x, m, out, y, begin, end);
  };
  WorkerPool::instance().run(parts, body);
  return LOWRA_LOWBIT_OK;
}

// ------------------------------------------------------------------------------------------------ 8-bit GEMM
// Rows of int8 codes with a float16 scale per block of kQ8Block (formats/int8_rows.py). Each row's sum over a token
// has 8 lanes; in block b, lane l takes the four products of k_i = 32 b + 8 i + l as
//   block = fma(q1, x1, q0 * x0) + fma(q3, x3, q2 * x2),   lane = fma(scale_b, block, lane)
// (two short chains per block, so the loop is not bound by one chain of FMA latencies), and the lanes are combined
// as in the float16 GEMM. The scalar and AVX2 paths round in this order: the same bits, for any thread count.
constexpr int64_t kQ8Block = 32;

float q8_row_dot_scalar(const int8_t* q, const uint16_t* scale, const float* x, int64_t in) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t b = 0; b < in / kQ8Block; ++b) {
    const float s = half_to_float(scale[b]);
    for (int l = 0; l < 8; ++l) {
      const int64_t k = b * kQ8Block + l;
      const float p0 = static_cast<float>(q[k]) * x[k];
      const float p2 = static_cast<float>(q[k + 16]) * x[k + 16];
      const float a = std::fma(static_cast<float>(q[k + 8]), x[k + 8], p0);
      const float c = std::fma(static_cast<float>(q[k + 24]), x[k + 24], p2);
      acc[l] = std::fma(s, a + c, acc[l]);
    }
  }
  return ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
}

void q8_rows_scalar(const int8_t* w, const uint16_t* scales, int64_t in, const float* x, int64_t m, int64_t out,
                    float* y, int64_t begin, int64_t end) {
  const int64_t blocks = in / kQ8Block;
  for (int64_t r = begin; r < end; ++r) {
    for (int64_t t = 0; t < m; ++t) y[t * out + r] = q8_row_dot_scalar(w + r * in, scales + r * blocks, x + t * in, in);
  }
}

#ifdef LOWRA_LOWBIT_HAVE_AVX2
LOWRA_AVX2_FN inline __m256 q8_eight(const int8_t* q) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
}

// Rows r..r+R-1 for tokens t0..t0+T-1: each code converted once serves every token of the tile.
template <int R, int T>
LOWRA_AVX2_FN void q8_tile(const int8_t* w, const uint16_t* scales, int64_t in, const float* x, int64_t out, float* y,
                           int64_t r, int64_t t0) {
  const int64_t blocks = in / kQ8Block;
  __m256 acc[R][T];
  for (auto& row : acc) {
    for (auto& a : row) a = _mm256_setzero_ps();
  }
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t k = b * kQ8Block;
    __m256 xs[T][4];
    for (int t = 0; t < T; ++t) {
      for (int i = 0; i < 4; ++i) xs[t][i] = _mm256_loadu_ps(x + (t0 + t) * in + k + 8 * i);
    }
    for (int j = 0; j < R; ++j) {
      const int8_t* row = w + (r + j) * in + k;
      _mm_prefetch(reinterpret_cast<const char*>(row + kHeadPrefetch), _MM_HINT_T0);
      const __m256 q0 = q8_eight(row), q1 = q8_eight(row + 8), q2 = q8_eight(row + 16), q3 = q8_eight(row + 24);
      const __m256 s = _mm256_broadcastss_ps(  // F16C: the exact value half_to_float gives, in one instruction
          _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(scales[(r + j) * blocks + b]))));
      for (int t = 0; t < T; ++t) {
        const __m256 a = _mm256_fmadd_ps(q1, xs[t][1], _mm256_mul_ps(q0, xs[t][0]));
        const __m256 c = _mm256_fmadd_ps(q3, xs[t][3], _mm256_mul_ps(q2, xs[t][2]));
        acc[j][t] = _mm256_fmadd_ps(s, _mm256_add_ps(a, c), acc[j][t]);
      }
    }
  }
  for (int j = 0; j < R; ++j) {
    for (int t = 0; t < T; ++t) y[(t0 + t) * out + r + j] = half_sum(acc[j][t]);
  }
}

LOWRA_AVX2_FN void q8_rows_avx2(const int8_t* w, const uint16_t* scales, int64_t in, const float* x, int64_t m,
                                int64_t out, float* y, int64_t begin, int64_t end) {
  int64_t r = begin;
  if (m == 1) {  // one token (decode): 4 rows per pass
    for (; r + 4 <= end; r += 4) q8_tile<4, 1>(w, scales, in, x, out, y, r, 0);
  } else {
    for (; r + 2 <= end; r += 2) {
      int64_t t = 0;
      for (; t + 2 <= m; t += 2) q8_tile<2, 2>(w, scales, in, x, out, y, r, t);
      if (t < m) q8_tile<2, 1>(w, scales, in, x, out, y, r, t);
    }
  }
  q8_rows_scalar(w, scales, in, x, m, out, y, r, end);  // the last rows: the same order of additions
}
#endif

int q8_gemm(const int8_t* weight, const uint16_t* scales, int64_t out, int64_t in, const float* x, int64_t m, float* y,
            int threads, int isa) {
  bool avx2 = false;
  if (!weight || !scales || !x || !y || out <= 0 || in <= 0 || in % kQ8Block || m <= 0 || threads < 1) {
    return LOWRA_LOWBIT_INVALID_ARGUMENT;
  }
  if (int status = resolve_isa(isa, avx2)) return status;
  // Parts of whole 4-row tiles, at least ~64k multiply-adds each (below that a hand-off costs more than it saves).
  const int64_t tiles = ceil_div(out, 4);
  const int64_t min_tiles = std::max<int64_t>(1, (int64_t{1} << 16) / (4 * in * m));
  const int parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, tiles / min_tiles)));
  const std::function<void(int)> body = [&](int p) {
    const int64_t begin = tiles * p / parts * 4, end = std::min(out, tiles * (p + 1) / parts * 4);
#ifdef LOWRA_LOWBIT_HAVE_AVX2
    if (avx2) {
      q8_rows_avx2(weight, scales, in, x, m, out, y, begin, end);
      return;
    }
#endif
    q8_rows_scalar(weight, scales, in, x, m, out, y, begin, end);
  };
  WorkerPool::instance().run(parts, body);
  return LOWRA_LOWBIT_OK;
}

// ------------------------------------------------------------------------------------------------ low-rank side branch
// low[k] = <down_k, x>: input j in lane j % 8 (fused multiply-adds in input order), lanes added as half_sum adds them;
// y[r] += (sum over k in order of up[r, k] * low[k], fused). Factors are float32 or float16 (uint16_t bits, converted
// exactly): the same values give the same bits.
inline float factor(float v) { return v; }
inline float factor(uint16_t h) { return half_to_float(h); }

template <typename T = float>
float lane_dot_scalar(const T* a, const float* x, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t j = 0; j < n; ++j) acc[j % 8] = std::fma(factor(a[j]), x[j], acc[j % 8]);
  return ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
}

template <typename T>
void lowrank_up_scalar(const T* up, int64_t rank, const float* low, float* y, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    float t = 0.0f;
    for (int64_t k = 0; k < rank; ++k) t = std::fma(factor(up[r * rank + k]), low[k], t);
    y[r] += t;
  }
}

#ifdef LOWRA_LOWBIT_HAVE_AVX2
LOWRA_AVX2_FN inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
LOWRA_AVX2_FN inline __m256 load8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// The first n < 8 values of p, zeros after (a copy: no load leaves the buffer).
template <typename T>
LOWRA_AVX2_FN inline __m256 load_tail(const T* p, int64_t n) {
  T tail[8] = {};
  std::memcpy(tail, p, sizeof(T) * static_cast<size_t>(n));
  return load8(tail);
}

// R of the dots at once (independent chains: the loads of x shared, the latencies overlapped), each in lane_dot's order.
template <int R, typename T = float>
LOWRA_AVX2_FN void lane_dots_avx2(const T* a, int64_t stride, const float* x, int64_t n, float* out) {
  __m256 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 xj = _mm256_loadu_ps(x + j);
    for (int i = 0; i < R; ++i) acc[i] = _mm256_fmadd_ps(load8(a + i * stride + j), xj, acc[i]);
  }
  if (j < n) {  // the tail's missing lanes multiply zeros: acc + 0 is acc
    const __m256 xj = load_tail(x + j, n - j);
    for (int i = 0; i < R; ++i) acc[i] = _mm256_fmadd_ps(load_tail(a + i * stride + j, n - j), xj, acc[i]);
  }
  for (int i = 0; i < R; ++i) out[i] = half_sum(acc[i]);
}

// 8 outputs at a time: their up rows (8 values of k each) transposed so lane i holds row r + i, then one fused
// multiply-add per k: each lane's order is the scalar one. Ranks that are a multiple of 8 only.
template <typename T>
LOWRA_AVX2_FN void lowrank_up_avx2(const T* up, int64_t rank, const float* low, float* y, int64_t out) {
  int64_t r = 0;
  for (; r + 8 <= out; r += 8) {
    __m256 t = _mm256_setzero_ps();
    for (int64_t k0 = 0; k0 < rank; k0 += 8) {
      __m256 v[8];
      for (int i = 0; i < 8; ++i) v[i] = load8(up + (r + i) * rank + k0);
      // 8 x 8 transpose: afterwards v[k] holds up[r + i, k0 + k] in lane i.
      const __m256 a0 = _mm256_unpacklo_ps(v[0], v[1]), a1 = _mm256_unpackhi_ps(v[0], v[1]);
      const __m256 a2 = _mm256_unpacklo_ps(v[2], v[3]), a3 = _mm256_unpackhi_ps(v[2], v[3]);
      const __m256 a4 = _mm256_unpacklo_ps(v[4], v[5]), a5 = _mm256_unpackhi_ps(v[4], v[5]);
      const __m256 a6 = _mm256_unpacklo_ps(v[6], v[7]), a7 = _mm256_unpackhi_ps(v[6], v[7]);
      const __m256 b0 = _mm256_shuffle_ps(a0, a2, 0x44), b1 = _mm256_shuffle_ps(a0, a2, 0xEE);
      const __m256 b2 = _mm256_shuffle_ps(a1, a3, 0x44), b3 = _mm256_shuffle_ps(a1, a3, 0xEE);
      const __m256 b4 = _mm256_shuffle_ps(a4, a6, 0x44), b5 = _mm256_shuffle_ps(a4, a6, 0xEE);
      const __m256 b6 = _mm256_shuffle_ps(a5, a7, 0x44), b7 = _mm256_shuffle_ps(a5, a7, 0xEE);
      const __m256 col[8] = {
          _mm256_permute2f128_ps(b0, b4, 0x20), _mm256_permute2f128_ps(b1, b5, 0x20),
          _mm256_permute2f128_ps(b2, b6, 0x20), _mm256_permute2f128_ps(b3, b7, 0x20),
          _mm256_permute2f128_ps(b0, b4, 0x31), _mm256_permute2f128_ps(b1, b5, 0x31),
          _mm256_permute2f128_ps(b2, b6, 0x31), _mm256_permute2f128_ps(b3, b7, 0x31)};
      for (int k = 0; k < 8; ++k) t = _mm256_fmadd_ps(col[k], _mm256_broadcast_ss(low + k0 + k), t);
    }
    _mm256_storeu_ps(y + r, _mm256_add_ps(_mm256_loadu_ps(y + r), t));
  }
  lowrank_up_scalar(up, rank, low, y, r, out);  // the last < 8 outputs: the same order
}
#endif

// The side branch's schedule, shared by the value and code paths: per token, the rank dots by groups of 4 over up
// to two threads (where rank x (in + out) >= 4096), nothing more when they are all zero (no user loaded), then the
// outputs by blocks of 8. dots(first, last, x_t, low) fills low[first, last); ups(begin, end, low, y_t) adds to
// y_t[begin, end). Each dot and output is computed the same way whichever thread takes it.
template <typename Dots, typename Ups>
void side_branch_schedule(int64_t rank, int64_t in, int64_t out, const float* x, int64_t m, float* y, int threads,
                          const Dots& dots, const Ups& ups) {
  std::vector<float> low(static_cast<size_t>(rank));
  const int parts = static_cast<int>(std::min<int64_t>(threads, rank * (in + out) >= (int64_t{1} << 12) ? 2 : 1));
  const int64_t groups = ceil_div(rank, 4), blocks = ceil_div(out, 8);
  for (int64_t t = 0; t < m; ++t) {
    const float* xt = x + t * in;
    const std::function<void(int)> dot_parts = [&](int p) {
      for (int64_t group = groups * p / parts; group < groups * (p + 1) / parts; ++group)
        dots(4 * group, std::min(rank, 4 * group + 4), xt, low.data());
    };
    WorkerPool::instance().run(parts, dot_parts);
    if (std::all_of(low.begin(), low.end(), [](float v) { return v == 0.0f; })) continue;
    const std::function<void(int)> up_parts = [&](int p) {
      ups(blocks * p / parts * 8, std::min(out, blocks * (p + 1) / parts * 8), low.data(), y + t * out);
    };
    WorkerPool::instance().run(parts, up_parts);
  }
}

template <typename T>
int lowrank_add(const T* down, const T* up, int64_t rank, int64_t in, int64_t out, const float* x, int64_t m,
                float* y, int threads, int isa) {
  bool avx2 = false;
  if (!down || !up || !x || !y || rank <= 0 || in <= 0 || out <= 0 || m <= 0 || threads < 1) {
    return LOWRA_LOWBIT_INVALID_ARGUMENT;
  }
  if (int status = resolve_isa(isa, avx2)) return status;
  const auto dots = [&](int64_t first, int64_t last, const float* xt, float* low) {
#ifdef LOWRA_LOWBIT_HAVE_AVX2
    if (avx2 && last - first == 4) return lane_dots_avx2<4>(down + first * in, in, xt, in, low + first);
    if (avx2) {
      for (int64_t k = first; k < last; ++k) lane_dots_avx2<1>(down + k * in, in, xt, in, low + k);
      return;
    }
#endif
    for (int64_t k = first; k < last; ++k) low[k] = lane_dot_scalar(down + k * in, xt, in);
  };
  const auto ups = [&](int64_t begin, int64_t end, const float* low, float* yt) {
#ifdef LOWRA_LOWBIT_HAVE_AVX2
    if (avx2 && rank % 8 == 0) return lowrank_up_avx2(up + begin * rank, rank, low, yt + begin, end - begin);
#endif
    lowrank_up_scalar(up, rank, low, yt, begin, end);
  };
  side_branch_schedule(rank, in, out, x, m, y, threads, dots, ups);
  return LOWRA_LOWBIT_OK;
}

int packed_lowrank_add(const uint8_t* down_codes, const uint16_t* down_books, const uint8_t* up_codes,
                       const uint16_t* up_books, int64_t rank, int64_t in, int64_t out, const float* x, int64_t m,
                       float* y, int threads, int isa) {
  bool avx2 = false, permute2 = false;
  if (!down_codes || !down_books || !up_codes || !up_books || !x || !y || rank <= 0 || in <= 0 || out <= 0 || m <= 0 ||
      threads < 1) {
    return LOWRA_LOWBIT_INVALID_ARGUMENT;
  }
  if (int status = resolve_isa(isa, avx2, &permute2)) return status;
  std::vector<float> books(static_cast<size_t>(32 * rank));
  for (int64_t i = 0; i < 16 * rank; ++i) {
    books[i] = half_to_float(down_books[i]);
    books[16 * rank + i] = half_to_float(up_books[i]);
  }
  const float* down_levels = books.data();
  const float* up_levels = books.data() + 16 * rank;
  const int64_t down_bytes = ceil_div(in, 2), up_bytes = ceil_div(out, 2);
  const auto dots = [&](int64_t first, int64_t last, const float* xt, float* low) {
#ifdef LOWRA_LOWBIT_HAVE_AVX2
    if (avx2) {
      for (int64_t k = first; k < last;) {
        const uint8_t* codes = down_codes + k * down_bytes;
        const float* levels = down_levels + 16 * k;
        if (last - k == 4) {
          permute2 ? lut_avx512::packed_dots<4>(codes, down_bytes, levels, xt, in, low + k)
                   : lut_avx2::packed_dots<4>(codes, down_bytes, levels, xt, in, low + k);
          k += 4;
        } else {
          permute2 ? lut_avx512::packed_dots<1>(codes, down_bytes, levels, xt, in, low + k)
                   : lut_avx2::packed_dots<1>(codes, down_bytes, levels, xt, in, low + k);
          ++k;
        }
      }
      return;
    }
#endif
    for (int64_t k = first; k < last; ++k)
      low[k] = packed_dot_scalar(down_codes + k * down_bytes, down_levels + 16 * k, xt, in);
  };
  const auto ups = [&](int64_t begin, int64_t end, const float* low, float* yt) {
#ifdef LOWRA_LOWBIT_HAVE_AVX2
    if (permute2) return lut_avx512::packed_up(up_codes, up_bytes, up_levels, rank, low, yt, begin, end);
    if (avx2) return lut_avx2::packed_up(up_codes, up_bytes, up_levels, rank, low, yt, begin, end);
#endif
    packed_up_scalar(up_codes, up_bytes, up_levels, rank, low, yt, begin, end);
  };
  side_branch_schedule(rank, in, out, x, m, y, threads, dots, ups);
  return LOWRA_LOWBIT_OK;
}

// ------------------------------------------------------------------------------------------------ attention
struct Attention {
  const float *q, *k, *v;
  int64_t heads, queries, dim, kv_heads, keys;
  const uint8_t* keep;
  const float* add;
  int64_t mask_b, mask_h;
  bool causal;
  float scale;
  float* out;
};

// o += p * row (fused, element order): the weighted sum of values.
void axpy_scalar(float p, const float* row, float* o, int64_t n) {
  for (int64_t d = 0; d < n; ++d) o[d] = std::fma(p, row[d], o[d]);
}

#ifdef LOWRA_LOWBIT_HAVE_AVX2
LOWRA_AVX2_FN void axpy_avx2(float p, const float* row, float* o, int64_t n) {
  const __m256 pv = _mm256_set1_ps(p);
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) _mm256_storeu_ps(o + d, _mm256_fmadd_ps(pv, _mm256_loadu_ps(row + d), _mm256_loadu_ps(o + d)));
  axpy_scalar(p, row + d, o + d, n - d);
}
#endif

// Query (b, h, i): scores[j] for the keys it sees, then the softmax-weighted sum of their values.
void attend_one(const Attention& a, int64_t b, int64_t h, int64_t i, bool avx2, float* scores) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int64_t kv = b * a.kv_heads + h / (a.heads / a.kv_heads);
  const float* kh = a.k + kv * a.keys * a.dim;
  const float* vh = a.v + kv * a.keys * a.dim;
  const float* qi = a.q + ((b * a.heads + h) * a.queries + i) * a.dim;
  const int64_t mask_row = b * a.mask_b + h * a.mask_h + i * a.keys;
  float* oi = a.out + ((b * a.queries + i) * a.heads + h) * a.dim;
  float best = neg_inf;
  for (int64_t j = 0; j < a.keys; ++j) {
    float add = 0.0f;
    if (a.keep != nullptr) {
      if (!a.keep[mask_row + j]) { scores[j] = neg_inf; continue; }
    } else if (a.add != nullptr) {
      add = a.add[mask_row + j];
      if (add == neg_inf) { scores[j] = neg_inf; continue; }
    } else if (a.causal && j > i) {
      scores[j] = neg_inf;
      continue;
    }
    float dot = 0.0f;
#ifdef LOWRA_LOWBIT_HAVE_AVX2
    if (avx2) lane_dots_avx2<1>(kh + j * a.dim, 0, qi, a.dim, &dot);
    else dot = lane_dot_scalar(kh + j * a.dim, qi, a.dim);
#else
    dot = lane_dot_scalar(kh + j * a.dim, qi, a.dim);
#endif
    scores[j] = dot * a.scale + add;
    best = std::max(best, scores[j]);
  }
  std::fill(oi, oi + a.dim, 0.0f);
  if (best == neg_inf) return;  // every key masked: zeros
  float total = 0.0f;
  for (int64_t j = 0; j < a.keys; ++j) {
    if (scores[j] == neg_inf) continue;
    const float p = std::exp(scores[j] - best);
    total += p;
#ifdef LOWRA_LOWBIT_HAVE_AVX2
    if (avx2) {
      axpy_avx2(p, vh + j * a.dim, oi, a.dim);
      continue;
    }
#endif
    axpy_scalar(p, vh + j * a.dim, oi, a.dim);
  }
  const float inv = 1.0f / total;
  for (int64_t d = 0; d < a.dim; ++d) oi[d] *= inv;
}

int attention(const Attention& a, int64_t batch, int threads, int isa) {
  bool avx2 = false;
  if (int status = resolve_isa(isa, avx2)) return status;
  const int64_t tasks = batch * a.heads * a.queries;
  // Parts of at least ~16k multiply-adds (below that a hand-off costs more than it saves).
  const int64_t per_task = 2 * a.keys * a.dim;
  const int64_t min_tasks = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, per_task));
  const int parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, tasks / min_tasks)));
  const std::function<void(int)> body = [&](int p) {
    std::vector<float> scores(static_cast<size_t>(a.keys));
    for (int64_t t = tasks * p / parts; t < tasks * (p + 1) / parts; ++t) {
      const int64_t i = t % a.queries, h = t / a.queries % a.heads, b = t / (a.queries * a.heads);
      attend_one(a, b, h, i, avx2, scores.data());
    }
  };
  WorkerPool::instance().run(parts, body);
  return LOWRA_LOWBIT_OK;
}

// 2-bit byte of the file (element k's code at bits 2k, 2k+1) -> bit-planar byte (b0 at bit k, b1 at bit 4 + k).
uint8_t planar_byte(unsigned byte) {
  unsigned out = 0;
  for (unsigned k = 0; k < 4; ++k) out |= (((byte >> (2 * k)) & 1u) << k) | (((byte >> (2 * k + 1)) & 1u) << (4 + k));
  return static_cast<uint8_t>(out);
}

// lowra_lowbit_block's work (arguments checked by the caller).
int block_codes(int64_t out_features, int64_t in_features, const uint8_t* widths, const uint8_t* rows,
                uint8_t* blocked) {
  std::vector<int64_t> row_start(static_cast<size_t>(out_features) + 1, 0);
  for (int64_t r = 0; r < out_features; ++r) {
    const int w = widths[r];
    if (w != 1 && w != 2 && w != 4) return LOWRA_LOWBIT_BAD_WIDTH;
    row_start[r + 1] = row_start[r] + ceil_div(in_features * w, 8);
  }
  return for_each_blocked_row(out_features, in_features, widths, [&](int64_t r, int64_t block, int lane, int count) {
    const int64_t nbytes = row_start[r + 1] - row_start[r];
    for (int64_t b = 0; b < nbytes; ++b) {
      blocked[block + blocked_byte(widths[r], nbytes, lane, count, b)] = rows[row_start[r] + b];
    }
  });
}

}  // namespace

struct lowra_lowbit_plan {
  Plan plan;
};

extern "C" {

int lowra_lowbit_repack(int64_t out_features, int64_t in_features, const uint8_t* widths, uint8_t* codes) {
  if (out_features <= 0 || in_features <= 0 || !widths || !codes) return LOWRA_LOWBIT_INVALID_ARGUMENT;
  uint8_t planar[256];
  for (unsigned b = 0; b < 256; ++b) planar[b] = planar_byte(b);
  int64_t offset = 0;
  for (int64_t r = 0; r < out_features; ++r) {
    const int w = widths[r];
    if (w != 1 && w != 2 && w != 4) return LOWRA_LOWBIT_BAD_WIDTH;
    const int64_t nbytes = ceil_div(in_features * w, 8);
    if (w == 2) {
      for (int64_t b = offset; b < offset + nbytes; ++b) codes[b] = planar[codes[b]];
    }
    offset += nbytes;
  }
  return LOWRA_LOWBIT_OK;
}

int lowra_lowbit_block(int64_t out_features, int64_t in_features, const uint8_t* widths, const uint8_t* rows,
                       uint8_t* blocked) {
  if (out_features <= 0 || in_features <= 0 || !widths || !rows || !blocked) return LOWRA_LOWBIT_INVALID_ARGUMENT;
  try {
    return block_codes(out_features, in_features, widths, rows, blocked);
  } catch (const std::bad_alloc&) {
    return LOWRA_LOWBIT_OUT_OF_MEMORY;
  }
}

int lowra_lowbit_gemv(const lowra_lowbit_layer* layer, const float* x, float* y, int threads, int isa) {
  try {
    Plan plan;
    if (int status = build_plan(layer, plan)) return status;
    return gemv(plan, layer, x, y, threads, isa);
  } catch (const std::bad_alloc&) {
    return LOWRA_LOWBIT_OUT_OF_MEMORY;
  }
}

int lowra_lowbit_gemm(const lowra_lowbit_layer* layer, const float* x, int64_t n_tokens, float* y, int threads,
                      int isa) {
  try {
    Plan plan;
    if (int status = build_plan(layer, plan)) return status;
    return gemm(plan, layer, x, n_tokens, y, threads, isa);
  } catch (const std::bad_alloc&) {
    return LOWRA_LOWBIT_OUT_OF_MEMORY;
  }
}

int lowra_lowbit_plan_create(const lowra_lowbit_layer* layer, lowra_lowbit_plan** plan) {
  if (!plan) return LOWRA_LOWBIT_INVALID_ARGUMENT;
  *plan = nullptr;
  try {
    auto made = std::make_unique<lowra_lowbit_plan>();
    if (int status = build_plan(layer, made->plan)) return status;
    *plan = made.release();
    return LOWRA_LOWBIT_OK;
  } catch (const std::bad_alloc&) {
    return LOWRA_LOWBIT_OUT_OF_MEMORY;
  }
}

void lowra_lowbit_plan_destroy(lowra_lowbit_plan* plan) { delete plan; }

int lowra_lowbit_plan_gemv(const lowra_lowbit_plan* plan, const lowra_lowbit_layer* layer, const float* x, float* y,
                           int threads, int isa) {
  if (!plan) return LOWRA_LOWBIT_INVALID_ARGUMENT;
  if (!plan_matches(plan->plan, layer)) return LOWRA_LOWBIT_PLAN_MISMATCH;
  try {
    return gemv(plan->plan, layer, x, y, threads, isa);
  } catch (const std::bad_alloc&) {
    return LOWRA_LOWBIT_OUT_OF_MEMORY;
  }
}

int lowra_lowbit_plan_gemm(const lowra_lowbit_plan* plan, const lowra_lowbit_layer* layer, const float* x,
                           int64_t n_tokens, float* y, int threads, int isa) {
  if (!plan) return LOWRA_LOWBIT_INVALID_ARGUMENT;
  if (!plan_matches(plan->plan, layer)) return LOWRA_LOWBIT_PLAN_MISMATCH;
  try {
    return gemm(plan->plan, layer, x, n_tokens, y, threads, isa);
  } catch (const std::bad_alloc&) {
    return LOWRA_LOWBIT_OUT_OF_MEMORY;
  }
}

int lowra_f16_gemm(const uint16_t* weight, int64_t out_features, int64_t in_features, const float* x, int64_t n_tokens,
                   float* y, int threads, int isa) {
  try {
    return f16_gemm(weight, out_features, in_features, x, n_tokens, y, threads, isa);
  } catch (const std::bad_alloc&) {
    return LOWRA_LOWBIT_OUT_OF_MEMORY;
  }
}

int lowra_q8_gemm(const int8_t* weight, const uint16_t* scales, int64_t out_features, int64_t in_features,
                  const float* x, int64_t n_tokens, float* y, int threads, int isa) {
  try {
    return q8_gemm(weight, scales, out_features, in_features, x, n_tokens, y, threads, isa);
  } catch (const std::bad_alloc&) {
    return LOWRA_LOWBIT_OUT_OF_MEMORY;
  }
}

int lowra_lowrank_add(const float* down, const float* up, int64_t rank, int64_t in_features, int64_t out_features,
                      const float* x, int64_t n_tokens, float* y, int threads, int isa) {
  try {
    return lowrank_add(down, up, rank, in_features, out_features, x, n_tokens, y, threads, isa);
  } catch (const std::bad_alloc&) {
    return LOWRA_LOWBIT_OUT_OF_MEMORY;
  }
}

int lowra_lowrank_add_f16(const uint16_t* down, const uint16_t* up, int64_t rank, int64_t in_features,
                          int64_t out_features, const float* x, int64_t n_tokens, float* y, int threads, int isa) {
  try {
    return lowrank_add(down, up, rank, in_features, out_features, x, n_tokens, y, threads, isa);
  } catch (const std::bad_alloc&) {
    return LOWRA_LOWBIT_OUT_OF_MEMORY;
  }
}

int lowra_lowrank4_add(const uint8_t* down_codes, const uint16_t* down_books, const uint8_t* up_codes,
                       const uint16_t* up_books, int64_t rank, int64_t in_features, int64_t out_features,
                       const float* x, int64_t n_tokens, float* y, int threads, int isa) {
  try {
    return packed_lowrank_add(down_codes, down_books, up_codes, up_books, rank, in_features, out_features, x, n_tokens,
                              y, threads, isa);
  } catch (const std::bad_alloc&) {
    return LOWRA_LOWBIT_OUT_OF_MEMORY;
  }
}

int lowra_attention(const float* q, const float* k, const float* v, int64_t batch, int64_t heads, int64_t queries,
                    int64_t dim, int64_t kv_heads, int64_t keys, const uint8_t* mask_keep, const float* mask_add,
                    int64_t mask_batch_stride, int64_t mask_head_stride, int causal, float scale, float* out,
                    int threads, int isa) {
  if (!q || !k || !v || !out || batch <= 0 || heads <= 0 || queries <= 0 || dim <= 0 || kv_heads <= 0 || keys <= 0 ||
      heads % kv_heads || (mask_keep && mask_add) || mask_batch_stride < 0 || mask_head_stride < 0 || threads < 1) {
    return LOWRA_LOWBIT_INVALID_ARGUMENT;
  }
  const Attention a{q, k, v, heads, queries, dim, kv_heads, keys, mask_keep, mask_add, mask_batch_stride,
                    mask_head_stride, causal != 0, scale, out};
  try {
    return attention(a, batch, threads, isa);
  } catch (const std::bad_alloc&) {
    return LOWRA_LOWBIT_OUT_OF_MEMORY;
  }
}

int lowra_lowbit_isa_available(int isa) { return isa_supported(isa) ? 1 : 0; }

const char* lowra_lowbit_status_name(int status) {
  switch (status) {
    case LOWRA_LOWBIT_OK: return "ok";
    case LOWRA_LOWBIT_INVALID_ARGUMENT: return "invalid argument";
    case LOWRA_LOWBIT_BAD_WIDTH: return "row width not in {1, 2, 4}";
    case LOWRA_LOWBIT_ISA_UNAVAILABLE: return "instruction set not available on this CPU or build";
    case LOWRA_LOWBIT_OUT_OF_MEMORY: return "out of memory";
    case LOWRA_LOWBIT_PLAN_MISMATCH: return "the plan was made for a layer of another shape, layout or widths";
    default: return "unknown status";
  }
}

}  // extern "C"
