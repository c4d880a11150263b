// CPU implementations of narvl::qctc_fwd / qctc_bwd / ctc_fwd / ctc_bwd.
//
// qctc_fwd streams each (b, n) logits row once for its max and row sum and once more (from
// cache) for sum exp(x - max), then gathers the <= L+1 label/blank logits: lse and the slot
// emissions e[b, n, k] = x[col_k] - lse (saved). The alpha recursion (ctc_lattice.h) then runs
// per sample on that small lattice. qctc_bwd runs alpha-beta on the saved emissions for the
// per-column posteriors, then streams each row once, writing
//     grad[v] = A * softmax[v] + C - gn * post[v]
// with A = gn - gs / N_b and C = gs / (N_b * V) (gn, gs: upstream gradients of the sample's
// CTC nll and of its smoothing term mean_{n<N_b, v} lp), post being non-zero only on the
// label and blank columns. Nothing of size B x N x V is allocated besides the gradient itself.
// Rows are independent and each is reduced in a fixed order, so results are bitwise identical
// for any thread count.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/extension.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string>
#include <limits>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <type_traits>
#include <vector>

#include "ctc_lattice.h"
#include "vec_math.h"

namespace narvl {
namespace {

using torch::Tensor;

struct RowStats {
  double max, sumexp, sum;
};

std::vector<float>& tls_buffer(int which) {
  static thread_local std::vector<float> bufs[2];
  return bufs[which];
}

template <typename scalar_t>
const float* to_f32(const scalar_t* x, int64_t V) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return x;
  } else {
    auto& buf = tls_buffer(0);
    if (static_cast<int64_t>(buf.size()) < V) buf.resize(V);
    for (int64_t v = 0; v < V; ++v) buf[v] = static_cast<float>(x[v]);
    return buf.data();
  }
}

template <typename scalar_t>
RowStats row_stats(const scalar_t* x, int64_t V) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    double m = -std::numeric_limits<double>::infinity(), s = 0.0, e = 0.0;
    for (int64_t v = 0; v < V; ++v) {
      m = x[v] > m ? x[v] : m;
      s += x[v];
    }
    for (int64_t v = 0; v < V; ++v) e += std::exp(x[v] - m);
    return {m, e, s};
  } else {
    float m;
    double e, s;
    row_stats_f32(to_f32(x, V), V, &m, &e, &s);
    return {static_cast<double>(m), e, s};
  }
}

// out[v] = A * exp(x[v] - lse) + C over a whole row; returns whether the row holds a -inf.
template <typename scalar_t>
bool row_grad(const scalar_t* x, int64_t V, double lse, double A, double C, scalar_t* out) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    bool neg = false;
    for (int64_t v = 0; v < V; ++v) {
      out[v] = A * std::exp(x[v] - lse) + C;
      neg |= x[v] == -std::numeric_limits<double>::infinity();
    }
    return neg;
  } else if constexpr (std::is_same_v<scalar_t, float>) {
    return row_softmax_affine_f32(x, V, static_cast<float>(lse), static_cast<float>(A),
                                  static_cast<float>(C), out);
  } else {
    const float* xf = to_f32(x, V);
    auto& buf = tls_buffer(1);
    if (static_cast<int64_t>(buf.size()) < V) buf.resize(V);
    const bool neg = row_softmax_affine_f32(xf, V, static_cast<float>(lse), static_cast<float>(A),
                                            static_cast<float>(C), buf.data());
    for (int64_t v = 0; v < V; ++v) out[v] = static_cast<scalar_t>(buf[v]);
    return neg;
  }
}

// The zero fill of a CTC gradient row with F.ctc_loss's non-finite entries (row_ctc_fill_f32);
// returns whether the row of log-probs x holds a non-finite value.
template <typename scalar_t>
bool row_ctc_fill(const scalar_t* x, int64_t V, double gn, scalar_t* out) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return row_ctc_fill_f32(x, V, static_cast<float>(gn), out);
  } else {
    const double inf = std::numeric_limits<double>::infinity();
    bool bad = false;
    for (int64_t v = 0; v < V; ++v) {
      const double xv = static_cast<double>(x[v]);
      const bool nf = !std::isfinite(xv);
      out[v] = static_cast<scalar_t>(nf ? (xv == inf ? inf * gn : std::numeric_limits<double>::quiet_NaN()) : 0.0);
      bad |= nf;
    }
    return bad;
  }
}

