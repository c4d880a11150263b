"""Triton kernels for CTC decoding: greedy and prefix beam search, the whole batch per launch.

Greedy: ``_argmax_kernel`` (one program per (b, t) frame, first maximum wins, as torch.argmax)
then ``_collapse_kernel`` (one program per sample: keep = not blank and not a repeat; positions
from a prefix sum).

Beam search: ``_topk_kernel`` (one program per frame) picks the cutoff_top_n best tokens exactly,
in two reads of the row: each lane's largest int64 key (order-preserving float bits << 32 |
reversed index, so ties go to the lower token id), then the keys at or above the K-th lane
maximum compacted into a scratch row and ranked by one ``tl.topk``. ``_beam_kernel`` (one
program per sample) then runs the prefix beam search over the frames with no host
synchronisation: each prefix is a (hash, length, last token) triple with probabilities pb / pnb
(linear, renormalised per frame), extensions (prefix i, token c) that recreate a prefix already in
the beam are merged into it (identified by the 40-bit hash and the length: two different
prefixes that collide would merge, which the C++ search never does), the
beam_width best of the stays and extensions survive (``tl.topk`` again; above a beam of 16 the
merge test runs one beam entry at a time, so only (beam, K) tiles are live), and per-frame
backpointers (parent slot, emitted token) are traced back at the end. Memory is O(B T beam),
never B x beam x V.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_HASH_MASK = (1 << 40) - 1
_HASH_MUL = 4194301


@triton.jit
def _argmax_kernel(X, stride_b, stride_t, T, V, OUT, NANF, BLOCK_V: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    b = r // T
    t = r % T
    row = X + b * stride_b + t * stride_t
    best = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    arg = tl.zeros((BLOCK_V,), tl.int64)
    nan = tl.zeros((BLOCK_V,), tl.int32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        nan += (x != x).to(tl.int32)
        upd = x > best
        arg = tl.where(upd, offs, arg)
        best = tl.where(upd, x, best)
    tl.store(NANF + r, tl.sum(nan, 0))
    m = tl.max(best, 0)
    tl.store(OUT + r, tl.min(tl.where(best == m, arg, V), 0))


@triton.jit
def _collapse_kernel(IDS, T, LEN, TOK, OUTLEN, blank, BLOCK_T: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    t = tl.arange(0, BLOCK_T)
    tb = tl.load(LEN + b)
    ids = tl.load(IDS + b * T + t, mask=t < T, other=-1)
    prev = tl.load(IDS + b * T + t - 1, mask=(t >= 1) & (t < T), other=-1)
    keep = (t < tb) & (ids != blank) & (ids != prev)
    pos = tl.cumsum(keep.to(tl.int32), 0) - 1
    tl.store(TOK + b * T + pos, ids, mask=keep)
    tl.store(OUTLEN + b, tl.sum(keep.to(tl.int64), 0))


@triton.jit
def _ordered_key(v, idx, n):
    """int64 key: larger v first, then lower idx (idx < n < 2^31)."""
    bits = v.to(tl.int32, bitcast=True)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # order-preserving as signed int32
    return bits.to(tl.int64) * 4294967296 + (n - 1 - idx).to(tl.int64)


@triton.jit
def _key_value(key):
    hi = (key >> 32).to(tl.int32)
    hi = hi ^ ((hi >> 31) & 0x7FFFFFFF)
    return hi.to(tl.float32, bitcast=True)


@triton.jit
def _frame_keys(row, offs, V, INPUT: tl.constexpr):
    """(x as float32 log-scores, int64 keys, valid mask) of the row's columns offs."""
    m = offs < V
    x = tl.load(row + offs, mask=m, other=1.0).to(tl.float32)
    if INPUT == 0:
        x = tl.log(x)
    return x, tl.where(m, _ordered_key(x, offs, V), -9223372036854775807 - 1), m


