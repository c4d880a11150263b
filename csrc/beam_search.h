// The CPU CTC prefix beam search, one sample at a time, resumable frame by frame (streaming).
//
// Each prefix in the beam carries the probabilities of its alignments that end in a blank (pb)
// and in a non-blank (pnb). At each frame only the cutoff_top_n most probable tokens are
// expanded (a partial selection over per-block maxima, never a sort of V), further cut to the
// smallest set whose mass reaches cutoff_prob. Prefixes live in a trie (parent pointers, one
// hash map from (parent, token) to node), so two ways of reaching the same token sequence land
// on the same node and are merged exactly; extensions that provably cannot enter the beam are
// skipped without being built. Probabilities are linear, rescaled per frame by the beam's
// maximum (the log of the scale is accumulated), so merging is a plain addition.
//
// A `Scoring` (beam_scoring.h) adds ctcdecode's language-model fusion (a factor
// exp(alpha * ln P(word | context) + beta) on the extensions that complete a word, and the
// lexicon constraint of word-based models) and hotword boosts. Each factor belongs to the trie
// node the extension creates, so merges stay exact.
//
// Timesteps follow ctcdecode (path_trie.cpp): each node records the frame at which the
// probability of its token was highest over the frames at which the search extended its parent
// by that token while the node was alive; a node is alive while it or one of its descendants is
// in the beam, and one that died starts afresh when it is built again.
#pragma once
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

#include "beam_scoring.h"
#include "vec_math.h"

