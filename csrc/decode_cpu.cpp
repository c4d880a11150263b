// CPU CTC decoding: greedy and prefix beam search over (B, T, V) scores.
//
// Prefix beam search keeps, for every prefix in the beam, the probability of the prefix's
// alignments that end in a blank (pb) and in a non-blank (pnb). At each frame only the
// cutoff_top_n most probable tokens are expanded (a partial selection: a running min-heap fed by
// a 16-lane chunk filter, never a sort of V), further cut to the smallest set whose mass reaches
// cutoff_prob. Prefixes live in a trie (parent pointers, one hash map from (parent, token) to
// node), so two ways of reaching the same token sequence land on the same node and are merged
// exactly; extensions that provably cannot enter the beam are skipped without being built (see
// beam_search_one). Probabilities are kept in linear space, rescaled per frame by the beam's maximum
// (the log of the scale is accumulated), so merging is a plain addition. Samples run in
// parallel; everything is deterministic.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

#include "vec_math.h"

namespace narvl {
namespace {

using torch::Tensor;

// ------------------------------------------------------------------------------------- greedy

// The row as float: the row itself for float input, else converted into a thread-local buffer.
template <typename scalar_t>
const float* float_row(const scalar_t* x, int64_t V) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return x;
  } else {
    static thread_local std::vector<float> buf;
    if (static_cast<int64_t>(buf.size()) < V) buf.resize(V);
    for (int64_t v = 0; v < V; ++v) buf[v] = static_cast<float>(x[v]);
    return buf.data();
  }
}

template <typename scalar_t>
int64_t row_argmax(const scalar_t* x, int64_t V) {
  bool nan = false;
  const int64_t a = row_argmax_f32(float_row(x, V), V, &nan);
  TORCH_CHECK(!nan, "narvl: NaN in scores");
  return a;
}

std::tuple<Tensor, Tensor> greedy_cpu(const Tensor& scores_in, const Tensor& lengths_in, int64_t blank) {
  TORCH_CHECK(scores_in.dim() == 3, "narvl: scores must be (B, T, V)");
  const Tensor scores = scores_in.contiguous();
  const int64_t B = scores.size(0), T = scores.size(1), V = scores.size(2);
  TORCH_CHECK(V > 0 && blank >= 0 && blank < V, "narvl: blank out of range");
  const Tensor lengths = lengths_in.to(torch::kLong).contiguous();
  TORCH_CHECK(lengths.numel() == B, "narvl: lengths must be (B,)");
  Tensor tokens = torch::full({B, T}, -1, scores.options().dtype(torch::kLong));
  Tensor out_lens = torch::zeros({B}, scores.options().dtype(torch::kLong));
  int64_t* tk = tokens.data_ptr<int64_t>();
  int64_t* ol = out_lens.data_ptr<int64_t>();
  const int64_t* len = lengths.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "greedy_cpu", [&] {
    const scalar_t* X = scores.data_ptr<scalar_t>();
    at::parallel_for(0, B, std::max<int64_t>(1, 4096 / std::max<int64_t>(T * V, 1)), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t Tb = len[b];
        TORCH_CHECK(Tb >= 0 && Tb <= T, "narvl: lengths[", b, "] outside [0, ", T, "]");
        int64_t n = 0, prev = -1;
        for (int64_t t = 0; t < Tb; ++t) {
          const int64_t c = row_argmax(X + (b * T + t) * V, V);
          if (c != blank && c != prev) tk[b * T + n++] = c;
          prev = c;
        }
        ol[b] = n;
      }
    });
  });
  return {tokens, out_lens};
}

// -------------------------------------------------------------------------------- beam search

struct Cand {
  float lp;  // log-probability of the token at this frame
  int32_t tok;
};

