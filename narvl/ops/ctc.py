"""CTC and Q-CTC: op registration, autograd, and the drop-in functional APIs.

Layers: kernels (csrc/ctc_cpu.cpp, kernels/ctc.py) -> ops (registered here: fake tensors,
autograd, one kernel per device that ``NARVL_BACKEND`` points at Triton or C++) -> ``qctc_loss`` /
``ctc_loss`` (validation) -> ``narvl.nn.QCTCLoss`` / ``narvl.nn.CTCLoss``. Every call takes a
registered op, whatever the backend.

* ``torch.ops.narvl.qctc_loss_fwd`` / ``qctc_loss_bwd``: the whole loss of ``qctc_loss``
  (log-softmax, CTC, label smoothing, weights, reduction, and on CUDA the value checks) in one op.
  On CUDA it is five kernel launches for forward and backward together; on CPU its kernel runs
  the C++ ``qctc_fwd`` / ``qctc_bwd`` and reduces the per-sample terms with PyTorch.
* ``torch.ops.narvl.ctc_loss_fwd`` / ``ctc_loss_bwd``: the whole loss of ``ctc_loss`` (CTC,
  reduction, and on CUDA the value checks) in one op, five launches for forward and backward
  together on CUDA; on CPU the C++ ``ctc_fwd`` / ``ctc_bwd`` reduced with PyTorch.
* ``torch.ops.narvl.qctc_fwd`` / ``qctc_bwd`` and ``ctc_fwd`` / ``ctc_bwd``: per-sample terms,
  ``nll_b`` (CTC negative log-likelihood) and, for Q-CTC,
  ``smooth_b = mean_{n < N_b, v} log_softmax(logits)[b, n, v]``; ``qctc_loss`` reduces them with
  PyTorch when its weights need a gradient.
"""
from __future__ import annotations

import torch

from .. import _backend, _library, checks  # noqa: F401  (_library defines the schemas)

_OPS = torch.ops.narvl

# ------------------------------------------------------------------------------ fake tensors


