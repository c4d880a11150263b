#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>
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
// 4: AVX-512 (x86-64-v4), 3: AVX2 + FMA (v3), 0: baseline. NARVL_CPU_LEVEL=0 or 3 caps it (read
// once per process), so that the tests run every ISA's row kernels on an AVX-512 machine.
static int x86_level() {
  static const int level = [] {
    int l = __builtin_cpu_supports("x86-64-v4") ? 4 : __builtin_cpu_supports("x86-64-v3") ? 3 : 0;
    const char* cap = std::getenv("NARVL_CPU_LEVEL");
    if (cap != nullptr && (std::string(cap) == "0" || std::string(cap) == "3")) l = std::min(l, std::atoi(cap));
    return l;
  }();
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

#ifdef NARVL_X86_DISPATCH
NARVL_V4 static int64_t row_argmax_v4(const float* x, int64_t V, bool* nan) { return row_argmax_impl<16>(x, V, nan); }
NARVL_V3 static int64_t row_argmax_v3(const float* x, int64_t V, bool* nan) { return row_argmax_impl<8>(x, V, nan); }
#endif

// ------------------------------------------------------------------------------------ top-k

// The bit mask of the lanes of v above t (lane j -> bit j) at each ISA's width. (Generic vector
// compares OR-ed together were scalarised by GCC here.)
template <int W>
struct LaneMask;
#ifdef NARVL_X86_DISPATCH
template <>
struct LaneMask<16> {
  NARVL_V4 static inline uint64_t gt(Vec<16>::F v, float t) {
    return _mm512_cmp_ps_mask(reinterpret_cast<__m512>(v), _mm512_set1_ps(t), _CMP_GT_OQ);
  }
};
template <>
struct LaneMask<8> {
  NARVL_V3 static inline uint64_t gt(Vec<8>::F v, float t) {
    return static_cast<uint32_t>(
        _mm256_movemask_ps(_mm256_cmp_ps(reinterpret_cast<__m256>(v), _mm256_set1_ps(t), _CMP_GT_OQ)));
  }
};
#endif
template <>
struct LaneMask<4> {
  static inline uint64_t gt(Vec<4>::F v, float t) {
    uint64_t m = 0;
    for (int j = 0; j < 4; ++j) m |= static_cast<uint64_t>(v[j] > t) << j;
    return m;
  }
};

// The buffer is cut back to k when it holds more than topk_cut_at(k) values: 3k balances the
// values gathered against the work of the cuts (random rows, k = 16..64: about half of 8k's).
static inline int64_t topk_cut_at(int64_t k) { return std::max<int64_t>(3 * k, k + 64); }
int64_t topk_buffer_size(int64_t k) { return topk_cut_at(k) + 128; }

// n elements of scratch: the caller's stack array when they fit, else a thread-local vector,
// reached only then (thread-local storage costs a call per access in a shared library).
template <typename T, size_t N>
static inline T* scratch(T (&local)[N], int64_t n) {
  if (n <= static_cast<int64_t>(N)) return local;
  static thread_local std::vector<T> heap;
  if (static_cast<int64_t>(heap.size()) < n) heap.resize(n);
  return heap.data();
}

static inline uint32_t ordered_bits(float f) {  // monotone map of non-NaN floats to uint32
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u ^ ((u >> 31) ? 0xffffffffu : 0x80000000u);
}

static inline float from_ordered_bits(uint32_t x) {
  const uint32_t u = x ^ ((x >> 31) ? 0x80000000u : 0xffffffffu);
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// The k-th largest of K[0, n) (1 <= k <= n): the largest X with count(K >= X) >= k, found bit by
// bit from the top (32 counting sweeps that GCC vectorises, no data-dependent branch).
// With low_bit > 0 only the bits from the top down to low_bit are found: a lower bound of the
// k-th largest key in 32 - low_bit sweeps.
__attribute__((always_inline)) static inline uint32_t kth_largest_key(const uint32_t* K, int64_t n, int64_t k,
                                                                      int low_bit = 0) {
  uint32_t X = 0;
  for (int bit = 31; bit >= low_bit; --bit) {
    const uint32_t trial = X | (1u << bit);
    int32_t c = 0;
    for (int64_t j = 0; j < n; ++j) c += K[j] >= trial;
    X = c >= k ? trial : X;
  }
  return X;
}

// Keeps the k best of vals/idx[0, n) (n > k; the entries are in increasing index order, as pass 2
// gathers them, and stay so; inlined into each ISA's scan, so the sweeps run at its width): the k-th largest value T
// (kth_largest_key over the ordered bits), then one branch-free compaction keeps the values
// above T and the lowest-index ties at T. Returns k and sets *thr = T.
__attribute__((always_inline)) static inline int64_t topk_cut(float* vals, int32_t* idx, int64_t n, int64_t k,
                                                              float* thr) {
  uint32_t local[512];
  uint32_t* K = scratch(local, n);
  for (int64_t j = 0; j < n; ++j) K[j] = ordered_bits(vals[j]);
  const uint32_t X = kth_largest_key(K, n, k);
  int64_t above = 0;
  for (int64_t j = 0; j < n; ++j) above += K[j] > X;
  const int64_t ties = k - above;  // ties at X kept, lowest index first
  int64_t w = 0, e = 0;
  for (int64_t j = 0; j < n; ++j) {
    const bool eq = K[j] == X;
    const bool keep = K[j] > X || (eq && e < ties);
    e += eq;
    vals[w] = vals[j];
    idx[w] = idx[j];
    w += keep;
  }
  *thr = from_ordered_bits(X);
  return k;
}

// Sorts vals/idx[0, n) by value, descending (ties: the lower index first), and keeps the first
// min(n, k), so that the caller needs no sort of its own. Each entry is one 64-bit key (the
// value's order-preserving bits over the complemented index; all distinct). Up to 128 entries
// (the beam search's case: about k + 10% from pass 2) each key's rank is counted against all
// the others, a branch-free O(n^2) that the ISA's vectors run (inlined into each ISA's scan), and
// the keys are placed by rank; a comparison sort takes larger buffers.
__attribute__((always_inline)) static inline int64_t topk_sort(float* vals, int32_t* idx, int64_t n, int64_t k) {
  uint64_t local[128];
  uint64_t* K = scratch(local, n);
  for (int64_t j = 0; j < n; ++j)
    K[j] = (static_cast<uint64_t>(ordered_bits(vals[j] + 0.0f)) << 32) |  // (-0 and +0: one key)
           static_cast<uint32_t>(~static_cast<uint32_t>(idx[j]));
  if (n <= 128) {
    for (int64_t i = 0; i < n; ++i) {
      const uint64_t ki = K[i];
      int64_t rank = 0;
      for (int64_t j = 0; j < n; ++j) rank += K[j] > ki;
      if (rank < k) {
        vals[rank] = from_ordered_bits(static_cast<uint32_t>(ki >> 32));
        idx[rank] = static_cast<int32_t>(~static_cast<uint32_t>(ki));
      }
    }
    return std::min(n, k);
  }
  std::sort(K, K + n, [](uint64_t a, uint64_t b) { return a > b; });
  n = std::min(n, k);
  for (int64_t j = 0; j < n; ++j) {
    vals[j] = from_ordered_bits(static_cast<uint32_t>(K[j] >> 32));
    idx[j] = static_cast<int32_t>(~static_cast<uint32_t>(K[j]));
  }
  return n;
}

// Appends the lanes of `m` of a chunk of 4 vectors at x + i to vals/idx.
template <int W>
struct Gather {
  static inline int64_t put(const float* x, int64_t i, uint64_t m, float* vals, int32_t* idx, int64_t n) {
    while (m) {
      const int j = __builtin_ctzll(m);
      vals[n] = x[i + j];
      idx[n++] = static_cast<int32_t>(i + j);
      m &= m - 1;
    }
    return n;
  }
};
#ifdef NARVL_X86_DISPATCH
// AVX-512: register compress + plain store, no branch per value (the memory form of vcompressps
// is slow on Zen 4); the buffer has 16 entries of slack past n.
template <>
struct Gather<16> {
  NARVL_V4 static inline int64_t put(const float* x, int64_t i, uint64_t m, float* vals, int32_t* idx, int64_t n) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int q = 0; q < 4; ++q) {
      const __mmask16 mq = static_cast<__mmask16>(m >> (16 * q));
      if (!mq) continue;
      const __m512 v = _mm512_loadu_ps(x + i + 16 * q);
      const __m512i ix = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int32_t>(i + 16 * q)));
      _mm512_storeu_ps(vals + n, _mm512_maskz_compress_ps(mq, v));
      _mm512_storeu_si512(idx + n, _mm512_maskz_compress_epi32(mq, ix));
      n += __builtin_popcount(mq);
    }
    return n;
  }
  // The values above thr of the 8 vectors at x + i, without a branch on where they fall (the
  // hits pass 2 rereads sit at random: branches on them mispredict); 128 entries of slack.
  NARVL_V4 static inline int64_t put_above(const float* x, int64_t i, float thr, float* vals, int32_t* idx,
                                           int64_t n) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 t = _mm512_set1_ps(thr);
    for (int q = 0; q < 8; ++q) {
      const __m512 v = _mm512_loadu_ps(x + i + 16 * q);
      const __mmask16 mq = _mm512_cmp_ps_mask(v, t, _CMP_GT_OQ);
      const __m512i ix = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int32_t>(i + 16 * q)));
      _mm512_storeu_ps(vals + n, _mm512_maskz_compress_ps(mq, v));
      _mm512_storeu_si512(idx + n, _mm512_maskz_compress_epi32(mq, ix));
      n += __builtin_popcount(mq);
    }
    return n;
  }
};
#endif

