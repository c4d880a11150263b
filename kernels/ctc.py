"""Triton kernels for CTC / Q-CTC: row log-sum-exp + gather, lattice recursion, gradient.

Stage 1 (``_row_kernel``, one program per (b, n) row): an online max / sum-exp over V in
BLOCK_V chunks (fp32 accumulation, fp64 for fp64 input), the plain row sum (for label
smoothing), and the gather of the <= S+1 slot emissions e[b, n, k] = x[col_k] - lse.
Stage 2 (``_lattice_kernel``, one program per sample): the alpha recursion in log space over
the 2L+1 lattice positions held in one block, through a global scratch row per frame (a barrier
separates the store of frame t from the shifted loads of frame t+1): the nll and the smoothing
term. The backward runs the same kernel with NEED_POST, adding beta and the per-column
posteriors post[b, t, k] (duplicate labels summed), from the emissions the forward saved.
Stage 3 (``_qctc_grad_kernel``, one program per row, looping over V chunks): grad = A * softmax + C,
then the label / blank columns are overwritten with their exact value minus gn * post; NaN/inf
input gives F.ctc_loss's NaN pattern (see the kernel).
No atomics anywhere, so results are deterministic; offsets are int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import settings


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _out_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@triton.jit
def _row_kernel(X, stride_b, stride_n, N, V, TGT, stride_tb, TL, QL, LSE, ROWSUM, EM, K, blank,
                NORMALIZED: tl.constexpr, HAS_QL: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    # every output entry is written here (inactive rows: lse = rowsum = 0, em = -inf), so the
    # launcher allocates without filling. Lengths are clamped to their ranges and labels outside
    # [0, V) gather nothing, so out-of-range values (reported by the checks) never read outside
    # the tensors.
    r = tl.program_id(0).to(tl.int64)
    b = r // N
    n = r % N
    nb = N
    if HAS_QL:
        nb = tl.minimum(tl.maximum(tl.load(QL + b), 0), N)
    L = tl.minimum(tl.maximum(tl.load(TL + b), 0), K - 1)
    row = X + b * stride_b + n * stride_n
    ks = tl.arange(0, BLOCK_K)
    if n < nb:
        lse = tl.zeros((), dtype=ACC)
        if not NORMALIZED:
            m = tl.full((BLOCK_V,), float("-inf"), ACC)
            s = tl.zeros((BLOCK_V,), ACC)
            rs = tl.zeros((BLOCK_V,), ACC)
            for v0 in range(0, V, BLOCK_V):
                offs = v0 + tl.arange(0, BLOCK_V)
                mask = offs < V
                x = tl.load(row + offs, mask=mask, other=float("-inf")).to(ACC)
                # NaN must reach lse (as torch.logsumexp), so the running max keeps it
                m_new = tl.maximum(m, x, propagate_nan=tl.PropagateNan.ALL)
                dead = m_new == float("-inf")
                s = s * tl.where(dead, 0.0, tl.exp(m - m_new)) + tl.where(dead, 0.0, tl.exp(x - m_new))
                rs += tl.where(mask, x, 0.0)
                m = m_new
            mx = tl.max(m, 0)
            tot = tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp(m - mx)), 0)
            lse = mx + tl.log(tot)
            tl.store(LSE + r, lse)
            tl.store(ROWSUM + r, tl.sum(rs, 0))
        is_blank = ks == K - 1
        lab = tl.load(TGT + b * stride_tb + ks, mask=ks < L, other=0)
        valid = ((ks < L) & (lab >= 0) & (lab < V)) | is_blank
        col = tl.where(is_blank, blank, lab)
        xv = tl.load(row + col, mask=valid, other=float("-inf")).to(ACC)
        em = tl.where(valid, xv - lse, float("-inf"))
        tl.store(EM + r * K + ks, em, mask=ks < K)
    else:
        if not NORMALIZED:
            tl.store(LSE + r, tl.zeros((), dtype=ACC))
            tl.store(ROWSUM + r, tl.zeros((), dtype=ACC))
        tl.store(EM + r * K + ks, tl.full((BLOCK_K,), float("-inf"), ACC), mask=ks < K)


@triton.jit
def _lse3(a, b, c):
    # NaN must survive (a NaN input is reported as bad input, never turned into -inf)
    m = tl.maximum(tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL), c,
                   propagate_nan=tl.PropagateNan.ALL)
    ms = tl.where(m == float("-inf"), 0.0, m)
    tot = tl.exp(a - ms) + tl.exp(b - ms) + tl.exp(c - ms)
    return tl.where(m == float("-inf"), float("-inf"), ms + tl.log(tot))


@triton.jit
def _lattice_kernel(EM, TGT, stride_tb, TL, QL, NLL, POST, ALPHA, BETA, T, K, LSE, ROWSUM, SMOOTH,
                    V, FLAGS, blank, SMOOTH_ON: tl.constexpr, NEED_POST: tl.constexpr,
                    HAS_QL: tl.constexpr, CHECK: tl.constexpr, BLOCK_W: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, ACC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    tb_raw = T
    if HAS_QL:
        tb_raw = tl.load(QL + b).to(tl.int64)
    L_raw = tl.load(TL + b).to(tl.int64)
    # clamped: out-of-range lengths (reported by CHECK) never index outside the tensors
    tb = tl.minimum(tl.maximum(tb_raw, 0), T).to(tl.int64)
    L = tl.minimum(tl.maximum(L_raw, 0), K - 1).to(tl.int64)
    if CHECK:  # this sample's faults as bits: 1 target length, 2 query length, 4 label, 8 blank
        kc = tl.arange(0, BLOCK_K)
        labc = tl.load(TGT + b * stride_tb + kc, mask=kc < L, other=0)
        live = kc < L
        oob = tl.sum((live & ((labc < 0) | (labc >= V))).to(tl.int32), 0)
        isb = tl.sum((live & (labc == blank)).to(tl.int32), 0)
        fl = tl.where((L_raw < 0) | (L_raw > K - 1), 1, 0) + tl.where((tb_raw < 0) | (tb_raw > T), 2, 0)
        fl = fl + tl.where(oob > 0, 4, 0) + tl.where(isb > 0, 8, 0)
        tl.store(FLAGS + b, fl.to(tl.int32))
    W = 2 * L + 1
    s = tl.arange(0, BLOCK_W)
    odd = (s % 2) == 1
    kidx = s // 2
    slot = tl.where(odd, kidx, K - 1)
    valid = s < W
    tgt = TGT + b * stride_tb
    lab = tl.load(tgt + kidx, mask=odd & valid, other=-1)
    lab_prev = tl.load(tgt + kidx - 1, mask=odd & valid & (s >= 3), other=-1)
    skip = odd & valid & (s >= 3) & (lab != lab_prev)
    lab_next = tl.load(tgt + kidx + 1, mask=odd & (s + 2 < W), other=-1)
    skip_next = odd & (s + 2 < W) & (lab_next != lab)
    em = EM + b * T * K
    ab = ALPHA + b * T * BLOCK_W
    bb = BETA + b * T * BLOCK_W
    ninf = float("-inf")
    has = tb > 0
    has_v = (s * 0 + tb) > 0  # the same, as a block (masks must be blocks)

    # alpha
    a = tl.load(em + slot, mask=valid & has_v, other=ninf).to(ACC)
    a = tl.where(s < 2, a, ninf)
    tl.store(ab + s, a, mask=has_v)
    for t in range(1, tb):
        tl.debug_barrier()
        base = ab + (t - 1) * BLOCK_W
        p1 = tl.load(base + s - 1, mask=s >= 1, other=ninf)
        p2 = tl.load(base + s - 2, mask=skip, other=ninf)
        et = tl.load(em + t * K + slot, mask=valid, other=ninf).to(ACC)
        a = tl.where(valid, _lse3(a, p1, p2) + et, ninf)
        tl.store(ab + t * BLOCK_W + s, a)
    ends = (s == W - 1) | (s == W - 2)
    fin = tl.where(ends & valid, a, ninf)
    mf = tl.max(fin, 0)
    mfs = tl.where(mf == ninf, 0.0, mf)
    ll = tl.where(mf == ninf, ninf, mfs + tl.log(tl.sum(tl.exp(fin - mfs), 0)))
    nll = tl.where(tl.sum(tl.where(fin != fin, 1, 0), 0) > 0, float("nan"), -ll)
    nll = tl.where(has, nll, tl.where(L == 0, 0.0, float("inf")))
    tl.store(NLL + b, nll)

    if NEED_POST:  # backward only: beta, then the per-column posteriors
        # beta
        tlast = tl.maximum(tb - 1, 0)
        bcur = tl.load(em + tlast * K + slot, mask=valid & has_v, other=ninf).to(ACC)
        bcur = tl.where(ends, bcur, ninf)
        tl.store(bb + tlast * BLOCK_W + s, bcur, mask=has_v)
        for i in range(1, tb):
            t = tb - 1 - i
            tl.debug_barrier()
            base = bb + (t + 1) * BLOCK_W
            n1 = tl.load(base + s + 1, mask=s + 1 < W, other=ninf)
            n2 = tl.load(base + s + 2, mask=skip_next, other=ninf)
            et = tl.load(em + t * K + slot, mask=valid, other=ninf).to(ACC)
            bcur = tl.where(valid, _lse3(bcur, n1, n2) + et, ninf)
            tl.store(bb + t * BLOCK_W + s, bcur)
        tl.debug_barrier()

        # posteriors per column
        finite = (nll == nll) & (nll != float("inf"))
        kk = tl.arange(0, BLOCK_K)
        labk = tl.load(tgt + kk, mask=kk < L, other=-2)
        eq = (labk[:, None] == lab[None, :]) & (odd & valid)[None, :]
        for t in range(0, tb):
            at = tl.load(ab + t * BLOCK_W + s)
            bt = tl.load(bb + t * BLOCK_W + s)
            et = tl.load(em + t * K + slot, mask=valid, other=ninf).to(ACC)
            dead = (at == ninf) | (bt == ninf) | (~valid)
            g = tl.where(dead, 0.0, tl.exp(at + bt - et + nll))
            g = tl.where(finite, g, float("nan"))
            gblank = tl.sum(tl.where(odd | (~valid), 0.0, g), 0)
            pk = tl.sum(tl.where(eq, g[None, :], 0.0), 1)
            pk = tl.where(kk < L, pk, 0.0)
            out = tl.where(kk == K - 1, gblank, pk)
            tl.store(POST + (b * T + t) * K + kk, out, mask=kk < K)

    if SMOOTH_ON:
        acc = tl.zeros((BLOCK_T,), ACC)
        for t0 in range(0, T, BLOCK_T):
            ts = t0 + tl.arange(0, BLOCK_T)
            m = ts < tb
            rsum = tl.load(ROWSUM + b * T + ts, mask=m, other=0.0).to(ACC)
            lse = tl.load(LSE + b * T + ts, mask=m, other=0.0).to(ACC)
            acc += tl.where(m, rsum - V * lse, 0.0)
        denom = tl.maximum(tb, 1).to(ACC) * V
        tl.store(SMOOTH + b, tl.where(has, tl.sum(acc, 0) / denom, 0.0))


@triton.jit
def _qctc_grad_kernel(X, stride_b, stride_n, G, N, V, LSE, POST, NLL, K, TGT, stride_tb, TL, QL, GN,
                      GS, blank, B, gl_stride, eps, HAS_QL: tl.constexpr, FUSED: tl.constexpr,
                      REDUCTION: tl.constexpr, ZERO_INF: tl.constexpr, HAS_W: tl.constexpr,
                      SMOOTH_ON: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                      ACC: tl.constexpr):
    # one program per (b, n) row: grad = A * softmax + C over V chunks, then the label / blank
    # columns get their exact value minus gn * post. Non-finite input follows F.ctc_loss (after
    # log_softmax): a sample with a NaN nll, or an infinite one under a non-zero gn, is NaN
    # throughout; a row holding a -inf is NaN, unless zero_infinity zeroed the sample (nll = inf,
    # gn = 0).
    # The per-sample gradients gn = dloss/dnll_b and gs = dloss/dsmooth_b are read from GN / GS,
    # or with FUSED derived here from the loss's gradient (GN, scalar or (B,) with gl_stride 1)
    # and the reduction of qctc_loss: loss_b = w_b ((1 - eps) c_b - eps smooth_b), c_b = nll_b,
    # divided by max(L_b, 1) for 'mean' (REDUCTION 1; 0 'none', 2 'sum'), 0 for an infinite nll_b
    # under ZERO_INF; GS then holds the weights w_b (HAS_W).
    r = tl.program_id(0).to(tl.int64)
    b = r // N
    n = r % N
    nb = N
    if HAS_QL:
        nb = tl.minimum(tl.maximum(tl.load(QL + b), 0), N)
    L = tl.minimum(tl.maximum(tl.load(TL + b), 0), K - 1)
    active = n < nb
    nll = tl.load(NLL + b).to(ACC)
    if FUSED:
        g0 = tl.load(GN + b * gl_stride).to(ACC)
        if REDUCTION == 1:
            g0 = g0 / B
        w = 1.0
        if HAS_W:
            w = tl.load(GS + b).to(ACC)
        gn = g0 * w
        if REDUCTION == 1:
            gn = gn / tl.maximum(L, 1).to(ACC)
        gs = tl.zeros((), ACC)
        if SMOOTH_ON:
            gn = gn * (1.0 - eps)
            gs = -g0 * w * eps
        if ZERO_INF:
            gn = tl.where((nll == float("inf")) | (nll == float("-inf")), 0.0, gn)
    else:
        gn = tl.load(GN + b).to(ACC)
        gs = tl.load(GS + b).to(ACC)
    nbf = tl.maximum(nb, 1).to(ACC)
    A = gn - gs / nbf
    C = gs / (nbf * V)
    lse = tl.load(LSE + r).to(ACC)
    row = X + b * stride_b + n * stride_n
    grow = G + r * V
    neg = tl.zeros((BLOCK_V,), tl.int32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        x = tl.load(row + offs, mask=mask & ((offs * 0 + n) < nb), other=0.0).to(ACC)
        neg = neg | (mask & (x == float("-inf"))).to(tl.int32)
        g = tl.where(active, A * tl.exp(x - lse) + C, 0.0)
        tl.store(grow + offs, g.to(G.dtype.element_ty), mask=mask)
    poisoned = (nll != nll) | ((nll == float("inf")) & (gn != 0.0))
    zeroed = (nll == float("inf")) & (gn == 0.0)
    bad = active & (poisoned | ((tl.max(neg, 0) > 0) & (~zeroed)))
    tl.debug_barrier()
    kk = tl.arange(0, BLOCK_K)
    is_blank = kk == K - 1
    lab = tl.load(TGT + b * stride_tb + kk, mask=kk < L, other=0)
    col = tl.where(is_blank, blank, lab)
    fix = (((kk < L) & (lab >= 0) & (lab < V)) | is_blank) & ((kk * 0 + n) < nb)
    xc = tl.load(row + col, mask=fix, other=0.0).to(ACC)
    p = tl.load(POST + r * K + kk, mask=fix, other=0.0).to(ACC)
    corr = tl.where(gn != 0.0, gn * p, 0.0)
    val = A * tl.exp(xc - lse) + C - corr
    tl.store(grow + col, val.to(G.dtype.element_ty), mask=fix)
    if bad:
        tl.debug_barrier()
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            tl.store(grow + offs, tl.full((BLOCK_V,), float("nan"), ACC).to(G.dtype.element_ty),
                     mask=offs < V)


@triton.jit
def _ctc_grad_kernel(LP, lp_st, lp_sb, G, stride_t, stride_b, POST, NLL, T, C, K, TGT, stride_tb, TL,
                     IL, GN, blank, B, gl_stride, FUSED: tl.constexpr, REDUCTION: tl.constexpr,
                     ZERO_INF: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                     ACC: tl.constexpr):
    # one program per (b, t) row of the gradient w.r.t. log_probs: -gn * post on the label and
    # blank columns, 0 elsewhere; as F.ctc_loss, NaN at NaN / -inf log-probs (inf * gn at +inf
    # ones) and over every live frame
    # of a sample whose nll is NaN (or infinite under a non-zero gn); zero_infinity's zeroed
    # samples (nll = inf, gn = 0) get 0.
    # gn = dloss/dnll_b is read from GN, or with FUSED derived here from the loss's gradient (GN,
    # scalar or (B,) with gl_stride 1) and ctc_loss's reduction: c_b = nll_b, divided by
    # max(L_b, 1) and averaged for 'mean' (REDUCTION 1; 0 'none', 2 'sum'), 0 for an infinite
    # nll_b under ZERO_INF.
    r = tl.program_id(0).to(tl.int64)
    b = r // T
    t = r % T
    tb = tl.minimum(tl.maximum(tl.load(IL + b), 0), T)
    L = tl.minimum(tl.maximum(tl.load(TL + b), 0), K - 1)
    nll = tl.load(NLL + b).to(ACC)
    if FUSED:
        gn = tl.load(GN + b * gl_stride).to(ACC)
        if REDUCTION == 1:
            gn = gn / B / tl.maximum(L, 1).to(ACC)
        if ZERO_INF:
            gn = tl.where((nll == float("inf")) | (nll == float("-inf")), 0.0, gn)
    else:
        gn = tl.load(GN + b).to(ACC)
    # 0 / 1 scalars, broadcast into block masks below (masks must be blocks)
    live = ((t < tb) & ((nll != float("inf")) | (gn != 0.0))).to(tl.int32)  # not zero_infinity's
    poisoned = live * ((nll != nll) | (nll == float("inf"))).to(tl.int32)
    xrow = LP + t * lp_st + b * lp_sb
    grow = G + t * stride_t + b * stride_b
    for c0 in range(0, C, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        mask = offs < C
        x = tl.load(xrow + offs, mask=mask & ((offs * 0 + live) != 0), other=0.0).to(ACC)
        val = tl.where(x == float("inf"), float("inf") * gn, tl.where(x - x == 0.0, 0.0, float("nan")))
        val = tl.where((offs * 0 + poisoned) != 0, float("nan"), val)
        tl.store(grow + offs, val.to(G.dtype.element_ty), mask=mask)
    tl.debug_barrier()
    kk = tl.arange(0, BLOCK_K)
    is_blank = kk == K - 1
    lab = tl.load(TGT + b * stride_tb + kk, mask=kk < L, other=0)
    col = tl.where(is_blank, blank, lab)
    ok = (((kk < L) & (lab >= 0) & (lab < C)) | is_blank) & ((kk * 0 + live * (1 - poisoned)) != 0)
    xc = tl.load(xrow + col, mask=ok, other=0.0).to(ACC)
    p = tl.load(POST + (b * T + t) * K + kk, mask=ok, other=0.0).to(ACC)
    tl.store(grow + col, (-gn * p).to(G.dtype.element_ty), mask=ok & (xc - xc == 0.0))


# ----------------------------------------------------------------------------------- launchers


def _lengths(x, device):
    return x.to(device=device, dtype=torch.int64).contiguous()


def _stats_block(V):
    return max(16, min(4096, triton.next_power_of_2(V)))


def _row_block(V):
    """The row pass's chunk: 2048 wide with 8 warps ran the B256 caption row pass at 2.4 TB/s on
    an H100 (fp32), against 1.4 TB/s at 4096 (bench/gpu_tune.py, gpu_h100_tune.json)."""
    return max(16, min(2048, triton.next_power_of_2(V)))


def _lattice(em, targets, tl_, ql, T, lse, rowsum, V, smooth_on, need_post, acc, flags=None,
             blank=0):
    """Alpha (with need_post also beta + posteriors) per sample -> (nll, smooth, post or None).
    ql None: every sample has T frames. flags: an int32 (B,) tensor that receives each sample's
    fault bits (see _lattice_kernel), or None (no checks)."""
    B, _, K = em.shape
    S = K - 1
    dev = em.device
    odt = em.dtype
    bw = triton.next_power_of_2(2 * S + 1)
    nll = torch.empty(B, dtype=odt, device=dev)
    smooth = torch.empty(B, dtype=odt, device=dev) if smooth_on else nll
    # every entry the gradient kernels read (frames t < T_b) is written by the kernel
    post = torch.empty(B, T, K, dtype=odt, device=dev) if need_post else nll
    alpha = torch.empty(B, max(T, 1), bw, dtype=odt, device=dev)
    beta = torch.empty_like(alpha) if need_post else alpha
    _lattice_kernel[(B,)](
        em, targets, targets.stride(0), tl_, nll if ql is None else ql, nll, post, alpha, beta, T, K,
        lse, rowsum, smooth, V, nll if flags is None else flags, blank, SMOOTH_ON=smooth_on,
        NEED_POST=need_post, HAS_QL=ql is not None, CHECK=flags is not None, BLOCK_W=bw,
        BLOCK_K=triton.next_power_of_2(K), BLOCK_T=min(1024, triton.next_power_of_2(max(T, 1))),
        ACC=acc, num_warps=1 if bw <= 64 else 4)
    return nll, smooth, (post if need_post else None)


def _rows(logits, targets, tl_, ql, blank):
    """The row pass of Q-CTC: (lse (B, N), rowsum (B, N), em (B, N, S+1)), every entry written."""
    B, N, V = logits.shape
    dev = logits.device
    K = targets.shape[1] + 1
    odt, acc = _out_dtype(logits.dtype), _acc(logits.dtype)
    lse = torch.empty(B, N, dtype=odt, device=dev)
    rowsum = torch.empty(B, N, dtype=odt, device=dev)
    em = torch.empty(B, N, K, dtype=odt, device=dev)
    if B * N > 0:
        _row_kernel[(B * N,)](
            logits, logits.stride(0), logits.stride(1), N, V, targets, targets.stride(0), tl_,
            tl_ if ql is None else ql, lse, rowsum, em, K, blank, NORMALIZED=False,
            HAS_QL=ql is not None, BLOCK_V=_row_block(V), BLOCK_K=triton.next_power_of_2(K), ACC=acc,
            num_warps=8)
    return lse, rowsum, em


def qctc_fwd(logits, targets, target_lengths, query_lengths, blank):
    """logits: (B, N, V) -> (nll (B,), smooth (B,), lse (B, N), em (B, N, S+1)), fp32/fp64."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    V = logits.shape[2]
    dev = logits.device
    targets = targets.to(device=dev, dtype=torch.int64).contiguous()
    tl_, ql = _lengths(target_lengths, dev), _lengths(query_lengths, dev)
    lse, rowsum, em = _rows(logits, targets, tl_, ql, blank)
    nll, smooth, _ = _lattice(em, targets, tl_, ql, logits.shape[1], lse, rowsum, V, True, False,
                              _acc(logits.dtype))
    return nll, smooth, lse, em


