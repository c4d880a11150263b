// Scoring for the CTC prefix beam search (beam_search.h): n-gram language-model fusion with
// ctcdecode's semantics, its lexicon constraint, and pyctcdecode-style hotword boosts.
//
// Language model (ctcdecode, scorer.cpp / ctc_beam_search_decoder.cpp):
// - word-based model (some vocabulary entry other than <s>, </s>, <unk> is longer than one
//   character): the extension of a prefix by the space label is multiplied by
//   exp(alpha * ln P(w | previous words) + beta), w being the word the space ends; prefixes are
//   restricted to the model's vocabulary (a trie of its words over the labels: an extension that
//   leaves it is not taken, a space is taken only after a whole word), and at the end the
//   last, unfinished word is scored the same way (an incomplete word is out of vocabulary).
// - character-based model: every label extension is scored, the "words" being labels.
// - contexts are the previous order - 1 words, padded with <s> at the start of the sentence;
//   any out-of-vocabulary word in the n-gram gives ln P = -1000 (ctcdecode's OOV_SCORE).
// - returned scores are ctcdecode's "approximate CTC" score: the search score plus the last
//   word's term, minus beta per label and alpha times the sentence's log-probability with </s>.
// Hotwords (pyctcdecode): a prefix's boost is weight * (number of completed words that are
// hotword unigrams) + weight * len(partial word) / len(shortest hotword it begins); each node's
// factor is exp(boost(node) - boost(parent)), so a path's factors multiply to exp(boost).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace narvl {
namespace beam {

constexpr double kOOVScore = -1000.0;  // ctcdecode's OOV_SCORE (natural log)

// A language model over word ids (0 = unknown word, as KenLM), natural-log probabilities.
struct LanguageModel {
  virtual ~LanguageModel() = default;
  virtual int order() const = 0;
  virtual int32_t index(const std::string& word) const = 0;  // 0 when unknown
  virtual const std::vector<std::string>& vocabulary() const = 0;  // id -> word
  // ln P(word | ctx[0..n)) with ctx oldest first (n = order - 1, padded with <s>).
  virtual double log_prob(const int32_t* ctx, int n, int32_t word) const = 0;
  // An upper bound of log_prob (for pruning).
  virtual double max_log_prob() const = 0;
};

// ARPA back-off model: P(w | h) = p(h w) if the n-gram exists, else bo(h) + P(w | h minus its
// oldest word); log10 values converted to natural log on load.
class ArpaModel : public LanguageModel {
 public:
  // Parses the text of an ARPA file; throws std::invalid_argument("line N: ...") on bad input.
  explicit ArpaModel(const std::string& text);
  int order() const override { return order_; }
  int32_t index(const std::string& word) const override {
    auto it = index_.find(word);
    return it == index_.end() ? 0 : it->second;
  }
  const std::vector<std::string>& vocabulary() const override { return vocab_; }
  double log_prob(const int32_t* ctx, int n, int32_t word) const override;
  double max_log_prob() const override { return max_lp_; }
  size_t num_ngrams(int n) const { return n >= 1 && n <= order_ ? grams_[n - 1].size() : 0; }