namespace narvl {
namespace beam {

enum Input : int64_t { kProbs = 0, kLogProbs = 1, kLogits = 2 };
constexpr double kProbFloor = static_cast<double>(std::numeric_limits<float>::min());  // FLT_MIN

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

struct Cand {
  float lp;  // log-probability of the token at this frame
  int32_t tok;
};

// The k largest entries of a row as log-probabilities, sorted descending (ties: lower token id),
// and the log-probability of `blank` (any rank): one read of the row (row_topk_f32, vec_math.h),
// which for logits also gives the row's log-sum-exp; never a sort of V. vals/idx are the
// caller's buffers (thread-local storage costs a call per access in a shared library).
template <typename scalar_t>
void top_candidates(const scalar_t* xr, int64_t V, int64_t k, int64_t input, int64_t blank,
                    std::vector<Cand>& heap, float* blank_lp, std::vector<float>& vals,
                    std::vector<int32_t>& idx) {
  const float* x = float_row(xr, V);
  const int64_t need = topk_buffer_size(k);
  if (static_cast<int64_t>(vals.size()) < need) {
    vals.resize(need);
    idx.resize(need);
  }
  float lse = 0.f;
  bool nan = false;
  const int64_t n = row_topk_f32(x, V, k, vals.data(), idx.data(), &nan, input == kLogits ? &lse : nullptr);
  if (nan) throw NanScoresError();  // narvl.checks.NaNScoresError in Python
  // probabilities: log(p + FLT_MIN) in double, as ctcdecode, so a zero probability is
  // log(FLT_MIN) = -87.3 (a very unlikely label, still ranked) rather than impossible
  auto to_log = [&](float f) {
    return input == kProbs ? static_cast<float>(std::log(static_cast<double>(f) + kProbFloor))
           : input == kLogits ? f - lse : f;
  };
  // the row's order (raw values descending, ties to the lower token) is the log-probabilities'
  // order, up to ties that the conversion rounds together: an insertion pass, linear on sorted
  // input, puts those in token order
  heap.resize(n);
  for (int64_t j = 0; j < n; ++j) {
    const Cand c{to_log(vals[j]), idx[j]};
    int64_t i = j;
    for (; i > 0 && (heap[i - 1].lp < c.lp || (heap[i - 1].lp == c.lp && heap[i - 1].tok > c.tok)); --i)
      heap[i] = heap[i - 1];
    heap[i] = c;
  }
  // the blank's log-probability for ctcdecode's min_cutoff, which takes log(p) without FLT_MIN
  *blank_lp = input == kProbs ? std::log(x[blank]) : to_log(x[blank]);
}

struct Node {
  int32_t tok, parent;
  int32_t t;          // frame of best_lp (ctcdecode's timestep)
  float best_lp;      // highest log-probability of tok over the frames that extended parent by it
  int32_t alive;      // == Search::alive_mark: alive through the last prune (or visited since)
  int32_t bstamp, bpos;  // in the beam at frame bstamp, at index bpos
  double factor;      // multiplier on every extension into this node (1 without scoring)
  NodeState s;        // language-model / lexicon / hotword state (beam_scoring.h)
};

struct Entry {
  int32_t node;
  double pb, pnb;
  double total() const { return pb + pnb; }
};

// Open-addressing map (parent node, token) -> child node; keys are never erased within a sample.
// Key and value share a 16-byte slot: one cache line per probe. clear() resets only the slots
// in use, and shrinks a table far larger than the last sample needed (a table that a wide beam
// had grown, refilled for every sample and probed all over, made later narrow-beam searches of
// short sequences ~40% slower).
struct ChildMap {
  struct Slot {
    uint64_t key;
    int32_t val;
  };
  std::vector<Slot> slots;
  std::vector<uint32_t> filled;  // the slots in use
  static constexpr uint64_t kEmpty = ~uint64_t(0);
  void clear() {
    size_t want = 256;
    while (want < 4 * filled.size()) want *= 2;
    if (slots.size() < 256 || slots.size() > 4 * want) {
      slots.assign(want, Slot{kEmpty, 0});
    } else {
      for (const uint32_t i : filled) slots[i].key = kEmpty;
    }
    filled.clear();
  }
  size_t used() const { return filled.size(); }
  static size_t mix(uint64_t k) {
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    return static_cast<size_t>(k);
  }
  size_t find(uint64_t key) const {  // the slot of key (found, or empty where it would go)
    const size_t mask = slots.size() - 1;
    size_t i = mix(key) & mask;
    while (slots[i].key != kEmpty && slots[i].key != key) i = (i + 1) & mask;
    return i;
  }
  void put(size_t i, uint64_t key, int32_t val) {  // at find(key)'s empty slot i
    slots[i] = Slot{key, val};
    filled.push_back(static_cast<uint32_t>(i));
  }
  void grow() {
    std::vector<Slot> old = std::move(slots);
    slots.assign(old.size() * 2, Slot{kEmpty, 0});
    filled.clear();
    for (const Slot& x : old)
      if (x.key != kEmpty) put(find(x.key), x.key, x.val);
  }
};

// Per-thread buffers shared by the samples a thread serves.
struct Scratch {
  // token -> index in this frame's candidate list: an open-addressing table of at least 4 slots
  // per candidate (L1-resident, where two V-sized arrays cost a cache miss per candidate)
  struct Slot {
    int32_t stamp, tok, pos;
  };
  std::vector<Slot> slots;
  uint32_t slot_shift = 32;
  std::vector<float> topk_vals;
  std::vector<int32_t> topk_idx;
  std::vector<double> cand_p;
  std::vector<double> heap;  // min-heap of the best `beam_width` final scores
  std::vector<Cand> cands;
  std::vector<int32_t> order;
  std::vector<Entry> next;
  int32_t epoch = 0;
  int32_t next_epoch() {
    if (epoch == std::numeric_limits<int32_t>::max()) {
      for (Slot& x : slots) x.stamp = 0;
      epoch = 0;
    }
    return ++epoch;
  }
  void reserve_slots(int64_t n) {  // room for n candidates
    if (static_cast<int64_t>(slots.size()) >= 4 * n) return;
    int bits = 6;
    while ((int64_t{1} << bits) < 4 * n) ++bits;
    slots.assign(size_t{1} << bits, Slot{0, 0, 0});
    slot_shift = 32 - bits;
  }
  size_t slot_of(int32_t tok) const {
    return static_cast<size_t>((static_cast<uint32_t>(tok) * 0x9E3779B1u) >> slot_shift);
  }
  void put(int32_t tok, int32_t pos, int32_t frame) {
    const size_t mask = slots.size() - 1;
    size_t i = slot_of(tok);
    while (slots[i].stamp == frame) i = (i + 1) & mask;
    slots[i] = Slot{frame, tok, pos};
  }
  int32_t find(int32_t tok, int32_t frame) const {  // -1 when tok is not a candidate
    const size_t mask = slots.size() - 1;
    for (size_t i = slot_of(tok); slots[i].stamp == frame; i = (i + 1) & mask)
      if (slots[i].tok == tok) return slots[i].pos;
    return -1;
  }
};

struct Options {
  int64_t beam_width = 10, blank = 0, top_n = 40;
  double cutoff_prob = 1.0;
  int64_t input = kLogProbs;
};

// One sample's search: begin(), then step() over the frames in any number of chunks, then
// finish() (which leaves the state as it is).
struct Search {
  Options o;
  const Scoring* sc = nullptr;  // not owned; nullptr = plain CTC
  std::vector<Node> nodes;
  ChildMap children;
  std::vector<Entry> beam;
  std::vector<int32_t> ghosts;  // alive nodes that are not in the beam
  std::vector<int32_t> ctx_pool;  // language-model contexts (beam_scoring.h)
  double log_scale = 0.0;
  int64_t frames = 0;  // frames consumed so far
  int32_t alive_mark = 1;
  bool done = false;  // nothing survived a frame

