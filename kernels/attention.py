"""Triton kernels for learnable-query attention with key lengths and a trainable additive bias.

Shapes: q (B, H, Lq, D), k and v (B, H, Lk, D), key_lengths (B,), bias (B or 1, H, Lq, Lk)
(a shared bias is passed with batch stride 0). NARVL's decoders have few queries (3 to ~100) and
long padded keys, so all queries of a (b, h) fit one block and the key axis carries the work.

Forward (``_fwd_kernel``): one program per (b*h, key split, query block); online softmax over the
keys of its split (keys j >= key_lengths[b] masked by index), fp32 accumulation, the log-sum-exp
saved. When B*H*ceil(Lq/BLOCK_M) cannot fill the GPU the key axis is split (flash-decoding) and
``_combine_kernel`` merges the partial (max, sum, accumulator) triples.
Backward: ``_dkdv_kernel`` (one program per (b*h, key block): dV = P^T dO, dK = dS^T Q * scale,
and dS written out for the bias gradient) and ``_dq_kernel`` (one program per (b*h, query
block): dQ = dS K * scale), with dS = P * (dO V^T - delta), delta = rowsum(dO * O). dbias is dS
(summed over the batch for a shared bias). No atomics: deterministic. Offsets are int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import settings


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    """a @ b with fp32 accumulation: the native dot in the operands' dtype (fp16/bf16 MMA on the
    GPU; the same dot under the interpreter, see kernels/_interpreter.py)."""
    return tl.dot(a, b, input_precision=PREC).to(tl.float32)


@triton.jit
def _scores(q, k, b_ptrs, bmask, scale, HAS_BIAS: tl.constexpr, PREC: tl.constexpr):
    """q k^T * scale (+ bias tile), fp32; k is an already-loaded (BLOCK_N, BLOCK_D) tile."""
    s = _mm(q, tl.trans(k), PREC) * scale
    if HAS_BIAS:
        s += tl.load(b_ptrs, mask=bmask, other=0.0).to(tl.float32)
    return s


@triton.jit
def _fwd_kernel(Q, K, V, BIAS, LENS, O, LSE, PO, PM, PL,
                sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sbb, sbh, sbm, sbn, sob, soh, som,
                H, Lq, Lk, D, scale, keys_per_split, NSPLIT,
                HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1).to(tl.int64)
    mb = tl.program_id(2).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mm = offs_m < Lq
    dm = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :],
                mask=mm[:, None] & dm[None, :], other=0.0)
    kl = tl.load(LENS + b).to(tl.int64)
    start = sp * keys_per_split
    end = tl.minimum(start + keys_per_split, kl)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nm = offs_n < end
        k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :],
                    mask=nm[:, None] & dm[None, :], other=0.0)
        s = _scores(q, k,
                    BIAS + b * sbb + h * sbh + offs_m[:, None] * sbm + offs_n[None, :] * sbn,
                    mm[:, None] & nm[None, :], scale, HAS_BIAS, PREC)
        s = tl.where(nm[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        dead = m_new == float("-inf")
        alpha = tl.where(dead, 0.0, tl.exp(m_i - m_new))
        p = tl.where(dead[:, None], 0.0, tl.exp(s - m_new[:, None]))
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :],
                    mask=nm[:, None] & dm[None, :], other=0.0)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, PREC)
        m_i = m_new
    if SPLIT:
        row = (bh * NSPLIT + sp) * Lq + offs_m
        tl.store(PM + row, m_i, mask=mm)
        tl.store(PL + row, l_i, mask=mm)
        tl.store(PO + row[:, None] * BLOCK_D + offs_d[None, :], acc, mask=mm[:, None])
    else:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :],
                 o.to(O.dtype.element_ty), mask=mm[:, None] & dm[None, :])
        tl.store(LSE + bh * Lq + offs_m, m_i + tl.log(l_i), mask=mm)


@triton.jit
def _combine_kernel(PO, PM, PL, O, LSE, sob, soh, som, H, Lq, D, NSPLIT,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    mb = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mm = offs_m < Lq
    sm = offs_s < NSPLIT
    rows = (bh * NSPLIT + offs_s[:, None]) * Lq + offs_m[None, :]  # (S, M)
    pm = tl.load(PM + rows, mask=sm[:, None] & mm[None, :], other=float("-inf"))
    pl = tl.load(PL + rows, mask=sm[:, None] & mm[None, :], other=0.0)
    M = tl.max(pm, 0)
    w = tl.where(pm == float("-inf"), 0.0, tl.exp(pm - M[None, :]))
    L = tl.sum(w * pl, 0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for s in range(0, NSPLIT):
        r = (bh * NSPLIT + s) * Lq + offs_m
        ws = tl.sum(tl.where(offs_s[:, None] == s, w, 0.0), 0)
        acc += ws[:, None] * tl.load(PO + r[:, None] * BLOCK_D + offs_d[None, :], mask=mm[:, None],
                                     other=0.0)
    o = acc / tl.where(L > 0, L, 1.0)[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :],
             o.to(O.dtype.element_ty), mask=mm[:, None] & (offs_d < D)[None, :])
    tl.store(LSE + bh * Lq + offs_m, M + tl.log(L), mask=mm)


@triton.jit
def _probs(q, k, b_ptrs, bmask, nm, lse, scale, HAS_BIAS: tl.constexpr, PREC: tl.constexpr):
    s = _scores(q, k, b_ptrs, bmask, scale, HAS_BIAS, PREC)
    return tl.where(nm[None, :] & (lse[:, None] > float("-inf")), tl.exp(s - lse[:, None]), 0.0)


@triton.jit
def _dkdv_kernel(Q, K, V, BIAS, LENS, DO, LSE, DELTA, DK, DV, DS,
                 sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sbb, sbh, sbm, sbn,
                 H, Lq, Lk, D, scale,
                 HAS_BIAS: tl.constexpr, STORE_DS: tl.constexpr, PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    nb = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dm = offs_d < D
    kl = tl.load(LENS + b).to(tl.int64)
    nm = offs_n < kl
    kmask = (offs_n < Lk)[:, None] & dm[None, :]
    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :], mask=kmask, other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :], mask=kmask, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for m0 in range(0, Lq, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mm = offs_m < Lq
        qm = mm[:, None] & dm[None, :]
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :], mask=qm, other=0.0)
        do = tl.load(DO + bh * Lq * BLOCK_D + offs_m[:, None] * BLOCK_D + offs_d[None, :],
                     mask=mm[:, None], other=0.0)
        lse = tl.load(LSE + bh * Lq + offs_m, mask=mm, other=float("-inf"))
        delta = tl.load(DELTA + bh * Lq + offs_m, mask=mm, other=0.0)
        p = _probs(q, k, BIAS + b * sbb + h * sbh + offs_m[:, None] * sbm + offs_n[None, :] * sbn,
                   mm[:, None] & (offs_n < Lk)[None, :], nm, lse, scale, HAS_BIAS, PREC)
        dv += _mm(tl.trans(p.to(do.dtype)), do, PREC)
        dp = _mm(do, tl.trans(v), PREC)
        ds = p * (dp - delta[:, None])
        dk += _mm(tl.trans(ds.to(q.dtype)), q, PREC)
        if STORE_DS:
            tl.store(DS + bh * Lq * Lk + offs_m[:, None] * Lk + offs_n[None, :], ds,
                     mask=mm[:, None] & (offs_n < Lk)[None, :])
    tl.store(DK + bh * Lk * D + offs_n[:, None] * D + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=kmask)
    tl.store(DV + bh * Lk * D + offs_n[:, None] * D + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=kmask)


@triton.jit
def _dq_kernel(Q, K, V, BIAS, LENS, DO, LSE, DELTA, DQ,
               sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sbb, sbh, sbm, sbn,
               H, Lq, Lk, D, scale,
               HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    mb = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mm = offs_m < Lq
    dm = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :],
                mask=mm[:, None] & dm[None, :], other=0.0)
    do = tl.load(DO + bh * Lq * BLOCK_D + offs_m[:, None] * BLOCK_D + offs_d[None, :],
                 mask=mm[:, None], other=0.0)
    lse = tl.load(LSE + bh * Lq + offs_m, mask=mm, other=float("-inf"))
    delta = tl.load(DELTA + bh * Lq + offs_m, mask=mm, other=0.0)
    kl = tl.load(LENS + b).to(tl.int64)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(0, kl, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nm = offs_n < kl
        kmask = nm[:, None] & dm[None, :]
        k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :], mask=kmask, other=0.0)
        v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :], mask=kmask, other=0.0)
        p = _probs(q, k, BIAS + b * sbb + h * sbh + offs_m[:, None] * sbm + offs_n[None, :] * sbn,
                   mm[:, None] & nm[None, :], nm, lse, scale, HAS_BIAS, PREC)
        dp = _mm(do, tl.trans(v), PREC)
        ds = p * (dp - delta[:, None])
        dq += _mm(ds.to(k.dtype), k, PREC)
    tl.store(DQ + bh * Lq * D + offs_m[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=mm[:, None] & dm[None, :])


@triton.jit
def _bwd_prep_kernel(GO, O, DO, DELTA, sgb, sgh, sgm, sgd, sob, soh, som, H, Lq, D,
                     BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # the backward's inputs in one pass: dO copied into a zero-padded (Lq, BLOCK_D) tile per
    # head in q's dtype (the dots' operand), and delta = rowsum(dO * O) in fp32; dO is read with
    # its own strides (an expanded gradient is not copied first)
    bh = tl.program_id(0).to(tl.int64)
    mb = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mm = offs_m < Lq
    m2 = mm[:, None] & (offs_d < D)[None, :]
    go = tl.load(GO + b * sgb + h * sgh + offs_m[:, None] * sgm + offs_d[None, :] * sgd, mask=m2,
                 other=0.0)
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], mask=m2, other=0.0)
    delta = tl.sum(go.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DO + bh * Lq * BLOCK_D + offs_m[:, None] * BLOCK_D + offs_d[None, :],
             go.to(DO.dtype.element_ty), mask=mm[:, None])
    tl.store(DELTA + bh * Lq + offs_m, delta, mask=mm)


# ----------------------------------------------------------------------------------- launchers


def _blocks(Lq, D):
    return max(16, min(64, triton.next_power_of_2(Lq))), max(16, triton.next_power_of_2(D))


# Triton picks interpreter or compiler when the kernels are defined, from the same variable.
_INTERPRET = settings.triton_interpret()


def _prec(x):
    """The dots' input precision. fp32: "tf32x3" (each operand split into two tf32 parts, three
    tensor-core products: about fp32's accuracy, where the FMA path of "ieee" spills kilobytes
    in the backward); fp64 (the interpreter only): "ieee"; fp16/bf16 products are exact whatever
    it says."""
    if x.dtype == torch.float32:
        return "tf32x3"
    return "ieee"


def _bias_strides(bias, B):
    if bias is None:
        return None, (0, 0, 0, 0)
    if bias.stride(-1) != 1:
        bias = bias.contiguous()
    if bias.dim() == 3:
        return bias, (0, bias.stride(0), bias.stride(1), bias.stride(2))
    return bias, (bias.stride(0), bias.stride(1), bias.stride(2), bias.stride(3))


def _sm_count(device):
    """SMs of the GPU the kernels are compiled for: the active Triton driver's (a real GPU, or a
    stub that compiles for one on a CPU machine, bench/gpu_resources.py); 1 in the interpreter."""
    if _INTERPRET:
        return 1
    index = device.index if device.type == "cuda" and device.index is not None else 0
    return triton.runtime.driver.active.utils.get_device_properties(index)["multiprocessor_count"]


def _warps(x, BLOCK_D):
    """fp32 tiles of head dim >= 64 take twice the threads: with 4 warps the forward (D 80/128)
    and dQ kernels spilled up to 1.3 KB and 0.5 KB per thread on sm_90, with 8 none do."""
    return 8 if x.dtype in (torch.float32, torch.float64) and BLOCK_D >= 64 else 4


def _bwd_blocks(x, BLOCK_M, BLOCK_D):
    """(the dK/dV kernel's query block, the key block of both backward kernels). fp32 takes
    smaller tiles than the 16-bit dtypes, for its tf32x3 dots hold two tf32 parts of each operand:
    32 keys from head dim 64 (with 64, dK/dV needed 0.5-0.9 KB of local memory per thread on
    sm_80), and 16 query rows at head dims 80-128 (with 32, 5.6-5.8 KB on sm_90, 7.8 KB on sm_80
    with 4 warps). bench/results/gpu_resources.json has the table."""
    wide = x.dtype in (torch.float32, torch.float64) and BLOCK_D >= 64
    block_n = 32 if (BLOCK_D > 64 or wide) else 64
    return (16 if wide and BLOCK_D >= 128 else BLOCK_M), block_n


def _last_contig(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def attention_fwd(q, k, v, key_lengths, bias, scale, num_splits=None):
    """-> (out (B, H, Lq, D) in q's dtype, lse (B, H, Lq) float32; float64 for float64 q, as the
    op's fake kernel says; only the interpreter takes float64, and accumulates in float32)."""
    q, k, v = _last_contig(q), _last_contig(k), _last_contig(v)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    dev = q.device
    BLOCK_M, BLOCK_D = _blocks(Lq, D)
    BLOCK_N = 64 if BLOCK_D <= 64 else 32
    mblocks = triton.cdiv(Lq, BLOCK_M)
    if num_splits is None:  # split the keys until the grid covers the SMs twice
        tiles = B * H * mblocks
        num_splits = max(1, min(triton.cdiv(Lk, 4 * BLOCK_N), triton.cdiv(2 * _sm_count(dev), tiles)))
    keys_per_split = triton.cdiv(triton.cdiv(Lk, num_splits), BLOCK_N) * BLOCK_N
    num_splits = triton.cdiv(Lk, keys_per_split)
    out = torch.empty(B, H, Lq, D, dtype=q.dtype, device=dev)
    lse = torch.empty(B, H, Lq, dtype=torch.float32, device=dev)
    bias_t, sb = _bias_strides(bias, B)
    lens = key_lengths.to(device=dev, dtype=torch.int64).contiguous()
    split = num_splits > 1
    if split:
        po = torch.empty(B * H * num_splits * Lq, BLOCK_D, dtype=torch.float32, device=dev)
        pm = torch.empty(B * H * num_splits * Lq, dtype=torch.float32, device=dev)
        pl = torch.empty_like(pm)
    else:
        po = pm = pl = lse
    _fwd_kernel[(B * H, num_splits, mblocks)](
        q, k, v, q if bias_t is None else bias_t, lens, out, lse, po, pm, pl,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), *sb, out.stride(0), out.stride(1), out.stride(2),
        H, Lq, Lk, D, float(scale), keys_per_split, num_splits,
        HAS_BIAS=bias_t is not None, SPLIT=split, PREC=_prec(q),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=_warps(q, BLOCK_D))
    if split:
        _combine_kernel[(B * H, mblocks)](
            po, pm, pl, out, lse, out.stride(0), out.stride(1), out.stride(2), H, Lq, D, num_splits,
            BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
            num_warps=4)
    return out, (lse.double() if q.dtype == torch.float64 else lse)


def attention_bwd(grad_out, q, k, v, out, lse, key_lengths, bias, scale, bias_grad):
    """-> (dq, dk, dv, dbias) with dbias of the bias's shape (an empty tensor when not needed)."""
    q, k, v = _last_contig(q), _last_contig(k), _last_contig(v)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    dev = q.device
    BLOCK_M, BLOCK_D = _blocks(Lq, D)
    BLOCK_M_KV, BLOCK_N = _bwd_blocks(q, BLOCK_M, BLOCK_D)
    do = torch.empty(B, H, Lq, BLOCK_D, dtype=q.dtype, device=dev)  # the dots' operands: q's dtype
    delta = torch.empty(B, H, Lq, dtype=torch.float32, device=dev)
    out = _last_contig(out)
    _bwd_prep_kernel[(B * H, triton.cdiv(Lq, BLOCK_M))](
        grad_out, out, do, delta, *grad_out.stride(), out.stride(0), out.stride(1), out.stride(2),
        H, Lq, D, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, num_warps=4)
    dq = torch.empty(B, H, Lq, D, dtype=q.dtype, device=dev)
    dk = torch.empty(B, H, Lk, D, dtype=k.dtype, device=dev)
    dv = torch.empty(B, H, Lk, D, dtype=v.dtype, device=dev)
    bias_t, sb = _bias_strides(bias, B)
    want_ds = bias_t is not None and bias_grad
    ds = torch.empty(B, H, Lq, Lk, dtype=torch.float32, device=dev) if want_ds else lse
    lens = key_lengths.to(device=dev, dtype=torch.int64).contiguous()
    lse = lse.float().contiguous()
    common = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
              v.stride(0), v.stride(1), v.stride(2), *sb, H, Lq, Lk, D, float(scale))
    bias_arg = q if bias_t is None else bias_t
    _dkdv_kernel[(B * H, triton.cdiv(Lk, BLOCK_N))](
        q, k, v, bias_arg, lens, do, lse, delta, dk, dv, ds, *common,
        HAS_BIAS=bias_t is not None, STORE_DS=want_ds, PREC=_prec(q),
        BLOCK_M=BLOCK_M_KV, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        num_warps=_warps(q, BLOCK_D))
    _dq_kernel[(B * H, triton.cdiv(Lq, BLOCK_M))](
        q, k, v, bias_arg, lens, do, lse, delta, dq, *common,
        HAS_BIAS=bias_t is not None, PREC=_prec(q), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        BLOCK_D=BLOCK_D, num_warps=_warps(q, BLOCK_D))
    if not want_ds:
        return dq, dk, dv, q.new_empty(0)
    dbias = ds.sum(0) if bias.dim() == 3 else ds
    return dq, dk, dv, dbias.to(bias.dtype)