 private:
  struct Gram {
    float lp, bo;
  };
  static std::string key(const int32_t* ids, int n) {
    return std::string(reinterpret_cast<const char*>(ids), sizeof(int32_t) * n);
  }
  const Gram* find(const int32_t* ids, int n) const {
    auto& m = grams_[n - 1];
    auto it = m.find(key(ids, n));
    return it == m.end() ? nullptr : &it->second;
  }
  int order_ = 0;
  std::vector<std::string> vocab_;
  std::unordered_map<std::string, int32_t> index_;
  std::vector<std::unordered_map<std::string, Gram>> grams_;
  double max_lp_ = 0.0;
};

// A trie over label ids (lexicon or hotword spellings).
struct LabelTrie {
  std::vector<std::unordered_map<int32_t, int32_t>> next{1};
  std::vector<int32_t> word{-1};   // word id at a node that ends a word, else -1
  std::vector<int32_t> depth{0};
  std::vector<int32_t> min_len{std::numeric_limits<int32_t>::max()};  // shortest word below
  int32_t step(int32_t node, int32_t label) const {
    if (node < 0) return -1;
    auto it = next[node].find(label);
    return it == next[node].end() ? -1 : it->second;
  }
  void add(const std::vector<int32_t>& labels, int32_t id) {
    int32_t v = 0;
    const int32_t L = static_cast<int32_t>(labels.size());
    min_len[0] = std::min(min_len[0], L);
    for (int32_t c : labels) {
      int32_t u = step(v, c);
      if (u < 0) {
        u = static_cast<int32_t>(next.size());
        next.emplace_back();
        word.push_back(-1);
        depth.push_back(depth[v] + 1);
        min_len.push_back(std::numeric_limits<int32_t>::max());
        next[v][c] = u;
      }
      v = u;
      min_len[v] = std::min(min_len[v], L);
    }
    if (word[v] < 0) word[v] = id;
  }
};

// The per-prefix state: lexicon node, language-model context (offset into a per-sample pool of
// order - 1 word ids), hotword node and accumulated boost.
struct NodeState {
  int32_t lex = 0;
  int32_t ctx = 0;
  int32_t hw = 0;
  int32_t hw_words = 0;  // completed hotword words
  float boost = 0.f;
};

class Scoring {
 public:
  // labels: the decoder's label strings; lm may be null (hotwords only); hotwords: unigrams
  // (weight applies to each).
  Scoring(std::vector<std::string> labels, int64_t blank, std::shared_ptr<const LanguageModel> lm,
          double alpha, double beta, const std::vector<std::string>& hotwords, double hotword_weight);

  bool has_lm() const { return lm_ != nullptr; }
  bool character_based() const { return char_based_; }
  int64_t dict_size() const { return dict_size_; }
  int max_order() const { return lm_ ? lm_->order() : 0; }
  int64_t space_id() const { return space_; }
  double alpha() const { return alpha_; }
  double beta() const { return beta_; }
  void reset_params(double alpha, double beta) {
    alpha_ = alpha;
    beta_ = beta;
  }
  // An upper bound of every extension's factor.
  double max_factor() const;
  void root(NodeState* s, std::vector<int32_t>& pool) const;
  // The extension of a prefix in state `p` by label c (not blank): false when the lexicon
  // forbids it; else the factor on its probability and the child's state.
  bool extend(const NodeState& p, int32_t c, std::vector<int32_t>& pool, double* factor,
              NodeState* child) const;
  // Added to a finished prefix's log-probability for its returned score (see the file comment).
  double final_adjustment(const NodeState& s, int32_t last_label, const std::vector<int32_t>& labels,
                          const std::vector<int32_t>& pool) const;

 private:
  double lm_score(const int32_t* ctx, int32_t word) const;  // alpha-free ln P, OOV -> -1000
  int32_t push_ctx(int32_t ctx, int32_t word, std::vector<int32_t>& pool) const;
  double hotword_boost(int32_t hw, int32_t words) const;

  std::vector<std::string> labels_;
  int64_t blank_;
  int64_t space_ = -1;
  std::shared_ptr<const LanguageModel> lm_;
  double alpha_ = 0.0, beta_ = 0.0;
  bool char_based_ = true;
  int64_t dict_size_ = 0;
  int32_t bos_ = 0, eos_ = 0;
  LabelTrie lex_;                       // word-based: the model's words, spelled in labels
  std::vector<int32_t> label_word_;     // character-based: label -> model word id
  LabelTrie hot_;                       // hotword unigrams spelled in labels
  bool has_hot_ = false;
  double hot_weight_ = 0.0;
};

}  // namespace beam
}  // namespace narvl
