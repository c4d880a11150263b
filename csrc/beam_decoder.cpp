// narvl._C.BeamDecoder: the CPU prefix beam search (beam_search.h) with language models,
// hotwords and streaming states, for narvl.CTCBeamDecoder / OnlineCTCBeamDecoder.
//
//   ArpaModel(text)                     an ARPA n-gram model (the file's text)
//   BeamDecoder(labels, blank, beam_width, cutoff_top_n, cutoff_prob, input_kind, lm, alpha,
//               beta, hotwords, hotword_weight)
//     lm: None, an ArpaModel, or any Python object with `order` (int), `vocabulary` (list of
//         words, index 0 the unknown word) and `log_prob(context: tuple, word: str) -> float`
//         (natural log; called with the GIL held, so such a model runs on one thread).
//     .decode(scores (B, T, V), lengths (B,), nbest, num_threads) -> 4 tensors
//     .new_state() -> BeamState
//     .decode_chunk(scores, lengths, states, is_eos, nbest, num_threads) -> 4 tensors
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <memory>
#include <stdexcept>
#include <unordered_map>

#include "beam_search.h"
#include "beam_scoring.h"

namespace py = pybind11;

namespace narvl {
namespace {

using torch::Tensor;

// A language model implemented in Python; results are cached per (context, word).
class PyLanguageModel : public beam::LanguageModel {
 public:
  explicit PyLanguageModel(py::object obj) : obj_(std::move(obj)) {
    order_ = obj_.attr("order").cast<int>();
    if (order_ < 1) throw std::invalid_argument("language model: order must be >= 1");
    for (py::handle w : obj_.attr("vocabulary")) vocab_.push_back(w.cast<std::string>());
    if (vocab_.empty()) throw std::invalid_argument("language model: empty vocabulary");
    for (size_t i = 0; i < vocab_.size(); ++i) index_.emplace(vocab_[i], static_cast<int32_t>(i));
    max_lp_ = obj_.attr("max_log_prob").cast<double>();
  }
  int order() const override { return order_; }
  int32_t index(const std::string& w) const override {
    auto it = index_.find(w);
    return it == index_.end() ? 0 : it->second;
  }
  const std::vector<std::string>& vocabulary() const override { return vocab_; }
  double max_log_prob() const override { return max_lp_; }
  double log_prob(const int32_t* ctx, int n, int32_t word) const override {
    std::string key(reinterpret_cast<const char*>(ctx), sizeof(int32_t) * n);
    key.append(reinterpret_cast<const char*>(&word), sizeof(int32_t));
    auto it = cache_.find(key);
    if (it != cache_.end()) return it->second;
    py::gil_scoped_acquire gil;
    py::tuple c(n);
    for (int i = 0; i < n; ++i) c[i] = py::str(vocab_[ctx[i]]);
    const double v = obj_.attr("log_prob")(c, py::str(vocab_[word])).cast<double>();
    cache_.emplace(std::move(key), v);
    return v;
  }

 private:
  py::object obj_;
  int order_ = 1;
  std::vector<std::string> vocab_;
  std::unordered_map<std::string, int32_t> index_;
  double max_lp_ = 0.0;
  mutable std::unordered_map<std::string, double> cache_;
};

class BeamDecoder;

struct BeamState {
  const BeamDecoder* owner;
  beam::Search search;
};

class BeamDecoder {
 public:
  BeamDecoder(std::vector<std::string> labels, int64_t blank, int64_t beam_width, int64_t top_n,
              double cutoff_prob, int64_t input_kind, py::object lm, double alpha, double beta,
              std::vector<std::string> hotwords, double hotword_weight)
      : V_(static_cast<int64_t>(labels.size())) {
    opt_.beam_width = beam_width;
    opt_.blank = blank;
    opt_.top_n = std::min(top_n, V_);
    opt_.cutoff_prob = cutoff_prob;
    opt_.input = input_kind;
    std::shared_ptr<const beam::LanguageModel> model;
    if (!lm.is_none()) {
      if (py::isinstance<beam::ArpaModel>(lm)) {
        model = lm.cast<std::shared_ptr<beam::ArpaModel>>();
      } else {
        model = std::make_shared<PyLanguageModel>(lm);
        python_lm_ = true;
      }
    }
    if (model || !hotwords.empty())
      scoring_ = std::make_unique<beam::Scoring>(std::move(labels), blank, model, alpha, beta, hotwords,
                                                 hotword_weight);
  }

  std::shared_ptr<BeamState> new_state() const {
    auto s = std::make_shared<BeamState>();
    s->owner = this;
    s->search.begin(opt_, scoring_.get());
    return s;
  }

  std::tuple<Tensor, Tensor, Tensor, Tensor> decode(const Tensor& scores, const Tensor& lengths, int64_t nbest,
                                                    int64_t num_threads) {
    const int64_t B = scores.size(0);
    std::vector<std::shared_ptr<BeamState>> states;
    for (int64_t b = 0; b < B; ++b) states.push_back(new_state());
    return run(scores, lengths, states, std::vector<bool>(B, true), nbest, num_threads);
  }