def _grad(logits, lse, em, targets, tl_, ql, blank, gn, gs, fused=False, reduction="sum",
          zero_infinity=False, eps=0.0, has_w=False):
    B, N, V = logits.shape
    dev = logits.device
    K = targets.shape[1] + 1
    grad = torch.empty(B, N, V, dtype=logits.dtype, device=dev)
    if grad.numel() == 0:
        return grad
    acc = _acc(logits.dtype)
    em = em.to(_out_dtype(logits.dtype)).contiguous()
    nll, _, post = _lattice(em, targets, tl_, ql, N, em, em, V, False, True, acc)
    gl_stride = gn.stride(0) if gn.dim() else 0  # an expanded (B,) gradient is read in place
    _qctc_grad_kernel[(B * N,)](
        logits, logits.stride(0), logits.stride(1), grad, N, V, lse.contiguous(), post, nll,
        K, targets, targets.stride(0), tl_, tl_ if ql is None else ql, gn, gs, blank, B, gl_stride,
        float(eps), HAS_QL=ql is not None, FUSED=fused, REDUCTION=REDUCTIONS[reduction],
        ZERO_INF=bool(zero_infinity), HAS_W=has_w, SMOOTH_ON=eps != 0.0, BLOCK_V=_stats_block(V),
        BLOCK_K=triton.next_power_of_2(K), ACC=acc, num_warps=8)
    return grad


