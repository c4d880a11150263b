// Row primitives over one contiguous float row, written so that GCC vectorises them without
// -ffast-math: 16 independent accumulator lanes (a fixed, thread-count-independent summation
// order, hence deterministic results), and a branch-free exp.
#pragma once
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// Runtime dispatch to the widest vector ISA the CPU has (AVX-512, AVX2+FMA, baseline SSE2).
#define NARVL_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NARVL_CLONES
#endif

namespace narvl {

// NaN found by a decoder's row scan. The extension's exception translator (narvl.cpp) raises it
// in Python as narvl.checks.NaNScoresError, a ValueError, so the error's kind is in its type.
struct NanScoresError : std::runtime_error {
  NanScoresError() : std::runtime_error("narvl: NaN in scores") {}
};

constexpr int kLanes = 16;

// The core of exp_f32 and of its vector form (vec_math.cpp), for a float or a GCC float vector
// T: x = n*ln2 + r, |r| <= ln2/2 (Cephes-style range reduction), degree-5 polynomial in r.
// Returns p ~ exp(r) and sets *fn to n (as a float).
template <typename T>
__attribute__((always_inline)) static inline T exp_poly(T xc, T* fn_out) {
  T fn = xc * 1.44269504088896341f + 12582912.f;
  fn = fn - 12582912.f;  // round to nearest integer
  T r = xc - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  T p = T{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  *fn_out = fn;
  return p;
}

// exp(x) for x <= ~88 with ~1 ulp-level relative error. exp(-inf) = 0, exp(NaN) = NaN.
static inline float exp_f32(float x) {
  const float lo = -87.33654f;
  float xc = x < -100.f ? -100.f : x;  // keeps NaN (comparison is false)
  float fn;
  const float p = exp_poly(xc, &fn);
  int32_t n = static_cast<int32_t>(fn);
  n = n < -126 ? -126 : (n > 127 ? 127 : n);
  int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  float y = p * scale;
  return xc < lo ? 0.f : y;
}

// (Defined with NARVL_CLONES in vec_math.cpp: the declaration stays plain so that other
// translation units call the ifunc dispatcher.)
// log(x) for positive normal x (Cephes-style: x = 2^e * m, polynomial in m - 1); NaN -> NaN.
static inline float log_f32(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(float));
  const float e = static_cast<float>(((bits >> 23) & 0xff) - 126);
  bits = (bits & 0x007fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  float m;
  std::memcpy(&m, &bits, sizeof(float));
  // m < sqrt(1/2): use 2m - 1 and e - 1. Both sides are computed and then selected, so that the
  // loop stays branch-free (GCC will not speculate trapping FP ops inside a conditional).
  const float sm = m < 0.70710678f ? 1.f : 0.f;
  const float ef = e - sm;
  const float f = m + m * sm - 1.f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y += ef * -2.12194440e-4f;
  y += -0.5f * z;
  const float r = f + y + ef * 0.693359375f;
  return x != x ? x : r;
}

// max_v x[v], sum_v x[v] (the plain row sum, needed by label smoothing) and, in a second pass
// over the row (from cache), sum_v exp(x[v] - max).
void row_stats_f32(const float* x, int64_t V, float* out_max, double* out_sumexp,
                                double* out_sum);

// out[v] = A * exp(x[v] - shift) + C; returns whether x holds a -inf (F.ctc_loss's backward
// turns such a row's gradient into NaN, and narvl follows it).
// Rows of 4096+ floats are written with non-temporal stores on AVX2/AVX-512 x86 (not with
// NARVL_STREAM_STORES=0); row_softmax_affine_plain always uses plain stores.
bool row_softmax_affine_f32(const float* x, int64_t V, float shift, float A, float C, float* out);
bool row_softmax_affine_plain(const float* x, int64_t V, float shift, float A, float C, float* out);
bool stream_stores_disabled();

// The CTC gradient's fill of a row of log-probs x, with F.ctc_loss's non-finite values:
// out[v] = NaN where x[v] is NaN or -inf, inf * gn where x[v] = +inf, 0 elsewhere; returns
// whether x holds a non-finite value.
bool row_ctc_fill_f32(const float* x, int64_t V, float gn, float* out);

// One frame of the float lattice recursions (see ctc_lattice.h), for s in [lo, hi):
//   forward:  out[s] = lse(prev[s], prev[s-1], prev[s-2] + skip[s]) + e[s]
//   backward: out[s] = lse(next[s], next[s+1], next[s+2] + skip[s]) + e[s]
// Rows are padded with -inf so that the shifted reads stay in bounds.
void lattice_row_fwd_f32(const float* prev, const float* skip, const float* e, float* out,
                         int64_t lo, int64_t hi);
void lattice_row_bwd_f32(const float* next, const float* skip, const float* e, float* out,
                         int64_t lo, int64_t hi);

// First index of the maximum of a float row (torch.argmax semantics); *nan set if x has NaN.
int64_t row_argmax_f32(const float* x, int64_t V, bool* nan);

// The min(k, V) largest values of a row and their indices, sorted by value, descending (ties:
// the lower index first).
// Pass 1 reads the row from memory: the maximum of each of 8W interleaved lanes (W = the ISA's
// vector width), each 8W-value chunk's lane maxima (folded four chunks to a vector), a NaN
// canary and, with lse != nullptr, *lse = log sum_v exp(x[v]) (online softmax; -inf for an all
// -inf row, NaN/+inf propagate). The k-th
// largest lane maximum bounds the k-th value from below, so pass 2 (from cache) gathers only the
// values reaching it, cutting back to the k best whenever 3k are held. Values are compared raw
// (the same order for probabilities, log-probabilities and logits); -inf values enter only when
// fewer than k values exceed -inf. vals/idx hold topk_buffer_size(k) entries; the first
// `returned` are the result. *nan is set when x holds a NaN (the values are then not filled).
int64_t topk_buffer_size(int64_t k);
// The ISA level the row kernels dispatch to: 4 (AVX-512), 3 (AVX2 + FMA) or 0 (baseline);
// NARVL_CPU_LEVEL=0 or 3 caps it (read once per process).
int cpu_dispatch_level();
int64_t row_topk_f32(const float* x, int64_t V, int64_t k, float* vals, int32_t* idx, bool* nan, float* lse);

}  // namespace narvl
