"""Linear (+ GELU) for the model layer, with faster CPU routes.

    y = x W^T + b            (activation None)
    y = gelu(x W^T + b)      (activation "gelu", the exact erf form of ``F.gelu``)

x: (..., K); weight: (N, K); bias: (N,) or None -> (..., N) in x's dtype.

Routes, for float32 CPU calls with at least ``ONEDNN_MIN_ROWS`` rows, no autocast and
``NARVL_CPU_FASTPATH`` not ``0``:
- no gradient needed (inference): one oneDNN matmul primitive with the bias and GELU fused as
  post-ops (``torch.ops.mkldnn._linear_pointwise``, the op inductor's CPU backend emits);
- a gradient needed (training): ``_OneDNNLinear``, oneDNN for the forward and for dx = dy W,
  ATen for dW and db; GELU stays a separate autograd op.
Which of oneDNN and ATen's ``addmm`` is faster depends on the CPU: on an AVX-512 AMD EPYC
(Zen 5) oneDNN was 1.2-1.8x faster at the model's 20-26 rows, 2.0-2.2x at training-sized batches
and 1.3-1.5x for forward + backward; on a Zen 3 EPYC (AVX2) it is 0.6-1.0x ``addmm`` nearly
everywhere (bench/bench_linear.py, docs/results.md). So ``NARVL_LINEAR_ROUTE=auto`` (the
default) takes oneDNN on CPUs with AVX-512 (``torch.backends.cpu.get_cpu_capability()``) and ATen
on the others: a fixed rule, so that a run computes the same on every start of the same machine
(a per-shape timing would pick differently from run to run on a noisy machine, and training
would round differently). ``onednn`` or ``aten`` pins the route. With 1-7 rows (an
autoregressive decoding step or beam) ``addmm`` is as fast or faster everywhere, so those calls
keep it, as does every other device, dtype, or torch build without the op. Inference copies
(``narvl.models.prepare_for_inference``) pass ``packed``, a oneDNN-blocked copy of the weight
made once (``pack_weight``): such a call takes oneDNN on every CPU (``NARVL_LINEAR_ROUTE=aten``
still pins ATen), as each weight then comes from memory without ATen's per-call packing of it
(1.2-1.7x ``addmm`` on a Zen 4 in a model-like sweep, bench_linear.py ``test_linear_cold``).
All routes compute the same function; tests compare them, values and gradients
(second order too). If the private op is missing or raises, the call and all later ones take
ATen (``narvl._backend.cpu_fastpath_failed`` logs it once).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _backend, settings

ONEDNN_MIN_ROWS = 8
_ACTIVATIONS = (None, "gelu")
_FASTPATH = "onednn_linear"


def _route_mode() -> str:
    return settings.linear_route()


def _prefer_onednn() -> bool:
    """The route of an eligible unpacked call: pinned by ``NARVL_LINEAR_ROUTE``, else oneDNN on
    CPUs with AVX-512 and ATen on the others (module docstring)."""
    mode = _route_mode()
    if mode != "auto":
        return mode == "onednn"
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def onednn_linear_available() -> bool:
    return _backend.mkldnn_ops_available("_linear_pointwise")


def _onednn_route(x, weight, bias) -> str | None:
    """"infer" (no gradient: fused oneDNN primitive), "train" (a gradient is needed: oneDNN
    forward and input gradient in ``_OneDNNLinear``) or None (ATen)."""
    if torch.compiler.is_compiling():  # traces (torch.compile, torch.export) see ATen, shape-free
        return None
    # cheapest test next: a one-row AR step must lose almost nothing to routing
    if x.dim() == 0 or x.numel() < ONEDNN_MIN_ROWS * x.shape[-1] or x.shape[-1] == 0:
        return None
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return None
    if bias is not None and bias.dtype != torch.float32:
        return None
    if torch.is_autocast_enabled("cpu") or not onednn_linear_available():
        return None
    if not _backend.cpu_fastpath_enabled(_FASTPATH):
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
                try:  # the transposed weight is copied only when oneDNN serves dx
                    if _prefer_onednn():
                        dx = _mm(gy, weight.t().contiguous())
                except RuntimeError as e:
                    _backend.cpu_fastpath_failed(_FASTPATH, e)
                if dx is None:
                    dx = gy.mm(weight)
        dw = gy.t().mm(x) if need_w else None
        db = gy.sum(0) if ctx.has_bias and need_b else None
        return dx, dw, db


def _aten(x, weight, bias, activation):
    y = F.linear(x, weight, bias)
    return F.gelu(y) if activation == "gelu" else y


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's blocked copy of a float32 CPU ``weight`` (N, K) for inference calls
    ``linear(x, weight, bias, packed=pack_weight(weight))``, or None where the op is missing,
    the fast path is off or the weight is not float32 on CPU. The copy is a snapshot: the caller
    packs again when ``weight`` changes (``narvl.models.inference.PackedLinear``)."""
    if (weight.dim() != 2 or weight.device.type != "cpu" or weight.dtype != torch.float32
            or not _backend.mkldnn_ops_available("_linear_pointwise", "_reorder_linear_weight")
            or not _backend.cpu_fastpath_enabled(_FASTPATH)):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())
    except RuntimeError as e:
        _backend.cpu_fastpath_failed(_FASTPATH, e)
        return None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str | None = None, packed: torch.Tensor | None = None) -> torch.Tensor:
    """See the module docstring. ``packed``: ``pack_weight(weight)``, used by inference calls
    on the oneDNN route (the weight is then not reordered at each call)."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    route = _onednn_route(x, weight, bias)
    if route is not None and x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"x's last dimension ({x.shape[-1]}) must equal weight's in-features "
                         f"({weight.shape[-1]})")
    if packed is not None and packed.shape != weight.shape:
        raise ValueError(f"packed ({tuple(packed.shape)}) must be pack_weight(weight) "
                         f"({tuple(weight.shape)})")
    y = None
    try:
        if route is not None:
            use_packed = route == "infer" and packed is not None
            # a packed weight takes oneDNN on every CPU unless pinned to ATen (module docstring)
            if (_route_mode() == "aten") if use_packed else not _prefer_onednn():
                route = None
        if route == "infer":
            attr, algo = ("gelu", "none") if activation == "gelu" else ("none", "")
            w1 = packed if use_packed else weight.detach().contiguous()
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w1, bias, attr, [], algo)
        if route == "train":
            y = _OneDNNLinear.apply(x.reshape(-1, x.shape[-1]).contiguous(), weight, bias)
            y = y.view(*x.shape[:-1], weight.shape[0])
    except RuntimeError as e:  # a private op that raises: ATen from now on (logged once)
        _backend.cpu_fastpath_failed(_FASTPATH, e)
        y = None
    if y is None:
        return _aten(x, weight, bias, activation)
    return F.gelu(y) if activation == "gelu" else y