def qctc_bwd(grad_nll, grad_smooth, logits, lse, em, targets, target_lengths, query_lengths, blank):
    """Gradient of sum_b (grad_nll[b] * nll_b + grad_smooth[b] * smooth_b) w.r.t. logits (B, N, V)."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    dev = logits.device
    targets = targets.to(device=dev, dtype=torch.int64).contiguous()
    tl_, ql = _lengths(target_lengths, dev), _lengths(query_lengths, dev)
    return _grad(logits, lse, em, targets, tl_, ql, blank, grad_nll.contiguous(),
                 grad_smooth.contiguous())


# ------------------------------------------------------------- the whole loss in five launches

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}

#: the fault bits of _lattice_kernel's checks -> (argument, what is wrong), for the host's message,
#: per function (ctc_loss's frames are its input lengths)
FAULTS = {"qctc_loss": ((1, "target_lengths", "a target length is outside [0, targets.shape[1]]"),
                        (2, "query_lengths", "a query length is outside [0, N]"),
                        (4, "targets", "a live label is outside [0, V)"),
                        (8, "targets", "a live label equals the blank index")),
          "ctc_loss": ((1, "target_lengths", "a target length is outside [0, targets.shape[1]]"),
                       (2, "input_lengths", "an input length is outside [0, T]"),
                       (4, "targets", "a live label is outside [0, C)"),
                       (8, "targets", "a live label equals the blank index"))}


@triton.jit(debug=True)
def _qctc_reduce_kernel(NLL, SMOOTH, TL, W, FLAGS, LOSS, B, S, eps, REDUCTION: tl.constexpr,
                        ZERO_INF: tl.constexpr, HAS_W: tl.constexpr, SMOOTH_ON: tl.constexpr,
                        CHECK: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
                        CTC: tl.constexpr = False):
    # One program: loss_b = w_b ((1 - eps) c_b - eps smooth_b) from the lattice's per-sample
    # terms (c_b as in _qctc_grad_kernel), stored per sample or summed in a fixed order (the same
    # result on every run). With CHECK, the lattice's fault bits are asserted on the device: a
    # failing check stops the stream with its message at the next synchronisation, and the host
    # never waits for it. (Compiled with debug=True for the asserts; one small program.)
    acc = tl.zeros((BLOCK,), ACC)
    c1 = tl.zeros((BLOCK,), tl.int32)
    c2 = tl.zeros((BLOCK,), tl.int32)
    c4 = tl.zeros((BLOCK,), tl.int32)
    c8 = tl.zeros((BLOCK,), tl.int32)
    for b0 in range(0, B, BLOCK):
        bs = b0 + tl.arange(0, BLOCK)
        m = bs < B
        c = tl.load(NLL + bs, mask=m, other=0.0).to(ACC)
        if ZERO_INF:
            c = tl.where((c == float("inf")) | (c == float("-inf")), 0.0, c)
        if REDUCTION == 1:
            L = tl.minimum(tl.maximum(tl.load(TL + bs, mask=m, other=1), 0), S)
            c = c / tl.maximum(L, 1).to(ACC)
        loss = c
        if SMOOTH_ON:
            loss = (1.0 - eps) * c - eps * tl.load(SMOOTH + bs, mask=m, other=0.0).to(ACC)
        if HAS_W:
            loss = loss * tl.load(W + bs, mask=m, other=0.0).to(ACC)
        if REDUCTION == 0:
            tl.store(LOSS + bs, loss, mask=m)
        else:
            acc += tl.where(m, loss, 0.0)
        if CHECK:
            f = tl.load(FLAGS + bs, mask=m, other=0)
            c1 += (f & 1) != 0
            c2 += (f & 2) != 0
            c4 += (f & 4) != 0
            c8 += (f & 8) != 0
    if REDUCTION != 0:
        tot = tl.sum(acc, 0)
        if REDUCTION == 1:
            tot = tot / B
        tl.store(LOSS, tot)
    if CHECK:
        if CTC:  # narvl.ctc_loss: the frames are input_lengths, the classes C
            tl.device_assert(tl.sum(c1, 0) == 0,
                             "narvl.ctc_loss: a target length is outside [0, targets.shape[1]]")
            tl.device_assert(tl.sum(c2, 0) == 0, "narvl.ctc_loss: an input length is outside [0, T]")
            tl.device_assert(tl.sum(c4, 0) == 0, "narvl.ctc_loss: a live label is outside [0, C)")
            tl.device_assert(tl.sum(c8, 0) == 0,
                             "narvl.ctc_loss: a live label equals the blank index")
        else:
            tl.device_assert(tl.sum(c1, 0) == 0,
                             "narvl.qctc_loss: a target length is outside [0, targets.shape[1]]")
            tl.device_assert(tl.sum(c2, 0) == 0, "narvl.qctc_loss: a query length is outside [0, N]")
            tl.device_assert(tl.sum(c4, 0) == 0, "narvl.qctc_loss: a live label is outside [0, V)")
            tl.device_assert(tl.sum(c8, 0) == 0,
                             "narvl.qctc_loss: a live label equals the blank index")


def raise_faults(flags, fn="qctc_loss"):
    """Under the interpreter (CPU tensors, where reading costs no synchronisation and the device
    asserts are inert): the first fault in the flags as a ValueError naming its argument. On a
    GPU the reduction kernel asserts them and the host reads nothing."""
    if flags is None or not (settings.triton_interpret() and flags.device.type == "cpu"):
        return
    fl = flags.tolist()
    for bit, arg, what in FAULTS[fn]:
        hit = [b for b, f in enumerate(fl) if f & bit]
        if hit:
            raise ValueError(f"{arg}: {what} (sample {hit[0]}; narvl.{fn})")


def qctc_loss_fwd(logits, targets, target_lengths, query_lengths, weights, blank, reduction,
                  zero_infinity, label_smoothing, check):
    """The whole Q-CTC loss of ``narvl.qctc_loss`` in three launches (rows, lattice, reduction
    with the checks) -> (loss (B,) or (), nll (B,), lse (B, N), em (B, N, S+1)), fp32/fp64."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    B, N, V = logits.shape
    dev = logits.device
    targets = targets.to(device=dev, dtype=torch.int64).contiguous()
    tl_ = _lengths(target_lengths, dev)
    ql = None if query_lengths is None else _lengths(query_lengths, dev)
    acc = _acc(logits.dtype)
    eps = float(label_smoothing)
    lse, rowsum, em = _rows(logits, targets, tl_, ql, blank)
    flags = torch.empty(B, dtype=torch.int32, device=dev) if check else None
    nll, smooth, _ = _lattice(em, targets, tl_, ql, N, lse, rowsum, V, eps != 0.0, False, acc,
                              flags=flags, blank=blank)
    loss = torch.empty((B,) if reduction == "none" else (), dtype=nll.dtype, device=dev)
    w = None if weights is None else weights.to(dev).contiguous()
    _qctc_reduce_kernel[(1,)](
        nll, smooth, tl_, nll if w is None else w, nll if flags is None else flags, loss, B,
        targets.shape[1], eps, REDUCTION=REDUCTIONS[reduction], ZERO_INF=bool(zero_infinity),
        HAS_W=w is not None, SMOOTH_ON=eps != 0.0, CHECK=bool(check),
        BLOCK=max(16, min(1024, triton.next_power_of_2(B))), ACC=acc, num_warps=4)
    raise_faults(flags)
    return loss, nll, lse, em


