"""CTC forced alignment: op registration and ``ctc_forced_align``, a batched drop-in for
``torchaudio.functional.forced_align``.

Layers: kernels (csrc/forced_align_cpu.cpp; kernels/forced_align.py on CUDA, and on CPU under
NARVL_BACKEND=triton with TRITON_INTERPRET=1) -> op ``torch.ops.narvl.ctc_forced_align``
(fake + per-device kernel registered here) -> ``ctc_forced_align`` (validation).
"""
from __future__ import annotations

import torch

from .. import _backend, _library, checks  # noqa: F401  (_library defines the schemas if needed)
from .ctc import ctc_min_frames

_OPS = torch.ops.narvl


def _score_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("narvl::ctc_forced_align")
def _forced_align_fake(log_probs, targets, input_lengths, target_lengths, blank):
    B, T, _ = log_probs.shape
    return (log_probs.new_empty((B, T), dtype=torch.long),
            log_probs.new_empty((B, T), dtype=_score_dtype(log_probs.dtype)))


@torch.library.register_kernel("narvl::ctc_forced_align", ("cpu", "cuda"))
def _forced_align_kernel(log_probs, targets, input_lengths, target_lengths, blank):
    k = _backend.kernels(log_probs.device, "forced_align", "narvl's CPU CTC forced alignment")
    if not hasattr(k, "ctc_forced_align"):
        raise RuntimeError("narvl._C is older than the sources (it has no ctc_forced_align kernel): "
                           "rebuild it with `pip install --no-build-isolation -e .`")
    return k.ctc_forced_align(log_probs, targets, input_lengths, target_lengths, blank)


def _frames_check(targets, tl_, il):
    """The fault of samples whose target needs more frames than they have."""
    need = ctc_min_frames(targets, tl_)
    bad = need > il

    def message():
        b = int(bad.nonzero()[0, 0])
        return (f"sample {b}: its target needs {int(need[b])} frames (target_lengths[{b}] = "
                f"{int(tl_[b])} plus {int(need[b] - tl_[b])} repeated labels) but input_lengths[{b}] "
                f"= {int(il[b])}")
    return bad, message, "a target needs more frames than input_lengths gives its sample"


