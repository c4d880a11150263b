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
#include <vector>

namespace narvl {

template <typename acc_t>
inline acc_t log_add(acc_t a, acc_t b) {
  if (a < b) std::swap(a, b);
  if (b == -std::numeric_limits<acc_t>::infinity()) return a;
  return a + std::log1p(std::exp(b - a));
}

struct LatticeScratch {
  std::vector<double> alpha, beta;
  std::vector<int64_t> rep;
  std::vector<double> acc;
};

// Returns nll. With post != nullptr also runs beta and writes post for frames [0, T_pad); the
// forward of a loss needs only alpha. em and post have K = S + 1 slots per frame. Only the band
// of states that are reachable from the start and can still reach the end is visited:
// W - 2 (T - t) <= s <= 2 t + 1.
template <typename em_t, typename post_t>
double ctc_lattice(const em_t* em, int64_t K, int64_t T, int64_t T_pad, const int64_t* labels,
                   int64_t L, post_t* post, LatticeScratch& ws) {
  const double ninf = -std::numeric_limits<double>::infinity();
  if (post != nullptr)
    for (int64_t i = 0; i < T_pad * K; ++i) post[i] = post_t(0);
  if (T == 0) return L == 0 ? 0.0 : std::numeric_limits<double>::infinity();
  const int64_t W = 2 * L + 1;
  const int64_t blank_slot = K - 1;
  auto slot = [&](int64_t s) { return (s & 1) ? (s >> 1) : blank_slot; };
  auto e = [&](int64_t t, int64_t s) { return static_cast<double>(em[t * K + slot(s)]); };
  auto skip = [&](int64_t s) { return s >= 3 && (s & 1) && labels[(s - 1) / 2] != labels[(s - 3) / 2]; };

  auto lo = [&](int64_t t) { return std::max<int64_t>(0, W - 2 * (T - t)); };
  auto hi = [&](int64_t t) { return std::min<int64_t>(W, 2 * t + 2); };
  ws.alpha.assign(T * W, ninf);
  double* a = ws.alpha.data();
  if (lo(0) <= 0) a[0] = e(0, 0);
  if (W > 1 && lo(0) <= 1) a[1] = e(0, 1);
  for (int64_t t = 1; t < T; ++t) {
    const double* ap = a + (t - 1) * W;
    double* at = a + t * W;
    for (int64_t s = lo(t); s < hi(t); ++s) {
      double v = ap[s];
      if (s >= 1) v = log_add(v, ap[s - 1]);
      if (skip(s)) v = log_add(v, ap[s - 2]);
      at[s] = v == ninf ? ninf : v + e(t, s);
    }
  }
  const double* alast = a + (T - 1) * W;
  const double ll = log_add(alast[W - 1], W > 1 ? alast[W - 2] : ninf);
  const double nll = -ll;
  if (post == nullptr) return nll;

  ws.beta.assign(T * W, ninf);
  double* b = ws.beta.data();
  double* blast = b + (T - 1) * W;
  blast[W - 1] = e(T - 1, W - 1);
  if (W > 1) blast[W - 2] = e(T - 1, W - 2);
  for (int64_t t = T - 2; t >= 0; --t) {
    const double* bn = b + (t + 1) * W;
    double* bt = b + t * W;
    for (int64_t s = lo(t); s < hi(t); ++s) {
      double v = bn[s];
      if (s + 1 < W) v = log_add(v, bn[s + 1]);
      if (s + 2 < W && skip(s + 2)) v = log_add(v, bn[s + 2]);
      bt[s] = v == ninf ? ninf : v + e(t, s);
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
  const bool finite = std::isfinite(nll);
  for (int64_t t = 0; t < T; ++t) {
    post_t* pt = post + t * K;
    if (!finite) {
      for (int64_t k = 0; k < L; ++k) pt[k] = post_t(NAN);
      pt[blank_slot] = post_t(NAN);
      continue;
    }
    const double* at = a + t * W;
    const double* bt = b + t * W;
    auto gamma = [&](int64_t s) {
      if (at[s] == ninf || bt[s] == ninf) return 0.0;
      return std::exp(at[s] + bt[s] - e(t, s) + nll);
    };
    double gb = 0.0;
    for (int64_t s = 0; s < W; s += 2) gb += gamma(s);
    pt[blank_slot] = post_t(gb);
    for (int64_t k = 0; k < L; ++k) ws.acc[k] = 0.0;
    for (int64_t k = 0; k < L; ++k) ws.acc[ws.rep[k]] += gamma(2 * k + 1);
    for (int64_t k = 0; k < L; ++k) pt[k] = post_t(ws.acc[ws.rep[k]]);
  }
  return nll;
}

}  // namespace narvl
