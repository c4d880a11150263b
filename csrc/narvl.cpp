// The one schema block of the narvl operator library. The kernels live in their own files
// (ctc_cpu.cpp, decode_cpu.cpp, forced_align_cpu.cpp for CPU; Triton for CUDA) and are registered on the ops from
// Python (narvl/ops/*.py), one kernel per device. narvl/_schema.py mirrors these strings for builds without this extension and
// tests/test_schema.py checks that the two agree.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(narvl, m) {
  // Q-CTC on raw logits (B, N, V): returns (nll (B,), smooth (B,), lse (B, N), em (B, N, S+1)),
  // em being the label/blank log-probabilities the backward re-derives the posteriors from.
  m.def(
      "qctc_fwd(Tensor logits, Tensor targets, Tensor target_lengths, Tensor query_lengths, "
      "int blank) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "qctc_bwd(Tensor grad_nll, Tensor grad_smooth, Tensor logits, Tensor lse, Tensor em, "
      "Tensor targets, Tensor target_lengths, Tensor query_lengths, int blank) -> Tensor");
  // CTC on log-probabilities (T, B, C): returns (nll (B,), em (B, T, S+1)).
  m.def(
      "ctc_fwd(Tensor log_probs, Tensor targets, Tensor input_lengths, Tensor target_lengths, "
      "int blank) -> (Tensor, Tensor)");
  m.def(
      "ctc_bwd(Tensor grad_nll, Tensor log_probs, Tensor em, Tensor targets, "
      "Tensor input_lengths, Tensor target_lengths, int blank) -> Tensor");
  // CTC decoding of (B, T, V) scores (batch-first).
  // Greedy: argmax per frame, merge repeats (unless merge_repeats is false: one label per frame),
  // drop blanks -> (tokens (B, T) int64 padded with -1, lengths (B,) int64).
  m.def(
      "ctc_greedy_decode(Tensor scores, Tensor lengths, int blank, bool merge_repeats=True) -> "
      "(Tensor, Tensor)");
  // Prefix beam search -> (tokens (B, nbest, T) int64 padded with -1, lengths (B, nbest) int64,
  // scores (B, nbest) float32 log-probabilities, timesteps (B, nbest, T) int64 padded with -1).
  // input_kind: 0 probabilities, 1 log-probabilities, 2 logits (log-softmax fused into the scan).
  // num_threads <= 0: torch's.
  m.def(
      "ctc_beam_search(Tensor scores, Tensor lengths, int beam_width, int blank, int cutoff_top_n, "
      "float cutoff_prob, int nbest, int input_kind, int num_threads) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
  // CTC forced alignment of (B, T, C) log-probabilities (batch-first): the Viterbi path of each
  // sample -> (alignments (B, T) int64, the label of each frame, blank past input_lengths[b];
  // scores (B, T) the log-probability of that label, 0 past input_lengths[b]; float64 for
  // float64 input, float32 otherwise).
  m.def(
      "ctc_forced_align(Tensor log_probs, Tensor targets, Tensor input_lengths, "
      "Tensor target_lengths, int blank) -> (Tensor, Tensor)");
  // Learnable-query attention: q (B, H, Lq, D), k/v (B, H, Lk, D), keys j >= key_lengths[b]
  // masked, attn_bias (H, Lq, Lk) or (B, H, Lq, Lk) additive -> (out (B, H, Lq, D),
  // lse (B, H, Lq) float32). The backward returns (dq, dk, dv, dbias; dbias empty unless
  // bias_grad).
  m.def(
      "query_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor key_lengths, Tensor? attn_bias, "
      "float scale) -> (Tensor, Tensor)");
  m.def(
      "query_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor key_lengths, Tensor? attn_bias, float scale, bool bias_grad) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
}

#include "vec_math.h"

namespace narvl {
void register_beam_decoder(pybind11::module_& m);  // beam_decoder.cpp
void register_ctc_kernels(pybind11::module_& m);   // ctc_cpu.cpp
void register_decode_kernels(pybind11::module_& m);  // decode_cpu.cpp
void register_forced_align_kernels(pybind11::module_& m);  // forced_align_cpu.cpp

// The beam search's per-frame top-k (vec_math.h) on one float32 row, for the tests: (values
// (min(k, V),) in the kernel's own order (best first, ties to the lower index), indices int64,
// NaN flag, log-sum-exp or None).
static pybind11::tuple row_topk(const torch::Tensor& row, int64_t k, bool logits) {
  TORCH_CHECK(row.dim() == 1 && row.scalar_type() == torch::kFloat32, "row: a 1-d float32 tensor");
  TORCH_CHECK(k >= 1, "k >= 1");
  const torch::Tensor x = row.contiguous();
  const int64_t V = x.numel();
  std::vector<float> vals(topk_buffer_size(k));
  std::vector<int32_t> idx(vals.size());
  bool nan = false;
  float lse = 0.f;
  const int64_t n = row_topk_f32(x.data_ptr<float>(), V, k, vals.data(), idx.data(), &nan,
                                 logits ? &lse : nullptr);
  // (copied in the kernel's own order: the tests check that it is sorted, ties to the lower index)
  torch::Tensor ov = torch::empty({n}, torch::kFloat32), oi = torch::empty({n}, torch::kInt64);
  float* pv = ov.data_ptr<float>();
  int64_t* pi = oi.data_ptr<int64_t>();
  for (int64_t j = 0; j < n; ++j) {
    pv[j] = vals[j];
    pi[j] = static_cast<int64_t>(idx[j]);
  }
  return pybind11::make_tuple(ov, oi, nan, logits ? pybind11::cast(lse) : pybind11::none());
}
}  // namespace narvl

PYBIND11_MODULE(_C, m) {
  m.doc() = "narvl native CPU kernels (registered on the torch.ops.narvl operators by narvl.ops)";
  // The decoders' NaN fault keeps its kind in its type: narvl.checks.NaNScoresError (a ValueError).
  pybind11::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const narvl::NanScoresError& e) {
      pybind11::object cls = pybind11::module_::import("narvl.checks").attr("NaNScoresError");
      PyErr_SetString(cls.ptr(), e.what());
    }
  });
  narvl::register_ctc_kernels(m);
  narvl::register_decode_kernels(m);
  narvl::register_forced_align_kernels(m);
  narvl::register_beam_decoder(m);
  m.def("_row_topk", &narvl::row_topk, "test hook: the CPU beam search's frame top-k on one row");
  m.def("_cpu_level", &narvl::cpu_dispatch_level,
        "test hook: the row kernels' ISA level (4 AVX-512, 3 AVX2, 0 baseline; NARVL_CPU_LEVEL caps it)");
}
