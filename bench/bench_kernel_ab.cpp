// Two builds of lowra's low-bit kernel library side by side: the GEMV of SmolLM2-135M's 210 linears (q, k, v, o,
// gate, up, down per block, 30 blocks, in model order, so each layer streams from memory as in a decode step) through
// each library's plans, alternating A and B every round; prints each one's median ms per token and B / A.
//
// Build (any C++17 compiler; the libraries are loaded with dlopen, so A and B may be any two builds of
// device_runtime/native/kernels/lowbit_gemv.cpp, e.g. `git stash`'s and today's):
//   g++ -O2 -std=c++17 -I device_runtime/native/kernels bench/bench_kernel_ab.cpp -o /tmp/kernel_ab -ldl
//   g++ -O3 -std=c++17 -fPIC -shared -pthread device_runtime/native/kernels/lowbit_gemv.cpp -o /tmp/b.so
// Run: /tmp/kernel_ab A.so B.so WIDTH [GROUP [ONE_LAYER]]
//   WIDTH: every row 1, 2 or 4 bits, or 0 for a mix (10% 1-bit, 45% 2-bit, 45% 4-bit rows); GROUP: absmax group
//   size (0: none); ONE_LAYER 1: one 1536 x 576 layer repeated while cached instead of the 210 streamed.
// Random codes and levels (speed does not depend on values); 1 then 2 threads; medians of 11 rounds. Run it on
// idle cores: a second job beside it makes every figure meaningless.
#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "lowbit_gemv.h"

namespace {

using CreatePlan = int (*)(const lowra_lowbit_layer*, lowra_lowbit_plan**);
using PlanGemv = int (*)(const lowra_lowbit_plan*, const lowra_lowbit_layer*, const float*, float*, int, int);
using Block = int (*)(int64_t, int64_t, const uint8_t*, const uint8_t*, uint8_t*);

struct Layer {
  lowra_lowbit_layer view;
  std::vector<uint8_t> widths, codes;
  std::vector<uint16_t> books, scales;
  int input;  // which of the block's inputs it multiplies (q/k/v share one, gate/up another)
};

// float16 bits of a value in [-1, 1) (truncated mantissa: any level will do).
uint16_t to_half(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000;
  const int exponent = static_cast<int>((u >> 23) & 255) - 127 + 15;
  return static_cast<uint16_t>(exponent <= 0 ? sign : sign | (exponent << 10) | ((u >> 13) & 0x3ff));
}

void* open_library(const char* path) {
  void* handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    std::fprintf(stderr, "cannot load %s: %s\n", path, dlerror());
    std::exit(2);
  }
  return handle;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s A.so B.so WIDTH(0|1|2|4) [GROUP [ONE_LAYER]]\n", argv[0]);
    return 2;
  }
  const int width = std::atoi(argv[3]), group = argc > 4 ? std::atoi(argv[4]) : 0;
  const bool one_layer = argc > 5 && std::atoi(argv[5]) != 0;
  void* libraries[2] = {open_library(argv[1]), open_library(argv[2])};
  const auto block = reinterpret_cast<Block>(dlsym(libraries[0], "lowra_lowbit_block"));
  std::mt19937 rng(1);
  const int shapes[7][2] = {{576, 576}, {192, 576}, {192, 576}, {576, 576}, {1536, 576}, {1536, 576}, {576, 1536}};
  const int inputs_of[7] = {0, 0, 0, 1, 2, 2, 3};
  std::vector<Layer> layers;
  for (int b = 0; b < (one_layer ? 1 : 30); ++b) {
    for (int k = 0; k < 7; ++k) {
      if (one_layer && k != 4) continue;
      Layer a;
      const int out = shapes[k][0], in = shapes[k][1];
      a.widths.resize(out);
      int64_t n_bytes = 0;
      for (auto& w : a.widths) {
        const int u = static_cast<int>(rng() % 20);
        w = static_cast<uint8_t>(width ? width : u < 2 ? 1 : u < 11 ? 2 : 4);
        n_bytes += (int64_t{in} * w + 7) / 8;
      }
      std::vector<uint8_t> rows(n_bytes);
      for (auto& v : rows) v = static_cast<uint8_t>(rng());
      a.codes.resize(rows.size());
      block(out, in, a.widths.data(), rows.data(), a.codes.data());
      for (int r = 0; r < out; ++r) {
        std::vector<float> levels(size_t{1} << a.widths[r]);
        for (auto& v : levels) v = static_cast<float>(rng() % 2000) / 1000.0f - 1.0f;
        std::sort(levels.begin(), levels.end());
        for (float v : levels) a.books.push_back(to_half(v));
      }
      const int n_groups = group ? (in + group - 1) / group : 0;
      a.scales.resize(static_cast<size_t>(out) * n_groups);
      for (auto& v : a.scales) v = to_half(0.5f + static_cast<float>(rng() % 1000) / 2000.0f);
      a.input = b * 4 + inputs_of[k];
      a.view = {out, in, group, a.widths.data(), a.codes.data(), a.books.data(), group ? a.scales.data() : nullptr,
                LOWRA_LOWBIT_LAYOUT_BLOCKED};
      layers.push_back(std::move(a));
    }
  }
  std::vector<std::vector<float>> xs(120, std::vector<float>(1536));
  for (auto& x : xs)
    for (auto& v : x) v = static_cast<float>(rng() % 2000) / 1000.0f - 1.0f;
  std::vector<float> y(1536);
  std::vector<lowra_lowbit_plan*> plans[2];
  PlanGemv gemv[2];
  for (int i = 0; i < 2; ++i) {
    gemv[i] = reinterpret_cast<PlanGemv>(dlsym(libraries[i], "lowra_lowbit_plan_gemv"));
    const auto create = reinterpret_cast<CreatePlan>(dlsym(libraries[i], "lowra_lowbit_plan_create"));
    for (auto& a : layers) {
      lowra_lowbit_plan* plan = nullptr;
      if (create(&a.view, &plan) != 0) return 1;
      plans[i].push_back(plan);
    }
  }
  const int reps = one_layer ? 200 : 20;
  for (int threads : {1, 2}) {
    std::vector<double> ms[2];
    for (int round = 0; round < 11; ++round) {
      for (int j = 0; j < 2; ++j) {
        const int i = round % 2 ? 1 - j : j;  // alternate which goes first
        const auto start = std::chrono::steady_clock::now();
        for (int rep = 0; rep < reps; ++rep) {
          for (size_t k = 0; k < layers.size(); ++k) {
            gemv[i](plans[i][k], &layers[k].view, xs[layers[k].input].data(), y.data(), threads, 0);
          }
        }
        ms[i].push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count() /
                        reps);
      }
    }
    for (auto& m : ms) std::sort(m.begin(), m.end());
    std::printf("width %d group %d threads %d: A %.3f ms  B %.3f ms  B/A %.3f\n", width, group, threads, ms[0][5],
                ms[1][5], ms[1][5] / ms[0][5]);
  }
  return 0;
}