// The k largest entries of a row, as log-probabilities, sorted descending (ties: lower token
// id). Selection runs on the raw values (the order of probabilities and of their logs is the
// same): a min-heap of size k fed block by block, where a block (64 values) whose maximum
// (precomputed, vectorised) cannot enter the heap is skipped with one comparison.
template <typename scalar_t>
void top_candidates(const scalar_t* xr, int64_t V, int64_t k, bool log_input, std::vector<Cand>& heap) {
  constexpr int64_t kBlock = 64;
  static thread_local std::vector<float> bmax;
  const float* x = float_row(xr, V);
  const int64_t nblk = (V + kBlock - 1) / kBlock;
  if (static_cast<int64_t>(bmax.size()) < nblk) bmax.resize(nblk);
  TORCH_CHECK(!block_max_f32(x, V, kBlock, bmax.data()), "narvl: NaN in scores");
  heap.clear();
  // min-heap on (value, then higher index first out) so that ties keep the lower token id
  auto cmp = [](const Cand& a, const Cand& b) { return a.lp > b.lp || (a.lp == b.lp && a.tok < b.tok); };
  // The k-th largest block maximum bounds the k-th largest value from below (those k blocks
  // each hold a value at least that large): only blocks reaching it are scanned (about k).
  static thread_local std::vector<float> sel;  // min-heap of the k largest block maxima
  float floor = -std::numeric_limits<float>::infinity();
  if (nblk > k) {
    sel.assign(bmax.begin(), bmax.begin() + k);
    std::make_heap(sel.begin(), sel.end(), std::greater<float>());
    for (int64_t blk = k; blk < nblk; ++blk) {
      if (bmax[blk] > sel.front()) {
        std::pop_heap(sel.begin(), sel.end(), std::greater<float>());
        sel.back() = bmax[blk];
        std::push_heap(sel.begin(), sel.end(), std::greater<float>());
      }
    }
    floor = sel.front();
  }
  float thr = -std::numeric_limits<float>::infinity();
  for (int64_t blk = 0; blk < nblk; ++blk) {
    if (bmax[blk] < floor) continue;
    const bool full = static_cast<int64_t>(heap.size()) == k;
    if (full && !(bmax[blk] > thr)) continue;
    const int64_t e = std::min(V, (blk + 1) * kBlock);
    for (int64_t v = blk * kBlock; v < e; ++v) {
      const float f = x[v];
      if (f < floor) continue;
      if (static_cast<int64_t>(heap.size()) < k) {
        heap.push_back({f, static_cast<int32_t>(v)});
        std::push_heap(heap.begin(), heap.end(), cmp);
        if (static_cast<int64_t>(heap.size()) == k) thr = heap.front().lp;
      } else if (f > thr) {
        std::pop_heap(heap.begin(), heap.end(), cmp);
        heap.back() = {f, static_cast<int32_t>(v)};
        std::push_heap(heap.begin(), heap.end(), cmp);
        thr = heap.front().lp;
      }
    }
  }
  if (!log_input)
    for (Cand& c : heap) c.lp = std::log(c.lp);
  std::sort(heap.begin(), heap.end(), [](const Cand& a, const Cand& b) {
    return a.lp > b.lp || (a.lp == b.lp && a.tok < b.tok);
  });
}

struct Node {
  int32_t tok, parent, t;
};

struct Entry {
  int32_t node;
  double pb, pnb;
  double total() const { return pb + pnb; }
};

// Open-addressing map (parent node, token) -> child node; keys are never erased within a sample.
struct ChildMap {
  std::vector<uint64_t> keys;
  std::vector<int32_t> vals;
  size_t used = 0;
  static constexpr uint64_t kEmpty = ~uint64_t(0);
  void clear() {
    if (keys.empty()) {
      keys.assign(1024, kEmpty);
      vals.assign(1024, 0);
    } else {
      std::fill(keys.begin(), keys.end(), kEmpty);
    }
    used = 0;
  }
  static size_t mix(uint64_t k) {
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    return static_cast<size_t>(k);
  }
  // Returns the slot of key (found, or empty where it would go).
  size_t find(uint64_t key) const {
    const size_t mask = keys.size() - 1;
    size_t i = mix(key) & mask;
    while (keys[i] != kEmpty && keys[i] != key) i = (i + 1) & mask;
    return i;
  }
  void grow() {
    std::vector<uint64_t> ok = std::move(keys);
    std::vector<int32_t> ov = std::move(vals);
    keys.assign(ok.size() * 2, kEmpty);
    vals.assign(ok.size() * 2, 0);
    for (size_t i = 0; i < ok.size(); ++i)
      if (ok[i] != kEmpty) {
        const size_t j = find(ok[i]);
        keys[j] = ok[i];
        vals[j] = ov[i];
      }
  }
};