@triton.jit
def _topk_kernel(X, stride_b, stride_t, T, V, TOPV, TOPI, NANF, SCR, INPUT: tl.constexpr,
                 K: tl.constexpr, BLOCK_V: tl.constexpr, CAP: tl.constexpr, SMALL: tl.constexpr):
    """Top K keys of one frame in two reads of the row, with two tl.topk calls in all.

    Pass 1 keeps each lane's largest key over the chunks (and, for logits, the online
    log-sum-exp; NaNs are counted). The K-th largest lane maximum kth is <= the K-th largest key,
    so every top-K key is >= kth; at most K lanes hold keys >= kth, each at most one per chunk,
    so pass 2 compacts at most K * chunks <= CAP candidates (prefix sum, masked store) into the
    frame's scratch row SCR, and one tl.topk over them (SMALL of them when they fit, the usual
    case) gives the answer. Keys are unique (the index is in the low bits), so the result is
    exactly the top K, ties to the lower token id."""
    r = tl.program_id(0).to(tl.int64)
    b = r // T
    t = r % T
    row = X + b * stride_b + t * stride_t
    lowest = -9223372036854775807 - 1
    lane = tl.full((BLOCK_V,), lowest, tl.int64)
    nan = tl.zeros((BLOCK_V,), tl.int32)
    m_run = tl.full((), float("-inf"), tl.float32)  # logits: running max and sum of exp
    s_run = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        x, key, m = _frame_keys(row, offs, V, INPUT)
        nan += (x != x).to(tl.int32)
        if INPUT == 2:  # the row's log-sum-exp in the same read (online softmax)
            cm = tl.max(tl.where(m, x, float("-inf")), 0)
            nm = tl.maximum(m_run, cm)
            sh = tl.where(nm == float("-inf"), 0.0, nm)
            s_run = s_run * tl.exp(m_run - sh) + tl.sum(tl.where(m, tl.exp(x - sh), 0.0), 0)
            m_run = nm
        lane = tl.maximum(lane, key)
    kth = tl.min(tl.topk(lane, K), 0)
    tl.store(NANF + r, tl.sum(nan, 0))
    scr = SCR + r * CAP
    base = tl.zeros((), tl.int32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        x, key, m = _frame_keys(row, offs, V, INPUT)
        c = m & (key >= kth)
        pos = base + tl.cumsum(c.to(tl.int32), 0) - 1
        tl.store(scr + pos, key, mask=c)
        base += tl.sum(c.to(tl.int32), 0)
    if base <= SMALL:
        js = tl.arange(0, SMALL)
        run = tl.topk(tl.load(scr + js, mask=js < base, other=lowest), K)
    else:
        jc = tl.arange(0, CAP)
        run = tl.topk(tl.load(scr + jc, mask=jc < base, other=lowest), K)
    ok = run != lowest
    idx = tl.where(ok, (V - 1) - (run & 0xFFFFFFFF), -1)
    val = tl.where(ok, _key_value(run), float("-inf"))
    if INPUT == 2:
        val = val - (m_run + tl.log(s_run))
    kk = tl.arange(0, K)
    tl.store(TOPV + r * K + kk, val)
    tl.store(TOPI + r * K + kk, idx.to(tl.int32))


@triton.jit
def _beam_kernel(TOPV, TOPI, LEN, T, blank, beam_width, top_n, cutoff_prob, nbest,
                 SCR_F, SCR_I, BP_PAR, BP_TOK, OUT_TOK, OUT_LEN, OUT_SCORE, OUT_TS,
                 BEAM: tl.constexpr, K: tl.constexpr, NCP: tl.constexpr,
                 HASH_MUL: tl.constexpr, HASH_MASK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    tb = tl.load(LEN + b)
    i = tl.arange(0, BEAM)
    j = tl.arange(0, K)
    NC = BEAM * (K + 1)
    h = tl.zeros((BEAM,), tl.int64)
    plen = tl.zeros((BEAM,), tl.int64)
    last = tl.full((BEAM,), -1, tl.int64)
    pb = tl.where(i == 0, 1.0, 0.0)
    pnb = tl.zeros((BEAM,), tl.float32)
    valid = i == 0
    log_scale = tl.zeros((), tl.float32)
    sf = SCR_F + b * NCP * 3  # score, pb, pnb of each candidate
    si = SCR_I + b * NCP * 5  # hash, length, last, parent, token of each candidate
    qs = tl.arange(0, NCP)
    for t in range(0, tb):
        frame = (b * T + t) * K
        cv = tl.load(TOPV + frame + j)
        ci = tl.load(TOPI + frame + j).to(tl.int64)
        p = tl.where((j < top_n) & (ci >= 0), tl.exp(cv), 0.0)
        before = tl.cumsum(p, 0) - p
        keep = (p > 0) & ((before < cutoff_prob) | (j == 0))
        p = tl.where(keep, p, 0.0)
        tot = pb + pnb
        p_blank = tl.sum(tl.where(ci == blank, p, 0.0), 0)
        is_last = ci[None, :] == last[:, None]
        p_last = tl.sum(tl.where(is_last, p[None, :], 0.0), 1)
        stay_pb = tl.where(valid, tot * p_blank, 0.0)
        stay_pnb = tl.where(valid, pnb * p_last, 0.0)
        is_ext = keep[None, :] & (ci[None, :] != blank) & valid[:, None]
        ext_val = tl.where(is_ext, tl.where(is_last, pb[:, None], tot[:, None]) * p[None, :], 0.0)
        ext_h = (h[:, None] * HASH_MUL + ci[None, :] + 1) & HASH_MASK
        ext_len = plen[:, None] + 1
        # an extension that recreates a prefix already in the beam merges into that entry
        if BEAM <= 16:  # one (BEAM, K, BEAM) comparison: fits the registers at these widths
            same = ((ext_h[:, :, None] == h[None, None, :]) & (ext_len[:, :, None] == plen[None, None, :])
                    & valid[None, None, :] & is_ext[:, :, None])
            stay_pnb += tl.sum(tl.sum(tl.where(same, ext_val[:, :, None], 0.0), 1), 0)
            merged = tl.sum(same.to(tl.int32), 2) > 0
        else:  # one beam entry at a time: (BEAM, K) tiles only, nothing spills
            merged = tl.zeros((BEAM, K), tl.int1)
            for m in range(0, beam_width):
                sel = i == m
                hm = tl.sum(tl.where(sel, h, 0), 0)
                lm = tl.sum(tl.where(sel, plen, 0), 0)
                vm = tl.sum(tl.where(sel & valid, 1, 0), 0) > 0
                s_m = (ext_h == hm) & (ext_len == lm) & is_ext & vm
                stay_pnb += tl.where(sel, tl.sum(tl.sum(tl.where(s_m, ext_val, 0.0), 1), 0), 0.0)
                merged = merged | s_m
        ext_val = tl.where(merged, 0.0, ext_val)
        # candidates: q < BEAM stays, q = BEAM + i * K + j extensions
        tl.store(sf + i, stay_pb + stay_pnb)
        tl.store(sf + NCP + i, stay_pb)
        tl.store(sf + 2 * NCP + i, stay_pnb)
        tl.store(si + i, h)
        tl.store(si + NCP + i, plen)
        tl.store(si + 2 * NCP + i, last)
        tl.store(si + 3 * NCP + i, i.to(tl.int64))
        tl.store(si + 4 * NCP + i, tl.full((BEAM,), -1, tl.int64))
        q2 = BEAM + i[:, None] * K + j[None, :]
        tl.store(sf + q2, ext_val)
        tl.store(sf + NCP + q2, tl.zeros((BEAM, K), tl.float32))
        tl.store(sf + 2 * NCP + q2, ext_val)
        tl.store(si + q2, ext_h)
        tl.store(si + NCP + q2, ext_len)
        tl.store(si + 2 * NCP + q2, ci[None, :] + i[:, None] * 0)
        tl.store(si + 3 * NCP + q2, i[:, None].to(tl.int64) + j[None, :] * 0)
        tl.store(si + 4 * NCP + q2, ci[None, :] + i[:, None] * 0)
        tl.debug_barrier()
        sc = tl.load(sf + qs, mask=qs < NC, other=0.0)
        top = tl.topk(_ordered_key(sc, qs, NCP), BEAM)
        q = (NCP - 1) - (top & 0xFFFFFFFF)
        score = tl.load(sf + q)
        valid = (score > 0.0) & (i < beam_width)
        pb = tl.where(valid, tl.load(sf + NCP + q), 0.0)
        pnb = tl.where(valid, tl.load(sf + 2 * NCP + q), 0.0)
        h = tl.load(si + q)
        plen = tl.load(si + NCP + q)
        last = tl.load(si + 2 * NCP + q)
        par = tl.load(si + 3 * NCP + q)
        tok = tl.load(si + 4 * NCP + q)
        bp = (b * T + t) * BEAM + i
        tl.store(BP_PAR + bp, tl.where(valid, par, -1))
        tl.store(BP_TOK + bp, tl.where(valid, tok, -1))
        tl.debug_barrier()
        mx = tl.max(tl.where(valid, pb + pnb, 0.0), 0)
        alive = mx > 0.0
        inv = tl.where(alive, 1.0 / mx, 0.0)
        pb = pb * inv
        pnb = pnb * inv
        log_scale += tl.where(alive, tl.log(tl.where(alive, mx, 1.0)), 0.0)
    # outputs, best first (topk kept the beam sorted)
    out = i < nbest
    tl.store(OUT_LEN + b * nbest + i, tl.where(valid, plen, 0), mask=out)
    tl.store(OUT_SCORE + b * nbest + i,
             tl.where(valid, tl.log(tl.where(valid, pb + pnb, 1.0)) + log_scale, float("-inf")),
             mask=out)
    cur = i.to(tl.int64)
    pos = plen - 1
    for s in range(0, tb):
        t = tb - 1 - s
        bp = (b * T + t) * BEAM + cur
        par = tl.load(BP_PAR + bp, mask=valid, other=-1)
        tok = tl.load(BP_TOK + bp, mask=valid, other=-1)
        emit = valid & (tok >= 0) & out
        dst = (b * nbest + i) * T + pos
        tl.store(OUT_TOK + dst, tok, mask=emit)
        tl.store(OUT_TS + dst, t + pos * 0, mask=emit)
        pos = tl.where(emit, pos - 1, pos)
        cur = tl.where(valid, par, cur)


# ----------------------------------------------------------------------------------- launchers


def _raise_on_nan(nanf):
    """One host read of the per-frame NaN counts the scans kept (no extra pass over the scores);
    the message is the one the C++ kernels raise, which the ops layer turns into a ValueError."""
    if bool(nanf.any()):
        raise RuntimeError("narvl: NaN in scores")


def greedy_decode(scores, lengths, blank, nan_check=False):
    """scores (B, T, V) -> (tokens (B, T) int64 padded with -1, out_lens (B,) int64).
    nan_check: raise RuntimeError("narvl: NaN in scores") when a frame holds NaN."""
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    B, T, V = scores.shape
    dev = scores.device
    ids = torch.empty(B, T, dtype=torch.int64, device=dev)
    tokens = torch.full((B, T), -1, dtype=torch.int64, device=dev)
    out_lens = torch.zeros(B, dtype=torch.int64, device=dev)
    if B * T == 0:
        return tokens, out_lens
    nanf = torch.empty(B * T, dtype=torch.int32, device=dev)
    _argmax_kernel[(B * T,)](scores, scores.stride(0), scores.stride(1), T, V, ids, nanf,
                             BLOCK_V=max(16, min(4096, triton.next_power_of_2(V))), num_warps=4)
    if nan_check:
        _raise_on_nan(nanf)
    _collapse_kernel[(B,)](ids, T, lengths.to(device=dev, dtype=torch.int64).contiguous(), tokens,
                           out_lens, blank, BLOCK_T=max(16, triton.next_power_of_2(T)))
    return tokens, out_lens


# The widest beam the GPU kernel is built for: up to 64 it compiles in under 30 s with no spills
# on sm_80 and sm_90 (bench/results/gpu_resources.json); 100 and 128 spill 0.6 KB per thread.
MAX_BEAM = 64

_TOPK_BLOCK = 2048  # the scan's chunk width over V (tests lower it to cover many chunks)


def frame_topk(scores, K, input_kind):
    """scores (B, T, V), last dim contiguous, B*T > 0 -> (values (B, T, K) float32
    log-probabilities, ids (B, T, K) int32, NaN counts (B*T,) int32): each frame's K largest
    scores, best first, ties to the lower id (-inf / -1 past V)."""
    B, T, V = scores.shape
    dev = scores.device
    topv = torch.empty(B, T, K, dtype=torch.float32, device=dev)
    topi = torch.empty(B, T, K, dtype=torch.int32, device=dev)
    nanf = torch.empty(B * T, dtype=torch.int32, device=dev)
    block_v = max(K, min(_TOPK_BLOCK, triton.next_power_of_2(V)))
    cap = triton.next_power_of_2(K * triton.cdiv(V, block_v))
    scratch = torch.empty(B * T, cap, dtype=torch.int64, device=dev)
    _topk_kernel[(B * T,)](scores, scores.stride(0), scores.stride(1), T, V, topv, topi, nanf,
                           scratch, INPUT=int(input_kind), K=K, BLOCK_V=block_v, CAP=cap,
                           SMALL=min(cap, 4 * K), num_warps=8)  # 8 warps: 2.82 ms vs 3.01 with 4
    return topv, topi, nanf


def _beam_warps(BEAM):
    """Warps of the beam program: its (BEAM, K) tiles spread over more threads as the beam
    widens (4 warps spilled 856 B at beam 64 and 2 KB at 128 on sm_90)."""
    return 4 if BEAM <= 32 else (8 if BEAM <= 64 else 16)


def beam_search(scores, lengths, beam_width, blank, cutoff_top_n, cutoff_prob, nbest, input_kind,
                nan_check=False):
    """Same contract as torch.ops.narvl.ctc_beam_search (see narvl.ctc_prefix_beam_search);
    nan_check as in greedy_decode."""
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    B, T, V = scores.shape
    dev = scores.device
    top_n = min(cutoff_top_n, V)
    K = max(16, triton.next_power_of_2(top_n))
    BEAM = max(2, triton.next_power_of_2(beam_width))
    NCP = triton.next_power_of_2(BEAM * (K + 1))
    lengths = lengths.to(device=dev, dtype=torch.int64).contiguous()
    tokens = torch.full((B, nbest, T), -1, dtype=torch.int64, device=dev)
    steps = torch.full((B, nbest, T), -1, dtype=torch.int64, device=dev)
    out_lens = torch.zeros(B, nbest, dtype=torch.int64, device=dev)
    out_scores = torch.full((B, nbest), float("-inf"), dtype=torch.float32, device=dev)
    if B * T > 0:
        topv, topi, nanf = frame_topk(scores, K, input_kind)
        if nan_check:
            _raise_on_nan(nanf)
    else:
        topv = torch.empty(B, 1, K, dtype=torch.float32, device=dev)
        topi = torch.empty(B, 1, K, dtype=torch.int32, device=dev)
    scr_f = torch.empty(B, 3 * NCP, dtype=torch.float32, device=dev)
    scr_i = torch.empty(B, 5 * NCP, dtype=torch.int64, device=dev)
    bp_par = torch.empty(B, max(T, 1), BEAM, dtype=torch.int64, device=dev)
    bp_tok = torch.empty_like(bp_par)
    _beam_kernel[(B,)](topv, topi, lengths, max(T, 1), blank, beam_width, top_n, float(cutoff_prob),
                       nbest, scr_f, scr_i, bp_par, bp_tok, tokens, out_lens, out_scores, steps,
                       BEAM=BEAM, K=K, NCP=NCP, HASH_MUL=_HASH_MUL, HASH_MASK=_HASH_MASK,
                       num_warps=_beam_warps(BEAM))
    return tokens, out_lens, out_scores, steps