// Non-finite semantics of F.ctc_loss's backward, which narvl reproduces exactly:
// - a sample whose nll is NaN (a NaN or +inf entered its lattice), or +inf (no alignment) while
//   its upstream gradient is non-zero (zero_infinity off), gets NaN over all its live frames;
// - a frame holding a -inf log-probability gets NaN there (F.ctc_loss computes
//   (exp(lp) - exp(log_alpha_beta + nll - lp)) * gn = exp(-inf + inf) * gn, NaN even for gn = 0);
//   after log_softmax that NaN covers the whole row of logits; log-probs that are NaN (or +inf)
//   outside the label columns give NaN (inf * gn) there;
// - except a sample that zero_infinity zeroed (nll = +inf, gn = 0): its CTC gradient is 0.
inline bool sample_zeroed(double nll, double gn) { return std::isinf(nll) && gn == 0.0; }
inline bool sample_poisoned(double nll, double gn) {
  return std::isnan(nll) || (std::isinf(nll) && gn != 0.0);
}

template <typename scalar_t>
void fill_nan(scalar_t* g, int64_t V) {
  std::fill(g, g + V, std::numeric_limits<scalar_t>::quiet_NaN());
}

// Gradient buffers. A fresh multi-megabyte gradient is written exactly once, and on Linux a
// freshly mapped buffer costs more in first-touch page faults (and the kernel's zeroing) than
// the kernel itself. Like the CUDA caching allocator, large buffers are therefore recycled: the
// tensor's deleter returns its block to a small cache (at most kCacheBlocks blocks, matched by
// exact size), so a training loop reuses warm pages. New blocks are 2 MiB aligned and advised
// for transparent huge pages. NARVL_GRAD_CACHE=0 turns the cache off.
constexpr size_t kBigBlock = size_t(8) << 20;
constexpr size_t kCacheBlocks = 2;

struct BlockCache {
  std::mutex mu;
  std::vector<std::pair<void*, size_t>> blocks;  // oldest first
};

BlockCache& block_cache() {
  static BlockCache* c = new BlockCache();  // leaked on purpose: deleters may run at exit
  return *c;
}

bool cache_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("NARVL_GRAD_CACHE");
    return !(v && std::string(v) == "0");
  }();
  return on;
}

void release_block(void* p, size_t n) {
  if (cache_enabled()) {
    BlockCache& c = block_cache();
    std::lock_guard<std::mutex> g(c.mu);
    c.blocks.emplace_back(p, n);
    if (c.blocks.size() <= kCacheBlocks) return;
    p = c.blocks.front().first;
    c.blocks.erase(c.blocks.begin());
  }
  std::free(p);
}

void* acquire_block(size_t n) {
  if (cache_enabled()) {
    BlockCache& c = block_cache();
    std::lock_guard<std::mutex> g(c.mu);
    for (auto it = c.blocks.rbegin(); it != c.blocks.rend(); ++it) {
      if (it->second == n) {
        void* p = it->first;
        c.blocks.erase(std::next(it).base());
        return p;
      }
    }
  }
  void* p = nullptr;
  const size_t align = size_t(2) << 20;
  if (posix_memalign(&p, align, (n + align - 1) / align * align) != 0) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  madvise(p, (n + align - 1) / align * align, MADV_HUGEPAGE);
#endif
  return p;
}

Tensor empty_for_streaming_write(at::IntArrayRef sizes, const at::TensorOptions& opt) {
  size_t numel = 1;
  for (auto s : sizes) numel *= static_cast<size_t>(s);
  const size_t bytes = numel * c10::elementSize(c10::typeMetaToScalarType(opt.dtype()));
  if (bytes < kBigBlock) return torch::empty(sizes, opt);
  void* p = acquire_block(bytes);
  return torch::from_blob(p, sizes, [bytes](void* q) { release_block(q, bytes); }, opt);
}

int64_t grain_for(int64_t V) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1)); }

void check_common(const Tensor& x, const Tensor& targets, const Tensor& target_lengths,
                  const Tensor& lengths, int64_t B, int64_t blank) {
  TORCH_CHECK(x.dim() == 3, "narvl: expected a 3-D input, got ", x.dim(), "-D");
  TORCH_CHECK(targets.dim() == 2 && targets.size(0) == B, "narvl: targets must be (B, S)");
  TORCH_CHECK(target_lengths.dim() == 1 && target_lengths.size(0) == B,
              "narvl: target_lengths must be (B,)");
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == B, "narvl: lengths must be (B,)");
  TORCH_CHECK(x.size(2) > 0 && blank >= 0 && blank < x.size(2), "narvl: blank out of range");
}