  void begin(const Options& opt, const Scoring* scoring) {
    o = opt;
    sc = scoring;
    nodes.assign(1, Node{-1, -1, -1, 0.f, alive_mark = 1, 0, 0, 1.0, NodeState{}});
    ctx_pool.clear();
    if (sc) sc->root(&nodes[0].s, ctx_pool);
    children.clear();
    beam.assign(1, Entry{0, 1.0, 0.0});
    ghosts.clear();
    log_scale = 0.0;
    frames = 0;
    done = false;
  }

  int32_t lookup(int32_t parent, int32_t tok) const {
    const uint64_t key = (static_cast<uint64_t>(parent) << 32) | static_cast<uint32_t>(tok);
    const size_t i = children.find(key);
    return children.slots[i].key == key ? children.slots[i].val : -1;
  }

  int32_t insert(int32_t parent, int32_t tok, double factor, const NodeState& s) {
    const uint64_t key = (static_cast<uint64_t>(parent) << 32) | static_cast<uint32_t>(tok);
    if (2 * (children.used() + 1) > children.slots.size()) children.grow();
    const size_t i = children.find(key);
    const int32_t id = static_cast<int32_t>(nodes.size());
    nodes.push_back(Node{tok, parent, -1, 0.f, 0, 0, 0, factor, s});
    children.put(i, key, id);
    return id;
  }

  // ctcdecode's get_path_trie bookkeeping for the extension of a node's parent by its token.
  void visit(int32_t n, float lp, int32_t t) {
    Node& x = nodes[n];
    if (x.alive == alive_mark) {
      if (x.best_lp < lp) {
        x.best_lp = lp;
        x.t = t;
      }
    } else {
      x.best_lp = lp;
      x.t = t;
      x.alive = alive_mark;
    }
  }

  template <typename scalar_t>
  void step(const scalar_t* X, int64_t nframes, int64_t V, Scratch& w);

