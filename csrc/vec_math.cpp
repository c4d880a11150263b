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

NARVL_CLONES bool row_softmax_affine_f32(const float* x, int64_t V, float shift, float A, float C,
                                         float* out) {
  const float ninf = -std::numeric_limits<float>::infinity();
  int32_t neg[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= V; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float v = x[i + j];
      out[i + j] = A * exp_f32(v - shift) + C;
      neg[j] |= v == ninf;
    }
  }
  for (int64_t t = i; t < V; ++t) {
    out[t] = A * exp_f32(x[t] - shift) + C;
    neg[t - i] |= x[t] == ninf;
  }
  int32_t any = 0;
  for (int j = 0; j < kLanes; ++j) any |= neg[j];
  return any != 0;
}

NARVL_CLONES bool row_ctc_fill_f32(const float* x, int64_t V, float gn, float* out) {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float pinf = inf * gn;
  int32_t bad[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= V; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float v = x[i + j];
      const bool nf = !(v - v == 0.f);  // NaN or +-inf
      out[i + j] = nf ? (v == inf ? pinf : nan) : 0.f;
      bad[j] |= nf;
    }
  }
  for (int64_t t = i; t < V; ++t) {
    const float v = x[t];
    const bool nf = !(v - v == 0.f);
    out[t] = nf ? (v == inf ? pinf : nan) : 0.f;
    bad[t - i] |= nf;
  }
  int32_t any = 0;
  for (int j = 0; j < kLanes; ++j) any |= bad[j];
  return any != 0;
}

// GCC vector extensions: 16 float lanes, lowered to the ISA of each target_clones variant
// (one zmm on AVX-512, two ymm on AVX2, four xmm on the baseline).
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

// max over the 16 lanes: a 4-step shuffle tree instead of 15 dependent scalar steps.
static inline float hmax16(v16f v) {
  const v16i s8 = {8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7};
  const v16i s4 = {4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11};
  const v16i s2 = {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13};
  const v16i s1 = {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14};
  v16f t = __builtin_shuffle(v, s8);
  v = v > t ? v : t;
  t = __builtin_shuffle(v, s4);
  v = v > t ? v : t;
  t = __builtin_shuffle(v, s2);
  v = v > t ? v : t;
  t = __builtin_shuffle(v, s1);
  v = v > t ? v : t;
  return v[0];
}

static inline v16f load16(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

NARVL_CLONES int64_t row_argmax_f32(const float* x, int64_t V, bool* nan) {
  const float ninf = -std::numeric_limits<float>::infinity();
  v16f best = {ninf, ninf, ninf, ninf, ninf, ninf, ninf, ninf,
               ninf, ninf, ninf, ninf, ninf, ninf, ninf, ninf};
  v16i arg = {0}, bad = {0};
  v16i idx = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  int64_t i = 0;
  for (; i + kLanes <= V; i += kLanes) {
    const v16f v = load16(x + i);
    const v16i up = v > best;  // strict: each lane keeps its first maximum
    best = up ? v : best;
    arg = up ? idx : arg;
    bad |= v != v;
    idx += kLanes;
  }
  float m = ninf;
  int64_t a = 0;
  bool any_bad = false;
  for (int j = 0; j < kLanes; ++j) {
    any_bad |= bad[j] != 0;
    if (best[j] > m || (best[j] == m && arg[j] < a)) {
      m = best[j];
      a = arg[j];
    }
  }
  for (int64_t t = i; t < V; ++t) {  // the tail comes after every lane's index
    any_bad |= x[t] != x[t];
    if (x[t] > m) {
      m = x[t];
      a = t;
    }
  }
  *nan = any_bad;
  return m == ninf ? 0 : a;
}

NARVL_CLONES bool block_max_f32(const float* x, int64_t V, int64_t block, float* out) {
  const float ninf = -std::numeric_limits<float>::infinity();
  v16i bad = {0};
  bool tail_bad = false;
  int64_t b = 0;
  for (int64_t s = 0; s < V; s += block, ++b) {
    const int64_t e = s + block <= V ? s + block : V;
    v16f mx = {ninf, ninf, ninf, ninf, ninf, ninf, ninf, ninf,
               ninf, ninf, ninf, ninf, ninf, ninf, ninf, ninf};
    int64_t i = s;
    for (; i + kLanes <= e; i += kLanes) {
      const v16f v = load16(x + i);
      mx = v > mx ? v : mx;
      bad |= v != v;
    }
    float m = hmax16(mx);
    for (; i < e; ++i) {
      m = x[i] > m ? x[i] : m;
      tail_bad |= x[i] != x[i];
    }
    out[b] = m;
  }
  bool any = tail_bad;
  for (int j = 0; j < kLanes; ++j) any |= bad[j] != 0;
  return any;
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