// Four chunks' lane maxima folded into one vector: lanes [qW/4, (q+1)W/4) hold the maxima of
// chunk q's lanes j, j + W/4, j + W/2, j + 3W/4 (two levels of half-folds). One 64-byte store
// per 4 chunks instead of one per chunk: the stores, not the reads, made pass 1 ~17% slower
// than a plain read of the row (bench/topk_row_micro.cpp).
template <int W>
struct Fold4 {
  typedef typename Vec<W>::F F;
  typedef typename Vec<W>::I I;
  // Output lane j (segments of S lanes, two per input when S = W/4, one when S = W/2) is the
  // larger of the two S-lane halves of its input segment (2S lanes of a, then of b).
  template <int S, size_t... J>
  static inline F fold(F a, F b, std::index_sequence<J...>) {
    constexpr int per = W / (2 * S);  // output segments per input vector
    const I lo{static_cast<int32_t>((static_cast<int>(J) / S) / per * W +
                                    (static_cast<int>(J) / S) % per * 2 * S + static_cast<int>(J) % S)...};
    const F l = __builtin_shuffle(a, b, lo), h = __builtin_shuffle(a, b, lo + S);
    return l > h ? l : h;
  }
  static inline F half(F a, F b) { return fold<W / 2>(a, b, std::make_index_sequence<W>{}); }  // [a, b]
  static inline F quarter(F x, F y) { return fold<W / 4>(x, y, std::make_index_sequence<W>{}); }
};