  // The nbest best prefixes: tokens/timesteps rows of length T (-1 padded), lengths and scores
  // (log-probabilities; with scoring, ctcdecode's approximate CTC score: the language-model,
  // word-insertion and hotword terms taken out again).
  void finish(int64_t nbest, int64_t T, int64_t* out_tok, int64_t* out_len, float* out_score,
              int64_t* out_ts) const;
};

template <typename scalar_t>
void Search::step(const scalar_t* X, int64_t nframes, int64_t V, Scratch& w) {
  w.reserve_slots(std::min(o.top_n, V));
  const int64_t beam_width = o.beam_width, blank = o.blank;
  const double max_factor = sc ? sc->max_factor() : 1.0;
  const bool lm_prune = sc && sc->has_lm();
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
  for (int64_t f = 0; f < nframes && !done; ++f, ++frames) {
    const int32_t t = static_cast<int32_t>(frames);
    const int32_t frame = w.next_epoch();
    const int32_t bframe = static_cast<int32_t>(frames + 1);  // beam stamp (per sample)
    float blank_lp;
    top_candidates(X + f * V, V, std::min(o.top_n, V), o.input, blank, w.cands, &blank_lp, w.topk_vals,
                   w.topk_idx);
    int64_t nc = static_cast<int64_t>(w.cands.size());
    // candidate probabilities, computed at first use (-1: not yet): the loops below stop after a
    // few candidates, so most frames need few of the top_n exponentials
    w.cand_p.assign(nc, -1.0);
    auto cand_p = [&](int64_t j) {
      double& p = w.cand_p[j];
      if (p < 0.0) p = std::exp(static_cast<double>(w.cands[j].lp));
      return p;
    };
    if (o.cutoff_prob < 1.0) {
      double mass = 0.0;
      int64_t keep = 0;
      while (keep < nc && mass < o.cutoff_prob) mass += cand_p(keep++);
      nc = std::max<int64_t>(keep, 1);
    }
    double p_blank = 0.0;
    for (int64_t j = 0; j < nc; ++j) {
      const int32_t tok = w.cands[j].tok;
      w.put(tok, static_cast<int32_t>(j), frame);
      if (tok == blank) p_blank = cand_p(j);
    }
    auto cand_of = [&](int32_t tok) { return w.find(tok, frame); };
    const int64_t nb = static_cast<int64_t>(beam.size());
    for (int64_t i = 0; i < nb; ++i) {
      nodes[beam[i].node].bstamp = bframe;
      nodes[beam[i].node].bpos = static_cast<int32_t>(i);
    }
    auto in_beam = [&](int32_t node) { return nodes[node].bstamp == bframe ? nodes[node].bpos : -1; };
    // ctcdecode's pruning with a language model: once the beam is full, the extension of
    // prefix i by token c is not taken when p_c * total_i < worst * p_blank / e^max(0, beta).
    double cut = -1.0;
    if (lm_prune && nb == beam_width) {
      double worst = beam[0].total();
      for (const Entry& e : beam) worst = std::min(worst, e.total());
      cut = worst * std::exp(static_cast<double>(blank_lp) - std::max(0.0, sc->beta()));
    }
    auto taken = [&](double tot, double p) { return !(tot * p < cut); };
    // (1) stays: pb' = (pb + pnb) p_blank, pnb' = pnb p_last
    w.next.resize(nb);
    for (int64_t i = 0; i < nb; ++i) {
      const Entry& e = beam[i];
      const int32_t last = nodes[e.node].tok;
      double stay_nb = 0.0;
      if (last >= 0 && last != blank) {
        const int32_t j = cand_of(last);
        if (j >= 0 && taken(e.total(), cand_p(j))) stay_nb = e.pnb * cand_p(j);
      }
      w.next[i] = Entry{e.node, e.total() * p_blank, stay_nb};
    }
    // (2) merges: prefix k = parent i + tok_k, both in the beam (and the timestep visit)
    for (int64_t k = 0; k < nb; ++k) {
      const Node& nk = nodes[beam[k].node];
      if (nk.parent < 0) continue;
      const int32_t i = in_beam(nk.parent);
      const int32_t j = cand_of(nk.tok);
      if (i < 0 || j < 0) continue;
      const Entry& ei = beam[i];
      if (!taken(ei.total(), cand_p(j))) continue;
      visit(beam[k].node, w.cands[j].lp, t);
      const int32_t last_i = nodes[ei.node].tok;
      w.next[k].pnb += (nk.tok == last_i ? ei.pb : ei.total()) * cand_p(j) * nk.factor;
    }
    // (3) alive nodes outside the beam whose parent is in it: the extension is visited
    // whether or not it survives (its score is handled in (4))
    for (const int32_t g : ghosts) {
      const Node& ng = nodes[g];
      if (ng.parent < 0) continue;
      const int32_t i = in_beam(ng.parent);
      const int32_t j = cand_of(ng.tok);
      if (i >= 0 && j >= 0 && taken(beam[i].total(), cand_p(j))) visit(g, w.cands[j].lp, t);
    }
    w.heap.clear();
    for (int64_t k = 0; k < nb; ++k) heap_push(w.next[k].total());
    // (4) new extensions (i, c) whose child is not in the beam: their score has one source and is
    // final, so one below the beam_width-th best final score so far cannot survive and is not
    // built; parents by decreasing probability, candidates sorted, so the loops stop early
    w.order.resize(nb);
    for (int64_t i = 0; i < nb; ++i) w.order[i] = static_cast<int32_t>(i);
    std::sort(w.order.begin(), w.order.end(), [&](int32_t a, int32_t b) {
      return beam[a].total() > beam[b].total() || (beam[a].total() == beam[b].total() && a < b);
    });
    for (const int32_t i : w.order) {
      const Entry ei = beam[i];
      const double tot = ei.total();
      if (tot * cand_p(0) * max_factor < threshold()) break;
      const int32_t last = nodes[ei.node].tok;
      for (int64_t j = 0; j < nc; ++j) {
        const int32_t c = w.cands[j].tok;
        if (c == blank) continue;
        const double pj = cand_p(j);
        if (tot * pj * max_factor < threshold()) break;
        if (!taken(tot, pj)) break;
        const double base = (c == last ? ei.pb : tot) * pj;
        if (base == 0.0) continue;
        int32_t ch = lookup(ei.node, c);
        double factor;
        NodeState s;
        if (ch >= 0) {
          if (in_beam(ch) >= 0) continue;  // merged in (2)
          factor = nodes[ch].factor;
        } else if (sc) {
          if (!sc->extend(nodes[ei.node].s, c, ctx_pool, &factor, &s)) continue;  // outside the lexicon
        } else {
          factor = 1.0;
        }
        const double score = base * factor;
        if (score < threshold() || score == 0.0) continue;
        if (ch < 0) ch = insert(ei.node, c, factor, s);
        visit(ch, w.cands[j].lp, t);
        w.next.push_back(Entry{ch, 0.0, score});
        heap_push(score);
      }
    }
    // (5) keep the beam_width most probable prefixes (ties: lower node id, i.e. older prefix)
    auto better = [](const Entry& a, const Entry& b) {
      return a.total() > b.total() || (a.total() == b.total() && a.node < b.node);
    };
    if (static_cast<int64_t>(w.next.size()) > beam_width) {
      // the heap holds the beam_width best totals: what is below its least cannot stay
      const double least = w.heap.front();
      size_t m = 0;
      for (const Entry& e : w.next)
        if (e.total() >= least) w.next[m++] = e;
      w.next.resize(m);
      if (static_cast<int64_t>(m) > beam_width) {  // ties at the least
        std::nth_element(w.next.begin(), w.next.begin() + beam_width, w.next.end(), better);
        w.next.resize(beam_width);
      }
    }
    double mx = 0.0;
    for (const Entry& e : w.next) mx = std::max(mx, e.total());
    beam.clear();
    for (const Entry& e : w.next)
      if (e.total() > 0.0) beam.push_back(e);
    if (!(mx > 0.0)) {  // nothing survives (e.g. all-zero probabilities)
      beam.clear();
      done = true;
      ++frames;
      break;
    }
    for (Entry& e : beam) {
      e.pb /= mx;
      e.pnb /= mx;
    }
    log_scale += std::log(mx);
    // alive = the beam and its ancestors; the rest of the trie is dead (ctcdecode deletes it)
    ++alive_mark;
    ghosts.clear();
    for (const Entry& e : beam) nodes[e.node].alive = alive_mark;
    for (const Entry& e : beam)
      for (int32_t v = nodes[e.node].parent; v >= 0 && nodes[v].alive != alive_mark; v = nodes[v].parent) {
        nodes[v].alive = alive_mark;
        ghosts.push_back(v);
      }
    // (the root is alive whenever anything is; it has no parent to be extended from)
  }
}

// Per-thread search state and buffers, reused across calls (their capacity is kept).
__attribute__((noinline)) inline Search& thread_search() {
  static thread_local Search search;
  return search;
}
__attribute__((noinline)) inline Scratch& thread_scratch() {
  static thread_local Scratch scratch;
  return scratch;
}

inline void Search::finish(int64_t nbest, int64_t T, int64_t* out_tok, int64_t* out_len, float* out_score,
                           int64_t* out_ts) const {
  // Final scores: the trie's, plus (with a word-based language model) the score of the last,
  // unfinished word; ranked by the trie's score, as ctcdecode returns them.
  std::vector<Entry> fin(beam);
  std::sort(fin.begin(), fin.end(), [](const Entry& a, const Entry& b) {
    return a.total() > b.total() || (a.total() == b.total() && a.node < b.node);
  });
  std::vector<int32_t> path;
  for (int64_t k = 0; k < nbest; ++k) {
    int64_t* tok = out_tok + k * T;
    int64_t* ts = out_ts + k * T;
    if (k >= static_cast<int64_t>(fin.size())) {
      out_len[k] = 0;
      out_score[k] = -std::numeric_limits<float>::infinity();
      continue;
    }
    const Entry& e = fin[k];
    path.clear();
    for (int32_t v = e.node; v > 0; v = nodes[v].parent) path.push_back(v);
    std::reverse(path.begin(), path.end());
    const int64_t n = static_cast<int64_t>(path.size());
    out_len[k] = n;
    for (int64_t i = 0; i < n && i < T; ++i) {
      tok[i] = nodes[path[i]].tok;
      ts[i] = nodes[path[i]].t;
    }
    double score = std::log(e.total()) + log_scale;
    if (sc) {
      std::vector<int32_t> labels(n);
      for (int64_t i = 0; i < n; ++i) labels[i] = nodes[path[i]].tok;
      score += sc->final_adjustment(nodes[e.node].s, nodes[e.node].tok, labels, ctx_pool);
    }
    out_score[k] = static_cast<float>(score);
  }
}

}  // namespace beam
}  // namespace narvl
