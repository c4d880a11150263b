// The CTC alpha-beta recursion in log space on the (T x (2L+1)) lattice of one sample.
//
// Emissions are stored per "slot": em[t * K + k] is log p_t(label_k) for k < L and
// log p_t(blank) for k = K - 1 (K = S + 1, S = padded target width). Lattice position s is
// blank for even s and label (s-1)/2 for odd s.
//
//   alpha_t(s) = lse(alpha_{t-1}(s), alpha_{t-1}(s-1), [skip(s)] alpha_{t-1}(s-2)) + e_t(s)
//   beta_t(s)  = lse(beta_{t+1}(s), beta_{t+1}(s+1), [skip(s+2)] beta_{t+1}(s+2)) + e_t(s)
//   nll        = -lse(alpha_{T-1}(W-1), alpha_{T-1}(W-2))
//   gamma_t(s) = exp(alpha_t(s) + beta_t(s) - e_t(s) + nll)     (posterior occupancy)
//
// skip(s) holds for odd s >= 3 whose label differs from the previous label. The output
// post[t * K + k] is the total posterior of the *column* of slot k at frame t (duplicate labels
// share it), which is what d nll / d log p_t(column) = -post needs. Frames t >= T get 0; when
// nll is infinite (infeasible target) the posterior is NaN, as the gradient of an infinite loss.
#pragma once
#include <cmath>
#include <cstdint>
#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "vec_math.h"

namespace narvl {

// Math in the lattice's precision: float (fast vectorisable exp/log) or double (libm).
template <typename acc_t>
struct LatticeMath;
template <>
struct LatticeMath<float> {
  static float exp(float x) { return exp_f32(x); }
  static float log(float x) { return log_f32(x); }
};
template <>
struct LatticeMath<double> {
  static double exp(double x) { return std::exp(x); }
  static double log(double x) { return std::log(x); }
};

// logsumexp(a0, a1, a2) + e, branch-free. All -inf stays -inf; a NaN input stays NaN.
template <typename acc_t>
inline acc_t lse3_plus(acc_t a0, acc_t a1, acc_t a2, acc_t e) {
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  acc_t m = a0;
  m = a1 > m ? a1 : m;
  m = a2 > m ? a2 : m;
  const bool dead = m == ninf;
  const acc_t ms = dead ? acc_t(0) : m;
  const acc_t sum = LatticeMath<acc_t>::exp(a0 - ms) + LatticeMath<acc_t>::exp(a1 - ms) +
                    LatticeMath<acc_t>::exp(a2 - ms);
  const acc_t r = ms + LatticeMath<acc_t>::log(sum) + e;
  return dead ? a0 + a1 + a2 : r;
}

template <typename acc_t>
struct LatticeScratch {
  std::vector<acc_t> alpha, beta, ext, skip, skip_next;
  std::vector<int64_t> rep;
  std::vector<double> acc;
};

constexpr int64_t kPad = 2;  // -inf cells on both sides of every lattice row

// Returns nll. With post != nullptr also runs beta and writes post for frames [0, T_pad); the
// forward of a loss needs only alpha. em and post have K = S + 1 slots per frame. The lattice
// runs in em's precision. Rows carry kPad -inf cells on each side and skip transitions are an
// additive 0 / -inf mask, so each frame is one branch-free loop over the states of the band
// W - 2 (T - t) <= s <= 2 t + 1 (reachable from the start, able to reach the end).
template <typename acc_t, typename post_t>
acc_t ctc_lattice(const acc_t* em, int64_t K, int64_t T, int64_t T_pad, const int64_t* labels,
                  int64_t L, post_t* post, LatticeScratch<acc_t>& ws) {
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  if (post != nullptr)
    for (int64_t i = 0; i < T_pad * K; ++i) post[i] = post_t(0);
  if (T == 0) return L == 0 ? acc_t(0) : std::numeric_limits<acc_t>::infinity();
  const int64_t W = 2 * L + 1, R = W + 2 * kPad;
  const int64_t blank_slot = K - 1;
  auto slot = [&](int64_t s) { return (s & 1) ? (s >> 1) : blank_slot; };
  auto lo = [&](int64_t t) { return std::max<int64_t>(0, W - 2 * (T - t)); };
  auto hi = [&](int64_t t) { return std::min<int64_t>(W, 2 * t + 2); };
  // skip[s] = 0 where the s-2 -> s transition exists, -inf elsewhere; skip_next[s] = skip[s+2].
  ws.skip.assign(R, ninf);
  for (int64_t s = 3; s < W; s += 2)
    if (labels[(s - 1) / 2] != labels[(s - 3) / 2]) ws.skip[s + kPad] = 0;
  ws.skip_next.assign(R, ninf);
  for (int64_t s = 0; s + 2 < W; ++s) ws.skip_next[s + kPad] = ws.skip[s + 2 + kPad];
  const acc_t* sk = ws.skip.data() + kPad;
  const acc_t* skn = ws.skip_next.data() + kPad;
  // ext[t][s] = emission of lattice state s at frame t
  ws.ext.resize(T * W);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t s = 0; s < W; ++s) ws.ext[t * W + s] = em[t * K + slot(s)];