struct BeamScratch {
  std::vector<Node> nodes;
  ChildMap children;
  std::vector<Entry> beam, next;
  std::vector<int32_t> beam_pos, beam_stamp;  // node -> index in `beam` at this frame
  std::vector<int32_t> tok_pos, tok_stamp;    // token -> index in the candidate list at this frame
  std::vector<double> cand_p;
  std::vector<double> heap;                   // min-heap of the best `beam_width` final scores
  std::vector<Cand> cands;
  std::vector<int32_t> order;
  // Frame counter shared by every sample this scratch serves: a stamp equal to `epoch` marks the
  // current frame, so the stamp arrays never need clearing between frames or samples.
  int32_t epoch = 0;
  int32_t next_epoch() {
    if (epoch == std::numeric_limits<int32_t>::max()) {
      std::fill(beam_stamp.begin(), beam_stamp.end(), 0);
      std::fill(tok_stamp.begin(), tok_stamp.end(), 0);
      epoch = 0;
    }
    return ++epoch;
  }
};

// One sample. Per frame: (1) the cutoff_top_n candidate tokens with probabilities p_j, sorted;
// (2) "stays": every prefix keeps pb' = (pb + pnb) p_blank and pnb' = pnb p_last; (3) merges:
// a prefix k already in the beam whose parent i is also in the beam receives the extension
// (i, tok_k) exactly; stay scores are now final; (4) new extensions (i, c) whose child is not in
// the beam: their score has a single source and is final, so any that falls strictly below the
// beam_width-th best final score so far cannot survive and is skipped without being built
// (candidates are sorted, so the loops stop early); (5) the beam_width best survive.
template <typename scalar_t>
void beam_search_one(const scalar_t* X, int64_t T, int64_t V, int64_t Tb, int64_t beam_width,
                     int64_t blank, int64_t top_n, double cutoff_prob, int64_t nbest, bool log_input,
                     int64_t* out_tok, int64_t* out_len, float* out_score, int64_t* out_ts,
                     BeamScratch& w) {
  w.nodes.assign(1, Node{-1, -1, -1});
  w.children.clear();
  w.beam.assign(1, Entry{0, 1.0, 0.0});
  if (static_cast<int64_t>(w.tok_stamp.size()) < V) {
    w.tok_stamp.resize(V, 0);
    w.tok_pos.resize(V, 0);
  }
  double log_scale = 0.0;
  auto child_of = [&](int32_t parent, int32_t tok, int32_t t) {
    const uint64_t key = (static_cast<uint64_t>(parent) << 32) | static_cast<uint32_t>(tok);
    size_t i = w.children.find(key);
    if (w.children.keys[i] == key) return w.children.vals[i];
    if (2 * (w.children.used + 1) > w.children.keys.size()) {
      w.children.grow();
      i = w.children.find(key);
    }
    const int32_t id = static_cast<int32_t>(w.nodes.size());
    w.nodes.push_back(Node{tok, parent, t});
    w.children.keys[i] = key;
    w.children.vals[i] = id;
    ++w.children.used;
    return id;
  };
  auto heap_push = [&](double v) {  // keeps the beam_width largest values; front() = threshold
    auto gt = [](double a, double b) { return a > b; };
    if (static_cast<int64_t>(w.heap.size()) < beam_width) {
      w.heap.push_back(v);
      std::push_heap(w.heap.begin(), w.heap.end(), gt);
    } else if (v > w.heap.front()) {
      std::pop_heap(w.heap.begin(), w.heap.end(), gt);
      w.heap.back() = v;
      std::push_heap(w.heap.begin(), w.heap.end(), gt);
    }
  };
  auto threshold = [&]() {
    return static_cast<int64_t>(w.heap.size()) < beam_width ? 0.0 : w.heap.front();
  };
  for (int64_t t = 0; t < Tb; ++t) {
    const int32_t frame = w.next_epoch();
    top_candidates(X + t * V, V, top_n, log_input, w.cands);
    int64_t nc = static_cast<int64_t>(w.cands.size());
    w.cand_p.resize(nc);
    for (int64_t j = 0; j < nc; ++j) w.cand_p[j] = std::exp(static_cast<double>(w.cands[j].lp));
    if (cutoff_prob < 1.0) {
      double mass = 0.0;
      int64_t keep = 0;
      while (keep < nc && mass < cutoff_prob) mass += w.cand_p[keep++];
      nc = std::max<int64_t>(keep, 1);
    }
    double p_blank = 0.0;
    for (int64_t j = 0; j < nc; ++j) {
      w.tok_stamp[w.cands[j].tok] = frame;
      w.tok_pos[w.cands[j].tok] = static_cast<int32_t>(j);
      if (w.cands[j].tok == blank) p_blank = w.cand_p[j];
    }
    auto p_of = [&](int32_t tok) { return w.tok_stamp[tok] == frame ? w.cand_p[w.tok_pos[tok]] : 0.0; };
    if (w.beam_stamp.size() < w.nodes.size()) {
      w.beam_stamp.resize(2 * w.nodes.size() + 16, 0);
      w.beam_pos.resize(2 * w.nodes.size() + 16, 0);
    }
    const int64_t nb = static_cast<int64_t>(w.beam.size());
    for (int64_t i = 0; i < nb; ++i) {
      w.beam_stamp[w.beam[i].node] = frame;
      w.beam_pos[w.beam[i].node] = static_cast<int32_t>(i);
    }
    auto in_beam = [&](int32_t node) { return w.beam_stamp[node] == frame ? w.beam_pos[node] : -1; };
    // (2) stays
    w.next.resize(nb);
    for (int64_t i = 0; i < nb; ++i) {
      const Entry& e = w.beam[i];
      const int32_t last = w.nodes[e.node].tok;
      w.next[i] = Entry{e.node, e.total() * p_blank, last >= 0 && last != blank ? e.pnb * p_of(last) : 0.0};
    }
    // (3) merges: prefix k = parent i + tok_k, both in the beam
    for (int64_t k = 0; k < nb; ++k) {
      const Node& nk = w.nodes[w.beam[k].node];
      if (nk.parent < 0 || nk.tok == blank) continue;
      const int32_t i = in_beam(nk.parent);
      if (i < 0) continue;
      const double p = p_of(nk.tok);
      if (p == 0.0) continue;
      const Entry& ei = w.beam[i];
      const int32_t last_i = w.nodes[ei.node].tok;
      w.next[k].pnb += (nk.tok == last_i ? ei.pb : ei.total()) * p;
    }
    w.heap.clear();
    for (int64_t k = 0; k < nb; ++k) heap_push(w.next[k].total());
    // (4) new extensions, parents by decreasing probability
    w.order.resize(nb);
    for (int64_t i = 0; i < nb; ++i) w.order[i] = static_cast<int32_t>(i);
    std::sort(w.order.begin(), w.order.end(), [&](int32_t a, int32_t b) {
      return w.beam[a].total() > w.beam[b].total() || (w.beam[a].total() == w.beam[b].total() && a < b);
    });
    for (const int32_t i : w.order) {
      const Entry ei = w.beam[i];
      const double tot = ei.total();
      if (tot * w.cand_p[0] < threshold()) break;  // no candidate of this or a later parent fits
      const int32_t last = w.nodes[ei.node].tok;
      for (int64_t j = 0; j < nc; ++j) {
        const int32_t c = w.cands[j].tok;
        if (c == blank) continue;
        const double pj = w.cand_p[j];
        if (tot * pj < threshold()) break;
        const double score = (c == last ? ei.pb : tot) * pj;
        if (score < threshold() || score == 0.0) continue;
        const int32_t ch = child_of(ei.node, c, static_cast<int32_t>(t));
        if (static_cast<size_t>(ch) < w.beam_stamp.size() && in_beam(ch) >= 0) continue;  // merged in (3)
        w.next.push_back(Entry{ch, 0.0, score});
        heap_push(score);
      }
    }
    // (5) keep the beam_width most probable prefixes (ties: lower node id, i.e. older prefix)
    auto better = [](const Entry& a, const Entry& b) {
      return a.total() > b.total() || (a.total() == b.total() && a.node < b.node);
    };
    if (static_cast<int64_t>(w.next.size()) > beam_width) {
      std::nth_element(w.next.begin(), w.next.begin() + beam_width, w.next.end(), better);
      w.next.resize(beam_width);
    }
    double mx = 0.0;
    for (const Entry& e : w.next) mx = std::max(mx, e.total());
    w.beam.clear();
    for (const Entry& e : w.next)
      if (e.total() > 0.0) w.beam.push_back(e);
    if (!(mx > 0.0)) {  // nothing survives (e.g. all-zero probabilities)
      w.beam.clear();
      break;
    }
    for (Entry& e : w.beam) {
      e.pb /= mx;
      e.pnb /= mx;
    }
    log_scale += std::log(mx);
  }
  std::sort(w.beam.begin(), w.beam.end(), [](const Entry& a, const Entry& b) {
    return a.total() > b.total() || (a.total() == b.total() && a.node < b.node);
  });
  for (int64_t k = 0; k < nbest; ++k) {
    int64_t* tok = out_tok + k * T;
    int64_t* ts = out_ts + k * T;
    if (k >= static_cast<int64_t>(w.beam.size())) {
      out_len[k] = 0;
      out_score[k] = -std::numeric_limits<float>::infinity();
      continue;
    }
    const Entry& e = w.beam[k];
    int64_t n = 0;
    for (int32_t v = e.node; v > 0; v = w.nodes[v].parent) ++n;
    out_len[k] = n;
    int64_t i = n;
    for (int32_t v = e.node; v > 0; v = w.nodes[v].parent) {
      --i;
      tok[i] = w.nodes[v].tok;
      ts[i] = w.nodes[v].t;
    }
    out_score[k] = static_cast<float>(std::log(e.total()) + log_scale);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> beam_cpu(const Tensor& scores_in, const Tensor& lengths_in,
                                                    int64_t beam_width, int64_t blank, int64_t top_n,
                                                    double cutoff_prob, int64_t nbest, bool log_input,
                                                    int64_t num_threads) {
  TORCH_CHECK(scores_in.dim() == 3, "narvl: scores must be (B, T, V)");
  const Tensor scores = scores_in.contiguous();
  const int64_t B = scores.size(0), T = scores.size(1), V = scores.size(2);
  TORCH_CHECK(V > 0 && blank >= 0 && blank < V, "narvl: blank out of range");
  TORCH_CHECK(beam_width >= 1 && nbest >= 1 && top_n >= 1, "narvl: beam_width, nbest, cutoff_top_n >= 1");
  const Tensor lengths = lengths_in.to(torch::kLong).contiguous();
  TORCH_CHECK(lengths.numel() == B, "narvl: lengths must be (B,)");
  const auto lopt = scores.options().dtype(torch::kLong);
  Tensor tokens = torch::full({B, nbest, T}, -1, lopt);
  Tensor timesteps = torch::full({B, nbest, T}, -1, lopt);
  Tensor out_lens = torch::zeros({B, nbest}, lopt);
  Tensor out_scores = torch::empty({B, nbest}, scores.options().dtype(torch::kFloat));
  const int64_t* len = lengths.data_ptr<int64_t>();
  const int64_t k = std::min(top_n, V);
  // num_threads > 0 caps the parallelism: at most num_threads chunks of the batch.
  const int64_t grain = num_threads > 0 ? (B + num_threads - 1) / num_threads : 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "beam_cpu", [&] {
    const scalar_t* X = scores.data_ptr<scalar_t>();
    at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
      static thread_local BeamScratch w;
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t Tb = len[b];
        TORCH_CHECK(Tb >= 0 && Tb <= T, "narvl: lengths[", b, "] outside [0, ", T, "]");
        beam_search_one(X + b * T * V, T, V, Tb, beam_width, blank, k, cutoff_prob, nbest, log_input,
                        tokens.data_ptr<int64_t>() + b * nbest * T,
                        out_lens.data_ptr<int64_t>() + b * nbest,
                        out_scores.data_ptr<float>() + b * nbest,
                        timesteps.data_ptr<int64_t>() + b * nbest * T, w);
      }
    });
  });
  return {tokens, out_lens, out_scores, timesteps};
}

}  // namespace

TORCH_LIBRARY_IMPL(narvl, CPU, m) {
  m.impl("ctc_greedy_decode", &greedy_cpu);
  m.impl("ctc_beam_search", &beam_cpu);
}

}  // namespace narvl