def qctc_loss_bwd(grad_loss, logits, nll, lse, em, targets, target_lengths, query_lengths, weights,
                  blank, reduction, zero_infinity, label_smoothing):
    """Gradient of ``qctc_loss_fwd``'s loss w.r.t. logits, in two launches (lattice with the
    posteriors, gradient rows); the per-sample factors are derived in the gradient kernel."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    dev = logits.device
    targets = targets.to(device=dev, dtype=torch.int64).contiguous()
    tl_ = _lengths(target_lengths, dev)
    ql = None if query_lengths is None else _lengths(query_lengths, dev)
    w = None if weights is None else weights.to(dev).contiguous()
    return _grad(logits, lse, em, targets, tl_, ql, blank, grad_loss,
                 grad_loss if w is None else w, fused=True, reduction=reduction,
                 zero_infinity=zero_infinity, eps=float(label_smoothing), has_w=w is not None)


def _ctc_emissions(log_probs, targets, tl_, il, blank):
    """The label columns of log_probs (T, B, C) -> em (B, T, S+1), every entry written."""
    T, B, C = log_probs.shape
    K = targets.shape[1] + 1
    em = torch.empty(B, T, K, dtype=_out_dtype(log_probs.dtype), device=log_probs.device)
    if B * T > 0:
        _row_kernel[(B * T,)](
            log_probs, log_probs.stride(1), log_probs.stride(0), T, C, targets, targets.stride(0),
            tl_, il, em, em, em, K, blank, NORMALIZED=True, HAS_QL=True, BLOCK_V=16,
            BLOCK_K=triton.next_power_of_2(K), ACC=_acc(log_probs.dtype), num_warps=1)
    return em


def ctc_fwd(log_probs, targets, input_lengths, target_lengths, blank):
    """log_probs: (T, B, C) -> (nll (B,), em (B, T, S+1))."""
    if log_probs.stride(-1) != 1:
        log_probs = log_probs.contiguous()
    T, B, C = log_probs.shape
    dev = log_probs.device
    targets = targets.to(device=dev, dtype=torch.int64).contiguous()
    tl_, il = _lengths(target_lengths, dev), _lengths(input_lengths, dev)
    em = _ctc_emissions(log_probs, targets, tl_, il, blank)
    nll, _, _ = _lattice(em, targets, tl_, il, T, em, em, C, False, False, _acc(log_probs.dtype))
    return nll, em


def ctc_loss_fwd(log_probs, targets, input_lengths, target_lengths, blank, reduction, zero_infinity,
                 check):
    """The whole loss of ``narvl.ctc_loss`` in three launches (label columns, lattice, reduction
    with the checks) -> (loss (B,) or (), nll (B,), em (B, T, S+1)), fp32/fp64."""
    if log_probs.stride(-1) != 1:
        log_probs = log_probs.contiguous()
    T, B, C = log_probs.shape
    dev = log_probs.device
    targets = targets.to(device=dev, dtype=torch.int64).contiguous()
    tl_, il = _lengths(target_lengths, dev), _lengths(input_lengths, dev)
    acc = _acc(log_probs.dtype)
    em = _ctc_emissions(log_probs, targets, tl_, il, blank)
    flags = torch.empty(B, dtype=torch.int32, device=dev) if check else None
    nll, _, _ = _lattice(em, targets, tl_, il, T, em, em, C, False, False, acc, flags=flags, blank=blank)
    loss = torch.empty((B,) if reduction == "none" else (), dtype=nll.dtype, device=dev)
    _qctc_reduce_kernel[(1,)](
        nll, nll, tl_, nll, nll if flags is None else flags, loss, B, targets.shape[1], 0.0,
        REDUCTION=REDUCTIONS[reduction], ZERO_INF=bool(zero_infinity), HAS_W=False, SMOOTH_ON=False,
        CHECK=bool(check), BLOCK=max(16, min(1024, triton.next_power_of_2(B))), ACC=acc, CTC=True,
        num_warps=4)
    raise_faults(flags, "ctc_loss")
    return loss, nll, em


def _ctc_grad(log_probs, em, targets, input_lengths, target_lengths, blank, g, reduction=None,
              zero_infinity=False):
    """Gradient w.r.t. log_probs (T, B, C) in two launches (lattice with the posteriors, gradient
    rows). ``reduction`` None: ``g`` is dloss/dnll_b (B,); else ``g`` is the gradient of
    ``ctc_loss_fwd``'s loss (scalar or (B,)) and the gradient kernel derives dloss/dnll_b."""
    if log_probs.stride(-1) != 1:
        log_probs = log_probs.contiguous()
    T, B, C = log_probs.shape
    dev = log_probs.device
    targets = targets.to(device=dev, dtype=torch.int64).contiguous()
    K = targets.shape[1] + 1
    grad = torch.empty(T, B, C, dtype=log_probs.dtype, device=dev)
    if B * T == 0:
        return grad
    tl_, il = _lengths(target_lengths, dev), _lengths(input_lengths, dev)
    acc = _acc(log_probs.dtype)
    em = em.to(_out_dtype(log_probs.dtype)).contiguous()
    nll, _, post = _lattice(em, targets, tl_, il, T, em, em, C, False, True, acc)
    fused = reduction is not None
    g = g if fused else g.contiguous()
    _ctc_grad_kernel[(B * T,)](
        log_probs, log_probs.stride(0), log_probs.stride(1), grad, grad.stride(0), grad.stride(1),
        post, nll, T, C, K, targets, targets.stride(0), tl_, il, g, blank, B,
        g.stride(0) if g.dim() else 0, FUSED=fused, REDUCTION=REDUCTIONS[reduction] if fused else 0,
        ZERO_INF=bool(zero_infinity), BLOCK_C=max(16, min(1024, triton.next_power_of_2(C))),
        BLOCK_K=triton.next_power_of_2(K), ACC=acc, num_warps=4)
    return grad


def ctc_loss_bwd(grad_loss, log_probs, nll, em, targets, input_lengths, target_lengths, blank,
                 reduction, zero_infinity):
    """Gradient of ``ctc_loss_fwd``'s loss w.r.t. log_probs (T, B, C), two launches (``nll`` is
    recomputed by the lattice pass that makes the posteriors)."""
    return _ctc_grad(log_probs, em, targets, input_lengths, target_lengths, blank, grad_loss,
                     reduction, zero_infinity)


def ctc_bwd(grad_nll, log_probs, em, targets, input_lengths, target_lengths, blank):
    """Gradient of sum_b grad_nll[b] * nll_b w.r.t. log_probs (T, B, C): -grad_nll * post."""
    return _ctc_grad(log_probs, em, targets, input_lengths, target_lengths, blank, grad_nll)
