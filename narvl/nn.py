"""nn.Module front-ends: they validate their configuration and call the functional APIs."""
from __future__ import annotations

import torch

from .ops.ctc import _REDUCTIONS, ctc_loss, qctc_loss


def _check_config(blank, reduction):
    if isinstance(blank, bool) or not isinstance(blank, int) or blank < 0:
        raise ValueError(f"blank must be a non-negative int, got {blank!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


class CTCLoss(torch.nn.Module):
    """Drop-in for ``torch.nn.CTCLoss`` backed by narvl's kernels."""

    def __init__(self, blank: int = 0, reduction: str = "mean", zero_infinity: bool = False):
        super().__init__()
        _check_config(blank, reduction)
        self.blank, self.reduction, self.zero_infinity = blank, reduction, bool(zero_infinity)

    def forward(self, log_probs, targets, input_lengths, target_lengths):
        return ctc_loss(log_probs, targets, input_lengths, target_lengths, self.blank,
                        self.reduction, self.zero_infinity)


class QCTCLoss(torch.nn.Module):
    """Q-CTC loss on decoder logits (B, N, V); see ``narvl.qctc_loss``."""

    def __init__(self, blank: int = 0, reduction: str = "mean", zero_infinity: bool = True,
                 label_smoothing: float = 0.0):
        super().__init__()
        _check_config(blank, reduction)
        if not 0.0 <= float(label_smoothing) <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        self.blank, self.reduction = blank, reduction
        self.zero_infinity, self.label_smoothing = bool(zero_infinity), float(label_smoothing)

    def forward(self, logits, targets, target_lengths, query_lengths=None, weights=None):
        return qctc_loss(logits, targets, target_lengths, query_lengths=query_lengths,
                         blank=self.blank, reduction=self.reduction,
                         zero_infinity=self.zero_infinity, label_smoothing=self.label_smoothing,
                         weights=weights)
