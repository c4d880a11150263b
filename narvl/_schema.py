"""Operator schemas of the ``narvl`` namespace, as Python strings.

The authoritative block is ``TORCH_LIBRARY(narvl, m)`` in ``csrc/narvl.cpp``. These strings are
used only when the native extension is absent, so that the ops (with their Triton CUDA and
reference CPU implementations) still exist; ``tests/test_schema.py`` checks that both agree.
"""

SCHEMAS = {
    "qctc_fwd": "(Tensor logits, Tensor targets, Tensor target_lengths, Tensor query_lengths, "
    "int blank) -> (Tensor, Tensor, Tensor, Tensor)",
    "qctc_bwd": "(Tensor grad_nll, Tensor grad_smooth, Tensor logits, Tensor lse, Tensor em, "
    "Tensor targets, Tensor target_lengths, Tensor query_lengths, int blank) -> Tensor",
    "ctc_fwd": "(Tensor log_probs, Tensor targets, Tensor input_lengths, Tensor target_lengths, "
    "int blank) -> (Tensor, Tensor)",
    "ctc_bwd": "(Tensor grad_nll, Tensor log_probs, Tensor em, Tensor targets, "
    "Tensor input_lengths, Tensor target_lengths, int blank) -> Tensor",
    "ctc_greedy_decode": "(Tensor scores, Tensor lengths, int blank, bool merge_repeats=True) -> "
    "(Tensor, Tensor)",
    "ctc_beam_search": "(Tensor scores, Tensor lengths, int beam_width, int blank, "
    "int cutoff_top_n, float cutoff_prob, int nbest, int input_kind, int num_threads) -> "
    "(Tensor, Tensor, Tensor, Tensor)",
    "ctc_forced_align": "(Tensor log_probs, Tensor targets, Tensor input_lengths, "
    "Tensor target_lengths, int blank) -> (Tensor, Tensor)",
    "query_attention_fwd": "(Tensor q, Tensor k, Tensor v, Tensor key_lengths, "
    "Tensor? attn_bias, float scale) -> (Tensor, Tensor)",
    "query_attention_bwd": "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
    "Tensor lse, Tensor key_lengths, Tensor? attn_bias, float scale, bool bias_grad) -> "
    "(Tensor, Tensor, Tensor, Tensor)",
}

# Ops defined in Python only (their CPU kernels compose the C++ ones; CUDA: Triton).
PY_SCHEMAS = {
    "qctc_loss_fwd": "(Tensor logits, Tensor targets, Tensor target_lengths, Tensor? query_lengths, "
    "Tensor? weights, int blank, str reduction, bool zero_infinity, float label_smoothing, "
    "bool check) -> (Tensor, Tensor, Tensor, Tensor)",
    "qctc_loss_bwd": "(Tensor grad_loss, Tensor logits, Tensor nll, Tensor lse, Tensor em, "
    "Tensor targets, Tensor target_lengths, Tensor? query_lengths, Tensor? weights, int blank, "
    "str reduction, bool zero_infinity, float label_smoothing) -> Tensor",
    "ctc_loss_fwd": "(Tensor log_probs, Tensor targets, Tensor input_lengths, Tensor target_lengths, "
    "int blank, str reduction, bool zero_infinity, bool check) -> (Tensor, Tensor, Tensor)",
    "ctc_loss_bwd": "(Tensor grad_loss, Tensor log_probs, Tensor nll, Tensor em, Tensor targets, "
    "Tensor input_lengths, Tensor target_lengths, int blank, str reduction, bool zero_infinity) -> Tensor",
    "assert_in_range": "(Tensor x, int lo, int hi, str message) -> ()",
    # query_attention's route (CompositeImplicitAutograd: autograd sees the ops it calls)
    "query_attention": "(Tensor q, Tensor k, Tensor v, Tensor? key_lengths, Tensor? attn_bias, "
    "float scale, bool causal) -> Tensor",
}
