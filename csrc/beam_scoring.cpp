#include "beam_scoring.h"

#include <algorithm>
#include <limits>
#include <sstream>
#include <stdexcept>

namespace narvl {
namespace beam {

namespace {

constexpr double kLn10 = 2.302585092994045684;

size_t utf8_len(const std::string& s) {
  size_t n = 0;
  for (unsigned char c : s) n += (c & 0xc0) != 0x80;
  return n;
}

std::vector<std::string> utf8_chars(const std::string& s) {
  std::vector<std::string> out;
  for (size_t i = 0; i < s.size();) {
    size_t j = i + 1;
    while (j < s.size() && (static_cast<unsigned char>(s[j]) & 0xc0) == 0x80) ++j;
    out.push_back(s.substr(i, j - i));
    i = j;
  }
  return out;
}

std::vector<std::string> split_ws(const std::string& line) {
  std::vector<std::string> out;
  std::string cur;
  for (char ch : line) {
    if (ch == ' ' || ch == '\t' || ch == '\r') {
      if (!cur.empty()) out.push_back(cur), cur.clear();
    } else {
      cur.push_back(ch);
    }
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

[[noreturn]] void bad(size_t line, const std::string& what) {
  std::ostringstream os;
  os << "line " << line << ": " << what;
  throw std::invalid_argument(os.str());
}

double parse_num(const std::string& s, size_t line) {
  try {
    size_t used = 0;
    const double v = std::stod(s, &used);
    if (used != s.size()) bad(line, "not a number: '" + s + "'");
    return v;
  } catch (const std::invalid_argument&) {
    bad(line, "not a number: '" + s + "'");
  } catch (const std::out_of_range&) {
    bad(line, "number out of range: '" + s + "'");
  }
}

}  // namespace

// ------------------------------------------------------------------------------------- ARPA

ArpaModel::ArpaModel(const std::string& text) {
  std::vector<size_t> counts;
  size_t lineno = 0, pos = 0;
  int section = -1;  // -1: before \data\, 0: \data\, n: \n-grams:, -2: after \end\.
  std::vector<size_t> seen;
  vocab_.push_back("<unk>");
  index_["<unk>"] = 0;
  bool have_unk_line = false;
  while (pos <= text.size()) {
    size_t nl = text.find('\n', pos);
    if (nl == std::string::npos) nl = text.size();
    std::string line = text.substr(pos, nl - pos);
    pos = nl + 1;
    ++lineno;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    const auto f = split_ws(line);
    if (f.empty()) {
      if (nl == text.size()) break;
      continue;
    }
    if (section == -2) break;
    if (f[0] == "\\data\\") {
      if (section != -1) bad(lineno, "repeated \\data\\ section");
      section = 0;
      continue;
    }
    if (section == -1) continue;  // text before \data\ is ignored (as KenLM does)
    if (f[0] == "\\end\\") {
      section = -2;
      continue;
    }
    if (f.size() == 1 && f[0].size() >= 8 && f[0][0] == '\\' && f[0].find("-grams:") != std::string::npos) {
      const int n = std::atoi(f[0].c_str() + 1);
      if (n < 1 || n > static_cast<int>(counts.size()))
        bad(lineno, "section " + f[0] + " not announced in \\data\\");
      if (n != section + 1) bad(lineno, "n-gram sections out of order");
      section = n;
      continue;
    }
    if (section == 0) {
      // ngram N=count
      if (f.size() < 2 || f[0] != "ngram") bad(lineno, "expected 'ngram N=count' in \\data\\");
      std::string spec;
      for (size_t i = 1; i < f.size(); ++i) spec += f[i];
      const size_t eq = spec.find('=');
      if (eq == std::string::npos) bad(lineno, "expected 'ngram N=count'");
      const int n = static_cast<int>(parse_num(spec.substr(0, eq), lineno));
      const double c = parse_num(spec.substr(eq + 1), lineno);
      if (n != static_cast<int>(counts.size()) + 1 || c < 0) bad(lineno, "bad n-gram count line");
      counts.push_back(static_cast<size_t>(c));
      continue;
    }
    // an n-gram line: log10 prob, n words, optional log10 back-off
    const int n = section;
    if (static_cast<int>(f.size()) != n + 1 && static_cast<int>(f.size()) != n + 2)
      bad(lineno, "expected a probability, " + std::to_string(n) + " word(s) and an optional back-off");
    if (grams_.size() < static_cast<size_t>(n)) grams_.resize(n), seen.resize(n, 0);
    const double lp = parse_num(f[0], lineno) * kLn10;
    const double bo = static_cast<int>(f.size()) == n + 2 ? parse_num(f[n + 1], lineno) * kLn10 : 0.0;
    int32_t ids[64];
    if (n > 64) bad(lineno, "order above 64");
    for (int i = 0; i < n; ++i) {
      const std::string& w = f[1 + i];
      auto it = index_.find(w);
      if (it == index_.end()) {
        if (n > 1) bad(lineno, "word '" + w + "' has no unigram");
        const int32_t id = static_cast<int32_t>(vocab_.size());
        vocab_.push_back(w);
        it = index_.emplace(w, id).first;
      } else if (n == 1 && w == "<unk>") {
        if (have_unk_line) bad(lineno, "duplicate unigram '<unk>'");
        have_unk_line = true;
      } else if (n == 1) {
        bad(lineno, "duplicate unigram '" + w + "'");
      }
      ids[i] = it->second;
    }
    grams_[n - 1][key(ids, n)] = Gram{static_cast<float>(lp), static_cast<float>(bo)};
    ++seen[n - 1];
  }
  if (section == -1) throw std::invalid_argument("line 1: no \\data\\ section (not an ARPA file)");
  if (counts.empty()) bad(lineno, "\\data\\ announces no n-grams");
  if (section != -2) bad(lineno, "missing \\end\\");
  order_ = static_cast<int>(counts.size());
  grams_.resize(order_);
  seen.resize(order_, 0);
  for (int n = 0; n < order_; ++n)
    if (seen[n] != counts[n])
      bad(lineno, std::to_string(n + 1) + "-grams: \\data\\ announces " + std::to_string(counts[n]) +
                      ", the file has " + std::to_string(seen[n]));
  if (!have_unk_line) {  // KenLM's default for a model without <unk>
    const int32_t u = 0;
    grams_[0][key(&u, 1)] = Gram{static_cast<float>(-100.0 * kLn10), 0.f};
  }
  // upper bound of log_prob: the largest probability plus every positive back-off on the way
  double mx = -std::numeric_limits<double>::infinity(), bo_pos = 0.0;
  for (int n = 0; n < order_; ++n) {
    double bmax = 0.0;
    for (const auto& kv : grams_[n]) {
      mx = std::max(mx, static_cast<double>(kv.second.lp));
      bmax = std::max(bmax, static_cast<double>(kv.second.bo));
    }
    bo_pos += bmax;
  }
  max_lp_ = std::max(mx, kOOVScore) + bo_pos;
}

double ArpaModel::log_prob(const int32_t* ctx, int n, int32_t word) const {
  n = std::min(n, order_ - 1);
  const int32_t* h = ctx;
  int32_t ids[64];
  double bo = 0.0;
  for (int k = n; k >= 0; --k) {  // the last k context words
    const int32_t* hk = h + (n - k);
    for (int i = 0; i < k; ++i) ids[i] = hk[i];
    ids[k] = word;
    if (const Gram* g = find(ids, k + 1)) return bo + g->lp;
    if (k > 0)
      if (const Gram* c = find(hk, k)) bo += c->bo;
  }
  return bo + find(&ids[0], 1)->lp;  // not reached: every word has a unigram (<unk> too)
}

// ------------------------------------------------------------------------------------ Scoring

Scoring::Scoring(std::vector<std::string> labels, int64_t blank, std::shared_ptr<const LanguageModel> lm,
                 double alpha, double beta, const std::vector<std::string>& hotwords, double hotword_weight)
    : labels_(std::move(labels)), blank_(blank), lm_(std::move(lm)), alpha_(alpha), beta_(beta) {
  for (size_t i = 0; i < labels_.size(); ++i)
    if (labels_[i] == " ") {
      space_ = static_cast<int64_t>(i);
      break;
    }
  std::unordered_map<std::string, int32_t> label_index;
  for (size_t i = 0; i < labels_.size(); ++i)
    if (static_cast<int64_t>(i) != blank_) label_index.emplace(labels_[i], static_cast<int32_t>(i));
  if (lm_) {
    const auto& vocab = lm_->vocabulary();
    for (const std::string& w : vocab)
      if (w != "<unk>" && w != "<s>" && w != "</s>" && utf8_len(w) > 1) char_based_ = false;
    bos_ = lm_->index("<s>");
    eos_ = lm_->index("</s>");
    if (char_based_) {
      label_word_.resize(labels_.size());
      for (size_t i = 0; i < labels_.size(); ++i) label_word_[i] = lm_->index(labels_[i]);
    } else {
      if (space_ < 0)
        throw std::invalid_argument(
            "a word-based language model needs a space label (\" \") in labels: words are the "
            "label runs between spaces");
      // the lexicon: each model word spelled with one label per character (ctcdecode's FST)
      for (size_t id = 0; id < vocab.size(); ++id) {
        const std::string& w = vocab[id];
        std::vector<int32_t> spelled;
        bool ok = !w.empty();
        for (const std::string& ch : utf8_chars(w)) {
          auto it = label_index.find(ch);
          if (it == label_index.end() || it->second == space_) {
            ok = false;
            break;
          }
          spelled.push_back(it->second);
        }
        if (!ok) continue;
        lex_.add(spelled, static_cast<int32_t>(id));
        ++dict_size_;
      }
    }
  }
  // hotwords: unigrams spelled with the longest matching label at each position
  size_t max_label = 1;
  for (const auto& kv : label_index) max_label = std::max(max_label, kv.first.size());
  int32_t hid = 0;
  for (const std::string& hwd : hotwords) {
    std::vector<int32_t> spelled;
    size_t i = 0;
    while (i < hwd.size()) {
      size_t take = 0;
      int32_t lab = -1;
      for (size_t L = std::min(max_label, hwd.size() - i); L >= 1; --L) {
        auto it = label_index.find(hwd.substr(i, L));
        if (it != label_index.end() && it->second != space_) {
          take = L;
          lab = it->second;
          break;
        }
      }
      if (lab < 0) throw std::invalid_argument("hotword '" + hwd + "' cannot be spelled with the labels");
      spelled.push_back(lab);
      i += take;
    }
    if (spelled.empty()) continue;
    hot_.add(spelled, hid++);
    has_hot_ = true;
  }
  hot_weight_ = hotword_weight;
}

double Scoring::max_factor() const {
  double lf = 0.0;
  if (lm_) {
    const double lp_max = lm_->max_log_prob();
    lf += std::max(alpha_ * lp_max, alpha_ * kOOVScore) + beta_;
    lf = std::max(lf, 0.0);  // extensions that complete no word have factor 1
  }
  if (has_hot_) lf += std::abs(hot_weight_);
  return std::exp(lf);
}

void Scoring::root(NodeState* s, std::vector<int32_t>& pool) const {
  *s = NodeState{};
  s->ctx = 0;
  if (lm_) {
    pool.clear();
    for (int i = 0; i + 1 < lm_->order(); ++i) pool.push_back(bos_);
  }
  s->hw = has_hot_ ? 0 : -1;
}

int32_t Scoring::push_ctx(int32_t ctx, int32_t word, std::vector<int32_t>& pool) const {
  const int n = lm_->order() - 1;
  if (n <= 0) return 0;
  const int32_t off = static_cast<int32_t>(pool.size());
  pool.resize(pool.size() + n);
  for (int i = 0; i + 1 < n; ++i) pool[off + i] = pool[ctx + i + 1];
  pool[off + n - 1] = word;
  return off;
}

double Scoring::lm_score(const int32_t* ctx, int32_t word) const {
  const int n = lm_->order() - 1;
  if (word == 0) return kOOVScore;
  for (int i = 0; i < n; ++i)
    if (ctx[i] == 0) return kOOVScore;
  return lm_->log_prob(ctx, n, word);
}

double Scoring::hotword_boost(int32_t hw, int32_t words) const {
  if (!has_hot_) return 0.0;
  double b = hot_weight_ * words;
  if (hw > 0) b += hot_weight_ * hot_.depth[hw] / static_cast<double>(hot_.min_len[hw]);
  return b;
}

bool Scoring::extend(const NodeState& p, int32_t c, std::vector<int32_t>& pool, double* factor,
                     NodeState* child) const {
  *child = p;
  double lf = 0.0;
  if (lm_) {
    if (char_based_) {
      const int32_t w = label_word_[c];
      lf += alpha_ * lm_score(pool.data() + p.ctx, w) + beta_;
      child->ctx = push_ctx(p.ctx, w, pool);
    } else if (c == space_) {
      if (p.lex < 0 || lex_.word[p.lex] < 0) return false;  // a space ends a whole word only
      const int32_t w = lex_.word[p.lex];
      lf += alpha_ * lm_score(pool.data() + p.ctx, w) + beta_;
      child->ctx = push_ctx(p.ctx, w, pool);
      child->lex = 0;
    } else {
      child->lex = lex_.step(p.lex, c);
      if (child->lex < 0) return false;
    }
  }
  if (has_hot_) {
    if (c == space_) {
      child->hw_words = p.hw_words + (p.hw > 0 && hot_.word[p.hw] >= 0 ? 1 : 0);
      child->hw = 0;
    } else {
      child->hw = hot_.step(p.hw, c);
    }
    const double b = hotword_boost(child->hw, child->hw_words);
    lf += b - p.boost;
    child->boost = static_cast<float>(b);
  }
  *factor = std::exp(lf);
  return true;
}

double Scoring::final_adjustment(const NodeState& s, int32_t last_label, const std::vector<int32_t>& labels,
                                 const std::vector<int32_t>& pool) const {
  double adj = -static_cast<double>(s.boost);
  if (!lm_) return adj;
  const int n = lm_->order() - 1;
  // the last word (word-based models; a prefix that ends in a space has none)
  if (!char_based_ && !labels.empty() && last_label != space_) {
    const int32_t w = s.lex >= 0 ? lex_.word[s.lex] : -1;
    adj += alpha_ * lm_score(pool.data() + s.ctx, w < 0 ? 0 : w) + beta_;
  }
  // ctcdecode's approximate CTC score: minus beta per label, minus alpha times the sentence's
  // log-probability (<s> padding, the words, </s>)
  adj -= beta_ * static_cast<double>(labels.size());
  std::string text;
  for (int32_t l : labels) text += labels_[l];
  std::vector<int32_t> sent;
  std::vector<std::string> words;
  if (char_based_) {
    words = utf8_chars(text);
  } else {
    std::string cur;
    for (char ch : text) {
      if (ch == ' ') {
        if (!cur.empty()) words.push_back(cur), cur.clear();
      } else {
        cur.push_back(ch);
      }
    }
    if (!cur.empty()) words.push_back(cur);
  }
  const int order = lm_->order();
  for (int i = 0; i < (words.empty() ? order : order - 1); ++i) sent.push_back(bos_);
  for (const std::string& w : words) sent.push_back(lm_->index(w));
  sent.push_back(eos_);
  double lp = 0.0;
  for (size_t i = 0; i + order <= sent.size(); ++i) lp += lm_score(sent.data() + i, sent[i + n]);
  adj -= alpha_ * lp;
  return adj;
}

}  // namespace beam
}  // namespace narvl