def _float_out(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("narvl::qctc_fwd")
def _qctc_fwd_fake(logits, targets, target_lengths, query_lengths, blank):
    B, N, _ = logits.shape
    K = targets.shape[1] + 1
    dt = _float_out(logits.dtype)
    new = logits.new_empty
    return new((B,), dtype=dt), new((B,), dtype=dt), new((B, N), dtype=dt), new((B, N, K), dtype=dt)


@torch.library.register_fake("narvl::qctc_bwd")
def _qctc_bwd_fake(grad_nll, grad_smooth, logits, lse, em, targets, target_lengths,
                   query_lengths, blank):
    return logits.new_empty(logits.shape)


@torch.library.register_fake("narvl::ctc_fwd")
def _ctc_fwd_fake(log_probs, targets, input_lengths, target_lengths, blank):
    T, B, _ = log_probs.shape
    K = targets.shape[1] + 1
    dt = _float_out(log_probs.dtype)
    return log_probs.new_empty((B,), dtype=dt), log_probs.new_empty((B, T, K), dtype=dt)


@torch.library.register_fake("narvl::ctc_bwd")
def _ctc_bwd_fake(grad_nll, log_probs, em, targets, input_lengths, target_lengths, blank):
    return log_probs.new_empty(log_probs.shape)


@torch.library.register_fake("narvl::qctc_loss_fwd")
def _qctc_loss_fwd_fake(logits, targets, target_lengths, query_lengths, weights, blank, reduction,
                        zero_infinity, label_smoothing, check):
    B, N, _ = logits.shape
    K = targets.shape[1] + 1
    dt = _float_out(logits.dtype)
    new = logits.new_empty
    loss = new((B,) if reduction == "none" else (), dtype=dt)
    return loss, new((B,), dtype=dt), new((B, N), dtype=dt), new((B, N, K), dtype=dt)


@torch.library.register_fake("narvl::qctc_loss_bwd")
def _qctc_loss_bwd_fake(grad_loss, logits, nll, lse, em, targets, target_lengths, query_lengths,
                        weights, blank, reduction, zero_infinity, label_smoothing):
    return logits.new_empty(logits.shape)


@torch.library.register_fake("narvl::ctc_loss_fwd")
def _ctc_loss_fwd_fake(log_probs, targets, input_lengths, target_lengths, blank, reduction,
                       zero_infinity, check):
    T, B, _ = log_probs.shape
    K = targets.shape[1] + 1
    dt = _float_out(log_probs.dtype)
    new = log_probs.new_empty
    return new((B,) if reduction == "none" else (), dtype=dt), new((B,), dtype=dt), new((B, T, K), dtype=dt)


@torch.library.register_fake("narvl::ctc_loss_bwd")
def _ctc_loss_bwd_fake(grad_loss, log_probs, nll, em, targets, input_lengths, target_lengths, blank,
                       reduction, zero_infinity):
    return log_probs.new_empty(log_probs.shape)


# ------------------------------------------------------------------------------------ autograd


def _qctc_setup(ctx, inputs, output):
    logits, targets, target_lengths, query_lengths, blank = inputs
    _, _, lse, em = output
    ctx.save_for_backward(logits, lse, em, targets, target_lengths, query_lengths)
    ctx.blank = blank
    ctx.mark_non_differentiable(lse, em)


def _qctc_backward(ctx, g_nll, g_smooth, _g_lse, _g_em):
    logits, lse, em, targets, tl, ql = ctx.saved_tensors
    B = logits.shape[0]
    z = lse.new_zeros(B)
    g_nll = z if g_nll is None else g_nll
    g_smooth = z if g_smooth is None else g_smooth
    grad = _OPS.qctc_bwd(g_nll, g_smooth, logits, lse, em, targets, tl, ql, ctx.blank)
    return grad, None, None, None, None


def _ctc_setup(ctx, inputs, output):
    log_probs, targets, input_lengths, target_lengths, blank = inputs
    _, em = output
    ctx.save_for_backward(log_probs, em, targets, input_lengths, target_lengths)
    ctx.blank = blank
    ctx.mark_non_differentiable(em)


def _ctc_backward(ctx, g_nll, _g_em):
    log_probs, em, targets, il, tl = ctx.saved_tensors
    if g_nll is None:
        return None, None, None, None, None
    grad = _OPS.ctc_bwd(g_nll, log_probs, em, targets, il, tl, ctx.blank)
    return grad, None, None, None, None


def _qctc_loss_setup(ctx, inputs, output):
    logits, targets, tl_, ql, weights, blank, reduction, zero_infinity, eps, _check = inputs
    _, nll, lse, em = output
    ctx.save_for_backward(logits, nll, lse, em, targets, tl_, ql, weights)
    ctx.args = (blank, reduction, zero_infinity, eps)
    ctx.mark_non_differentiable(nll, lse, em)
    ctx.set_materialize_grads(False)  # no zero gradients are made for nll, lse, em


def _qctc_loss_backward(ctx, g_loss, _g_nll, _g_lse, _g_em):
    if g_loss is None:  # no gradient reached the loss (grads are not materialised)
        return (None,) * 10
    logits, nll, lse, em, targets, tl_, ql, weights = ctx.saved_tensors
    grad = _OPS.qctc_loss_bwd(g_loss, logits, nll, lse, em, targets, tl_, ql, weights, *ctx.args)
    return (grad,) + (None,) * 9


def _ctc_loss_setup(ctx, inputs, output):
    log_probs, targets, il, tl_, blank, reduction, zero_infinity, _check = inputs
    _, nll, em = output
    ctx.save_for_backward(log_probs, nll, em, targets, il, tl_)
    ctx.args = (blank, reduction, zero_infinity)
    ctx.mark_non_differentiable(nll, em)
    ctx.set_materialize_grads(False)


def _ctc_loss_backward(ctx, g_loss, _g_nll, _g_em):
    if g_loss is None:
        return (None,) * 8
    log_probs, nll, em, targets, il, tl_ = ctx.saved_tensors
    grad = _OPS.ctc_loss_bwd(g_loss, log_probs, nll, em, targets, il, tl_, *ctx.args)
    return (grad,) + (None,) * 7


torch.library.register_autograd("narvl::qctc_fwd", _qctc_backward, setup_context=_qctc_setup)
torch.library.register_autograd("narvl::ctc_loss_fwd", _ctc_loss_backward, setup_context=_ctc_loss_setup)
torch.library.register_autograd("narvl::qctc_loss_fwd", _qctc_loss_backward,
                                setup_context=_qctc_loss_setup)
torch.library.register_autograd("narvl::ctc_fwd", _ctc_backward, setup_context=_ctc_setup)

# --------------------------------------------------------------------- per-device kernels
# CUDA -> Triton; CPU -> C++ (narvl._C), or Triton under NARVL_BACKEND=triton + TRITON_INTERPRET=1.


def _kernels(x):
    return _backend.kernels(x.device, "ctc", "narvl's CPU CTC kernels")


@torch.library.register_kernel("narvl::qctc_fwd", ("cpu", "cuda"))
def _qctc_fwd_kernel(logits, targets, target_lengths, query_lengths, blank):
    return _kernels(logits).qctc_fwd(logits, targets, target_lengths, query_lengths, blank)


@torch.library.register_kernel("narvl::qctc_bwd", ("cpu", "cuda"))
def _qctc_bwd_kernel(grad_nll, grad_smooth, logits, lse, em, targets, tl, ql, blank):
    return _kernels(logits).qctc_bwd(grad_nll, grad_smooth, logits, lse, em, targets, tl, ql, blank)


@torch.library.register_kernel("narvl::ctc_fwd", ("cpu", "cuda"))
def _ctc_fwd_kernel(log_probs, targets, input_lengths, target_lengths, blank):
    return _kernels(log_probs).ctc_fwd(log_probs, targets, input_lengths, target_lengths, blank)


@torch.library.register_kernel("narvl::ctc_bwd", ("cpu", "cuda"))
def _ctc_bwd_kernel(grad_nll, log_probs, em, targets, input_lengths, target_lengths, blank):
    return _kernels(log_probs).ctc_bwd(grad_nll, log_probs, em, targets, input_lengths, target_lengths,
                                       blank)


def _full_lengths(ql, B, N, device):
    return checks.full_lengths(B, N, device) if ql is None else ql


@torch.library.register_kernel("narvl::qctc_loss_fwd", ("cpu", "cuda"))
def _qctc_loss_fwd_kernel(logits, targets, target_lengths, query_lengths, weights, blank, reduction,
                          zero_infinity, label_smoothing, check):
    k = _kernels(logits)
    if _backend.resolve(logits.device) == "triton":
        return k.qctc_loss_fwd(logits, targets, target_lengths, query_lengths, weights, blank,
                               reduction, zero_infinity, label_smoothing, check)
    B, N, V = logits.shape
    ql = _full_lengths(query_lengths, B, N, logits.device)
    if check:  # CPU tensors: the host reads the values for free
        checks.raise_first(_qctc_faults(targets, target_lengths, ql, N, V, blank))
    nll, smooth, lse, em = k.qctc_fwd(logits, targets, target_lengths, ql, blank)
    loss = _reduce(nll, smooth, target_lengths, reduction, zero_infinity, label_smoothing, weights)
    return (loss.clone() if loss is nll else loss), nll, lse, em  # outputs never alias


@torch.library.register_kernel("narvl::qctc_loss_bwd", ("cpu", "cuda"))
def _qctc_loss_bwd_kernel(grad_loss, logits, nll, lse, em, targets, target_lengths, query_lengths,
                          weights, blank, reduction, zero_infinity, label_smoothing):
    k = _kernels(logits)
    if _backend.resolve(logits.device) == "triton":
        return k.qctc_loss_bwd(grad_loss, logits, nll, lse, em, targets, target_lengths,
                               query_lengths, weights, blank, reduction, zero_infinity,
                               label_smoothing)
    B, N, _ = logits.shape
    gn, gs = _reduce_grads(grad_loss, nll, target_lengths, reduction, zero_infinity,
                           label_smoothing, weights)
    return k.qctc_bwd(gn, gs, logits, lse, em, targets, target_lengths,
                      _full_lengths(query_lengths, B, N, logits.device), blank)


def _ctc_faults(targets, target_lengths, input_lengths, T, C, blank):
    return [checks.range_fault(input_lengths, 0, T, "input_lengths", "an input length must fit in the T frames"),
            checks.range_fault(target_lengths, 0, targets.shape[1], "target_lengths",
                               "a target length must fit in targets"),
            *checks.label_faults(targets, target_lengths, C, blank)]


@torch.library.register_kernel("narvl::ctc_loss_fwd", ("cpu", "cuda"))
def _ctc_loss_fwd_kernel(log_probs, targets, input_lengths, target_lengths, blank, reduction,
                         zero_infinity, check):
    k = _kernels(log_probs)
    if _backend.resolve(log_probs.device) == "triton":
        return k.ctc_loss_fwd(log_probs, targets, input_lengths, target_lengths, blank, reduction,
                              zero_infinity, check)
    T, _, C = log_probs.shape
    if check:  # CPU tensors: the host reads the values for free
        checks.raise_first(_ctc_faults(targets, target_lengths, input_lengths, T, C, blank))
    nll, em = k.ctc_fwd(log_probs, targets, input_lengths, target_lengths, blank)
    loss = _reduce(nll, None, target_lengths, reduction, zero_infinity, 0.0, None)
    return (loss.clone() if loss is nll else loss), nll, em  # outputs never alias


@torch.library.register_kernel("narvl::ctc_loss_bwd", ("cpu", "cuda"))
def _ctc_loss_bwd_kernel(grad_loss, log_probs, nll, em, targets, input_lengths, target_lengths, blank,
                         reduction, zero_infinity):
    k = _kernels(log_probs)
    if _backend.resolve(log_probs.device) == "triton":
        return k.ctc_loss_bwd(grad_loss, log_probs, nll, em, targets, input_lengths, target_lengths,
                              blank, reduction, zero_infinity)
    gn, _ = _reduce_grads(grad_loss, nll, target_lengths, reduction, zero_infinity, 0.0, None)
    return k.ctc_bwd(gn, log_probs, em, targets, input_lengths, target_lengths, blank)


# --------------------------------------------------------------------------------- validation

_REDUCTIONS = ("none", "mean", "sum")


def _qctc_faults(targets, target_lengths, query_lengths, N, V, blank):
    """The value checks of qctc_loss as (bad mask, message) pairs (host side)."""
    return [checks.range_fault(target_lengths, 0, targets.shape[1], "target_lengths",
                               "a target length must fit in targets"),
            checks.range_fault(query_lengths, 0, N, "query_lengths",
                               "a query length must fit in the N query slots"),
            *checks.label_faults(targets, target_lengths, V, blank)]


def _check_common(x, xname, targets, blank, reduction, vocab):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{xname} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{xname} must be a floating-point tensor, got {x.dtype}")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must hold integers, got {targets.dtype}")
    if isinstance(blank, bool) or not isinstance(blank, int):
        raise TypeError(f"blank must be an int, got {type(blank).__name__}")
    if not 0 <= blank < vocab:
        raise ValueError(f"blank = {blank} is outside [0, {vocab}) for a vocabulary of {vocab}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _pad_concatenated(targets, target_lengths):
    """1-D concatenated targets -> (B, max L) padded with 0."""
    B = target_lengths.shape[0]
    total = int(target_lengths.sum()) if B else 0
    if targets.numel() != total:
        raise ValueError(f"concatenated targets have {targets.numel()} labels but "
                         f"target_lengths sum to {total}")
    S = int(target_lengths.max()) if B else 0
    offsets = torch.cumsum(target_lengths, 0) - target_lengths
    k = torch.arange(S, device=targets.device)
    live = k[None, :] < target_lengths[:, None]
    idx = (offsets[:, None] + k[None, :]).clamp(max=max(total - 1, 0))
    if total == 0:
        return targets.new_zeros((B, S), dtype=torch.long)
    return torch.where(live, targets.long()[idx], 0)


# --------------------------------------------------------------------------------- public API


def ctc_min_frames(targets: torch.Tensor, target_lengths: torch.Tensor) -> torch.Tensor:
    """(B,) the fewest frames (queries) a CTC alignment of each target needs: L_b plus the number
    of adjacent repeated labels (a blank must separate them). A sample with fewer frames than
    this is infeasible: its CTC loss is +inf (0 under ``zero_infinity``, which is why
    ``train.py`` counts such samples). targets: (B, S) padded; target_lengths: (B,)."""
    if targets.dim() != 2 or target_lengths.shape != (targets.shape[0],):
        raise ValueError(f"targets must be (B, S) and target_lengths (B,), got {tuple(targets.shape)} "
                         f"and {tuple(target_lengths.shape)}")
    tl_ = target_lengths.long()
    S = targets.shape[1]
    k = torch.arange(1, max(S, 1), device=targets.device)
    rep = (targets[:, 1:] == targets[:, :-1]) & (k[None, :] < tl_[:, None])
    return tl_ + rep.sum(1)



def _reduce(nll, smooth, target_lengths, reduction, zero_infinity, label_smoothing, weights):
    """The loss from per-sample terms (B,): loss_b = w_b * ((1 - eps) * c_b - eps * smooth_b) with
    c_b = nll_b ('none', 'sum') or nll_b / max(L_b, 1) ('mean', then averaged over the batch);
    infinite nll_b -> 0 under ``zero_infinity``."""
    if zero_infinity:
        nll = nll.masked_fill(torch.isinf(nll), 0.0)
    if reduction == "mean":
        nll = nll / target_lengths.clamp_min(1).to(nll.dtype)
    eps = float(label_smoothing)
    loss = nll if eps == 0.0 else (1.0 - eps) * nll - eps * smooth
    if weights is not None:
        loss = loss * weights.to(loss.dtype)
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()


def _reduce_grads(grad_loss, nll, target_lengths, reduction, zero_infinity, label_smoothing, weights):
    """(dloss/dnll_b, dloss/dsmooth_b), each (B,), of ``_reduce``'s loss for its gradient
    ``grad_loss`` (a scalar, or (B,) for 'none')."""
    B = nll.shape[0]
    g = grad_loss.to(nll.dtype)
    g = g if reduction == "none" else g.expand(B)
    if reduction == "mean":
        g = g / B
    if weights is not None:
        g = g * weights.to(nll.dtype)
    gn = g / target_lengths.clamp_min(1).to(nll.dtype) if reduction == "mean" else g
    eps = float(label_smoothing)
    if eps != 0.0:
        gn, gs = gn * (1.0 - eps), g * -eps
    else:
        gs = torch.zeros_like(g)
    if zero_infinity:
        gn = gn.masked_fill(torch.isinf(nll), 0.0)
    return gn.contiguous(), gs.contiguous()


def qctc_loss(logits, targets, target_lengths, *, query_lengths=None, blank=0, reduction="mean",
              zero_infinity=True, label_smoothing=0.0, weights=None):
    """Q-CTC loss on raw decoder logits, fused with the log-softmax.

    Args:
        logits: (B, N, V) float32/float16/bfloat16 (float64 accepted) decoder outputs, batch-first.
        targets: (B, S) padded integer labels (answer tokens + EOS); entries at k >= L_b ignored.
        target_lengths: (B,) integers L_b in [0, S].
        query_lengths: (B,) integers N_b in [0, N], default N (queries are normally unpadded).
        blank: blank index in [0, V) (NARVL uses V - 1).
        reduction: 'none' | 'mean' | 'sum'.
        zero_infinity: infeasible samples (L_b + repeats > N_b) give 0 loss and 0 gradient.
        label_smoothing: eps in [0, 1].
        weights: optional (B,) per-sample weights w_b (e.g. VQA answer confidence).

    With lp = log_softmax(logits) in fp32 and ctc_b the CTC nll of sample b over its first N_b slots:
        'none': loss_b = w_b * ((1 - eps) * ctc_b - eps * mean_{n<N_b, v} lp[b, n, v])
        'sum':  sum_b loss_b
        'mean': mean_b w_b * ((1 - eps) * ctc_b / max(L_b, 1) - eps * mean_{n<N_b, v} lp[b, n, v])
    Returns a float32 loss (float64 for float64 logits); the gradient has the logits' dtype.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 3:
        raise ValueError(f"logits must be 3-D (B, N, V), got shape {tuple(logits.shape)}")
    B, N, V = logits.shape
    _check_common(logits, "logits", targets, blank, reduction, max(V, 1))
    if B == 0:
        raise ValueError("logits has an empty batch (B = 0)")
    if N == 0 or V == 0:
        raise ValueError(f"logits has an empty query or vocabulary axis: shape {tuple(logits.shape)}")
    if targets.dim() != 2 or targets.shape[0] != B:
        raise ValueError(f"targets must be (B={B}, S), got shape {tuple(targets.shape)}")
    if targets.device != logits.device:
        raise ValueError(f"targets is on {targets.device} but logits on {logits.device}")
    tl_ = checks.as_lengths(target_lengths, "target_lengths", B, logits.device)
    ql = (None if query_lengths is None
          else checks.as_lengths(query_lengths, "query_lengths", B, logits.device))
    eps = float(label_smoothing)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if weights is not None:
        if not isinstance(weights, torch.Tensor):
            weights = torch.as_tensor(weights, dtype=torch.float32)
        if weights.shape != (B,):
            raise ValueError(f"weights must have shape ({B},), got {tuple(weights.shape)}")
        weights = weights.to(logits.device)
    full_ql = _full_lengths(ql, B, N, logits.device)  # for the checks; the fused op takes ql
    on_device = False  # value checks asserted inside the op's kernels (CUDA), not read here
    if checks.enabled():
        if checks.on_host(logits.device):
            checks.raise_first(_qctc_faults(targets, tl_, full_ql, N, V, blank))
        else:
            on_device = True
    checks.finite(logits, "logits")
    targets = targets.long()
    if weights is not None and weights.requires_grad:
        # differentiable weights: the per-sample op, reduced by PyTorch (which gives their gradient)
        if on_device:
            checks.assert_none(_qctc_faults(targets, tl_, full_ql, N, V, blank), "narvl.qctc_loss")
        nll, smooth, _, _ = _OPS.qctc_fwd(logits, targets, tl_, full_ql, blank)
        return _reduce(nll, smooth, tl_, reduction, zero_infinity, eps, weights)
    loss, _, _, _ = _OPS.qctc_loss_fwd(logits, targets, tl_, ql, weights, blank, reduction,
                                       bool(zero_infinity), eps, on_device)
    return loss


def ctc_loss(log_probs, targets, input_lengths, target_lengths, blank=0, reduction="mean",
             zero_infinity=False):
    """Drop-in for ``torch.nn.functional.ctc_loss``.

    log_probs: (T, B, C) or unbatched (T, C) log-probabilities; targets: padded (B, S), or 1-D
    concatenated (sum(target_lengths),), or unbatched (S,); lengths as tensors, tuples or lists.
    Same values as F.ctc_loss. The gradient w.r.t. log_probs is the exact one, -posterior
    (F.ctc_loss returns exp(log_probs) - posterior instead); both give the same gradient with
    respect to logits when log_probs = log_softmax(logits), which is the supported use.
    """
    if not isinstance(log_probs, torch.Tensor):
        raise TypeError(f"log_probs must be a torch.Tensor, got {type(log_probs).__name__}")
    unbatched = log_probs.dim() == 2
    if unbatched:
        log_probs = log_probs.unsqueeze(1)
        if isinstance(targets, torch.Tensor):
            if targets.dim() != 1:
                raise ValueError(f"unbatched targets must be 1-D, got shape {tuple(targets.shape)}")
            targets = targets.unsqueeze(0)
    if log_probs.dim() != 3:
        raise ValueError(f"log_probs must be (T, B, C) or (T, C), got shape {tuple(log_probs.shape)}")
    T, B, C = log_probs.shape
    _check_common(log_probs, "log_probs", targets, blank, reduction, max(C, 1))
    if B == 0:
        raise ValueError("log_probs has an empty batch (B = 0)")
    if T == 0 or C == 0:
        raise ValueError(f"log_probs has an empty time or class axis: shape {tuple(log_probs.shape)}")
    if targets.device != log_probs.device:
        raise ValueError(f"targets is on {targets.device} but log_probs on {log_probs.device}")
    il = checks.as_lengths(input_lengths, "input_lengths", B, log_probs.device)
    tl_ = checks.as_lengths(target_lengths, "target_lengths", B, log_probs.device)
    if targets.dim() == 1:
        # concatenated targets: padding them needs the lengths on the host (as F.ctc_loss reads them)
        if checks.enabled():
            checks.raise_first([
                checks.range_fault(il, 0, T, "input_lengths", "an input length must fit in the T frames"),
                checks.range_fault(tl_, 0, targets.numel(), "target_lengths", "lengths must fit the targets")])
        targets = _pad_concatenated(targets, tl_)
    elif targets.dim() != 2 or targets.shape[0] != B:
        raise ValueError(f"targets must be (B={B}, S) or 1-D concatenated, got {tuple(targets.shape)}")
    on_device = False  # value checks asserted inside the op's kernels (CUDA), not read here
    if checks.enabled():
        if checks.on_host(log_probs.device):
            checks.raise_first(_ctc_faults(targets, tl_, il, T, C, blank))
        else:
            on_device = True
    checks.finite(log_probs, "log_probs")
    targets = targets.long()
    loss, _, _ = _OPS.ctc_loss_fwd(log_probs, targets, il, tl_, blank, reduction, bool(zero_infinity),
                                   on_device)
    if unbatched and reduction == "none":
        loss = loss[0]
    return loss.to(log_probs.dtype)