  ws.alpha.assign(T * R, ninf);
  acc_t* a = ws.alpha.data() + kPad;
  if (lo(0) <= 0) a[0] = ws.ext[0];
  if (W > 1 && lo(0) <= 1) a[1] = ws.ext[1];
  for (int64_t t = 1; t < T; ++t) {
    const acc_t* ap = a + (t - 1) * R;
    acc_t* at = a + t * R;
    const acc_t* e = ws.ext.data() + t * W;
    if constexpr (std::is_same_v<acc_t, float>) {
      lattice_row_fwd_f32(ap, sk, e, at, lo(t), hi(t));
    } else {
      const int64_t s1 = hi(t);
      for (int64_t s = lo(t); s < s1; ++s) at[s] = lse3_plus(ap[s], ap[s - 1], ap[s - 2] + sk[s], e[s]);
    }
  }
  const acc_t* alast = a + (T - 1) * R;
  const acc_t nll = -lse3_plus(alast[W - 1], alast[W - 2], ninf, acc_t(0));  // alast[-1] = -inf pad
  if (post == nullptr) return nll;

  ws.beta.assign(T * R, ninf);
  acc_t* b = ws.beta.data() + kPad;
  b[(T - 1) * R + W - 1] = ws.ext[(T - 1) * W + W - 1];
  if (W > 1) b[(T - 1) * R + W - 2] = ws.ext[(T - 1) * W + W - 2];
  for (int64_t t = T - 2; t >= 0; --t) {
    const acc_t* bn = b + (t + 1) * R;
    acc_t* bt = b + t * R;
    const acc_t* e = ws.ext.data() + t * W;
    if constexpr (std::is_same_v<acc_t, float>) {
      lattice_row_bwd_f32(bn, skn, e, bt, lo(t), hi(t));
    } else {
      const int64_t s1 = hi(t);
      for (int64_t s = lo(t); s < s1; ++s) bt[s] = lse3_plus(bn[s], bn[s + 1], bn[s + 2] + skn[s], e[s]);
    }
  }

  // rep[k]: first label index with the same token as label k (duplicates share a column).
  ws.rep.resize(L);
  for (int64_t k = 0; k < L; ++k) {
    ws.rep[k] = k;
    for (int64_t j = 0; j < k; ++j)
      if (labels[j] == labels[k]) {
        ws.rep[k] = j;
        break;
      }
  }
  ws.acc.assign(L > 0 ? L : 1, 0.0);
  const bool finite = std::isfinite(static_cast<double>(nll));
  std::vector<acc_t>& g = ws.skip;  // reuse as the per-frame occupancy buffer (size >= W)
  for (int64_t t = 0; t < T; ++t) {
    post_t* pt = post + t * K;
    if (!finite) {
      for (int64_t k = 0; k < L; ++k) pt[k] = post_t(NAN);
      pt[blank_slot] = post_t(NAN);
      continue;
    }
    const acc_t* at = a + t * R;
    const acc_t* bt = b + t * R;
    const acc_t* e = ws.ext.data() + t * W;
    for (int64_t s = 0; s < W; ++s) {
      const acc_t v = at[s] + bt[s] - e[s] + nll;
      g[s] = (at[s] == ninf || bt[s] == ninf) ? acc_t(0) : LatticeMath<acc_t>::exp(v);
    }
    double gb = 0.0;
    for (int64_t s = 0; s < W; s += 2) gb += g[s];
    pt[blank_slot] = post_t(gb);
    for (int64_t k = 0; k < L; ++k) ws.acc[k] = 0.0;
    for (int64_t k = 0; k < L; ++k) ws.acc[ws.rep[k]] += g[2 * k + 1];
    for (int64_t k = 0; k < L; ++k) pt[k] = post_t(ws.acc[ws.rep[k]]);
  }
  return nll;
}

}  // namespace narvl
