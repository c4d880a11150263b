"""CTC decoding: greedy and prefix beam search (the drop-in decoders are narvl/decoder.py).

Layers: kernels (csrc/decode_cpu.cpp; kernels/decode.py on CUDA, and on CPU under
NARVL_BACKEND=triton with TRITON_INTERPRET=1) -> ops ``torch.ops.narvl.ctc_greedy_decode`` /
``ctc_beam_search`` (fake + per-device kernels registered here) -> ``ctc_greedy_decode`` /
``ctc_prefix_beam_search`` -> ``narvl.CTCBeamDecoder``.

Scores are batch-first (B, T, V): log-probabilities, probabilities or raw logits (``input=``);
the beam search normalises logits in the same scan as its top-k (no separate log-softmax pass),
and greedy decoding takes any of them (same argmax).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .. import _backend, _library, checks  # noqa: F401

_OPS = torch.ops.narvl


@torch.library.register_fake("narvl::ctc_greedy_decode")
def _greedy_fake(scores, lengths, blank, merge_repeats=True):
    B, T, _ = scores.shape
    return scores.new_empty((B, T), dtype=torch.long), scores.new_empty((B,), dtype=torch.long)


@torch.library.register_fake("narvl::ctc_beam_search")
def _beam_fake(scores, lengths, beam_width, blank, cutoff_top_n, cutoff_prob, nbest, input_kind,
               num_threads):
    B, T, _ = scores.shape
    new = scores.new_empty
    return (new((B, nbest, T), dtype=torch.long), new((B, nbest), dtype=torch.long),
            new((B, nbest), dtype=torch.float32), new((B, nbest, T), dtype=torch.long))


def _triton(x):
    return _backend.resolve(x.device) == "triton"


def _native():
    return _backend.native_module("narvl's CPU CTC decoding")


@torch.library.register_kernel("narvl::ctc_greedy_decode", ("cpu", "cuda"))
def _greedy_kernel(scores, lengths, blank, merge_repeats=True):
    if _triton(scores):
        return _backend.triton_kernels().decode.greedy_decode(scores, lengths, blank, nan_check=checks.enabled(),
                                                              merge_repeats=merge_repeats)
    return _native().ctc_greedy_decode(scores, lengths, blank, merge_repeats)


@torch.library.register_kernel("narvl::ctc_beam_search", ("cpu", "cuda"))
def _beam_kernel(scores, lengths, beam_width, blank, cutoff_top_n, cutoff_prob, nbest, input_kind,
                 num_threads):
    if _triton(scores):
        return _backend.triton_kernels().decode.beam_search(
            scores, lengths, beam_width, blank, cutoff_top_n, cutoff_prob, nbest, input_kind,
            nan_check=checks.enabled())
    return _native().ctc_beam_search(scores, lengths, beam_width, blank, cutoff_top_n, cutoff_prob,
                                     nbest, input_kind, num_threads)


INPUT_KINDS = {"probs": 0, "log_probs": 1, "logits": 2}
GPU_MAX_BEAM = 128  # = narvl.kernels.decode.MAX_BEAM (tests/test_decode.py checks they agree)


class BeamSearchResult(NamedTuple):
    """tokens (B, nbest, T) int64 padded with -1; lengths (B, nbest); scores (B, nbest) float32
    log-probabilities of each labeling summed over the alignments the beam kept (-inf for empty
    slots); timesteps (B, nbest, T) int64 (-1 padded), ctcdecode's alignment: for each token, the
    frame at which its probability was highest among the frames at which the search extended
    the shorter prefix by it (while the prefix stayed alive in the beam)."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    scores: torch.Tensor
    timesteps: torch.Tensor


def input_kind(input, log_probs_input=True):
    """The ``input_kind`` int of the ops from ``input`` ('log_probs', 'probs', 'logits' or None:
    then from the boolean ``log_probs_input``)."""
    if input is None:
        return INPUT_KINDS["log_probs" if log_probs_input else "probs"]
    if input not in INPUT_KINDS:
        raise ValueError(f"input must be one of {tuple(INPUT_KINDS)}, got {input!r}")
    return INPUT_KINDS[input]


def _check_scores(scores, name):
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {scores.dtype}")
    if scores.dim() != 3:
        raise ValueError(f"{name} must be 3-D (B, T, V), got shape {tuple(scores.shape)}")
    B, T, V = scores.shape
    if B == 0:
        raise ValueError(f"{name} has an empty batch (B = 0)")
    if V == 0:
        raise ValueError(f"{name} has an empty vocabulary axis")
    return B, T, V


def _run_checked(name, fn):
    """Runs fn(), a decoder op on scores the Python layer has validated. NaN in the scores is the
    one value fault only the kernels see (their row scans detect it without an extra pass): a
    ``checks.NaNScoresError``, raised again naming ``name``. Any other error (a language
    model's own ``ValueError`` included) passes through unchanged."""
    try:
        return fn()
    except checks.NaNScoresError:
        raise checks.NaNScoresError(f"{name} contains NaN") from None


