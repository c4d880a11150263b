// CPU CTC decoding: greedy and prefix beam search over (B, T, V) scores.
//
// Prefix beam search keeps, for every prefix in the beam, the probability of the prefix's
// alignments that end in a blank (pb) and in a non-blank (pnb). At each frame only the
// cutoff_top_n most probable tokens are expanded (a partial selection: a running min-heap fed by
// a 16-lane chunk filter, never a sort of V), further cut to the smallest set whose mass reaches
// cutoff_prob. Prefixes live in a trie (parent pointers, one hash map from (parent, token) to
// node), so two ways of reaching the same token sequence land on the same node and are merged
// exactly. Probabilities are kept in linear space, rescaled per frame by the beam's maximum
// (the log of the scale is accumulated), so merging is a plain addition. Samples run in
// parallel; everything is deterministic.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <unordered_map>
#include <vector>

namespace narvl {
namespace {

using torch::Tensor;

// ------------------------------------------------------------------------------------- greedy

template <typename scalar_t>
int64_t row_argmax(const scalar_t* x, int64_t V) {
  int64_t best = 0;
  float bv = static_cast<float>(x[0]);
  for (int64_t v = 1; v < V; ++v) {
    const float f = static_cast<float>(x[v]);
    if (f > bv) {  // first maximum wins, as torch.argmax
      bv = f;
      best = v;
    }
  }
  return best;
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

// The k largest entries of x (as log-probabilities), sorted descending. Keeps a min-heap of size
// k; 16-element chunks whose maximum cannot enter the heap are skipped with one comparison.
template <typename scalar_t>
void top_candidates(const scalar_t* x, int64_t V, int64_t k, bool log_input, std::vector<Cand>& heap) {
  heap.clear();
  auto cmp = [](const Cand& a, const Cand& b) { return a.lp > b.lp; };  // min-heap on lp
  auto val = [&](int64_t v) {
    const float f = static_cast<float>(x[v]);
    return log_input ? f : std::log(f);
  };
  float thr = -std::numeric_limits<float>::infinity();
  int64_t v = 0;
  for (; v < V && static_cast<int64_t>(heap.size()) < k; ++v) {
    heap.push_back({val(v), static_cast<int32_t>(v)});
    std::push_heap(heap.begin(), heap.end(), cmp);
  }
  if (static_cast<int64_t>(heap.size()) == k) thr = heap.front().lp;
  constexpr int64_t C = 16;
  for (; v < V; v += C) {
    const int64_t e = std::min(V, v + C);
    if (e - v == C) {
      float m = static_cast<float>(x[v]);
      for (int64_t j = 1; j < C; ++j) m = std::max(m, static_cast<float>(x[v + j]));
      const float mv = log_input ? m : std::log(m);
      if (!(mv > thr)) continue;
    }
    for (int64_t j = v; j < e; ++j) {
      const float f = val(j);
      if (f > thr) {
        std::pop_heap(heap.begin(), heap.end(), cmp);
        heap.back() = {f, static_cast<int32_t>(j)};
        std::push_heap(heap.begin(), heap.end(), cmp);
        thr = heap.front().lp;
      }
    }
  }
  // descending by lp, ties by token id (deterministic)
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

struct BeamScratch {
  std::vector<Node> nodes;
  std::unordered_map<uint64_t, int32_t> children;
  std::vector<Entry> beam, next;
  std::vector<int32_t> slot;   // node -> index in `next`, valid where stamp[node] == frame + 1
  std::vector<int32_t> stamp;
  std::vector<Cand> cands;
};

template <typename scalar_t>
void beam_search_one(const scalar_t* X, int64_t T, int64_t V, int64_t Tb, int64_t beam_width,
                     int64_t blank, int64_t top_n, double cutoff_prob, int64_t nbest, bool log_input,
                     int64_t* out_tok, int64_t* out_len, float* out_score, int64_t* out_ts,
                     BeamScratch& w) {
  w.nodes.assign(1, Node{-1, -1, -1});
  w.children.clear();
  std::fill(w.stamp.begin(), w.stamp.end(), 0);
  w.beam.assign(1, Entry{0, 1.0, 0.0});
  double log_scale = 0.0;
  auto child_of = [&](int32_t parent, int32_t tok, int32_t t) {
    const uint64_t key = (static_cast<uint64_t>(parent) << 32) | static_cast<uint32_t>(tok);
    auto it = w.children.find(key);
    if (it != w.children.end()) return it->second;
    const int32_t id = static_cast<int32_t>(w.nodes.size());
    w.nodes.push_back(Node{tok, parent, t});
    w.children.emplace(key, id);
    return id;
  };
  for (int64_t t = 0; t < Tb; ++t) {
    top_candidates(X + t * V, V, top_n, log_input, w.cands);
    int64_t nc = static_cast<int64_t>(w.cands.size());
    if (cutoff_prob < 1.0) {
      double mass = 0.0;
      int64_t keep = 0;
      while (keep < nc && mass < cutoff_prob) mass += std::exp(static_cast<double>(w.cands[keep++].lp));
      nc = std::max<int64_t>(keep, 1);
    }
    w.next.clear();
    const int32_t frame = static_cast<int32_t>(t) + 1;
    auto add = [&](int32_t node) -> Entry& {
      if (static_cast<size_t>(node) >= w.slot.size()) {
        w.slot.resize(2 * node + 16, 0);
        w.stamp.resize(2 * node + 16, 0);
      }
      if (w.stamp[node] != frame) {
        w.stamp[node] = frame;
        w.slot[node] = static_cast<int32_t>(w.next.size());
        w.next.push_back(Entry{node, 0.0, 0.0});
      }
      return w.next[w.slot[node]];
    };
    for (const Entry e : w.beam) {
      const int32_t last = w.nodes[e.node].tok;
      for (int64_t j = 0; j < nc; ++j) {
        const int32_t c = w.cands[j].tok;
        const double p = std::exp(static_cast<double>(w.cands[j].lp));
        if (c == blank) {
          add(e.node).pb += e.total() * p;
        } else if (c == last) {
          const int32_t ch = child_of(e.node, c, static_cast<int32_t>(t));
          add(ch).pnb += e.pb * p;      // a blank separated the repeat: a new token
          add(e.node).pnb += e.pnb * p;  // the repeat collapses into the last token
        } else {
          const int32_t ch = child_of(e.node, c, static_cast<int32_t>(t));
          add(ch).pnb += e.total() * p;
        }
      }
    }
    // keep the beam_width most probable prefixes (ties: lower node id, i.e. older prefix)
    auto better = [](const Entry& a, const Entry& b) {
      return a.total() > b.total() || (a.total() == b.total() && a.node < b.node);
    };
    if (static_cast<int64_t>(w.next.size()) > beam_width) {
      std::nth_element(w.next.begin(), w.next.begin() + beam_width, w.next.end(), better);
      w.next.resize(beam_width);
    }
    double mx = 0.0;
    for (const Entry& e : w.next) mx = std::max(mx, e.total());
    w.beam.swap(w.next);
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