// Gathers the slot emissions of one row: em[k] = x[label_k] - lse (k < L), em[K-1] = x[blank] - lse.
template <typename scalar_t, typename out_t>
void gather_slots(const scalar_t* x, int64_t V, double lse, const int64_t* labels, int64_t L,
                  int64_t K, int64_t blank, out_t* em) {
  const out_t ninf = -std::numeric_limits<out_t>::infinity();
  for (int64_t k = 0; k < K - 1; ++k) {
    if (k < L) {
      const int64_t c = labels[k];
      TORCH_CHECK(c >= 0 && c < V && c != blank, "narvl: label ", c, " out of range or blank");
      em[k] = static_cast<out_t>(static_cast<double>(x[c]) - lse);
    } else {
      em[k] = ninf;
    }
  }
  em[K - 1] = static_cast<out_t>(static_cast<double>(x[blank]) - lse);
}

int64_t checked_length(const int64_t* p, int64_t b, int64_t hi, const char* what) {
  const int64_t v = p[b];
  TORCH_CHECK(v >= 0 && v <= hi, "narvl: ", what, "[", b, "] = ", v, " is outside [0, ", hi, "]");
  return v;
}

template <typename scalar_t>
std::tuple<Tensor, Tensor, Tensor, Tensor> qctc_fwd_impl(const Tensor& logits, const Tensor& targets,
                                                         const Tensor& tl, const Tensor& ql,
                                                         int64_t blank) {
  using out_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t B = logits.size(0), N = logits.size(1), V = logits.size(2);
  const int64_t S = targets.size(1), K = S + 1;
  const auto fopt = logits.options().dtype(c10::CppTypeToScalarType<out_t>::value);
  Tensor nll = torch::empty({B}, fopt), smooth = torch::empty({B}, fopt);
  Tensor lse = torch::zeros({B, N}, fopt);
  Tensor em = torch::full({B, N, K}, -std::numeric_limits<double>::infinity(), fopt);
  std::vector<double> rowsum(B * N, 0.0);
  const scalar_t* X = logits.data_ptr<scalar_t>();
  const int64_t sB = logits.stride(0), sN = logits.stride(1);
  const int64_t* tgt = targets.data_ptr<int64_t>();
  const int64_t* TL = tl.data_ptr<int64_t>();
  const int64_t* QL = ql.data_ptr<int64_t>();
  out_t* lse_p = lse.data_ptr<out_t>();
  out_t* em_p = em.data_ptr<out_t>();

  at::parallel_for(0, B * N, grain_for(V), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / N, n = r % N;
      const int64_t Nb = checked_length(QL, b, N, "query_lengths");
      const int64_t L = checked_length(TL, b, S, "target_lengths");
      if (n >= Nb) continue;
      const scalar_t* x = X + b * sB + n * sN;
      const RowStats st = row_stats(x, V);
      const double l = st.max + std::log(st.sumexp);
      lse_p[r] = static_cast<out_t>(l);
      rowsum[r] = st.sum;
      gather_slots(x, V, l, tgt + b * S, L, K, blank, em_p + r * K);
    }
  });

  out_t* nll_p = nll.data_ptr<out_t>();
  out_t* sm_p = smooth.data_ptr<out_t>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    static thread_local LatticeScratch<out_t> ws;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t Nb = QL[b], L = TL[b];
      nll_p[b] = static_cast<out_t>(ctc_lattice(em_p + b * N * K, K, Nb, N, tgt + b * S, L,
                                                static_cast<out_t*>(nullptr), ws));
      double acc = 0.0;
      for (int64_t n = 0; n < Nb; ++n)
        acc += rowsum[b * N + n] - static_cast<double>(V) * static_cast<double>(lse_p[b * N + n]);
      sm_p[b] = static_cast<out_t>(Nb > 0 ? acc / (static_cast<double>(Nb) * V) : 0.0);
    }
  });
  return {nll, smooth, lse, em};
}