def ctc_forced_align(log_probs, targets, input_lengths=None, target_lengths=None, blank=0):
    r"""Align CTC label sequences to emissions: the best (Viterbi) CTC path of each sample.

    A batched drop-in for ``torchaudio.functional.forced_align``: every sample gets what
    torchaudio gives for it alone (with ``log_probs[b:b+1, :input_lengths[b]]`` and
    ``targets[b:b+1, :target_lengths[b]]``), including which of several equally scored paths
    is returned: a path ends in the final blank only when that scores strictly more than ending
    in the last label, and going back from there each frame keeps the highest lattice state
    (later labels first) among the predecessors of equal best score.

    Args:
        log_probs (Tensor): log-probabilities of the CTC emissions, shape `(B, T, C)`:
            batch size, frames, classes including blank. float32 or float64; float16 and
            bfloat16 are read exactly and computed in float32.
        targets (Tensor): target labels, shape `(B, S)`, int32 or int64, padded: entries at
            ``k >= target_lengths[b]`` are ignored.
        input_lengths (Tensor, tuple or list, optional): valid frames per sample, shape `(B,)`,
            each in ``[0, T]``. Default: ``T`` for all.
        target_lengths (Tensor, tuple or list, optional): labels per sample, shape `(B,)`, each
            in ``[0, S]``. Default: ``S`` for all.
        blank (int, optional): index of the blank class, in ``[0, C)``. Default: 0.

    Returns:
        Tuple(Tensor, Tensor):
            alignments: int64, shape `(B, T)`: the label of each frame on the best path (blank
            included). Frames ``t >= input_lengths[b]`` hold ``blank``, so that
            ``torchaudio.functional.merge_tokens(alignments[b], scores[b])`` gives the same
            spans with or without trimming. A sample with an empty target is all blank.

            scores: shape `(B, T)`: ``log_probs[b, t, alignments[b, t]]``, 0 for
            ``t >= input_lengths[b]``; float64 for float64 input, float32 otherwise.

    Raises:
        TypeError: ``log_probs`` not a floating-point tensor, ``targets`` not an integer tensor,
            lengths not integers, ``blank`` not an int.
        ValueError: wrong shapes, tensors on different devices, ``blank`` outside ``[0, C)``,
            lengths out of range, a live label outside ``[0, C)`` or equal to ``blank``, or a
            sample whose target needs more frames than it has (``target_lengths[b]`` plus the
            number of adjacent repeated labels, :func:`narvl.ctc_min_frames`, above
            ``input_lengths[b]``): the error names the sample. These value checks cost one
            host synchronisation; ``NARVL_CHECK=0`` and ``torch.compile`` skip them: a sample
            whose target cannot fit then comes back all blank with -inf scores on its frames,
            and out-of-range lengths or labels are undefined (the C++ kernel raises a
            RuntimeError).

    An empty batch (B = 0) returns empty `(0, T)` tensors. NaN and infinite log-probabilities
    flow through the maximisation: a comparison with NaN is false, so a NaN score never wins
    as a challenger; a path through a NaN or -inf entry shows it in ``scores``. When every path
    scores -inf or NaN the result is still a path that collapses to the target.

    Not differentiable (as torchaudio's): the outputs carry no gradient.

    Differences from torchaudio, whose native op takes one sample: the alignments are int64
    whatever the targets' dtype (torchaudio returns the targets' dtype), and float16 input is
    computed in float32 with float32 scores (torchaudio keeps float16 throughout, so its path
    can differ where float16 rounding makes two paths tie).
    """
    if not isinstance(log_probs, torch.Tensor):
        raise TypeError(f"log_probs must be a torch.Tensor, got {type(log_probs).__name__}")
    if not log_probs.is_floating_point():
        raise TypeError(f"log_probs must be a floating-point tensor, got {log_probs.dtype}")
    if log_probs.dim() != 3:
        raise ValueError(f"log_probs must be 3-D (B, T, C), got shape {tuple(log_probs.shape)}")
    B, T, C = log_probs.shape
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"targets must be int32 or int64, got {targets.dtype}")
    if targets.dim() != 2 or targets.shape[0] != B:
        raise ValueError(f"targets must be 2-D (B={B}, S), got shape {tuple(targets.shape)}")
    if targets.device != log_probs.device:
        raise ValueError(f"targets is on {targets.device} but log_probs on {log_probs.device}")
    if isinstance(blank, bool) or not isinstance(blank, int):
        raise TypeError(f"blank must be an int, got {type(blank).__name__}")
    if not 0 <= blank < C:
        raise ValueError(f"blank = {blank} is outside [0, {C}) for {C} classes")
    S = targets.shape[1]
    dev = log_probs.device
    il = (torch.full((B,), T, dtype=torch.long, device=dev) if input_lengths is None
          else checks.as_lengths(input_lengths, "input_lengths", B, dev))
    tl_ = (torch.full((B,), S, dtype=torch.long, device=dev) if target_lengths is None
           else checks.as_lengths(target_lengths, "target_lengths", B, dev))
    if B == 0:
        return (torch.empty((0, T), dtype=torch.long, device=dev),
                torch.empty((0, T), dtype=_score_dtype(log_probs.dtype), device=dev))
    if checks.enabled():
        tl_checked = tl_.clamp(0, S)
        faults = [
            checks.range_fault(il, 0, T, "input_lengths", "an input length must fit in the T frames"),
            checks.range_fault(tl_, 0, S, "target_lengths", "a target length must fit in targets"),
            *checks.label_faults(targets, tl_checked, C, blank),
            _frames_check(targets, tl_checked, il)]
        if checks.on_host(dev):
            checks.raise_first(faults)
        else:
            checks.assert_none(faults, "narvl.ctc_forced_align")
    with torch.no_grad():
        return _OPS.ctc_forced_align(log_probs.detach(), targets, il, tl_, blank)
