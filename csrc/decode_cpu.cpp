// CPU CTC decoding: greedy and prefix beam search over (B, T, V) scores.
//
// The prefix beam search itself is csrc/beam_search.h (shared with the streaming and
// language-model decoder of beam_decoder.cpp). Samples run in parallel; results are
// deterministic for any thread count.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

#include "beam_search.h"
#include "vec_math.h"

namespace narvl {
namespace {

using torch::Tensor;

// ------------------------------------------------------------------------------------- greedy

template <typename scalar_t>
int64_t row_argmax(const scalar_t* x, int64_t V) {
  bool nan = false;
  const int64_t a = row_argmax_f32(beam::float_row(x, V), V, &nan);
  if (nan) throw NanScoresError();  // narvl.checks.NaNScoresError in Python
  return a;
}

std::tuple<Tensor, Tensor> greedy_cpu(const Tensor& scores_in, const Tensor& lengths_in, int64_t blank,
                                      bool merge_repeats) {
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
          if (c != blank && (c != prev || !merge_repeats)) tk[b * T + n++] = c;
          prev = c;
        }
        ol[b] = n;
      }
    });
  });
  return {tokens, out_lens};
}

// -------------------------------------------------------------------------------- beam search

std::tuple<Tensor, Tensor, Tensor, Tensor> beam_cpu(const Tensor& scores_in, const Tensor& lengths_in,
                                                    int64_t beam_width, int64_t blank, int64_t top_n,
                                                    double cutoff_prob, int64_t nbest, int64_t input_kind,
                                                    int64_t num_threads) {
  TORCH_CHECK(scores_in.dim() == 3, "narvl: scores must be (B, T, V)");
  const Tensor scores = scores_in.contiguous();
  const int64_t B = scores.size(0), T = scores.size(1), V = scores.size(2);
  TORCH_CHECK(V > 0 && blank >= 0 && blank < V, "narvl: blank out of range");
  TORCH_CHECK(beam_width >= 1 && nbest >= 1 && top_n >= 1, "narvl: beam_width, nbest, cutoff_top_n >= 1");
  TORCH_CHECK(input_kind >= 0 && input_kind <= 2, "narvl: input_kind must be 0 (probs), 1 (log-probs) or 2 (logits)");
  const Tensor lengths = lengths_in.to(torch::kLong).contiguous();
  TORCH_CHECK(lengths.numel() == B, "narvl: lengths must be (B,)");
  const auto lopt = scores.options().dtype(torch::kLong);
  Tensor tokens = torch::full({B, nbest, T}, -1, lopt);
  Tensor timesteps = torch::full({B, nbest, T}, -1, lopt);
  Tensor out_lens = torch::zeros({B, nbest}, lopt);
  Tensor out_scores = torch::empty({B, nbest}, scores.options().dtype(torch::kFloat));
  const int64_t* len = lengths.data_ptr<int64_t>();
  beam::Options opt;
  opt.beam_width = beam_width;
  opt.blank = blank;
  opt.top_n = std::min(top_n, V);
  opt.cutoff_prob = cutoff_prob;
  opt.input = input_kind;
  // num_threads > 0 caps the parallelism: at most num_threads chunks of the batch.
  const int64_t grain = num_threads > 0 ? (B + num_threads - 1) / num_threads : 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "beam_cpu", [&] {
    const scalar_t* X = scores.data_ptr<scalar_t>();
    at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
      // (references taken once: each use of a thread_local object is a call in a shared library)
      beam::Search& search = beam::thread_search();
      beam::Scratch& scratch = beam::thread_scratch();
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t Tb = len[b];
        TORCH_CHECK(Tb >= 0 && Tb <= T, "narvl: lengths[", b, "] outside [0, ", T, "]");
        search.begin(opt, nullptr);
        search.step(X + b * T * V, Tb, V, scratch);
        search.finish(nbest, T, tokens.data_ptr<int64_t>() + b * nbest * T,
                      out_lens.data_ptr<int64_t>() + b * nbest, out_scores.data_ptr<float>() + b * nbest,
                      timesteps.data_ptr<int64_t>() + b * nbest * T);
      }
    });
  });
  return {tokens, out_lens, out_scores, timesteps};
}

}  // namespace

// The CPU kernels of narvl::ctc_greedy_decode / ctc_beam_search, registered on the ops by
// narvl/ops/decode.py; they run without the GIL.
void register_decode_kernels(pybind11::module_& m) {
  const auto nogil = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("ctc_greedy_decode", &greedy_cpu, nogil);
  m.def("ctc_beam_search", &beam_cpu, nogil);
}

}  // namespace narvl