// Per-column posteriors (B, T, K) from the slot emissions: the alpha-beta pass of the backward.
// nll (B,) receives each sample's nll from the same pass.
template <typename out_t>
Tensor posteriors(const Tensor& em_in, const int64_t* tgt, int64_t S, const int64_t* lengths,
                  int64_t T, const int64_t* TL, int64_t B, std::vector<double>& nll) {
  const int64_t K = S + 1;
  const Tensor em = em_in.to(c10::CppTypeToScalarType<out_t>::value).contiguous();
  TORCH_CHECK(em.dim() == 3 && em.size(0) == B && em.size(1) == T && em.size(2) == K,
              "narvl: em must be (B, T, S+1)");
  Tensor post = torch::empty({B, T, K}, em.options());
  nll.assign(B, 0.0);
  const out_t* em_p = em.data_ptr<out_t>();
  out_t* post_p = post.data_ptr<out_t>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    static thread_local LatticeScratch<out_t> ws;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t Tb = checked_length(lengths, b, T, "lengths");
      const int64_t L = checked_length(TL, b, S, "target_lengths");
      nll[b] = static_cast<double>(ctc_lattice(em_p + b * T * K, K, Tb, T, tgt + b * S, L,
                                               post_p + b * T * K, ws));
    }
  });
  return post;
}

template <typename scalar_t>
Tensor qctc_bwd_impl(const Tensor& gn_t, const Tensor& gs_t, const Tensor& logits, const Tensor& lse,
                     const Tensor& em, const Tensor& targets, const Tensor& tl, const Tensor& ql,
                     int64_t blank) {
  using out_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t B = logits.size(0), N = logits.size(1), V = logits.size(2);
  const int64_t S = targets.size(1), K = S + 1;
  Tensor grad = empty_for_streaming_write({B, N, V}, logits.options());
  const Tensor gn64 = gn_t.to(torch::kDouble).contiguous(), gs64 = gs_t.to(torch::kDouble).contiguous();
  const Tensor lse_c = lse.to(c10::CppTypeToScalarType<out_t>::value).contiguous();
  const int64_t* tgt = targets.data_ptr<int64_t>();
  const int64_t* TL = tl.data_ptr<int64_t>();
  const int64_t* QL = ql.data_ptr<int64_t>();
  std::vector<double> nllv;
  const Tensor post_c = posteriors<out_t>(em, tgt, S, QL, N, TL, B, nllv);
  const double* gn = gn64.data_ptr<double>();
  const double* gs = gs64.data_ptr<double>();
  const out_t* lse_p = lse_c.data_ptr<out_t>();
  const out_t* post_p = post_c.data_ptr<out_t>();
  const scalar_t* X = logits.data_ptr<scalar_t>();
  scalar_t* G = grad.data_ptr<scalar_t>();
  const int64_t sB = logits.stride(0), sN = logits.stride(1);

  at::parallel_for(0, B * N, grain_for(V), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / N, n = r % N;
      const int64_t Nb = checked_length(QL, b, N, "query_lengths");
      const int64_t L = checked_length(TL, b, S, "target_lengths");
      scalar_t* g = G + r * V;
      if (n >= Nb) {
        std::fill(g, g + V, scalar_t(0));
        continue;
      }
      if (sample_poisoned(nllv[b], gn[b])) {
        fill_nan(g, V);
        continue;
      }
      const scalar_t* x = X + b * sB + n * sN;
      const double l = static_cast<double>(lse_p[r]);
      const double A = gn[b] - gs[b] / Nb, C = gs[b] / (static_cast<double>(Nb) * V);
      if (row_grad(x, V, l, A, C, g) && !sample_zeroed(nllv[b], gn[b])) {
        fill_nan(g, V);
        continue;
      }
      // Label and blank columns: overwrite with the exact value including the posterior.
      const int64_t* labels = tgt + b * S;
      const out_t* pr = post_p + r * K;
      auto fix = [&](int64_t col, double p) {
        const double sm = std::exp(static_cast<double>(x[col]) - l);
        g[col] = static_cast<scalar_t>(A * sm + C - (gn[b] != 0.0 ? gn[b] * p : 0.0));
      };
      for (int64_t k = 0; k < L; ++k) {
        TORCH_CHECK(labels[k] >= 0 && labels[k] < V, "narvl: label out of range");
        fix(labels[k], pr[k]);
      }
      fix(blank, pr[K - 1]);
    }
  });
  return grad;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> qctc_fwd_cpu(const Tensor& logits_in, const Tensor& targets_in,
                                                        const Tensor& target_lengths,
                                                        const Tensor& query_lengths, int64_t blank) {
  const int64_t B = logits_in.size(0);
  check_common(logits_in, targets_in, target_lengths, query_lengths, B, blank);
  const Tensor logits = logits_in.stride(2) == 1 ? logits_in : logits_in.contiguous();
  const Tensor targets = targets_in.to(torch::kLong).contiguous();
  const Tensor tl = target_lengths.to(torch::kLong).contiguous();
  const Tensor ql = query_lengths.to(torch::kLong).contiguous();
  std::tuple<Tensor, Tensor, Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "qctc_fwd_cpu", [&] {
    out = qctc_fwd_impl<scalar_t>(logits, targets, tl, ql, blank);
  });
  return out;
}

