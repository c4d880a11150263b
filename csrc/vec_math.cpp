#include "vec_math.h"

namespace narvl {

NARVL_CLONES void row_stats_f32(const float* x, int64_t V, float* out_max, double* out_sumexp,
                                double* out_sum) {
  const float ninf = -std::numeric_limits<float>::infinity();
  float mx[kLanes], sm[kLanes], se[kLanes];
  for (int j = 0; j < kLanes; ++j) {
    mx[j] = ninf;
    sm[j] = 0.f;
    se[j] = 0.f;
  }
  int64_t i = 0;
  for (; i + kLanes <= V; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      float v = x[i + j];
      mx[j] = v > mx[j] ? v : mx[j];
      sm[j] += v;
    }
  }
  for (int64_t t = i; t < V; ++t) {
    float v = x[t];
    mx[t - i] = v > mx[t - i] ? v : mx[t - i];
    sm[t - i] += v;
  }
  float m = ninf;
  double s = 0.0;
  for (int j = 0; j < kLanes; ++j) {
    m = mx[j] > m ? mx[j] : m;
    s += sm[j];
  }
  i = 0;
  for (; i + kLanes <= V; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) se[j] += exp_f32(x[i + j] - m);
  }
  for (int64_t t = i; t < V; ++t) se[t - i] += exp_f32(x[t] - m);
  double e = 0.0;
  for (int j = 0; j < kLanes; ++j) e += se[j];
  *out_max = m;
  *out_sumexp = e;
  *out_sum = s;
}

NARVL_CLONES void row_softmax_affine_f32(const float* x, int64_t V, float shift, float A, float C,
                                         float* out) {
  for (int64_t v = 0; v < V; ++v) out[v] = A * exp_f32(x[v] - shift) + C;
}

static inline float lse3_plus_f32(float a0, float a1, float a2, float e) {
  const float ninf = -std::numeric_limits<float>::infinity();
  float m = a0;
  m = a1 > m ? a1 : m;
  m = a2 > m ? a2 : m;
  const bool dead = m == ninf;
  const float ms = dead ? 0.f : m;
  const float r = ms + log_f32(exp_f32(a0 - ms) + exp_f32(a1 - ms) + exp_f32(a2 - ms)) + e;
  return dead ? a0 + a1 + a2 : r;
}

NARVL_CLONES void lattice_row_fwd_f32(const float* prev, const float* skip, const float* e,
                                      float* out, int64_t lo, int64_t hi) {
  for (int64_t s = lo; s < hi; ++s)
    out[s] = lse3_plus_f32(prev[s], prev[s - 1], prev[s - 2] + skip[s], e[s]);
}

NARVL_CLONES void lattice_row_bwd_f32(const float* next, const float* skip, const float* e,
                                      float* out, int64_t lo, int64_t hi) {
  for (int64_t s = lo; s < hi; ++s)
    out[s] = lse3_plus_f32(next[s], next[s + 1], next[s + 2] + skip[s], e[s]);
}

}  // namespace narvl
