#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace narvl {

// GCC vector extensions: 16 float lanes, lowered to the ISA of each target_clones variant
// (one zmm on AVX-512, two ymm on AVX2, four xmm on the baseline), for the kernels below that
// only compare, select and add.
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

static inline v16f load16(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// The Q-CTC row kernels (exp-heavy) are instantiated at each ISA's native width instead: GCC
// scalarises wider-than-native vector selects and conversions (the AVX2 build of a 16-lane
// version ran ~15x slower than its AVX-512 one). W lanes of VF (floats) / VI (int32).
template <int W>
struct Vec {
  typedef float F __attribute__((vector_size(4 * W)));
  typedef int32_t I __attribute__((vector_size(4 * W)));
};

template <typename F>
__attribute__((always_inline)) static inline F vload(const float* p) {
  F v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename F>
__attribute__((always_inline)) static inline F vsplat(float a) {
  return F{} + a;
}

// exp_f32 (vec_math.h) on a vector: the same exp_poly and clamps.
template <typename F, typename I>
__attribute__((always_inline)) static inline F vexp(F x) {
  const F xc = x < vsplat<F>(-100.f) ? vsplat<F>(-100.f) : x;  // NaN stays (comparison false)
  F fn;
  const F p = exp_poly(xc, &fn);
  I n = __builtin_convertvector(fn == fn ? fn : vsplat<F>(0.f), I);
  n = n < -126 ? I{} - 126 : (n > 127 ? I{} + 127 : n);
  const I bits = (n + 127) << 23;
  F scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const F y = p * scale;
  return xc < vsplat<F>(-87.33654f) ? vsplat<F>(0.f) : y;
}

// One pass over the row from memory: blocks of 16 vectors (L1-resident) are swept twice, once
// for the per-lane block maximum and the plain sum, once for sum exp(x - max) with the lane's
// running sum rescaled when its maximum grows (online softmax, one extra exp per lane and
// block). A lane whose maximum is still -inf shifts by 0, so exp(-inf - 0) = 0 there. The
// summation order depends on V and the ISA only (deterministic for any thread count).
template <int W>
__attribute__((always_inline)) static inline void row_stats_impl(const float* x, int64_t V, float* out_max,
                                                                 double* out_sumexp, double* out_sum) {
  typedef typename Vec<W>::F F;
  typedef typename Vec<W>::I I;
  constexpr int64_t kBlock = 16 * W;
  const float ninf = -std::numeric_limits<float>::infinity();
  const F vninf = vsplat<F>(ninf);
  F mx = vninf, sm = vsplat<F>(0.f), se = vsplat<F>(0.f);
  int64_t i = 0;
  for (; i + kBlock <= V; i += kBlock) {
    F bm = vninf;
    for (int64_t k = 0; k < kBlock; k += W) {
      const F v = vload<F>(x + i + k);
      bm = v > bm ? v : bm;
      sm += v;
    }
    const F mn = bm > mx ? bm : mx;
    const F sh = mn == vninf ? vsplat<F>(0.f) : mn;
    se *= vexp<F, I>(mx - sh);
    mx = mn;
    for (int64_t k = 0; k < kBlock; k += W) se += vexp<F, I>(vload<F>(x + i + k) - sh);
  }
  for (; i < V; i += W) {  // the tail, a vector at a time, the last one padded with -inf / 0
    F v, z;
    if (i + W <= V) {
      v = z = vload<F>(x + i);
    } else {
      float pad[W], zero[W];
      for (int j = 0; j < W; ++j) {
        pad[j] = i + j < V ? x[i + j] : ninf;
        zero[j] = i + j < V ? x[i + j] : 0.f;
      }
      v = vload<F>(pad);
      z = vload<F>(zero);
    }
    sm += z;
    const F mn = v > mx ? v : mx;
    const F sh = mn == vninf ? vsplat<F>(0.f) : mn;
    se = se * vexp<F, I>(mx - sh) + vexp<F, I>(v - sh);
    mx = mn;
  }
  float m = ninf;
  double s = 0.0, e = 0.0;
  for (int j = 0; j < W; ++j) {
    m = mx[j] > m ? mx[j] : m;
    s += sm[j];
  }
  const double ms = m == ninf ? 0.0 : static_cast<double>(m);
  for (int j = 0; j < W; ++j)
    e += static_cast<double>(se[j]) * (mx[j] == ninf ? 0.0 : std::exp(static_cast<double>(mx[j]) - ms));
  *out_max = m;
  *out_sumexp = e;
  *out_sum = s;
}

// out[v] = A * exp(x[v] - shift) + C; returns whether x holds a -inf.
template <int W>
__attribute__((always_inline)) static inline bool softmax_affine_impl(const float* x, int64_t V, float shift,
                                                                      float A, float C, float* out) {
  typedef typename Vec<W>::F F;
  typedef typename Vec<W>::I I;
  const float ninf = -std::numeric_limits<float>::infinity();
  I negv = I{};
  int64_t i = 0;
  for (; i + W <= V; i += W) {
    const F v = vload<F>(x + i);
    const F r = vexp<F, I>(v - shift) * A + C;
    negv |= v == ninf;
    std::memcpy(out + i, &r, sizeof(F));
  }
  int32_t neg = 0;
  for (; i < V; ++i) {
    out[i] = A * exp_f32(x[i] - shift) + C;
    neg |= x[i] == ninf;
  }
  for (int j = 0; j < W; ++j) neg |= negv[j] != 0;
  return neg != 0;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define NARVL_X86_DISPATCH 1
#define NARVL_V4 __attribute__((target("arch=x86-64-v4")))
#define NARVL_V3 __attribute__((target("arch=x86-64-v3")))

// Streaming variant: the gradient row is written once and not read again by this kernel, so
// whole 64-byte lines go out with non-temporal stores, which skip the read-for-ownership of a
// plain store (a third of the backward's memory traffic). Chunks are computed into an L1 buffer,
// then streamed; the unaligned head and the tail use plain stores.
constexpr int64_t kStreamChunk = 512;
#define NARVL_STREAMED_ROW(W, STREAM_CHUNK)                                              \
  int64_t i = 0;                                                                         \
  bool neg = false;                                                                      \
  const int64_t head = std::min<int64_t>(                                                \
      V, ((64 - reinterpret_cast<uintptr_t>(out) % 64) % 64) / sizeof(float));           \
  neg |= softmax_affine_impl<W>(x, head, shift, A, C, out);                              \
  i = head;                                                                              \
  alignas(64) float buf[kStreamChunk];                                                   \
  for (; i + kStreamChunk <= V; i += kStreamChunk) {                                     \
    neg |= softmax_affine_impl<W>(x + i, kStreamChunk, shift, A, C, buf);                \
    STREAM_CHUNK;                                                                        \
  }                                                                                      \
  neg |= softmax_affine_impl<W>(x + i, V - i, shift, A, C, out + i);                     \
  _mm_sfence(); /* streamed rows are visible to every thread after the parallel region */ \
  return neg;

NARVL_V4 static bool softmax_affine_stream_v4(const float* x, int64_t V, float shift, float A, float C,
                                              float* out) {
  NARVL_STREAMED_ROW(16, for (int64_t k = 0; k < kStreamChunk; k += 16)
                             _mm512_stream_ps(out + i + k, _mm512_load_ps(buf + k)))
}
NARVL_V3 static bool softmax_affine_stream_v3(const float* x, int64_t V, float shift, float A, float C,
                                              float* out) {
  NARVL_STREAMED_ROW(8, for (int64_t k = 0; k < kStreamChunk; k += 8)
                            _mm256_stream_ps(out + i + k, _mm256_load_ps(buf + k)))
}
NARVL_V4 static bool softmax_affine_v4(const float* x, int64_t V, float sh, float A, float C, float* out) {
  return softmax_affine_impl<16>(x, V, sh, A, C, out);
}
NARVL_V3 static bool softmax_affine_v3(const float* x, int64_t V, float sh, float A, float C, float* out) {
  return softmax_affine_impl<8>(x, V, sh, A, C, out);
}

NARVL_V4 static void row_stats_v4(const float* x, int64_t V, float* m, double* e, double* s) {
  row_stats_impl<16>(x, V, m, e, s);
}
NARVL_V3 static void row_stats_v3(const float* x, int64_t V, float* m, double* e, double* s) {
  row_stats_impl<8>(x, V, m, e, s);
}
static int x86_level() {  // 4: AVX-512 (x86-64-v4), 3: AVX2 + FMA (v3), 0: baseline
  static const int level = __builtin_cpu_supports("x86-64-v4") ? 4 : __builtin_cpu_supports("x86-64-v3") ? 3 : 0;
  return level;
}
#endif

bool stream_stores_disabled() {
  static const bool off = [] {
    const char* v = std::getenv("NARVL_STREAM_STORES");
    return v != nullptr && std::string(v) == "0";
  }();
  return off;
}

// Rows shorter than this stay in cache for whoever reads them next: plain stores.
constexpr int64_t kStreamMinRow = 4096;

void row_stats_f32(const float* x, int64_t V, float* out_max, double* out_sumexp, double* out_sum) {
#ifdef NARVL_X86_DISPATCH
  if (x86_level() == 4) return row_stats_v4(x, V, out_max, out_sumexp, out_sum);
  if (x86_level() == 3) return row_stats_v3(x, V, out_max, out_sumexp, out_sum);
#endif
  row_stats_impl<4>(x, V, out_max, out_sumexp, out_sum);
}

bool row_softmax_affine_f32(const float* x, int64_t V, float shift, float A, float C, float* out) {
#ifdef NARVL_X86_DISPATCH
  if (V >= kStreamMinRow && !stream_stores_disabled()) {
    if (x86_level() == 4) return softmax_affine_stream_v4(x, V, shift, A, C, out);
    if (x86_level() == 3) return softmax_affine_stream_v3(x, V, shift, A, C, out);
  }
#endif
  return row_softmax_affine_plain(x, V, shift, A, C, out);
}

bool row_softmax_affine_plain(const float* x, int64_t V, float shift, float A, float C, float* out) {
#ifdef NARVL_X86_DISPATCH
  if (x86_level() == 4) return softmax_affine_v4(x, V, shift, A, C, out);
  if (x86_level() == 3) return softmax_affine_v3(x, V, shift, A, C, out);
#endif
  return softmax_affine_impl<4>(x, V, shift, A, C, out);
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
