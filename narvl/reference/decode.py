"""Pure-Python references for CTC decoding (slow; for tests, benchmarks and builds without C++).

``beam_search_reference`` is the textbook CTC prefix beam search written with tuples as prefix
keys: per frame, for every prefix with probabilities (pb: alignments ending in blank, pnb:
ending in a non-blank) and every candidate token c with probability p,
    c == blank:           next[prefix].pb  += (pb + pnb) * p
    c == last(prefix):    next[prefix + c].pnb += pb * p;  next[prefix].pnb += pnb * p
    otherwise:            next[prefix + c].pnb += (pb + pnb) * p
then the beam_width most probable prefixes survive. ``labeling_logprobs_bruteforce`` sums over
every alignment explicitly (tiny T and V only).
"""
from __future__ import annotations

import itertools
import math

import torch


def greedy_decode_reference(scores, lengths, blank):
    """scores (B, T, V) -> (tokens (B, T) int64 padded with -1, out_lens (B,))."""
    B, T, _ = scores.shape
    best = scores.float().argmax(-1).cpu()
    tokens = torch.full((B, T), -1, dtype=torch.long)
    out_lens = torch.zeros(B, dtype=torch.long)
    for b in range(B):
        prev, n = -1, 0
        for t in range(int(lengths[b])):
            c = int(best[b, t])
            if c != blank and c != prev:
                tokens[b, n] = c
                n += 1
            prev = c
        out_lens[b] = n
    return tokens.to(scores.device), out_lens.to(scores.device)


def _candidates(row, top_n, cutoff_prob):
    order = sorted(range(len(row)), key=lambda v: (-row[v], v))[:top_n]
    if cutoff_prob < 1.0:
        keep, mass = 0, 0.0
        while keep < len(order) and mass < cutoff_prob:
            mass += math.exp(row[order[keep]])
            keep += 1
        order = order[: max(keep, 1)]
    return [(v, math.exp(row[v])) for v in order]


def beam_search_reference(scores, lengths, beam_width, blank, cutoff_top_n, cutoff_prob, nbest,
                          log_input=True):
    """Same contract as narvl.ctc_prefix_beam_search (tuple of 4 tensors)."""
    B, T, V = scores.shape
    lp = scores.double().cpu()
    if not log_input:
        lp = lp.log()
    tokens = torch.full((B, nbest, T), -1, dtype=torch.long)
    steps = torch.full((B, nbest, T), -1, dtype=torch.long)
    lens = torch.zeros(B, nbest, dtype=torch.long)
    out = torch.full((B, nbest), float("-inf"), dtype=torch.float32)
    for b in range(B):
        beam = {(): (1.0, 0.0)}
        first_t = {(): ()}
        log_scale = 0.0
        for t in range(int(lengths[b])):
            nxt = {}

            def add(key, dpb, dpnb):
                pb, pnb = nxt.get(key, (0.0, 0.0))
                nxt[key] = (pb + dpb, pnb + dpnb)

            for prefix, (pb, pnb) in beam.items():
                last = prefix[-1] if prefix else None
                for c, p in _candidates(lp[b, t].tolist(), cutoff_top_n, cutoff_prob):
                    if c == blank:
                        add(prefix, (pb + pnb) * p, 0.0)
                        continue
                    ext = prefix + (c,)
                    first_t.setdefault(ext, first_t[prefix] + (t,))
                    if c == last:
                        add(ext, 0.0, pb * p)
                        add(prefix, 0.0, pnb * p)
                    else:
                        add(ext, 0.0, (pb + pnb) * p)
            ranked = sorted(nxt.items(), key=lambda kv: -(kv[1][0] + kv[1][1]))[:beam_width]
            mx = max((pb + pnb for _, (pb, pnb) in ranked), default=0.0)
            if mx <= 0.0:
                beam = {}
                break
            beam = {k: (pb / mx, pnb / mx) for k, (pb, pnb) in ranked}
            log_scale += math.log(mx)
        ranked = sorted(beam.items(), key=lambda kv: -(kv[1][0] + kv[1][1]))[:nbest]
        for k, (prefix, (pb, pnb)) in enumerate(ranked):
            lens[b, k] = len(prefix)
            if prefix:
                tokens[b, k, : len(prefix)] = torch.tensor(prefix)
                steps[b, k, : len(prefix)] = torch.tensor(first_t[prefix])
            out[b, k] = math.log(pb + pnb) + log_scale
    dev = scores.device
    return tokens.to(dev), lens.to(dev), out.to(dev), steps.to(dev)


def labeling_logprobs_bruteforce(log_probs, blank):
    """{labeling tuple: log P(labeling)} summing over all V^T alignments of log_probs (T, V)."""
    T, V = log_probs.shape
    lp = log_probs.double().tolist()
    probs = {}
    for path in itertools.product(range(V), repeat=T):
        lab, prev = [], None
        for c in path:
            if c != blank and c != prev:
                lab.append(c)
            prev = c
        p = math.exp(sum(lp[t][c] for t, c in enumerate(path)))
        probs[tuple(lab)] = probs.get(tuple(lab), 0.0) + p
    return {k: math.log(v) for k, v in probs.items() if v > 0}
