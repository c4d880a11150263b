"""Float64 reference of CTC and Q-CTC that writes the alpha recursion itself.

The recursion runs in log space over the extended label sequence
``l' = (blank, l_1, blank, l_2, ..., l_L, blank)`` of width ``W = 2L + 1``:

    alpha_0(0) = lp_0(blank), alpha_0(1) = lp_0(l_1)
    alpha_t(s) = logsumexp(alpha_{t-1}(s), alpha_{t-1}(s-1), [skip(s)] alpha_{t-1}(s-2)) + lp_t(l'_s)
    nll = -logsumexp(alpha_{T-1}(W-1), alpha_{T-1}(W-2))

where ``skip(s)`` holds for a label position whose label differs from the one two positions
back. Unreachable states hold a large finite negative number instead of -inf, so that autograd
through the recursion stays finite; the gradients used by the tests come from autograd here,
independently of the kernels' alpha-beta formulas. An nll beyond 1e50 is reported as +inf.
"""
from __future__ import annotations

import torch

_NEG = -1.0e100
_INF_LIMIT = 1.0e50


def ctc_nll_reference(log_probs, targets, input_lengths, target_lengths, blank):
    """CTC negative log-likelihood per sample.

    log_probs: (B, T, C) batch-first log-probabilities (any float dtype; computed in float64).
    targets: (B, S) padded labels; input_lengths, target_lengths: (B,).
    Returns nll: (B,) float64, +inf where no alignment exists.
    """
    lp = log_probs.double()
    B, T, C = lp.shape
    S = targets.shape[1]
    W = 2 * S + 1
    dev = lp.device
    il = torch.as_tensor(input_lengths, device=dev).long()
    tl = torch.as_tensor(target_lengths, device=dev).long()
    s = torch.arange(W, device=dev)
    odd = (s % 2) == 1
    k = (s // 2).clamp(max=max(S - 1, 0))
    tg = targets.long().to(dev)
    lab = torch.where(odd, tg[:, k] if S > 0 else torch.full((B, W), blank, device=dev), blank)
    lab = lab.clamp(0, C - 1)
    valid = s[None, :] < (2 * tl + 1)[:, None]  # (B, W)
    prev = torch.cat([torch.full((B, 2), -1, device=dev, dtype=lab.dtype), lab[:, :-2]], 1)
    skip = odd[None, :] & (s[None, :] >= 3) & (lab != prev)
    # emissions on the extended sequence: (B, T, W)
    e = lp.gather(2, lab[:, None, :].expand(B, T, W)).clamp_min(_NEG)
    e = torch.where(valid[:, None, :], e, torch.full_like(e, _NEG))
    neg = torch.full((B, 1), _NEG, dtype=lp.dtype, device=dev)

    a = torch.where(s[None, :] < 2, e[:, 0], torch.full_like(e[:, 0], _NEG))
    alphas = [a]
    for t in range(1, T):
        s1 = torch.cat([neg, a[:, :-1]], 1)
        s2 = torch.where(skip, torch.cat([neg, neg, a[:, :-2]], 1), torch.full_like(a, _NEG))
        a = torch.logsumexp(torch.stack([a, s1, s2]), 0) + e[:, t]
        alphas.append(a)
    alpha = torch.stack(alphas, 1)  # (B, T, W)
    last = alpha[torch.arange(B, device=dev), (il - 1).clamp(min=0)]  # (B, W)
    end1 = last.gather(1, (2 * tl)[:, None])[:, 0]
    end2 = torch.where(tl > 0, last.gather(1, (2 * tl - 1).clamp(min=0)[:, None])[:, 0],
                       torch.full_like(end1, _NEG))
    nll = -torch.logsumexp(torch.stack([end1, end2]), 0)
    inf = torch.full_like(nll, float("inf"))
    nll = torch.where(nll > _INF_LIMIT, inf, nll)
    empty = torch.where(tl == 0, torch.zeros_like(nll), inf)
    return torch.where(il == 0, empty, nll)


def _reduce(nll, smooth, target_lengths, reduction, zero_infinity, label_smoothing, weights):
    """The loss from per-sample terms, written out sample by sample (the oracle of the kernels'
    reduction in narvl/ops/ctc.py):

    loss_b = w_b * ((1 - eps) * c_b - eps * smooth_b) with c_b = nll_b ('none', 'sum') or
    nll_b / max(L_b, 1) ('mean', then averaged over the batch).
    """
    eps = float(label_smoothing)
    per_sample = []
    for b in range(nll.shape[0]):
        c = nll[b]
        if zero_infinity and bool(torch.isinf(c)):
            c = torch.zeros_like(c)
        if reduction == "mean":
            c = c / max(int(target_lengths[b]), 1)
        term = c if eps == 0.0 else (1.0 - eps) * c - eps * smooth[b]
        per_sample.append(term if weights is None else term * weights[b].to(term.dtype))
    losses = torch.stack(per_sample)
    if reduction == "none":
        return losses
    total = losses.sum()
    return total if reduction == "sum" else total / len(per_sample)


def qctc_terms_reference(logits, targets, target_lengths, query_lengths, blank):
    """(nll (B,), smooth (B,)) of Q-CTC: smooth_b = mean over n < N_b and all v of log_softmax."""
    lp = torch.log_softmax(logits.double(), -1)
    B, N, V = lp.shape
    ql = torch.as_tensor(query_lengths, device=lp.device).long()
    nll = ctc_nll_reference(lp, targets, ql, target_lengths, blank)
    rows = (torch.arange(N, device=lp.device)[None, :] < ql[:, None]).to(lp.dtype)
    smooth = (lp.sum(-1) * rows).sum(1) / (ql.clamp_min(1).to(lp.dtype) * V)
    return nll, smooth


def qctc_loss_reference(logits, targets, target_lengths, query_lengths=None, blank=0,
                        reduction="mean", zero_infinity=True, label_smoothing=0.0, weights=None):
    """Q-CTC loss on logits (B, N, V) in float64 (see narvl.qctc_loss for the math)."""
    B, N, _ = logits.shape
    if query_lengths is None:
        query_lengths = torch.full((B,), N, dtype=torch.long, device=logits.device)
    tl = torch.as_tensor(target_lengths, device=logits.device).long()
    nll, smooth = qctc_terms_reference(logits, targets, tl, query_lengths, blank)
    return _reduce(nll, smooth, tl, reduction, zero_infinity, label_smoothing, weights)


def ctc_loss_reference(log_probs, targets, input_lengths, target_lengths, blank=0,
                       reduction="mean", zero_infinity=False):
    """F.ctc_loss semantics on time-first (T, B, C) log_probs and padded (B, S) targets."""
    tl = torch.as_tensor(target_lengths, device=log_probs.device).long()
    nll = ctc_nll_reference(log_probs.transpose(0, 1), targets, input_lengths, tl, blank)
    return _reduce(nll, None, tl, reduction, zero_infinity, 0.0, None)