// Pass 2: gathers the values above thr into vals/idx, cutting back to the k best whenever more
// than topk_cut_at(k) are held (which raises thr); then topk_sort keeps the k best in order, and
// -inf indices complete them when fewer than k values exceed -inf. Returns the count.
template <int W>
__attribute__((always_inline)) static inline int64_t topk_gather(const float* x, int64_t V, int64_t k, float thr,
                                                                 float* vals, int32_t* idx, const float* cmax,
                                                                 int64_t nchunk) {
  typedef typename Vec<W>::F F;
  constexpr int64_t kStep = 4 * W;
  const float ninf = -std::numeric_limits<float>::infinity();
  const int64_t cap = topk_cut_at(k);  // (the buffer has room for one more chunk's values above it)
  int64_t n = 0;
  // Pass 1 folded each group of 4 chunks' lane maxima into one vector (Fold4): only the chunks
  // whose W/4 lanes there exceed thr are reread. They are listed first, without a branch, so
  // that their loads from cache go out back to back rather than each behind a mispredicted
  // branch (9% of the top-k's time on the caption rows, with the branch-free put_above).
  constexpr int Q = W / 4;
  int32_t local[1024];
  int32_t* hits = scratch(local, nchunk);
  int64_t nh = 0;
  for (int64_t g = 0; g < nchunk / 4; ++g) {
    const uint64_t gm = LaneMask<W>::gt(vload<F>(cmax + g * W), thr);
    for (int64_t q = 0; q < 4; ++q) {
      hits[nh] = static_cast<int32_t>(4 * g + q);
      nh += ((gm >> (q * Q)) & ((uint64_t{1} << Q) - 1)) != 0;
    }
  }
  for (int64_t h = 0; h < nh; ++h) {
    const int64_t c = hits[h];
#ifdef NARVL_X86_DISPATCH
    if constexpr (W == 16) {
      n = Gather<16>::put_above(x, 2 * c * kStep, thr, vals, idx, n);
      if (n > cap) n = topk_cut(vals, idx, n, k, &thr);
      continue;
    }
#endif
    for (int64_t s = 0; s < 2; ++s) {
      const int64_t j = (2 * c + s) * kStep;
      const F v0 = vload<F>(x + j), v1 = vload<F>(x + j + W);
      const F v2 = vload<F>(x + j + 2 * W), v3 = vload<F>(x + j + 3 * W);
      const uint64_t m = LaneMask<W>::gt(v0, thr) | (LaneMask<W>::gt(v1, thr) << W) |
                         (LaneMask<W>::gt(v2, thr) << (2 * W)) | (LaneMask<W>::gt(v3, thr) << (3 * W));
      if (m) {
        n = Gather<W>::put(x, j, m, vals, idx, n);
        if (n > cap) n = topk_cut(vals, idx, n, k, &thr);
      }
    }
  }
  // the chunks outside whole groups, then the scalar tail, are tested step by step
  int64_t i = nchunk * 2 * kStep;
  for (; i + kStep <= V; i += kStep) {
    const F v0 = vload<F>(x + i), v1 = vload<F>(x + i + W);
    const F v2 = vload<F>(x + i + 2 * W), v3 = vload<F>(x + i + 3 * W);
    const F a = v0 > v1 ? v0 : v1, b = v2 > v3 ? v2 : v3;
    if (__builtin_expect(LaneMask<W>::gt(a > b ? a : b, thr) != 0, 0)) {
      const uint64_t m = LaneMask<W>::gt(v0, thr) | (LaneMask<W>::gt(v1, thr) << W) |
                         (LaneMask<W>::gt(v2, thr) << (2 * W)) | (LaneMask<W>::gt(v3, thr) << (3 * W));
      n = Gather<W>::put(x, i, m, vals, idx, n);
      if (n > cap) n = topk_cut(vals, idx, n, k, &thr);
    }
  }
  for (; i < V; ++i) {
    if (x[i] > thr) {
      vals[n] = x[i];
      idx[n++] = static_cast<int32_t>(i);
      if (n > cap) n = topk_cut(vals, idx, n, k, &thr);
    }
  }
  n = topk_sort(vals, idx, n, k);
  if (n < k && n < V) {  // fewer than k values above -inf: the lowest -inf indices complete it
    for (int64_t v = 0; v < V && n < k; ++v)
      if (x[v] == ninf) {
        vals[n] = ninf;
        idx[n++] = static_cast<int32_t>(v);
      }
  }
  return n;
}