  std::tuple<Tensor, Tensor, Tensor, Tensor> run(const Tensor& scores_in, const Tensor& lengths_in,
                                                 const std::vector<std::shared_ptr<BeamState>>& states,
                                                 const std::vector<bool>& is_eos, int64_t nbest,
                                                 int64_t num_threads) {
    TORCH_CHECK(scores_in.dim() == 3 && scores_in.size(2) == V_, "narvl: scores must be (B, T, ", V_, ")");
    TORCH_CHECK(scores_in.device().is_cpu(), "narvl: BeamDecoder runs on CPU tensors");
    const Tensor scores = scores_in.contiguous();
    const int64_t B = scores.size(0), T = scores.size(1);
    TORCH_CHECK(static_cast<int64_t>(states.size()) == B && static_cast<int64_t>(is_eos.size()) == B,
                "narvl: one state and one is_eos per sample");
    const Tensor lengths = lengths_in.to(torch::kLong).contiguous();
    TORCH_CHECK(lengths.numel() == B, "narvl: lengths must be (B,)");
    const int64_t* len = lengths.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(states[b] && states[b]->owner == this, "narvl: state ", b, " belongs to another decoder");
      TORCH_CHECK(len[b] >= 0 && len[b] <= T, "narvl: lengths[", b, "] outside [0, ", T, "]");
    }
    const int64_t grain = python_lm_ ? B : (num_threads > 0 ? (B + num_threads - 1) / num_threads : 1);
    auto step_all = [&] {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "beam_decoder", [&] {
        const scalar_t* X = scores.data_ptr<scalar_t>();
        at::parallel_for(0, B, std::max<int64_t>(grain, 1), [&](int64_t b0, int64_t b1) {
          beam::Scratch& scratch = beam::thread_scratch();
          for (int64_t b = b0; b < b1; ++b) states[b]->search.step(X + b * T * scores.size(2), len[b], V_, scratch);
        });
      });
    };
    if (python_lm_) {
      step_all();  // the model's callbacks take the GIL, which this thread holds
    } else {
      py::gil_scoped_release nogil;
      step_all();
    }
    int64_t Tout = T;
    for (int64_t b = 0; b < B; ++b) Tout = std::max<int64_t>(Tout, states[b]->search.frames);
    const auto lopt = torch::TensorOptions().dtype(torch::kLong);
    Tensor tokens = torch::full({B, nbest, Tout}, -1, lopt);
    Tensor steps = torch::full({B, nbest, Tout}, -1, lopt);
    Tensor out_lens = torch::zeros({B, nbest}, lopt);
    Tensor out_scores = torch::full({B, nbest}, -std::numeric_limits<float>::infinity(),
                                    torch::TensorOptions().dtype(torch::kFloat));
    for (int64_t b = 0; b < B; ++b) {
      (void)is_eos[b];  // finished or not, the best hypotheses so far are returned
      states[b]->search.finish(nbest, Tout, tokens.data_ptr<int64_t>() + b * nbest * Tout,
                               out_lens.data_ptr<int64_t>() + b * nbest,
                               out_scores.data_ptr<float>() + b * nbest,
                               steps.data_ptr<int64_t>() + b * nbest * Tout);
    }
    return {tokens, out_lens, out_scores, steps};
  }

  bool character_based() const { return scoring_ && scoring_->has_lm() ? scoring_->character_based() : false; }
  int max_order() const { return scoring_ ? scoring_->max_order() : 0; }
  int64_t dict_size() const { return scoring_ ? scoring_->dict_size() : 0; }
  void reset_params(double alpha, double beta) {
    if (scoring_) scoring_->reset_params(alpha, beta);
  }

 private:
  int64_t V_;
  beam::Options opt_;
  std::unique_ptr<beam::Scoring> scoring_;
  bool python_lm_ = false;
};

}  // namespace

void register_beam_decoder(py::module_& m) {
  py::class_<beam::LanguageModel, std::shared_ptr<beam::LanguageModel>>(m, "_LanguageModelBase");
  py::class_<beam::ArpaModel, beam::LanguageModel, std::shared_ptr<beam::ArpaModel>>(m, "ArpaModel")
      .def(py::init([](const std::string& text) {
             try {
               return std::make_shared<beam::ArpaModel>(text);
             } catch (const std::invalid_argument& e) {
               throw py::value_error(e.what());
             }
           }),
           py::arg("text"))
      .def_property_readonly("order", &beam::ArpaModel::order)
      .def_property_readonly("vocabulary", &beam::ArpaModel::vocabulary)
      .def_property_readonly("max_log_prob", &beam::ArpaModel::max_log_prob)
      .def("num_ngrams", &beam::ArpaModel::num_ngrams)
      .def("log_prob", [](const beam::ArpaModel& lm, const std::vector<std::string>& ctx, const std::string& w) {
        std::vector<int32_t> ids;
        for (const auto& c : ctx) ids.push_back(lm.index(c));
        return lm.log_prob(ids.data(), static_cast<int>(ids.size()), lm.index(w));
      });
  py::class_<BeamState, std::shared_ptr<BeamState>>(m, "BeamState")
      .def_property_readonly("frames", [](const BeamState& s) { return s.search.frames; });
  py::class_<BeamDecoder>(m, "BeamDecoder")
      .def(py::init([](std::vector<std::string> labels, int64_t blank, int64_t beam_width, int64_t top_n,
                       double cutoff_prob, int64_t input_kind, py::object lm, double alpha, double beta,
                       std::vector<std::string> hotwords, double hotword_weight) {
             try {
               return std::make_unique<BeamDecoder>(std::move(labels), blank, beam_width, top_n, cutoff_prob,
                                                    input_kind, lm, alpha, beta, std::move(hotwords),
                                                    hotword_weight);
             } catch (const std::invalid_argument& e) {
               throw py::value_error(e.what());
             }
           }))
      .def("new_state", &BeamDecoder::new_state)
      .def("decode", &BeamDecoder::decode)
      .def("decode_chunk", &BeamDecoder::run)
      .def("character_based", &BeamDecoder::character_based)
      .def("max_order", &BeamDecoder::max_order)
      .def("dict_size", &BeamDecoder::dict_size)
      .def("reset_params", &BeamDecoder::reset_params);
}

}  // namespace narvl
