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
(Zen 5) oneDNN was 1.2-1.8x faster at the model's 20-26 rows and 2.1-3.6x at training-sized
batches, on a Zen 3 EPYC (AVX2) it is 0.6-1.0x ``addmm`` nearly everywhere, on an Intel Xeon
about even (bench/bench_linear.py). So an eligible call is *measured*: the first call of each
(rows, K, N, activation, bias, threads) key times both routes on its own operands (alternating,
best of ``_TRIALS``) and the faster one serves that key from then on (``route_choices()`` shows
them; oneDNN must win by 5%, ATen being the plain route). ``NARVL_LINEAR_ROUTE=onednn`` or
``aten`` pins the choice (``auto``, the default, measures). With 1-7 rows (an autoregressive decoding step or beam) ``addmm`` is as fast or
faster everywhere, so those calls keep it, as does every other device, dtype, or torch build
without the op. Inference copies (``narvl.models.prepare_for_inference``) pass ``packed``, a oneDNN-blocked
copy of the weight made once (``pack_weight``): such a call takes oneDNN without timing
(``NARVL_LINEAR_ROUTE=aten`` still pins ATen). Timing on the call's own operands misjudges it:
there the weight sits in L2 and ATen's per-call packing of it is cheap, while in a model pass
each weight comes from memory and that packing costs as much as the product (bench_linear.py
``test_linear_cold``). All routes compute the same function; tests compare them, values and gradients
(second order too). If the private op is missing or raises, the call and all later ones take
ATen (``narvl._backend.cpu_fastpath_failed`` logs it once).
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .. import _backend, settings

ONEDNN_MIN_ROWS = 8
_ACTIVATIONS = (None, "gelu")
_FASTPATH = "onednn_linear"
_TRIALS = 7
_MARGIN = 0.95  # oneDNN must beat ATen by 5%: ATen is the plain route, and timings this short are noisy
_MAX_CHOICES = 4096
_choices: dict = {}  # key -> True (oneDNN) / False (ATen), filled by measurement


def route_choices() -> dict:
    """The measured choices so far: (rows, K, N, activation, bias, threads, op) -> "onednn" / "aten"."""
    return {k: ("onednn" if v else "aten") for k, v in _choices.items()}


def _route_mode() -> str:
    return settings.linear_route()


def _rows_key(rows: int) -> int:
    """Rows exactly up to 64, then the next power of two (a bounded number of keys)."""
    return rows if rows <= 64 else 1 << (rows - 1).bit_length()


def _faster(fast, slow) -> bool:
    """Whether ``fast()`` beats ``slow()`` by ``_MARGIN``: one warm-up each, then ``_TRIALS``
    alternating timed runs, best time of each."""
    fast(), slow()
    best_f = best_s = float("inf")
    for _ in range(_TRIALS):
        t0 = time.perf_counter()
        fast()
        t1 = time.perf_counter()
        slow()
        t2 = time.perf_counter()
        best_f, best_s = min(best_f, t1 - t0), min(best_s, t2 - t1)
    return best_f < _MARGIN * best_s


def _prefer_onednn(op: str, rows: int, k: int, n: int, activation, has_bias: bool, onednn, aten) -> bool:
    """The route for this key: pinned by ``NARVL_LINEAR_ROUTE``, else measured once
    (``onednn`` / ``aten``: zero-argument callables computing the same result)."""
    mode = _route_mode()
    if mode != "auto":
        return mode == "onednn"
    key = (_rows_key(rows), k, n, activation, has_bias, torch.get_num_threads(), op)
    choice = _choices.get(key)
    if choice is None:
        with torch.no_grad():
            choice = _faster(onednn, aten)
        if len(_choices) >= _MAX_CHOICES:
            _choices.clear()
        _choices[key] = choice
    return choice


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
                    if _prefer_onednn("dx", gy.shape[0], gy.shape[1], weight.shape[1], None, False,
                                      lambda: _mm(gy, weight.t().contiguous()), lambda: gy.mm(weight)):
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
            act = activation if route == "infer" else None  # training: GELU stays separate
            attr, algo = ("gelu", "none") if act == "gelu" else ("none", "")
            K = x.shape[-1]
            use_packed = route == "infer" and packed is not None
            w1 = packed if use_packed else weight.detach().contiguous()
            # a packed weight takes oneDNN unless pinned to ATen: timing both routes on hot
            # operands (below) misjudges it, see the module docstring
            if use_packed and _route_mode() == "aten":
                route = None
            elif not use_packed and not _prefer_onednn(
                    "fwd", x.numel() // K, K, weight.shape[0], act, bias is not None,
                    lambda: torch.ops.mkldnn._linear_pointwise(x.reshape(-1, K).contiguous(), w1,
                                                               None if bias is None else bias.detach(),
                                                               attr, [], algo),
                    lambda: _aten(x.detach(), weight.detach(), None if bias is None else bias.detach(), act)):
                route = None
        if route == "infer":
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
