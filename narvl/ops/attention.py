"""Learnable-query attention: ops, autograd, CPU path, functional API.

Layers: Triton kernels (kernels/attention.py) -> ops ``torch.ops.narvl.query_attention_fwd/bwd``
(CUDA: Triton; CPU: the same math in ATen matmuls, or Triton under NARVL_BACKEND=triton with
TRITON_INTERPRET=1; registered here) -> ``query_attention`` (validation) ->
``narvl.nn.QueryDecoderLayer``.

``query_attention`` validates its arguments and calls one op, ``torch.ops.narvl.query_attention``,
whose kernel (registered here as CompositeImplicitAutograd, so autograd sees the ops it calls)
is the one place that routes:

- CPU (the C++ backend), what measured faster (bench/bench_attention.py): ``query_attention_fwd``
  (its explicit CPU kernel, forward and backward) when training with short key axes
  (self-attention among the queries); torch's SDPA, with the bias and the key-length mask folded
  into its float mask, for long key axes (cross-attention) and for every call that needs no
  gradient (inference);
- causal calls (the AR baseline's teacher-forced decoder), on every device: SDPA with the causal
  mask joined to the bias (narvl's kernels have no causal mask; NARVL's queries never need one);
- otherwise (CUDA, or Triton under the interpreter): ``query_attention_fwd`` / ``_bwd``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _backend, _library, checks  # noqa: F401

_OPS = torch.ops.narvl
_CPU_OP_MAX_KEYS = 128


@torch.library.register_fake("narvl::query_attention_fwd")
def _fwd_fake(q, k, v, key_lengths, attn_bias, scale):
    B, H, Lq, _ = q.shape
    lse_dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(q.shape), q.new_empty((B, H, Lq), dtype=lse_dt)


@torch.library.register_fake("narvl::query_attention_bwd")
def _bwd_fake(grad_out, q, k, v, out, lse, key_lengths, attn_bias, scale, bias_grad):
    db = attn_bias.new_empty(attn_bias.shape) if (attn_bias is not None and bias_grad) else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), db


def _setup(ctx, inputs, output):
    q, k, v, key_lengths, attn_bias, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_lengths, attn_bias)
    ctx.scale = scale
    ctx.bias_grad = attn_bias is not None and attn_bias.requires_grad
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero gradient is made for lse


def _backward(ctx, g_out, _g_lse):
    if g_out is None:
        return None, None, None, None, None, None
    q, k, v, out, lse, key_lengths, attn_bias = ctx.saved_tensors
    dq, dk, dv, db = _OPS.query_attention_bwd(g_out, q, k, v, out, lse, key_lengths,
                                              attn_bias, ctx.scale, ctx.bias_grad)
    return dq, dk, dv, None, (db if ctx.bias_grad else None), None


torch.library.register_autograd("narvl::query_attention_fwd", _backward, setup_context=_setup)


def _tk():
    return _backend.triton_kernels().attention


def _triton(x):
    """Whether the Triton kernels serve x's device (CUDA, or CPU under the interpreter)."""
    return _backend.resolve(x.device) == "triton"


def _acc(x):
    return x.double() if x.dtype == torch.float64 else x.float()


def _cpu_probs(q, k, key_lengths, attn_bias, scale):
    s = torch.matmul(_acc(q), _acc(k).transpose(-1, -2)) * scale
    if attn_bias is not None:
        s = s + _acc(attn_bias)
    keep = torch.arange(k.shape[2], device=k.device)[None, :] < key_lengths.long()[:, None]
    return s.masked_fill(~keep[:, None, None, :], float("-inf"))


def plain_fwd(q, k, v, key_lengths, attn_bias, scale):
    """``query_attention_fwd`` in plain ATen ops (its CPU kernel): (out, lse). Exporters
    (``narvl.models.export_onnx``) decompose the op into this."""
    s = _cpu_probs(q, k, key_lengths, attn_bias, scale)
    lse = torch.logsumexp(s, -1)
    out = torch.matmul(torch.exp(s - lse[..., None]), _acc(v))
    return out.to(q.dtype), lse


def _causal_keep(Lq, Lk, device):
    """(Lq, Lk) bool: query i sees keys j <= i + Lk - Lq."""
    return torch.ones(Lq, Lk, dtype=torch.bool, device=device).tril(Lk - Lq)