Tensor qctc_bwd_cpu(const Tensor& grad_nll, const Tensor& grad_smooth, const Tensor& logits_in,
                    const Tensor& lse, const Tensor& em, const Tensor& targets_in,
                    const Tensor& target_lengths, const Tensor& query_lengths, int64_t blank) {
  const int64_t B = logits_in.size(0);
  check_common(logits_in, targets_in, target_lengths, query_lengths, B, blank);
  TORCH_CHECK(grad_nll.numel() == B && grad_smooth.numel() == B, "narvl: grads must be (B,)");
  const Tensor logits = logits_in.stride(2) == 1 ? logits_in : logits_in.contiguous();
  const Tensor targets = targets_in.to(torch::kLong).contiguous();
  const Tensor tl = target_lengths.to(torch::kLong).contiguous();
  const Tensor ql = query_lengths.to(torch::kLong).contiguous();
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "qctc_bwd_cpu", [&] {
    out = qctc_bwd_impl<scalar_t>(grad_nll, grad_smooth, logits, lse, em, targets, tl, ql, blank);
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// CTC on log-probabilities (T, B, C): the forward reads only the label and blank columns; the
// gradient -gn * post is non-zero only there (the backward reads each live row once, for
// F.ctc_loss's NaN at -inf entries).

template <typename scalar_t>
std::tuple<Tensor, Tensor> ctc_fwd_impl(const Tensor& lp, const Tensor& targets, const Tensor& il,
                                        const Tensor& tl, int64_t blank) {
  using out_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t T = lp.size(0), B = lp.size(1), C = lp.size(2);
  const int64_t S = targets.size(1), K = S + 1;
  const auto fopt = lp.options().dtype(c10::CppTypeToScalarType<out_t>::value);
  Tensor nll = torch::empty({B}, fopt);
  Tensor em = torch::full({B, T, K}, -std::numeric_limits<double>::infinity(), fopt);
  const scalar_t* X = lp.data_ptr<scalar_t>();
  const int64_t sT = lp.stride(0), sB = lp.stride(1);
  const int64_t* tgt = targets.data_ptr<int64_t>();
  const int64_t* IL = il.data_ptr<int64_t>();
  const int64_t* TL = tl.data_ptr<int64_t>();
  out_t* em_p = em.data_ptr<out_t>();
  out_t* nll_p = nll.data_ptr<out_t>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    static thread_local LatticeScratch<out_t> ws;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t Tb = checked_length(IL, b, T, "input_lengths");
      const int64_t L = checked_length(TL, b, S, "target_lengths");
      for (int64_t t = 0; t < Tb; ++t)
        gather_slots(X + t * sT + b * sB, C, 0.0, tgt + b * S, L, K, blank, em_p + (b * T + t) * K);
      nll_p[b] = static_cast<out_t>(ctc_lattice(em_p + b * T * K, K, Tb, T, tgt + b * S, L,
                                                static_cast<out_t*>(nullptr), ws));
    }
  });
  return {nll, em};
}

