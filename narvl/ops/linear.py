"""Linear (+ GELU) for the model layer, with faster CPU routes.

    y = x W^T + b            (activation None)
    y = gelu(x W^T + b)      (activation "gelu", the exact erf form of ``F.gelu``)

x: (..., K); weight: (N, K); bias: (N,) or None -> (..., N) in x's dtype.

Routes, for float32 CPU calls with at least ``ONEDNN_MIN_ROWS`` rows, no autocast,
``NARVL_BACKEND`` not ``reference`` and ``NARVL_CPU_FASTPATH`` not ``0``:
- no gradient needed (inference): one oneDNN matmul primitive with the bias and GELU fused as
  post-ops (``torch.ops.mkldnn._linear_pointwise``, the op inductor's CPU backend emits);
- a gradient needed (training): ``_OneDNNLinear``, oneDNN for the forward and for dx = dy W,
  ATen for dW and db; GELU stays a separate autograd op.
On this project's AMD EPYC oneDNN's matmul is 1.2-1.8x faster than ATen's ``addmm`` at the
model's 20-26 rows and 2.1-3.6x at training-sized batches (bench/bench_linear.py). With 1-7 rows
(an autoregressive decoding step or beam) ``addmm`` is as fast or faster, so those calls keep
it, as does every other device, dtype, or torch build without the op. All routes compute the
same function; tests compare them, values and gradients (second order too). If the private op
is missing or raises, the call and all later ones take ATen (``narvl._backend.cpu_fastpath_failed``
logs it once).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _backend

ONEDNN_MIN_ROWS = 8
_ACTIVATIONS = (None, "gelu")
_FASTPATH = "onednn_linear"


def onednn_linear_available() -> bool:
    return _backend.mkldnn_ops_available("_linear_pointwise")


def _onednn_route(x, weight, bias) -> str | None:
    """"infer" (no gradient: fused oneDNN primitive), "train" (a gradient is needed: oneDNN
    forward and input gradient in ``_OneDNNLinear``) or None (ATen)."""
    # cheapest test first: a one-row AR step must lose almost nothing to routing
    if x.dim() == 0 or x.numel() < ONEDNN_MIN_ROWS * x.shape[-1] or x.shape[-1] == 0:
        return None
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return None
    if bias is not None and bias.dtype != torch.float32:
        return None
    if torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling() or not onednn_linear_available():
        return None
    if _backend.requested_backend() == "reference" or not _backend.cpu_fastpath_enabled(_FASTPATH):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return "train"
    return "infer"


def _mm(a, b_t):
    """a (M, K) @ b_t^T with b_t (N, K): one oneDNN matmul, (M, N)."""
    return torch.ops.mkldnn._linear_pointwise(a, b_t, None, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b with oneDNN for the forward and for dx = dy W (1.7-2.7x and ~1.8x ATen's
    addmm / mm at training sizes here); dW = dy^T x and db stay on ATen, which is as fast for
    them. x (M, K) contiguous, weight (N, K), bias (N,) or None. Twice differentiable: under
    ``create_graph`` the backward runs on differentiable ATen ops."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.ops.mkldnn._linear_pointwise(x, weight.detach().contiguous(), bias, "none", [], "")

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        if torch.is_grad_enabled():  # double backward: a graph of ATen ops
            dx = gy.mm(weight) if need_x else None
        else:
            gy = gy.contiguous()
            dx = None
            if need_x:
                try:
                    dx = _mm(gy, weight.t().contiguous())
                except RuntimeError as e:
                    _backend.cpu_fastpath_failed(_FASTPATH, e)
                    dx = gy.mm(weight)
        dw = gy.t().mm(x) if need_w else None
        db = gy.sum(0) if ctx.has_bias and need_b else None
        return dx, dw, db


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str | None = None) -> torch.Tensor:
    """See the module docstring."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    route = _onednn_route(x, weight, bias)
    if route is not None and x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"x's last dimension ({x.shape[-1]}) must equal weight's in-features "
                         f"({weight.shape[-1]})")
    y = None
    try:
        if route == "infer":
            attr, algo = ("gelu", "none") if activation == "gelu" else ("none", "")
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight.contiguous(), bias, attr, [], algo)
        if route == "train":
            y = _OneDNNLinear.apply(x.reshape(-1, x.shape[-1]).contiguous(), weight, bias)
            y = y.view(*x.shape[:-1], weight.shape[0])
    except RuntimeError as e:  # a private op that raises: ATen from now on (logged once)
        _backend.cpu_fastpath_failed(_FASTPATH, e)
        y = None
    if y is None:
        y = F.linear(x, weight, bias)
    return F.gelu(y) if activation == "gelu" else y