def plain_attention(q, k, v, key_lengths, attn_bias, scale, causal):
    """``narvl::query_attention`` in plain ATen ops (matmul, masked softmax, matmul): exporters
    (``narvl.models.export_onnx``) decompose the op into this."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if attn_bias is not None:
        s = s + attn_bias.to(s.dtype)
    Lq, Lk = q.shape[2], k.shape[2]
    if causal:
        s = s.masked_fill(~_causal_keep(Lq, Lk, q.device), float("-inf"))
    if key_lengths is not None:
        keep = torch.arange(Lk, device=q.device)[None, :] < key_lengths.to(q.device)[:, None]
        s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
    return torch.matmul(torch.softmax(s, -1), v)


@torch.library.register_kernel("narvl::query_attention_fwd", ("cpu", "cuda"))
def _fwd_kernel(q, k, v, key_lengths, attn_bias, scale):
    if _triton(q):
        return _tk().attention_fwd(q, k, v, key_lengths, attn_bias, scale)
    return plain_fwd(q, k, v, key_lengths, attn_bias, scale)


@torch.library.register_kernel("narvl::query_attention_bwd", ("cpu", "cuda"))
def _bwd_kernel(grad_out, q, k, v, out, lse, key_lengths, attn_bias, scale, bias_grad):
    if _triton(q):
        return _tk().attention_bwd(grad_out, q, k, v, out, lse, key_lengths, attn_bias, scale, bias_grad)
    p = torch.exp(_cpu_probs(q, k, key_lengths, attn_bias, scale) - _acc(lse)[..., None])
    do = _acc(grad_out)
    dv = torch.matmul(p.transpose(-1, -2), do)
    delta = (do * _acc(out)).sum(-1, keepdim=True)
    ds = p * (torch.matmul(do, _acc(v).transpose(-1, -2)) - delta)
    dq = torch.matmul(ds, _acc(k)) * scale
    dk = torch.matmul(ds.transpose(-1, -2), _acc(q)) * scale
    if attn_bias is not None and bias_grad:
        db = (ds.sum(0) if attn_bias.dim() == 3 else ds).to(attn_bias.dtype)
    else:
        db = q.new_empty(0)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), db


def _sdpa(q, k, v, key_lengths, attn_bias, scale, full_lengths):
    mask = None
    if not full_lengths:
        keep = torch.arange(k.shape[2], device=q.device)[None, :] < key_lengths[:, None]
        mask = torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, float("-inf"))[:, None, None, :]
    if attn_bias is not None:
        mask = attn_bias if mask is None else attn_bias + mask
    if mask is not None and mask.dim() == 3:
        mask = mask[None]  # a 4-D mask keeps SDPA on its fused CPU kernel (3-D falls back to math)
    if torch.compiler.is_exporting():
        # torch.export (export_onnx): softmax attention in plain ops. The trace records the
        # layout SDPA's fused CPU kernel returns (heads interleaved), which its decomposition
        # into ONNX-convertible ops does not keep, so the reshapes after it would not apply.
        s = torch.matmul(q, k.transpose(-1, -2)) * scale
        return torch.matmul(torch.softmax(s if mask is None else s + mask, -1), v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@torch.library.impl("narvl::query_attention", "CompositeImplicitAutograd")
def _route(q, k, v, key_lengths, attn_bias, scale, causal):
    """``narvl::query_attention``: the route of every ``query_attention`` call (module
    docstring). ``key_lengths`` None: every key is valid (no mask is built)."""
    full = key_lengths is None
    if causal:
        keep = _causal_keep(q.shape[2], k.shape[2], q.device)
        b = torch.zeros((), dtype=q.dtype, device=q.device) if attn_bias is None else attn_bias.to(q.dtype)
        b = torch.where(keep, b, torch.full((), float("-inf"), dtype=q.dtype, device=q.device))
        return _sdpa(q, k, v, key_lengths, b, scale, full)
    if _backend.resolve(q.device) == "cpp":
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, attn_bias))
        if not (needs_grad and k.shape[2] <= _CPU_OP_MAX_KEYS):
            return _sdpa(q, k, v, key_lengths, attn_bias, scale, full)
    if full:
        key_lengths = checks.full_lengths(q.shape[0], k.shape[2], q.device)
    return _OPS.query_attention_fwd(q, k, v, key_lengths, attn_bias, scale)[0]


GPU_MAX_HEAD_DIM = 128


def query_attention(q, k, v, key_lengths=None, attn_bias=None, scale=None, causal=False):
    """Attention of a few learnable queries into long padded keys, with a trainable bias.

    q: (B, H, Lq, D); k, v: (B, H, Lk, D); key_lengths: (B,) in [1, Lk] (keys j >= key_lengths[b]
    are masked; default all); attn_bias: (H, Lq, Lk) shared over the batch or (B, H, Lq, Lk),
    additive, differentiable; scale: default D**-0.5; causal: query i sees keys j <= i + Lk - Lq
    (Lq <= Lk; the AR baseline's teacher-forced decoder).
        out = softmax(q k^T * scale + attn_bias + mask) v
    Returns (B, H, Lq, D) in q's dtype (fp32 / fp16 / bf16); gradients for q, k, v and attn_bias.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, L, D), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch mismatch: q {B}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[1] != H or v.shape[1] != H:
        raise ValueError(f"head mismatch: q {H}, k {k.shape[1]}, v {v.shape[1]}")
    if k.shape[3] != D or v.shape[3] != D:
        raise ValueError(f"head-dim mismatch: q {D}, k {k.shape[3]}, v {v.shape[3]}")
    if v.shape[2] != Lk:
        raise ValueError(f"k and v key lengths differ: {Lk} vs {v.shape[2]}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError("q, k, v must be on one device")
    if B == 0 or Lq == 0 or Lk == 0 or H == 0 or D == 0:
        raise ValueError(f"empty attention input: q {tuple(q.shape)}, k {tuple(k.shape)}")
    full = key_lengths is None
    if not full:
        if isinstance(key_lengths, (list, tuple)):
            key_lengths = torch.tensor(key_lengths)
        if not isinstance(key_lengths, torch.Tensor) or key_lengths.is_floating_point():
            raise TypeError("key_lengths must be an integer tensor, list or tuple")
        if key_lengths.shape != (B,):
            raise ValueError(f"key_lengths must have shape ({B},), got {tuple(key_lengths.shape)}")
        key_lengths = key_lengths.to(device=q.device, dtype=torch.long)
        if checks.enabled():
            if checks.on_host(q.device):
                lo, hi = (int(t) for t in torch.aminmax(key_lengths))
                if lo < 1 or hi > Lk:
                    raise ValueError(f"key_lengths must lie in [1, {Lk}], got {key_lengths.tolist()}")
                full = lo == Lk  # every key valid: no mask to build (CPU SDPA route)
            else:  # asserted on the device, no synchronisation
                torch.ops.narvl.assert_in_range(key_lengths, 1, Lk, "key_lengths must lie in [1, Lk]")
    if attn_bias is not None:
        if not isinstance(attn_bias, torch.Tensor) or not attn_bias.is_floating_point():
            raise TypeError("attn_bias must be a floating-point tensor")
        if tuple(attn_bias.shape) not in ((H, Lq, Lk), (B, H, Lq, Lk)):
            raise ValueError(f"attn_bias must be ({H}, {Lq}, {Lk}) or ({B}, {H}, {Lq}, {Lk}), "
                             f"got {tuple(attn_bias.shape)}")
        attn_bias = attn_bias.to(q.device)
    scale = D ** -0.5 if scale is None else float(scale)
    if causal:
        if Lq > Lk:
            raise ValueError(f"causal attention needs Lq <= Lk, got Lq = {Lq}, Lk = {Lk}")
    elif _backend.resolve(q.device) == "triton":  # the GPU kernels' limits (sm_80 / sm_90)
        if D > GPU_MAX_HEAD_DIM:
            raise ValueError(f"head dim {D} exceeds the GPU kernels' maximum of {GPU_MAX_HEAD_DIM}")
        if q.dtype == torch.float64 and q.device.type == "cuda":  # the interpreter takes it
            raise ValueError("float64 attention is not supported by the GPU kernels (its tiles exceed "
                             "sm_80's shared memory); use float32, bfloat16 or float16")
    return _OPS.query_attention(q, k, v, None if full else key_lengths, attn_bias, scale, bool(causal))