def _lengths(lengths, name, B, T, device):
    if lengths is None:
        return checks.full_lengths(B, T, device)
    if isinstance(lengths, (list, tuple)):
        lengths = torch.tensor(lengths, dtype=torch.long)
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, list or tuple of integers")
    if lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got {lengths.dtype}")
    if lengths.shape != (B,):
        raise ValueError(f"{name} must have shape ({B},), got {tuple(lengths.shape)}")
    lengths = lengths.to(device=device, dtype=torch.long)
    if checks.enabled():
        if checks.on_host(device):
            if bool(((lengths < 0) | (lengths > T)).any()):
                raise ValueError(f"{name} must lie in [0, {T}], got {lengths.tolist()}")
        else:  # asserted on the device, no synchronisation
            torch.ops.narvl.assert_in_range(lengths, 0, T, f"{name} must lie in [0, T]")
    return lengths


_check_int = checks.check_int


def ctc_greedy_decode(log_probs, lengths=None, blank=0, merge_repeats=True):
    """Greedy CTC decoding: argmax per frame, merge repeats, drop blanks.

    log_probs: (B, T, V) log-probabilities, probabilities or logits (the argmax is the same).
    lengths: (B,) valid frames per sample (default T). merge_repeats: False keeps one label per
    frame (NARVL's grounding and entailment slots), dropping only the blanks. Returns (tokens
    (B, T) int64 padded with -1, out_lens (B,) int64), on the input's device.
    """
    B, T, V = _check_scores(log_probs, "log_probs")
    _check_int(blank, "blank", 0, V)
    if not isinstance(merge_repeats, bool):
        raise TypeError(f"merge_repeats must be a bool, got {merge_repeats!r}")
    lengths = _lengths(lengths, "lengths", B, T, log_probs.device)
    return _run_checked("log_probs", lambda: _OPS.ctc_greedy_decode(log_probs, lengths, blank, merge_repeats))


def ctc_prefix_beam_search(log_probs, lengths=None, *, beam_width=10, blank=0, cutoff_top_n=40,
                           cutoff_prob=1.0, nbest=None, log_probs_input=True, num_threads=0,
                           input=None):
    """CTC prefix beam search.

    log_probs: (B, T, V) scores: log-probabilities (``input="log_probs"``, the default),
    probabilities (``input="probs"`` or ``log_probs_input=False``) or raw logits
    (``input="logits"``: each frame's log-sum-exp is computed in the same scan as its top-k, so
    the logits are read once and no log-softmax pass runs before the search).
    Probabilities are read as log(p + FLT_MIN), as ctcdecode reads them: a zero probability is a
    very unlikely label (-87.3), not an impossible one (on CUDA the search's float32
    probabilities, rescaled per frame, cannot hold one that far below the best: it drops out).
    Each frame expands the ``cutoff_top_n`` most probable tokens, cut further to the smallest
    set whose probability reaches ``cutoff_prob`` (at least one; 0 keeps only the most probable
    token, 1 cuts nothing); each prefix carries the probabilities of its
    alignments ending in blank and in non-blank, merged exactly; the ``beam_width`` most probable
    prefixes survive each frame. Returns a ``BeamSearchResult`` with ``nbest`` (default
    beam_width) hypotheses per sample, best first.
    """
    return _beam_search(log_probs, lengths, beam_width, blank, cutoff_top_n, cutoff_prob, nbest,
                        input_kind(input, log_probs_input), num_threads)


def gpu_search_fits(device, beam_width: int) -> bool:
    """False where the Triton search serves ``device`` and ``beam_width`` exceeds its
    ``GPU_MAX_BEAM``: the one place that limit is checked."""
    return not (_backend.resolve(device) == "triton" and beam_width > GPU_MAX_BEAM)


def _beam_search(log_probs, lengths, beam_width, blank, cutoff_top_n, cutoff_prob, nbest, kind,
                 num_threads, names=("log_probs", "lengths")):
    """``ctc_prefix_beam_search`` after the input kind is known; ``names`` are the caller's
    names of the scores and lengths arguments, which the errors name (the ctcdecode drop-in's
    are ``probs`` and ``seq_lens``)."""
    B, T, V = _check_scores(log_probs, names[0])
    _check_int(blank, "blank", 0, V)
    _check_int(beam_width, "beam_width", 1)
    _check_int(cutoff_top_n, "cutoff_top_n", 1)
    nbest = beam_width if nbest is None else nbest
    _check_int(nbest, "nbest", 1)
    if nbest > beam_width:
        raise ValueError(f"nbest = {nbest} cannot exceed beam_width = {beam_width}")
    cutoff_prob = float(cutoff_prob)
    if not 0.0 <= cutoff_prob <= 1.0:  # NaN fails too
        raise ValueError(f"cutoff_prob must be in [0, 1], got {cutoff_prob}")
    lengths = _lengths(lengths, names[1], B, T, log_probs.device)
    args = (log_probs, lengths, beam_width, blank, cutoff_top_n, cutoff_prob, nbest, kind)
    if not gpu_search_fits(log_probs.device, beam_width):
        raise ValueError(f"beam_width = {beam_width} exceeds the GPU search's maximum of {GPU_MAX_BEAM}; "
                         f"decode on the CPU (log_probs.cpu()) for wider beams")
    _check_int(num_threads, "num_threads", 0)
    return BeamSearchResult(*_run_checked(
        names[0], lambda: _OPS.ctc_beam_search(*args, num_threads)))
