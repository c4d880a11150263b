"""Float64 reference of CTC forced alignment (``narvl.ctc_forced_align``), in plain PyTorch.

One sample at a time, the best-path recursion runs over the extended label sequence
``(blank, l_1, blank, ..., l_L, blank)`` (state s: blank for even s, label (s-1)/2 for odd s):

    a_0(s) = lp_0(l'_s) for s in the window of frame 0
    a_t(s) = max(a_{t-1}(s), a_{t-1}(s-1), [skip(s)] a_{t-1}(s-2)) + lp_t(l'_s)

States outside the window of frame t hold -inf: the window keeps the states reachable from
frame 0 (the fewest frames reaching s, s included, is at most t + 1) from which the end of the
lattice is still reachable (the fewest frames from s, s included, to the end is at most
T_b - t). Ties follow torchaudio's CPU kernel: s-2 is taken only when strictly above both
others, s-1 only when strictly above s; the path ends in the final blank only when that is
strictly above the last label. A chosen predecessor outside the window (every candidate -inf
or NaN) is replaced by the next lower one in the window.
"""
from __future__ import annotations

import torch


def _window_bounds(labels):
    """(reach, need) of the extended sequence of ``labels`` (a list of ints), as lists."""
    L = len(labels)
    W = 2 * L + 1
    rep = [0] + [int(labels[k] == labels[k - 1]) for k in range(1, L)]
    cum = [sum(rep[:k + 1]) for k in range(L)]  # repeats among labels 0..k
    R = cum[-1] if L else 0
    reach, need = [0] * W, [0] * W
    for s in range(W):
        k = s // 2
        if s % 2:  # label k
            reach[s] = k + 1 + cum[k]
            need[s] = (L - k) + (R - cum[k])
        else:  # blank k: one frame after label k-1, one frame before label k
            reach[s] = 1 if k == 0 else k + cum[k - 1] + 1
            need[s] = 1 if k == L else 1 + (L - k) + (R - cum[k])
    return reach, need


def forced_align_reference(log_probs, targets, input_lengths=None, target_lengths=None, blank=0):
    """The best CTC path of each sample.

    log_probs: (B, T, C) (any float dtype; computed in float64); targets: (B, S) padded;
    input_lengths / target_lengths: (B,) (default T / S). A sample with fewer frames than its
    target needs raises ValueError. Returns (alignments (B, T) int64, blank past the input
    length; scores (B, T) float64, log_probs at the alignment, 0 past the input length).
    """
    lp = log_probs.detach().double().cpu()
    B, T, C = lp.shape
    S = targets.shape[1]
    il = [T] * B if input_lengths is None else [int(v) for v in torch.as_tensor(input_lengths)]
    tl = [S] * B if target_lengths is None else [int(v) for v in torch.as_tensor(target_lengths)]
    paths = torch.full((B, T), blank, dtype=torch.long)
    scores = torch.zeros(B, T, dtype=torch.float64)
    ninf = float("-inf")
    for b in range(B):
        Tb, L = il[b], tl[b]
        labels = [int(v) for v in targets[b, :L]]
        reach, need = _window_bounds(labels)
        W = 2 * L + 1
        if need[0] - 1 > Tb:
            raise ValueError(f"sample {b} needs {need[0] - 1} frames but has {Tb}")
        if Tb == 0:
            continue
        ext = torch.tensor([blank if s % 2 == 0 else labels[s // 2] for s in range(W)])
        reach_t, need_t = torch.tensor(reach), torch.tensor(need)
        skip = torch.tensor([s % 2 == 1 and s >= 3 and labels[s // 2] != labels[s // 2 - 1]
                             for s in range(W)])
        lower = torch.arange(W) >= 1

        def window(t):
            return (reach_t <= t + 1) & (need_t <= Tb - t)

        a = torch.where(window(0), lp[b, 0, ext], ninf)
        back = torch.zeros(Tb, W, dtype=torch.long)
        for t in range(1, Tb):
            x0 = a
            x1 = torch.cat([a.new_full((1,), ninf), a[:-1]])
            x2 = torch.where(skip, torch.cat([a.new_full((2,), ninf), a[:-2]])[:W], ninf)
            take2 = (x2 > x1) & (x2 > x0)
            take1 = ~take2 & (x1 > x0)
            step = torch.where(take2, 2, torch.where(take1, 1, 0))
            best = torch.where(take2, x2, torch.where(take1, x1, x0))
            prev_in = window(t - 1)
            prev_in1 = torch.cat([torch.tensor([False]), prev_in[:-1]]) & lower
            fallback = torch.where(prev_in1, 1, 2)
            step = torch.where((step == 0) & ~prev_in, fallback, step)
            inside = window(t)
            a = torch.where(inside, best + lp[b, t, ext], ninf)
            back[t] = torch.where(inside, step, 0)
        s = W - 1 if W > 1 and bool(a[W - 1] > a[W - 2]) else max(W - 2, 0)
        for t in range(Tb - 1, -1, -1):
            paths[b, t] = int(ext[s])
            scores[b, t] = lp[b, t, int(ext[s])]
            s -= int(back[t, s])
    return paths, scores
