#include "vec_math.h"

#include <cmath>
#include <cstdlib>
#include <string>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace narvl {

// GCC vector extensions: 16 float lanes, lowered to the ISA of each target_clones variant
// (one zmm on AVX-512, two ymm on AVX2, four xmm on the baseline). Written this way, the row
// kernels are vector code on every ISA (GCC's auto-vectoriser left the AVX2 variants scalar).
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

static inline v16f load16(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

static inline v16f splat16(float a) { return v16f{} + a; }

// exp_f32 (vec_math.h) on 16 lanes: the same range reduction, polynomial and clamps.
static inline v16f exp16(v16f x) {
  const v16f lo = splat16(-87.33654f);
  const v16f xc = x < splat16(-100.f) ? splat16(-100.f) : x;  // NaN stays (comparison false)
  v16f fn = xc * 1.44269504088896341f + 12582912.f;
  fn = fn - 12582912.f;
  v16f r = xc - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  v16f p = splat16(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  v16i n = __builtin_convertvector(fn == fn ? fn : splat16(0.f), v16i);
  n = n < -126 ? v16i{} - 126 : (n > 127 ? v16i{} + 127 : n);
  const v16i bits = (n + 127) << 23;
  v16f scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const v16f y = p * scale;
  return xc < lo ? splat16(0.f) : y;
}

// One pass over the row from memory: blocks of kStatBlock floats (1 KiB, L1-resident) are swept
// twice, once for the per-lane block maximum and the plain sum, once for sum exp(x - max) with
// the lane's running sum rescaled when its maximum grows (online softmax, one extra exp per lane
// and block). A lane whose maximum is still -inf shifts by 0, so exp(-inf - 0) = 0 there. The
// summation order is fixed by V alone (deterministic for any thread count).
constexpr int64_t kStatBlock = 16 * kLanes;

NARVL_CLONES void row_stats_f32(const float* x, int64_t V, float* out_max, double* out_sumexp,
                                double* out_sum) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const v16f vninf = splat16(ninf);
  v16f mx = vninf, sm = splat16(0.f), se = splat16(0.f);
  auto step = [&](v16f bm, const float* xb, int64_t n) {  // fold n floats whose lane max is bm
    const v16f mn = bm > mx ? bm : mx;
    const v16f sh = mn == vninf ? splat16(0.f) : mn;
    se *= exp16(mx - sh);
    mx = mn;
    for (int64_t k = 0; k < n; k += kLanes) se += exp16(load16(xb + k) - sh);
  };
  int64_t i = 0;
  for (; i + kStatBlock <= V; i += kStatBlock) {
    v16f bm = vninf;
    for (int64_t k = 0; k < kStatBlock; k += kLanes) {
      const v16f v = load16(x + i + k);
      bm = v > bm ? v : bm;
      sm += v;
    }
    step(bm, x + i, kStatBlock);
  }
  for (; i + kLanes <= V; i += kLanes) {  // whole vectors of the tail
    const v16f v = load16(x + i);
    sm += v;
    step(v, x + i, kLanes);
  }
  if (i < V) {  // the last < 16 floats, padded with -inf (exp -> 0) and 0 (sum)
    float pad[kLanes], zero[kLanes];
    for (int j = 0; j < kLanes; ++j) {
      pad[j] = i + j < V ? x[i + j] : ninf;
      zero[j] = i + j < V ? x[i + j] : 0.f;
    }
    sm += load16(zero);
    const v16f v = load16(pad);
    step(v, pad, kLanes);
  }
  float m = ninf;
  double s = 0.0, e = 0.0;
  for (int j = 0; j < kLanes; ++j) {
    m = mx[j] > m ? mx[j] : m;
    s += sm[j];
  }
  const double ms = m == ninf ? 0.0 : static_cast<double>(m);
  for (int j = 0; j < kLanes; ++j)
    e += static_cast<double>(se[j]) * (mx[j] == ninf ? 0.0 : std::exp(static_cast<double>(mx[j]) - ms));
  *out_max = m;
  *out_sumexp = e;
  *out_sum = s;
}

// out[v] = A * exp(x[v] - shift) + C. The gradient row is written once and not read again by
// this kernel, so on x86 the stores of long rows are non-temporal (streaming): they skip the
// read-for-ownership a plain store makes, a third of the backward's memory traffic. STORE(p, r)
// writes the 16 results r at p (16-float aligned when STREAM); a macro, so that each variant is
// compiled, its intrinsics inlined, under its own target.
#define NARVL_SOFTMAX_AFFINE_BODY(STREAM, STORE)                                              \
  const float ninf = -std::numeric_limits<float>::infinity();                                \
  int32_t neg = 0;                                                                           \
  int64_t i = 0;                                                                             \
  if (STREAM) { /* plain stores up to a 64-byte-aligned output address */                   \
    while (i < V && (reinterpret_cast<uintptr_t>(out + i) % 64) != 0) {                      \
      out[i] = A * exp_f32(x[i] - shift) + C;                                                \
      neg |= x[i] == ninf;                                                                   \
      ++i;                                                                                   \
    }                                                                                        \
  }                                                                                          \
  v16i negv = v16i{};                                                                        \
  for (; i + kLanes <= V; i += kLanes) {                                                     \
    const v16f v = load16(x + i);                                                            \
    const v16f r = exp16(v - shift) * A + C;                                                 \
    negv |= v == ninf;                                                                       \
    STORE(out + i, r);                                                                       \
  }                                                                                          \
  for (; i < V; ++i) {                                                                       \
    out[i] = A * exp_f32(x[i] - shift) + C;                                                  \
    neg |= x[i] == ninf;                                                                     \
  }                                                                                          \
  for (int j = 0; j < kLanes; ++j) neg |= negv[j] != 0;

#define NARVL_PLAIN_STORE(p, r) std::memcpy((p), &(r), sizeof(v16f))

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define NARVL_STREAM_AVX512(p, r)                        \
  do {                                                   \
    __m512 z;                                            \
    std::memcpy(&z, &(r), sizeof(z));                    \
    _mm512_stream_ps((p), z);                            \
  } while (0)
#define NARVL_STREAM_AVX2(p, r)                          \
  do {                                                   \
    __m256 h[2];                                         \
    std::memcpy(h, &(r), sizeof(h));                     \
    _mm256_stream_ps((p), h[0]);                         \
    _mm256_stream_ps((p) + 8, h[1]);                     \
  } while (0)

__attribute__((target("arch=x86-64-v4"))) static bool softmax_affine_avx512(
    const float* x, int64_t V, float shift, float A, float C, float* out) {
  NARVL_SOFTMAX_AFFINE_BODY(true, NARVL_STREAM_AVX512)
  _mm_sfence();  // the streamed rows are visible to every thread after the parallel region
  return neg != 0;
}
__attribute__((target("arch=x86-64-v3"))) static bool softmax_affine_avx2(
    const float* x, int64_t V, float shift, float A, float C, float* out) {
  NARVL_SOFTMAX_AFFINE_BODY(true, NARVL_STREAM_AVX2)
  _mm_sfence();
  return neg != 0;
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

bool row_softmax_affine_f32(const float* x, int64_t V, float shift, float A, float C, float* out) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  if (V >= kStreamMinRow && !stream_stores_disabled()) {
    static const int isa = __builtin_cpu_supports("x86-64-v4") ? 2 : __builtin_cpu_supports("x86-64-v3") ? 1 : 0;
    if (isa == 2) return softmax_affine_avx512(x, V, shift, A, C, out);
    if (isa == 1) return softmax_affine_avx2(x, V, shift, A, C, out);
  }
#endif
  return row_softmax_affine_plain(x, V, shift, A, C, out);
}

NARVL_CLONES bool row_softmax_affine_plain(const float* x, int64_t V, float shift, float A, float C,
                                           float* out) {
  NARVL_SOFTMAX_AFFINE_BODY(false, NARVL_PLAIN_STORE)
  return neg != 0;
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
