#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace narvl {

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

// First index of the maximum (torch.argmax: NaN is not a maximum here; it is reported instead).
template <int W>
__attribute__((always_inline)) static inline int64_t row_argmax_impl(const float* x, int64_t V, bool* nan) {
  typedef typename Vec<W>::F F;
  typedef typename Vec<W>::I I;
  const float ninf = -std::numeric_limits<float>::infinity();
  F best = vsplat<F>(ninf);
  I arg = I{}, bad = I{}, idx = I{};
  for (int j = 0; j < W; ++j) idx[j] = j;
  int64_t i = 0;
  for (; i + W <= V; i += W) {
    const F v = vload<F>(x + i);
    const I up = v > best;  // strict: each lane keeps its first maximum
    best = up ? v : best;
    arg = up ? idx : arg;
    bad |= v != v;
    idx += W;
  }
  float m = ninf;
  int64_t a = 0;
  bool any_bad = false;
  for (int j = 0; j < W; ++j) {
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
  return a;
}

// Per-block maxima of the row and, when lse != nullptr, the row's log-sum-exp in the same read:
// each lane keeps a running maximum and a sum of exp(x - max) rescaled when the maximum grows
// (online softmax). Returns whether the row holds a NaN.
template <int W, bool LSE>
__attribute__((always_inline)) static inline bool block_max_impl(const float* x, int64_t V, int64_t block,
                                                                 float* out, float* lse) {
  typedef typename Vec<W>::F F;
  typedef typename Vec<W>::I I;
  const float ninf = -std::numeric_limits<float>::infinity();
  const F vninf = vsplat<F>(ninf);
  I bad = I{};
  bool tail_bad = false;
  F rmx = vninf, rse = vsplat<F>(0.f);
  float tmx = ninf;  // the scalar tail's maximum and sum
  double tse = 0.0;
  int64_t b = 0;
  for (int64_t s = 0; s < V; s += block, ++b) {
    const int64_t e = s + block <= V ? s + block : V;
    F mx = vninf;
    int64_t i = s;
    for (; i + W <= e; i += W) {
      const F v = vload<F>(x + i);
      mx = v > mx ? v : mx;
      bad |= v != v;
    }
    if (LSE && i > s) {
      const F mn = mx > rmx ? mx : rmx;
      const F sh = mn == vninf ? vsplat<F>(0.f) : mn;
      rse *= vexp<F, I>(rmx - sh);
      rmx = mn;
      for (int64_t k = s; k + W <= e; k += W) rse += vexp<F, I>(vload<F>(x + k) - sh);
    }
    float m = ninf;
    for (int j = 0; j < W; ++j) m = mx[j] > m ? mx[j] : m;
    for (; i < e; ++i) {
      m = x[i] > m ? x[i] : m;
      tail_bad |= x[i] != x[i];
      if (LSE) {
        const float xi = x[i];
        if (xi > tmx) {
          tse = tse * (tmx == ninf ? 0.0 : std::exp(static_cast<double>(tmx) - xi)) + 1.0;
          tmx = xi;
        } else if (xi != ninf) {
          tse += std::exp(static_cast<double>(xi) - tmx);
        }
      }
    }
    out[b] = m;
  }
  bool any = tail_bad;
  for (int j = 0; j < W; ++j) any |= bad[j] != 0;
  if (LSE) {
    float M = tmx;
    for (int j = 0; j < W; ++j) M = rmx[j] > M ? rmx[j] : M;
    if (M == ninf || M != M || M == -ninf) {
      *lse = M;  // all -inf: -inf; NaN or +inf maxima propagate
    } else {
      double sum = tmx == ninf ? 0.0 : tse * std::exp(static_cast<double>(tmx) - M);
      for (int j = 0; j < W; ++j)
        if (rmx[j] != ninf) sum += static_cast<double>(rse[j]) * std::exp(static_cast<double>(rmx[j]) - M);
      *lse = static_cast<float>(M + std::log(sum));
    }
  }
  return any;
}

#ifdef NARVL_X86_DISPATCH
NARVL_V4 static int64_t row_argmax_v4(const float* x, int64_t V, bool* nan) { return row_argmax_impl<16>(x, V, nan); }
NARVL_V3 static int64_t row_argmax_v3(const float* x, int64_t V, bool* nan) { return row_argmax_impl<8>(x, V, nan); }
NARVL_V4 static bool block_max_v4(const float* x, int64_t V, int64_t bl, float* o) { return block_max_impl<16, false>(x, V, bl, o, nullptr); }
NARVL_V3 static bool block_max_v3(const float* x, int64_t V, int64_t bl, float* o) { return block_max_impl<8, false>(x, V, bl, o, nullptr); }
NARVL_V4 static bool block_max_lse_v4(const float* x, int64_t V, int64_t bl, float* o, float* l) { return block_max_impl<16, true>(x, V, bl, o, l); }
NARVL_V3 static bool block_max_lse_v3(const float* x, int64_t V, int64_t bl, float* o, float* l) { return block_max_impl<8, true>(x, V, bl, o, l); }
#endif

int64_t row_argmax_f32(const float* x, int64_t V, bool* nan) {
#ifdef NARVL_X86_DISPATCH
  if (x86_level() == 4) return row_argmax_v4(x, V, nan);
  if (x86_level() == 3) return row_argmax_v3(x, V, nan);
#endif
  return row_argmax_impl<4>(x, V, nan);
}

bool block_max_f32(const float* x, int64_t V, int64_t block, float* out) {
#ifdef NARVL_X86_DISPATCH
  if (x86_level() == 4) return block_max_v4(x, V, block, out);
  if (x86_level() == 3) return block_max_v3(x, V, block, out);
#endif
  return block_max_impl<4, false>(x, V, block, out, nullptr);
}

bool block_max_lse_f32(const float* x, int64_t V, int64_t block, float* out, float* lse) {
#ifdef NARVL_X86_DISPATCH
  if (x86_level() == 4) return block_max_lse_v4(x, V, block, out, lse);
  if (x86_level() == 3) return block_max_lse_v3(x, V, block, out, lse);
#endif
  return block_max_impl<4, true>(x, V, block, out, lse);
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
