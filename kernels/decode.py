"""Triton kernels for CTC decoding: greedy and prefix beam search, the whole batch per launch.

Greedy: ``_argmax_kernel`` (one program per (b, t) frame, first maximum wins, as torch.argmax)
then ``_collapse_kernel`` (one program per sample: keep = not blank and not a repeat; positions
from a prefix sum).

Beam search: ``_topk_kernel`` (one program per frame) picks the cutoff_top_n best tokens exactly,
in two reads of the row: each lane's largest int64 key (order-preserving float bits << 32 |
reversed index, so ties go to the lower token id), then the keys at or above the K-th lane
maximum compacted into a scratch row and ranked by one ``tl.topk``. ``_beam_kernel`` (one
program per sample) then runs the prefix beam search over the frames with no host
synchronisation, with the C++ search's semantics:
- each beam slot holds its prefix as a token row (two row buffers, this frame's and the next's)
  with probabilities pb / pnb (linear, renormalised per frame);
- prefixes are identified exactly: slot i is a proper prefix of slot m when their token rows
  agree over i's length (a (slots, slots) comparison built in blocks of IB parent rows), so an
  extension (i, c) that recreates slot m merges into it, and no two different prefixes ever do;
- timesteps follow ctcdecode's path trie: each row position carries the record (best log-prob,
  frame) of the prefix ending there; at each frame every alive prefix whose parent is in the
  beam and whose token is a kept candidate takes the frame when its log-prob beats the record,
  in the row of every beam slot that descends from it (alive = in the beam or an ancestor of
  one, exactly the prefixes that rows hold); an appended prefix that is still alive keeps its
  record, one that had died starts afresh;
- the beam_width best of the stays and extensions survive (``tl.topk`` again over the stored
  candidate scores; what a chosen candidate carries is rebuilt from its index).
Memory is O(B beam T) plus O(B beam (beam + top-k)) scratch, never B x beam x V.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import settings
from ..checks import NaNScoresError
from . import checks


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


@triton.jit(debug=True)
def _collapse_kernel(IDS, T, LEN, TOK, OUTLEN, NANF, blank, NAN_CHECK: tl.constexpr,
                     MERGE: tl.constexpr, BLOCK_T: tl.constexpr):
    # writes every entry of its sample's outputs (tokens past the count: -1). With NAN_CHECK, a
    # NaN counted by the argmax scan fires a device-side assert (debug=True compiles it in: a
    # small program); the host does not wait for it.
    b = tl.program_id(0).to(tl.int64)
    t = tl.arange(0, BLOCK_T)
    tb = tl.load(LEN + b)
    ids = tl.load(IDS + b * T + t, mask=t < T, other=-1)
    prev = tl.load(IDS + b * T + t - 1, mask=(t >= 1) & (t < T), other=-1)
    keep = (t < tb) & (ids != blank)
    if MERGE:
        keep = keep & (ids != prev)
    pos = tl.cumsum(keep.to(tl.int32), 0) - 1
    count = tl.sum(keep.to(tl.int64), 0)
    tl.store(TOK + b * T + pos, ids, mask=keep)
    tl.store(TOK + b * T + t, tl.full((BLOCK_T,), -1, tl.int64), mask=(t >= count) & (t < T))
    tl.store(OUTLEN + b, count)
    if NAN_CHECK:
        nan = tl.sum(tl.load(NANF + b * T + t, mask=t < T, other=0), 0)
        tl.device_assert(nan == 0, "narvl: NaN in scores")


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
        x = tl.log(x + 1.1754943508222875e-38)  # log(p + FLT_MIN), as ctcdecode: 0 -> -87.3
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
def _frame_candidates(TOPV, TOPI, frame, j, top_n, cutoff_prob):
    """The frame's K candidates (tokens ci, probabilities p, kept mask): the first top_n, cut
    once the probability before them reaches cutoff_prob (the first always kept)."""
    cv = tl.load(TOPV + frame + j)
    ci = tl.load(TOPI + frame + j).to(tl.int64)
    p = tl.where((j < top_n) & (ci >= 0), tl.exp(cv), 0.0)
    before = tl.cumsum(p, 0) - p
    keep = (p > 0) & ((before < cutoff_prob) | (j == 0))
    return ci, tl.where(keep, p, 0.0), keep


@triton.jit
def _score_extensions(ci, p, keep, j, blank, sf, slot_f, slot_i, BEAM: tl.constexpr, K: tl.constexpr,
                      IB: tl.constexpr):
    """Extensions (i, c) in blocks of IB slots: scores stored as candidates q = BEAM + i * K + j;
    each slot's probability of its own last token (and its candidate index, and whether it is
    kept) set aside in the slot scratch."""
    for ib in range(0, BEAM, IB):
        ii = ib + tl.arange(0, IB)
        last_i = tl.load(slot_i + BEAM + ii)
        valid_i = tl.load(slot_i + 2 * BEAM + ii) > 0
        is_last = ci[None, :] == last_i[:, None]
        kl = is_last & keep[None, :]
        tl.store(slot_f + 2 * BEAM + ii, tl.sum(tl.where(is_last, p[None, :], 0.0), 1))
        tl.store(slot_i + 3 * BEAM + ii, tl.sum(tl.where(kl, j[None, :], 0), 1))
        tl.store(slot_i + 4 * BEAM + ii, tl.max(kl.to(tl.int64), 1))
        is_ext = keep[None, :] & (ci[None, :] != blank) & valid_i[:, None]
        base = tl.where(is_last, tl.load(slot_f + ii)[:, None], tl.load(slot_f + BEAM + ii)[:, None])
        tl.store(sf + BEAM + ii[:, None] * K + j[None, :], tl.where(is_ext, base * p[None, :], 0.0))


@triton.jit
def _visit_and_merge(TOPV, TOPI, ROW_TOK, ROW_LP, ROW_TS, anc_tok, slot_f, slot_i, frame, rows, i, j, keep,
                     valid, plen, t, T, blank, top_n, BEAM: tl.constexpr, IB: tl.constexpr):
    """The prefix trie's bookkeeping of one frame. Returns per slot m (has_par, i_par, pb_par,
    tot_par, last_par): whether slot m = a parent slot i_par + last[m], both in the beam (its
    extension's mass merges into m), with the parent's pb, pb + pnb and last token."""
    # anc[i, m]: slot i's prefix is a proper prefix of slot m's (token rows compared exactly);
    # tok_at / lp_at [i, m]: slot m's token and record log-prob at position plen[i]. Built in
    # blocks of IB parent rows i (the slot fields come back from the slot scratch), so only
    # (IB, BEAM) tiles are live.
    maxlen = tl.max(tl.where(valid, plen, 0), 0)
    has_par = tl.zeros((BEAM,), tl.int1)
    i_par = tl.zeros((BEAM,), tl.int64)
    pb_par = tl.zeros((BEAM,), tl.float32)
    tot_par = tl.zeros((BEAM,), tl.float32)
    last_par = tl.zeros((BEAM,), tl.int64)
    for ib in range(0, BEAM, IB):
        ii = ib + tl.arange(0, IB)
        plen_i = tl.load(slot_i + ii)
        valid_i = tl.load(slot_i + 2 * BEAM + ii) > 0
        eq = (ii[:, None] >= 0) & (i[None, :] >= 0)
        tok_at = tl.full((IB, BEAM), -2, tl.int32)
        lp_at = tl.zeros((IB, BEAM), tl.float32)
        for q in range(0, maxlen):
            inrow = valid & (q < plen)
            tk = tl.load(ROW_TOK + rows + i * T + q, mask=inrow, other=-1)
            tk_i = tl.load(ROW_TOK + rows + ii * T + q, mask=valid_i & (q < plen_i), other=-1)
            lq = tl.load(ROW_LP + rows + i * T + q, mask=inrow, other=0.0)
            eq = eq & ((q >= plen_i[:, None]) | (tk_i[:, None] == tk[None, :]))
            at = q == plen_i[:, None]
            tok_at = tl.where(at, tk[None, :], tok_at)
            lp_at = tl.where(at, lq[None, :], lp_at)
        anc = eq & (plen_i[:, None] < plen[None, :]) & valid_i[:, None] & valid[None, :]
        tok_at = tl.where(anc, tok_at, -2)
        # timestep visits (ctcdecode's get_path_trie): every alive prefix whose parent is in
        # the beam, extended by a kept candidate, takes the frame if its log-prob beats the
        # record; the copies of a prefix's record in its descendants' rows change alike
        new_lp = lp_at
        hit_any = tl.zeros((IB, BEAM), tl.int1)
        for jj in range(0, top_n):
            cj = tl.load(TOPI + frame + jj)
            vj = tl.load(TOPV + frame + jj)
            kj = tl.sum(tl.where(j == jj, keep.to(tl.int32), 0), 0) > 0
            hit = (tok_at == cj) & kj & (cj != blank) & (vj > new_lp)
            new_lp = tl.where(hit, vj, new_lp)
            hit_any = hit_any | hit
        dst = rows + i[None, :] * T + plen_i[:, None]
        tl.store(ROW_LP + dst, new_lp, mask=hit_any)
        tl.store(ROW_TS + dst, (t + i[None, :] * 0 + ii[:, None] * 0).to(tl.int32), mask=hit_any)
        tl.store(anc_tok + ii[:, None] * BEAM + i[None, :], tok_at)  # for the appended records
        # merges: slot m = slot i + last[m], both in the beam, gets the extension's mass
        par = anc & (plen[None, :] == plen_i[:, None] + 1)
        has_par = has_par | (tl.max(par.to(tl.int32), 0) > 0)
        i_par += tl.sum(tl.where(par, ii[:, None], 0), 0)
        pb_par += tl.sum(tl.where(par, tl.load(slot_f + ii)[:, None], 0.0), 0)
        tot_par += tl.sum(tl.where(par, tl.load(slot_f + BEAM + ii)[:, None], 0.0), 0)
        last_par += tl.sum(tl.where(par, tl.load(slot_i + BEAM + ii)[:, None], 0), 0)
    return has_par, i_par, pb_par, tot_par, last_par


@triton.jit
def _best_candidates(sf, ks, i, BEAM: tl.constexpr, K: tl.constexpr, NCP: tl.constexpr, IB: tl.constexpr,
                     NBLK: tl.constexpr, FIN: tl.constexpr):
    """The indices q of the BEAM best candidates, best first, in two rounds: the BEAM best
    extensions of each block of IB slots (IB * K keys), then the best of the stays and those
    (FIN keys), so no tile of all BEAM * (K + 1) candidates is ever live."""
    for ib in range(0, BEAM, IB):
        qb = BEAM + ib * K + tl.arange(0, IB * K)
        kb = tl.topk(_ordered_key(tl.load(sf + qb), qb, NCP), BEAM)
        tl.store(ks + (ib // IB) * BEAM + i, kb)
    tl.debug_barrier()
    f = tl.arange(0, FIN)
    fk = tl.load(ks + f - BEAM, mask=(f >= BEAM) & (f < BEAM + NBLK * BEAM), other=-9223372036854775807 - 1)
    fk = tl.where(f < BEAM, _ordered_key(tl.load(sf + f, mask=f < BEAM, other=0.0), f, NCP), fk)
    top = tl.topk(fk, BEAM)
    return (NCP - 1) - (top & 0xFFFFFFFF)


@triton.jit
def _copy_rows(ROW_TOK, ROW_LP, ROW_TS, src_row, dst_row, valid, length, maxlen, pp, TB: tl.constexpr):
    """Copies the first length[m] positions of each valid slot's row (token, record log-prob,
    record frame) from src_row[m] to dst_row[m], TB positions at a time."""
    for p0 in range(0, maxlen, TB):
        pos = p0 + pp
        cm = valid[:, None] & (pos[None, :] < length[:, None])
        a_src = src_row[:, None] + pos[None, :]
        a_dst = dst_row[:, None] + pos[None, :]
        tl.store(ROW_TOK + a_dst, tl.load(ROW_TOK + a_src, mask=cm, other=0), mask=cm)
        tl.store(ROW_LP + a_dst, tl.load(ROW_LP + a_src, mask=cm, other=0.0), mask=cm)
        tl.store(ROW_TS + a_dst, tl.load(ROW_TS + a_src, mask=cm, other=0), mask=cm)


@triton.jit
def _append_records(ROW_TOK, ROW_LP, ROW_TS, anc_tok, slot_f, slot_i, rows, nrows, i, t, T,
                    BEAM: tl.constexpr, IB: tl.constexpr):
    """The appended token of each extended new slot, with its timestep record: an appended
    prefix still alive in the trie (a descendant in the beam) keeps its record, else this frame
    with the candidate's log-prob (slot_f). Checked in blocks of IB new slots (their source,
    token and length in the slot scratch), so only (IB, BEAM) tiles are live."""
    for ib in range(0, BEAM, IB):
        ii = ib + tl.arange(0, IB)
        src_i = tl.load(slot_i + ii)
        tok_i = tl.load(slot_i + BEAM + ii)
        len_i = tl.load(slot_i + 2 * BEAM + ii)
        ext_i = tok_i >= 0
        gt = tl.load(anc_tok + src_i[:, None] * BEAM + i[None, :], mask=ext_i[:, None], other=-2)
        ghost = (gt == tok_i[:, None].to(tl.int32)) & ext_i[:, None]
        g_at = rows + i[None, :] * T + len_i[:, None]
        g_lp = tl.max(tl.where(ghost, tl.load(ROW_LP + g_at, mask=ghost, other=0.0), float("-inf")), 1)
        g_ts = tl.max(tl.where(ghost, tl.load(ROW_TS + g_at, mask=ghost, other=0), -1), 1)
        has_g = tl.max(ghost.to(tl.int32), 1) > 0
        a_new = nrows + ii * T + len_i
        tl.store(ROW_TOK + a_new, tok_i.to(tl.int32), mask=ext_i)
        tl.store(ROW_LP + a_new, tl.where(has_g, g_lp, tl.load(slot_f + ii)), mask=ext_i)
        tl.store(ROW_TS + a_new, tl.where(has_g, g_ts, t).to(tl.int32), mask=ext_i)


@triton.jit
def _beam_kernel(TOPV, TOPI, LEN, T, blank, beam_width, top_n, cutoff_prob, nbest,
                 SCR_F, SLOT_F, SLOT_I, ANC_TOK, ROW_TOK, ROW_LP, ROW_TS, OUT_TOK, OUT_LEN,
                 OUT_SCORE, OUT_TS, KS, BEAM: tl.constexpr, K: tl.constexpr, NCP: tl.constexpr,
                 TB: tl.constexpr, IB: tl.constexpr, NBLK: tl.constexpr, FIN: tl.constexpr):
    """One program per sample. Each beam slot holds its prefix as a token row and, per position,
    the timestep record (best log-prob, frame) of the prefix ending there (ctcdecode's node
    fields), in two row buffers (this frame's, the next's)."""
    b = tl.program_id(0).to(tl.int64)
    tb = tl.load(LEN + b)
    i = tl.arange(0, BEAM)
    j = tl.arange(0, K)
    plen = tl.zeros((BEAM,), tl.int64)
    last = tl.full((BEAM,), -1, tl.int64)
    pb = tl.where(i == 0, 1.0, 0.0)
    pnb = tl.zeros((BEAM,), tl.float32)
    valid = i == 0
    log_scale = tl.zeros((), tl.float32)
    sf = SCR_F + b * NCP * 3  # each candidate's score; then pb, pnb of the stays
    anc_tok = ANC_TOK + b * BEAM * BEAM
    ks = KS + b * NBLK * BEAM  # each block's best extension keys
    slot_f = SLOT_F + b * BEAM * 3  # each slot's pb, pb + pnb, probability of its last token
    slot_i = SLOT_I + b * BEAM * 5  # length, last token, validity, its candidate index, kept
    pp = tl.arange(0, TB)
    cur = 0
    for t in range(0, tb):
        frame = (b * T + t) * K
        ci, p, keep = _frame_candidates(TOPV, TOPI, frame, j, top_n, cutoff_prob)
        tot = pb + pnb
        p_blank = tl.sum(tl.where(ci == blank, p, 0.0), 0)
        tl.store(slot_i + i, plen)
        tl.store(slot_i + BEAM + i, last)
        tl.store(slot_i + 2 * BEAM + i, valid.to(tl.int64))
        tl.store(slot_f + i, pb)
        tl.store(slot_f + BEAM + i, tot)
        tl.debug_barrier()
        _score_extensions(ci, p, keep, j, blank, sf, slot_f, slot_i, BEAM, K, IB)
        tl.debug_barrier()
        p_last = tl.load(slot_f + 2 * BEAM + i)
        j_last = tl.load(slot_i + 3 * BEAM + i)
        last_kept = tl.load(slot_i + 4 * BEAM + i) > 0
        stay_pb = tl.where(valid, tot * p_blank, 0.0)
        stay_pnb = tl.where(valid, pnb * p_last, 0.0)
        rows = (b * 2 + cur) * BEAM * T
        has_par, i_par, pb_par, tot_par, last_par = _visit_and_merge(
            TOPV, TOPI, ROW_TOK, ROW_LP, ROW_TS, anc_tok, slot_f, slot_i, frame, rows, i, j, keep,
            valid, plen, t, T, blank, top_n, BEAM, IB)
        merge = has_par & last_kept & valid
        stay_pnb += tl.where(merge, tl.where(last == last_par, pb_par, tot_par) * p_last, 0.0)
        # candidates: q < BEAM stays, q = BEAM + i * K + j extensions (only their scores are
        # stored; what a chosen one carries is rebuilt from q below)
        tl.store(sf + i, stay_pb + stay_pnb)
        tl.store(sf + NCP + i, stay_pb)
        tl.store(sf + 2 * NCP + i, stay_pnb)
        tl.debug_barrier()
        # an extension that recreates a prefix in the beam was merged above: it is no candidate
        tl.store(sf + BEAM + i_par * K + j_last, tl.zeros((BEAM,), tl.float32), mask=merge)
        tl.debug_barrier()
        q = _best_candidates(sf, ks, i, BEAM, K, NCP, IB, NBLK, FIN)
        score = tl.load(sf + q)
        valid = (score > 0.0) & (i < beam_width)
        stay = q < BEAM
        qe = tl.where(stay, 0, q - BEAM)
        src = tl.where(stay, q, qe // K)
        jsel = qe % K
        tok = tl.where(stay, -1, tl.load(TOPI + frame + jsel).to(tl.int64))
        lp_c = tl.load(TOPV + frame + jsel)
        pb = tl.where(valid & stay, tl.load(sf + NCP + src), 0.0)
        pnb = tl.where(valid, tl.where(stay, tl.load(sf + 2 * NCP + src), score), 0.0)
        plen = tl.where(valid, tl.load(slot_i + src) + (~stay).to(tl.int64), 0)
        last = tl.where(valid, tl.where(stay, tl.load(slot_i + BEAM + src), tok), -1)
        # the next rows: the source slot's row, plus the appended token and its record
        nxt = 1 - cur
        nrows = (b * 2 + nxt) * BEAM * T
        ext = valid & (tok >= 0)
        src_len = plen - ext.to(tl.int64)
        newmax = tl.max(tl.where(valid, plen, 0), 0)
        _copy_rows(ROW_TOK, ROW_LP, ROW_TS, rows + src * T, nrows + i * T, valid, src_len, newmax, pp, TB)
        # the new slots' source, appended token and source length pass through the slot
        # scratch (free by now) to _append_records
        tl.store(slot_i + i, src)
        tl.store(slot_i + BEAM + i, tl.where(ext, tok, -1))
        tl.store(slot_i + 2 * BEAM + i, src_len)
        tl.store(slot_f + i, lp_c)
        tl.debug_barrier()
        _append_records(ROW_TOK, ROW_LP, ROW_TS, anc_tok, slot_f, slot_i, rows, nrows, i, t, T, BEAM, IB)
        tl.debug_barrier()
        cur = nxt
        mx = tl.max(tl.where(valid, pb + pnb, 0.0), 0)
        alive = mx > 0.0
        inv = tl.where(alive, 1.0 / mx, 0.0)
        pb = pb * inv
        pnb = pnb * inv
        log_scale += tl.where(alive, tl.log(tl.where(alive, mx, 1.0)), 0.0)
    # outputs, best first (topk kept the beam sorted)
    out = (i < nbest) & valid
    tl.store(OUT_LEN + b * nbest + i, tl.where(valid, plen, 0), mask=i < nbest)
    tl.store(OUT_SCORE + b * nbest + i,
             tl.where(valid, tl.log(tl.where(valid, pb + pnb, 1.0)) + log_scale, float("-inf")),
             mask=i < nbest)
    rows = (b * 2 + cur) * BEAM * T
    maxlen = tl.max(tl.where(out, plen, 0), 0)
    for p0 in range(0, maxlen, TB):
        pos = p0 + pp
        cm = out[:, None] & (pos[None, :] < plen[:, None])
        a_src = rows + i[:, None] * T + pos[None, :]
        dst = (b * nbest + i[:, None]) * T + pos[None, :]
        tl.store(OUT_TOK + dst, tl.load(ROW_TOK + a_src, mask=cm, other=0).to(tl.int64), mask=cm)
        tl.store(OUT_TS + dst, tl.load(ROW_TS + a_src, mask=cm, other=0).to(tl.int64), mask=cm)


# ----------------------------------------------------------------------------------- launchers


def _raise_on_nan(nanf):
    """The per-frame NaN counts the scans kept (no extra pass over the scores): read on the host
    for CPU tensors (the interpreter; free), asserted on the device for CUDA tensors (one small
    program, no synchronisation). On the host it raises ``NaNScoresError``, as the C++ kernels
    do, which the ops layer names."""
    if not _host_reads(nanf):
        checks.count_outside(nanf, 0, 0, "NaN in scores")
    elif any(nanf.tolist()):
        raise NaNScoresError("narvl: NaN in scores")


def _host_reads(x):
    """The interpreter on CPU tensors: device asserts are inert, the host reads instead (free)."""
    return settings.triton_interpret() and x.device.type == "cpu"


def greedy_decode(scores, lengths, blank, nan_check=False, merge_repeats=True):
    """scores (B, T, V) -> (tokens (B, T) int64 padded with -1, out_lens (B,) int64), in two
    launches (frame argmax, collapse; ``merge_repeats`` False keeps repeats). nan_check: NaN in a
    frame raises ``narvl.checks.NaNScoresError`` (CPU tensors, the interpreter) or fires a
    device-side assert (CUDA)."""
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    B, T, V = scores.shape
    dev = scores.device
    if B * T == 0:
        return (torch.full((B, T), -1, dtype=torch.int64, device=dev),
                torch.zeros(B, dtype=torch.int64, device=dev))
    ids = torch.empty(B, T, dtype=torch.int64, device=dev)
    tokens = torch.empty(B, T, dtype=torch.int64, device=dev)  # every entry written by _collapse
    out_lens = torch.empty(B, dtype=torch.int64, device=dev)
    nanf = torch.empty(B * T, dtype=torch.int32, device=dev)
    _argmax_kernel[(B * T,)](scores, scores.stride(0), scores.stride(1), T, V, ids, nanf,
                             BLOCK_V=max(16, min(4096, triton.next_power_of_2(V))), num_warps=4)
    if nan_check and _host_reads(nanf):
        _raise_on_nan(nanf)
    _collapse_kernel[(B,)](ids, T, lengths.to(device=dev, dtype=torch.int64).contiguous(), tokens,
                           out_lens, nanf, blank, NAN_CHECK=bool(nan_check) and not _host_reads(nanf),
                           MERGE=bool(merge_repeats), BLOCK_T=max(16, triton.next_power_of_2(T)))
    return tokens, out_lens


# The widest beam the GPU kernel is built for (ctcdecode's range; its default is 100): up to
# 128 it compiles in under 30 s within the 256 B local-memory budget on sm_80 and sm_90
# (bench/results/gpu_resources.json).
MAX_BEAM = 128

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
    """Warps of the beam program: 8 from beam 32 (at 64, 16 warps cap the registers at 128 and
    spilled 568 B on sm_90; at 128, 1.3 KB against 16 B with 8)."""
    return 4 if BEAM <= 16 else 8


def _row_block(BEAM, T):
    """Positions per step of the prefix-row copy: its (BEAM, TB) tiles stay within 1024 entries
    (at beam 128, 32 positions spilled 0.9 KB per thread on sm_90 and 16 still 160 B; 8 fit)."""
    return max(4, min(64, triton.next_power_of_2(T), 1024 // BEAM))


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
    # the beam kernel writes every length and score (empty slots: 0 and -inf)
    out_lens = torch.empty(B, nbest, dtype=torch.int64, device=dev)
    out_scores = torch.empty(B, nbest, dtype=torch.float32, device=dev)
    if B * T > 0:
        topv, topi, nanf = frame_topk(scores, K, input_kind)
        if nan_check:
            _raise_on_nan(nanf)
    else:
        topv = torch.empty(B, 1, K, dtype=torch.float32, device=dev)
        topi = torch.empty(B, 1, K, dtype=torch.int32, device=dev)
    Tp = max(T, 1)
    scr_f = torch.empty(B, 3 * NCP, dtype=torch.float32, device=dev)
    anc_tok = torch.empty(B, BEAM, BEAM, dtype=torch.int32, device=dev)
    IB = min(BEAM, 16)
    keys = torch.empty(B, (BEAM // IB) * BEAM, dtype=torch.int64, device=dev)
    slot_f = torch.empty(B, 3 * BEAM, dtype=torch.float32, device=dev)
    slot_i = torch.empty(B, 5 * BEAM, dtype=torch.int64, device=dev)
    row_tok = torch.empty(B, 2, BEAM, Tp, dtype=torch.int32, device=dev)
    row_lp = torch.empty(B, 2, BEAM, Tp, dtype=torch.float32, device=dev)
    row_ts = torch.empty(B, 2, BEAM, Tp, dtype=torch.int32, device=dev)
    _beam_kernel[(B,)](topv, topi, lengths, Tp, blank, beam_width, top_n, float(cutoff_prob),
                       nbest, scr_f, slot_f, slot_i, anc_tok, row_tok, row_lp, row_ts, tokens,
                       out_lens, out_scores, steps, keys, BEAM=BEAM, K=K, NCP=NCP,
                       TB=_row_block(BEAM, Tp), IB=IB, NBLK=BEAM // IB,
                       FIN=triton.next_power_of_2(BEAM + BEAM * (BEAM // IB)), num_warps=_beam_warps(BEAM))
    return tokens, out_lens, out_scores, steps
