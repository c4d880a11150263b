// Microbenchmark of the CPU beam search's frame top-k (csrc/vec_math.cpp, row_topk_f32) against
// a plain vector sum of the same rows (the read floor), outside torch and the search.
//
// Rows: the caption bench's log-probs (bench/setups.py decode_inputs("caption"), 640 rows of
// V = 59,458), written once by
//   python -c "import sys; sys.path.insert(0, 'bench'); from setups import decode_inputs; \
//              x = decode_inputs('caption'); x = x[0] if isinstance(x, tuple) else x; \
//              x.contiguous().numpy().tofile('/tmp/caption_rows.bin')"
// Build and run (seconds; only vec_math.cpp is compiled):
//   g++ -O3 -Icsrc -o /tmp/topk_micro bench/topk_row_micro.cpp csrc/vec_math.cpp
//   /tmp/topk_micro /tmp/caption_rows.bin [k]
// Prints, per row, the best of 15 sweeps of each; without a file it uses random rows.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "vec_math.h"

namespace {
constexpr long kV = 59458, kRows = 640;

typedef float F16 __attribute__((vector_size(64)));

__attribute__((target("avx512f"), noinline)) float row_sum(const float* x, long V) {
  F16 acc[8] = {};
  long i = 0;
  for (; i + 128 <= V; i += 128)
    for (int a = 0; a < 8; ++a) {
      F16 v;
      std::memcpy(&v, x + i + 16 * a, sizeof(v));
      acc[a] += v;
    }
  F16 s = acc[0];
  for (int a = 1; a < 8; ++a) s += acc[a];
  float r = 0.f;
  for (int j = 0; j < 16; ++j) r += s[j];
  for (; i < V; ++i) r += x[i];
  return r;
}
}  // namespace

int main(int argc, char** argv) {
  std::vector<float> rows(kV * kRows);
  if (argc > 1) {
    FILE* f = std::fopen(argv[1], "rb");
    if (!f || std::fread(rows.data(), sizeof(float), rows.size(), f) != rows.size()) {
      std::fprintf(stderr, "cannot read %ld float32 rows of %ld from %s\n", kRows, kV, argv[1]);
      return 1;
    }
    std::fclose(f);
  } else {
    std::mt19937 g(0);
    std::normal_distribution<float> n;
    for (float& v : rows) v = 3.f * n(g) - 11.f;
  }
  const long k = argc > 2 ? std::atol(argv[2]) : 40;
  std::vector<float> vals(narvl::topk_buffer_size(k));
  std::vector<int32_t> idx(vals.size());
  using clock = std::chrono::steady_clock;
  for (int round = 0; round < 3; ++round) {
    double best_topk = 1e30, best_sum = 1e30;
    for (int rep = 0; rep < 15; ++rep) {
      bool nan = false;
      long found = 0;
      auto t0 = clock::now();
      for (long r = 0; r < kRows; ++r)
        found += narvl::row_topk_f32(rows.data() + r * kV, kV, k, vals.data(), idx.data(), &nan, nullptr);
      auto t1 = clock::now();
      float s = 0.f;
      for (long r = 0; r < kRows; ++r) s += row_sum(rows.data() + r * kV, kV);
      auto t2 = clock::now();
      best_topk = std::min(best_topk, std::chrono::duration<double, std::micro>(t1 - t0).count() / kRows);
      best_sum = std::min(best_sum, std::chrono::duration<double, std::micro>(t2 - t1).count() / kRows);
      if (found < 0 || s == 1.2345f) std::puts("");  // keeps both loops
    }
    std::printf("k %ld: top-k %.2f us/row, sum (read floor) %.2f us/row, ratio %.2f\n", k, best_topk, best_sum,
                best_topk / best_sum);
  }
  return 0;
}