template <typename scalar_t>
Tensor ctc_bwd_impl(const Tensor& gn_t, const Tensor& lp, const Tensor& em, const Tensor& targets,
                    const Tensor& il, const Tensor& tl, int64_t blank) {
  using out_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t T = lp.size(0), B = lp.size(1), C = lp.size(2);
  const int64_t S = targets.size(1), K = S + 1;
  Tensor grad = empty_for_streaming_write({T, B, C}, lp.options());
  const Tensor gn64 = gn_t.to(torch::kDouble).contiguous();
  const int64_t* tgt = targets.data_ptr<int64_t>();
  const int64_t* IL = il.data_ptr<int64_t>();
  const int64_t* TL = tl.data_ptr<int64_t>();
  std::vector<double> nllv;
  const Tensor post_c = posteriors<out_t>(em, tgt, S, IL, T, TL, B, nllv);
  const scalar_t* X = lp.data_ptr<scalar_t>();
  const int64_t sT = lp.stride(0), sB = lp.stride(1);
  const double* gn = gn64.data_ptr<double>();
  const out_t* post_p = post_c.data_ptr<out_t>();
  scalar_t* G = grad.data_ptr<scalar_t>();
  at::parallel_for(0, T * B, grain_for(C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r / B, b = r % B;
      scalar_t* g = G + r * C;
      const int64_t Tb = checked_length(IL, b, T, "input_lengths");
      const int64_t L = checked_length(TL, b, S, "target_lengths");
      if (t >= Tb || sample_zeroed(nllv[b], gn[b])) {
        std::fill(g, g + C, scalar_t(0));
        continue;
      }
      if (sample_poisoned(nllv[b], gn[b])) {
        fill_nan(g, C);
        continue;
      }
      const scalar_t* x = X + t * sT + b * sB;
      const bool bad = row_ctc_fill(x, C, gn[b], g);  // 0, or F.ctc_loss's non-finite values
      const out_t* pr = post_p + (b * T + t) * K;
      const int64_t* labels = tgt + b * S;
      auto put = [&](int64_t col, out_t p) {
        if (!bad || std::isfinite(static_cast<double>(x[col])))
          g[col] = static_cast<scalar_t>(-gn[b] * static_cast<double>(p));
      };
      for (int64_t k = 0; k < L; ++k) {
        TORCH_CHECK(labels[k] >= 0 && labels[k] < C, "narvl: label out of range");
        put(labels[k], pr[k]);
      }
      put(blank, pr[K - 1]);
    }
  });
  return grad;
}

std::tuple<Tensor, Tensor> ctc_fwd_cpu(const Tensor& lp_in, const Tensor& targets_in,
                                       const Tensor& input_lengths, const Tensor& target_lengths,
                                       int64_t blank) {
  TORCH_CHECK(lp_in.dim() == 3, "narvl: log_probs must be (T, B, C)");
  check_common(lp_in, targets_in, target_lengths, input_lengths, lp_in.size(1), blank);
  const Tensor lp = lp_in.stride(2) == 1 ? lp_in : lp_in.contiguous();
  const Tensor targets = targets_in.to(torch::kLong).contiguous();
  const Tensor il = input_lengths.to(torch::kLong).contiguous();
  const Tensor tl = target_lengths.to(torch::kLong).contiguous();
  std::tuple<Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lp.scalar_type(), "ctc_fwd_cpu", [&] {
    out = ctc_fwd_impl<scalar_t>(lp, targets, il, tl, blank);
  });
  return out;
}

Tensor ctc_bwd_cpu(const Tensor& grad_nll, const Tensor& lp_in, const Tensor& em,
                   const Tensor& targets_in, const Tensor& input_lengths, const Tensor& target_lengths,
                   int64_t blank) {
  TORCH_CHECK(lp_in.dim() == 3, "narvl: log_probs must be (T, B, C)");
  check_common(lp_in, targets_in, target_lengths, input_lengths, lp_in.size(1), blank);
  TORCH_CHECK(grad_nll.numel() == lp_in.size(1), "narvl: grad_nll must be (B,)");
  const Tensor lp = lp_in.stride(2) == 1 ? lp_in : lp_in.contiguous();
  const Tensor targets = targets_in.to(torch::kLong).contiguous();
  const Tensor il = input_lengths.to(torch::kLong).contiguous();
  const Tensor tl = target_lengths.to(torch::kLong).contiguous();
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lp_in.scalar_type(), "ctc_bwd_cpu", [&] {
    out = ctc_bwd_impl<scalar_t>(grad_nll, lp, em, targets, il, tl, blank);
  });
  return out;
}

}  // namespace

// The CPU kernels of narvl::{qctc,ctc}_{fwd,bwd}. narvl/ops/ctc.py registers them on the ops
// (one CPU kernel that also serves NARVL_BACKEND=triton under the interpreter); they run without
// the GIL.
void register_ctc_kernels(pybind11::module_& m) {
  const auto nogil = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("qctc_fwd", &qctc_fwd_cpu, nogil);
  m.def("qctc_bwd", &qctc_bwd_cpu, nogil);
  m.def("ctc_fwd", &ctc_fwd_cpu, nogil);
  m.def("ctc_bwd", &ctc_bwd_cpu, nogil);
}

}  // namespace narvl