// Two reads of the row, the second from cache (a 59458-float row is 238 KB): pass 1 keeps the
// maximum of each of 8W interleaved lanes (plus the NaN canary and, for logits, the online
// log-sum-exp); the k-th largest lane maximum L is a lower bound of the k-th largest value (k
// disjoint lanes each hold a value >= L), so pass 2 gathers the values >= L, about k to 1.2k of
// them on random rows (k = 40) where one running threshold gathered 550 and cut 5 times.
template <int W, bool LSE>
__attribute__((always_inline)) static inline int64_t row_topk_impl(const float* x, int64_t V, int64_t k,
                                                                   float* vals, int32_t* idx, bool* nan,
                                                                   float* lse) {
  typedef typename Vec<W>::F F;
  typedef typename Vec<W>::I I;
  constexpr int NA = 8;
  constexpr int64_t kStep = NA * W;
  const float ninf = -std::numeric_limits<float>::infinity();
  const F vninf = vsplat<F>(ninf);
  F canary = vsplat<F>(0.f);  // sum of the row: NaN when the row holds a NaN (or both infinities)
  F rmx = vninf, rse = vsplat<F>(0.f);
  F acc[NA];
  for (int a = 0; a < NA; ++a) acc[a] = vninf;
  // each group's folded lane maxima, for pass 2 (on the stack up to V ~ 65,000)
  const int64_t ngroup = V / (4 * kStep);
  const int64_t nchunk = 4 * ngroup;
  alignas(64) float local[2048];
  float* cmax = scratch(local, (ngroup + 1) * W);
  auto chunk = [&](int64_t i) __attribute__((always_inline)) {  // 8W values: their lane maxima
    F v[NA];
    for (int a = 0; a < NA; ++a) v[a] = vload<F>(x + i + a * W);
    canary += ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
    for (int a = 0; a < NA; ++a) acc[a] = v[a] > acc[a] ? v[a] : acc[a];
    F cm = (v[0] > v[1] ? v[0] : v[1]);
    const F c23 = v[2] > v[3] ? v[2] : v[3], c45 = v[4] > v[5] ? v[4] : v[5], c67 = v[6] > v[7] ? v[6] : v[7];
    cm = cm > c23 ? cm : c23;
    const F c47 = c45 > c67 ? c45 : c67;
    cm = cm > c47 ? cm : c47;
    if (LSE) {
      const F mn = cm > rmx ? cm : rmx;
      const F sh = mn == vninf ? vsplat<F>(0.f) : mn;
      F e = rse * vexp<F, I>(rmx - sh);
      for (int a = 0; a < NA; ++a) e += vexp<F, I>(v[a] - sh);
      rse = e;
      rmx = mn;
    }
    return cm;
  };
  int64_t i = 0;
  for (int64_t g = 0; g < ngroup; ++g, i += 4 * kStep) {
    const F c0 = chunk(i), c1 = chunk(i + kStep);
    const F h01 = Fold4<W>::half(c0, c1);
    const F c2 = chunk(i + 2 * kStep), c3 = chunk(i + 3 * kStep);
    const F gm = Fold4<W>::quarter(h01, Fold4<W>::half(c2, c3));
    std::memcpy(cmax + g * W, &gm, sizeof(F));
  }
  for (; i + kStep <= V; i += kStep) chunk(i);
  bool bad = false;
  float tmx = ninf;  // the scalar tail's maximum and sum
  double tse = 0.0;
  for (int64_t t = i; t < V; ++t) {
    const float xi = x[t];
    bad |= xi != xi;
    if (LSE) {
      if (xi > tmx) {
        tse = tse * (tmx == ninf ? 0.0 : std::exp(static_cast<double>(tmx) - xi)) + 1.0;
        tmx = xi;
      } else if (xi != ninf) {
        tse += std::exp(static_cast<double>(xi) - tmx);
      }
    }
  }
  bool canary_nan = false;
  for (int j = 0; j < W; ++j) canary_nan |= canary[j] != canary[j];
  if (canary_nan)  // a NaN, or +inf and -inf: the exact check
    for (int64_t v = 0; v < V && !bad; ++v) bad |= x[v] != x[v];
  *nan = bad;
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
  if (bad) return 0;  // reported by the caller; the values are not used
  float thr = ninf;
  if (k <= NA * W && i > 0) {  // L = the k-th largest lane maximum
    alignas(64) float lm[NA * W];
    for (int a = 0; a < NA; ++a) std::memcpy(lm + a * W, &acc[a], sizeof(F));
    uint32_t K[NA * W];
    for (int j = 0; j < NA * W; ++j) K[j] = ordered_bits(lm[j]);
    // a lower bound of the k-th largest lane maximum in 16 sweeps (the top 16 key bits: sign,
    // exponent and 7 mantissa bits), clamped at -inf's key (the keys below it are NaNs)
    const uint32_t X = std::max(kth_largest_key(K, NA * W, k, 16), ordered_bits(ninf));
    const float L = from_ordered_bits(X);
    thr = std::nextafter(L, ninf);  // x > thr  <=>  x >= L
  }
  return topk_gather<W>(x, V, k, thr, vals, idx, cmax, nchunk);
}

