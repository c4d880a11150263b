"""Triton kernel for CTC forced alignment (the Viterbi path of each sample), batch-first.

``_forced_align_kernel`` runs one program per sample: the 2L+1 lattice states sit in one block
(BLOCK_W lanes), the frames run serially. Each frame reads the previous frame's scores shifted by
one and two states from a two-row global scratch (a barrier separates the store of frame t - 1
from the loads of frame t; the rows alternate, so a row is rewritten only after every lane has
read it), takes the max with csrc/forced_align_cpu.cpp's comparisons (ties keep the highest
state; the final blank wins only when strictly better than the last label), and stores one int8
back-pointer per state in a global (B, T, W) scratch. The backtrack then walks the back-pointers
from the last frame as a scalar loop. States outside the window of frame t (not reachable from
frame 0 by then, or unable to reach the end in the frames left: the bounds ``reach`` / ``need``
come from the launcher) hold -inf, as in the C++ kernel, and a back-pointer never leaves it.
A sample whose target does not fit in its frames comes back all blank with -inf scores.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _forced_align_kernel(LP, stride_b, stride_t, TGT, stride_tb, IL, TL, REACH, NEED, ALPHA, BACK,
                         PATH, SCORE, T, C, WM, blank, BLOCK_W: tl.constexpr, ACC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    tb = tl.load(IL + b).to(tl.int64)
    L = tl.load(TL + b).to(tl.int64)
    W = 2 * L + 1
    s = tl.arange(0, BLOCK_W)
    valid = s < W
    odd = (s % 2) == 1
    tgt = TGT + b * stride_tb
    lab = tl.load(tgt + s // 2, mask=odd & valid, other=0).to(tl.int64)
    lab = tl.where(odd, tl.minimum(tl.maximum(lab, 0), C - 1), blank)  # (clamped: never read out of the row)
    lab_prev = tl.load(tgt + s // 2 - 1, mask=odd & valid & (s >= 3), other=-1).to(tl.int64)
    skip = odd & valid & (s >= 3) & (lab != lab_prev)
    big = 1 << 40
    bounds = b * WM + s
    reach = tl.load(REACH + bounds, mask=valid, other=big)
    need = tl.load(NEED + bounds, mask=valid, other=big)
    reach1 = tl.load(REACH + bounds - 1, mask=valid & (s >= 1), other=big)  # of state s - 1
    need1 = tl.load(NEED + bounds - 1, mask=valid & (s >= 1), other=big)
    frames_needed = tl.sum(tl.where(s == 0, need, 0), 0) - 1  # L + repeats
    row = LP + b * stride_b
    ninf = float("-inf")
    arow = ALPHA + b * 2 * BLOCK_W
    back = BACK + b * T * WM
    out_path = PATH + b * T
    out_score = SCORE + b * T
    if frames_needed > tb:
        for t in range(0, tb):
            tl.store(out_score + t, ninf)
    elif tb > 0:
        inside = valid & (reach <= 1) & (need <= tb)
        e = tl.load(row + lab, mask=inside, other=0.0).to(ACC)
        a = tl.where(inside, e, ninf)
        tl.store(arow + s, a)
        for t in range(1, tb):
            tl.debug_barrier()
            prev = arow + ((t - 1) % 2) * BLOCK_W
            x1 = tl.load(prev + s - 1, mask=s >= 1, other=ninf)
            x2 = tl.load(prev + s - 2, mask=skip, other=ninf)
            take2 = (x2 > x1) & (x2 > a)
            take1 = (~take2) & (x1 > a)
            best = tl.where(take2, x2, tl.where(take1, x1, a))
            step = tl.where(take2, 2, tl.where(take1, 1, 0))
            # a predecessor outside the previous window (every candidate -inf or NaN): the next
            # lower one inside it
            in_prev = (reach <= t) & (need <= tb - t + 1)
            in_prev1 = (reach1 <= t) & (need1 <= tb - t + 1)
            step = tl.where((step == 0) & (~in_prev), tl.where(in_prev1, 1, 2), step)
            inside = valid & (reach <= t + 1) & (need <= tb - t)
            e = tl.load(row + t * stride_t + lab, mask=inside, other=0.0).to(ACC)
            a = tl.where(inside, best + e, ninf)
            tl.store(arow + (t % 2) * BLOCK_W + s, a)
            tl.store(back + t * WM + s, step.to(tl.int8), mask=valid)
        tl.debug_barrier()
        last_blank = tl.sum(tl.where(s == W - 1, a, 0.0), 0)
        last_label = tl.sum(tl.where(s == W - 2, a, 0.0), 0)
        st = tl.where((W > 1) & (last_blank > last_label), W - 1, tl.maximum(W - 2, 0))
        for i in range(0, tb):
            t = tb - 1 - i
            c = tl.load(tgt + st // 2, mask=(st % 2) == 1, other=0).to(tl.int64)
            c = tl.where((st % 2) == 1, c, blank)
            tl.store(out_path + t, c)
            tl.store(out_score + t, tl.load(row + t * stride_t + c).to(ACC))
            st = st - tl.load(back + t * WM + st, mask=t > 0, other=0).to(tl.int64)


def _window_bounds(targets, target_lengths):
    """(reach, need), int64 (B, 2S+1): the fewest frames that reach each lattice state from frame
    0 (the state included), and that lead from it to the end of the lattice."""
    B, S = targets.shape
    dev = targets.device
    L = target_lengths[:, None]
    k = torch.arange(S, device=dev)
    rep = torch.zeros(B, S, dtype=torch.long, device=dev)
    if S > 1:
        rep[:, 1:] = ((targets[:, 1:] == targets[:, :-1]) & (k[None, 1:] < L)).long()
    # cum[:, j] = repeats among labels 0..j-1 (j = 0..S), then one more copy of the total
    cum = torch.cat([rep.new_zeros(B, 1), rep.cumsum(1)], 1)
    cum = torch.cat([cum, cum[:, -1:]], 1)
    R = cum.gather(1, target_lengths[:, None])
    kb = torch.arange(S + 1, device=dev)[None, :]  # blank k (state 2k)
    kl = k[None, :]  # label k (state 2k + 1)
    label_reach = kl + 1 + cum[:, 1:S + 1]
    label_need = (L - kl) + (R - cum[:, 1:S + 1])
    blank_reach = kb + cum[:, :S + 1] + 1
    blank_need = torch.where(kb >= L, 1, 1 + (L - kb) + (R - cum[:, 1:S + 2]))
    reach = torch.empty(B, 2 * S + 1, dtype=torch.long, device=dev)
    need = torch.empty_like(reach)
    reach[:, 0::2], reach[:, 1::2] = blank_reach, label_reach
    need[:, 0::2], need[:, 1::2] = blank_need, label_need
    return reach.contiguous(), need.contiguous()


def ctc_forced_align(log_probs, targets, input_lengths, target_lengths, blank):
    """log_probs: (B, T, C) -> (alignments (B, T) int64, scores (B, T) float32 / float64)."""
    if log_probs.stride(-1) != 1:
        log_probs = log_probs.contiguous()
    B, T, C = log_probs.shape
    dev = log_probs.device
    targets = targets.to(device=dev, dtype=torch.int64).contiguous()
    S = targets.shape[1]
    # (clamped so that unchecked input never reads out of bounds; checked input is unchanged)
    il = input_lengths.to(device=dev, dtype=torch.int64).clamp(0, T).contiguous()
    tl_ = target_lengths.to(device=dev, dtype=torch.int64).clamp(0, S).contiguous()
    f64 = log_probs.dtype == torch.float64
    odt = torch.float64 if f64 else torch.float32
    paths = torch.full((B, T), blank, dtype=torch.long, device=dev)
    scores = torch.zeros(B, T, dtype=odt, device=dev)
    if B == 0 or T == 0:
        return paths, scores
    WM = 2 * S + 1
    reach, need = _window_bounds(targets, tl_)
    bw = max(2, triton.next_power_of_2(WM))
    alpha = torch.empty(B, 2, bw, dtype=odt, device=dev)
    back = torch.empty(B, T, WM, dtype=torch.int8, device=dev)
    _forced_align_kernel[(B,)](
        log_probs, log_probs.stride(0), log_probs.stride(1), targets, targets.stride(0), il, tl_,
        reach, need, alpha, back, paths, scores, T, C, WM, blank, BLOCK_W=bw,
        ACC=tl.float64 if f64 else tl.float32, num_warps=1 if bw <= 64 else (4 if bw <= 1024 else 8))
    return paths, scores