#ifdef NARVL_X86_DISPATCH
NARVL_V4 static int64_t row_topk_v4(const float* x, int64_t V, int64_t k, float* a, int32_t* b, bool* nan) { return row_topk_impl<16, false>(x, V, k, a, b, nan, nullptr); }
NARVL_V3 static int64_t row_topk_v3(const float* x, int64_t V, int64_t k, float* a, int32_t* b, bool* nan) { return row_topk_impl<8, false>(x, V, k, a, b, nan, nullptr); }
NARVL_V4 static int64_t row_topk_lse_v4(const float* x, int64_t V, int64_t k, float* a, int32_t* b, bool* nan, float* l) { return row_topk_impl<16, true>(x, V, k, a, b, nan, l); }
NARVL_V3 static int64_t row_topk_lse_v3(const float* x, int64_t V, int64_t k, float* a, int32_t* b, bool* nan, float* l) { return row_topk_impl<8, true>(x, V, k, a, b, nan, l); }
#endif

int64_t row_topk_f32(const float* x, int64_t V, int64_t k, float* vals, int32_t* idx, bool* nan, float* lse) {
  if (k <= 0 || V <= 0) {
    *nan = false;
    if (lse) *lse = -std::numeric_limits<float>::infinity();
    return 0;
  }
#ifdef NARVL_X86_DISPATCH
  const int level = x86_level();
  if (level == 4) return lse ? row_topk_lse_v4(x, V, k, vals, idx, nan, lse) : row_topk_v4(x, V, k, vals, idx, nan);
  if (level == 3) return lse ? row_topk_lse_v3(x, V, k, vals, idx, nan, lse) : row_topk_v3(x, V, k, vals, idx, nan);
#endif
  return lse ? row_topk_impl<4, true>(x, V, k, vals, idx, nan, lse)
             : row_topk_impl<4, false>(x, V, k, vals, idx, nan, nullptr);
}

int cpu_dispatch_level() {
#ifdef NARVL_X86_DISPATCH
  return x86_level();
#else
  return 0;
#endif
}

int64_t row_argmax_f32(const float* x, int64_t V, bool* nan) {
#ifdef NARVL_X86_DISPATCH
  if (x86_level() == 4) return row_argmax_v4(x, V, nan);
  if (x86_level() == 3) return row_argmax_v3(x, V, nan);
#endif
  return row_argmax_impl<4>(x, V, nan);
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
