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

FLT_MIN = 1.1754943508222875e-38  # float32's smallest normal: ctcdecode adds it to probabilities


def greedy_decode_reference(scores, lengths, blank, merge_repeats=True):
    """scores (B, T, V) -> (tokens (B, T) int64 padded with -1, out_lens (B,))."""
    B, T, _ = scores.shape
    best = scores.float().argmax(-1).cpu()
    tokens = torch.full((B, T), -1, dtype=torch.long)
    out_lens = torch.zeros(B, dtype=torch.long)
    for b in range(B):
        prev, n = -1, 0
        for t in range(int(lengths[b])):
            c = int(best[b, t])
            if c != blank and (c != prev or not merge_repeats):
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
    return [(v, math.exp(row[v]), row[v]) for v in order]


def to_log_probs(scores, input_kind):
    """(B, T, V) scores as float64 log-probabilities: input_kind 0 probabilities (log(p +
    FLT_MIN)), 1 log-probabilities, 2 logits (True/False mean 1/0)."""
    x = scores.double().cpu()
    kind = int(input_kind)
    if kind == 0:
        return (x + FLT_MIN).log()  # as ctcdecode: a zero probability is log(FLT_MIN), not -inf
    if kind == 2:
        return x.log_softmax(-1)
    return x


def beam_search_reference(scores, lengths, beam_width, blank, cutoff_top_n, cutoff_prob, nbest,
                          input_kind=1):
    """Same contract as narvl.ctc_prefix_beam_search (tuple of 4 tensors).

    Timesteps follow ctcdecode: a prefix's last token is stamped with the frame at which that
    token's log-probability was highest among the frames that extended the prefix's parent by
    it, counted while the prefix stayed alive (it, or a longer prefix of it, in the beam); a
    prefix that died starts afresh. Prefixes whose probability is 0 are dropped."""
    B, T, V = scores.shape
    lp = to_log_probs(scores, input_kind)
    tokens = torch.full((B, nbest, T), -1, dtype=torch.long)
    steps = torch.full((B, nbest, T), -1, dtype=torch.long)
    lens = torch.zeros(B, nbest, dtype=torch.long)
    out = torch.full((B, nbest), float("-inf"), dtype=torch.float32)
    for b in range(B):
        beam = {(): (1.0, 0.0)}
        rec = {}  # alive prefix -> (best log-prob of its last token, frame)
        log_scale = 0.0
        for t in range(int(lengths[b])):
            nxt = {}

            def add(key, dpb, dpnb):
                pb, pnb = nxt.get(key, (0.0, 0.0))
                nxt[key] = (pb + dpb, pnb + dpnb)

            cands = _candidates(lp[b, t].tolist(), cutoff_top_n, cutoff_prob)
            for prefix, (pb, pnb) in beam.items():
                last = prefix[-1] if prefix else None
                for c, p, lpc in cands:
                    if c == blank:
                        add(prefix, (pb + pnb) * p, 0.0)
                        continue
                    ext = prefix + (c,)
                    if ext not in rec or rec[ext][0] < lpc:
                        rec[ext] = (lpc, t)
                    if c == last:
                        add(ext, 0.0, pb * p)
                        add(prefix, 0.0, pnb * p)
                    else:
                        add(ext, 0.0, (pb + pnb) * p)
            ranked = sorted(nxt.items(), key=lambda kv: -(kv[1][0] + kv[1][1]))[:beam_width]
            ranked = [kv for kv in ranked if kv[1][0] + kv[1][1] > 0]
            if not ranked:
                beam = {}
                break
            mx = max(pb + pnb for _, (pb, pnb) in ranked)
            beam = {k: (pb / mx, pnb / mx) for k, (pb, pnb) in ranked}
            log_scale += math.log(mx)
            alive = {k[:i] for k in beam for i in range(len(k) + 1)}
            rec = {k: v for k, v in rec.items() if k in alive}
        ranked = sorted(beam.items(), key=lambda kv: -(kv[1][0] + kv[1][1]))[:nbest]
        for k, (prefix, (pb, pnb)) in enumerate(ranked):
            lens[b, k] = len(prefix)
            if prefix:
                tokens[b, k, : len(prefix)] = torch.tensor(prefix)
                steps[b, k, : len(prefix)] = torch.tensor([rec[prefix[: i + 1]][1]
                                                           for i in range(len(prefix))])
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


# ------------------------------------------------------------- language models and hotwords

OOV_SCORE = -1000.0


class ArpaReference:
    """A plain-Python ARPA back-off model (natural log), independent of the C++ loader."""

    def __init__(self, text):
        self.grams, order, section = {}, 0, None
        for line in text.splitlines():
            f = line.split()
            if not f:
                continue
            if f[0] == "\\data\\":
                section = "data"
            elif f[0] == "\\end\\":
                break
            elif f[0].startswith("\\") and f[0].endswith("-grams:"):
                section = int(f[0][1:-7])
                order = max(order, section)
            elif section == "data":
                continue
            elif isinstance(section, int):
                n = section
                bo = float(f[n + 1]) if len(f) == n + 2 else 0.0
                self.grams[tuple(f[1:n + 1])] = (float(f[0]) * math.log(10), bo * math.log(10))
        self.order = order
        self.vocab = {g[0] for g in self.grams if len(g) == 1} - {"<unk>"}

    def cond(self, ctx, w):
        """ln P(w | ctx) with ctcdecode's out-of-vocabulary rule."""
        if any(x not in self.vocab for x in (*ctx, w)):
            return OOV_SCORE
        ctx = tuple(ctx)[len(ctx) - (self.order - 1):] if self.order > 1 else ()
        bo = 0.0
        for k in range(len(ctx), -1, -1):
            h = ctx[len(ctx) - k:]
            if h + (w,) in self.grams:
                return bo + self.grams[h + (w,)][0]
            if k > 0 and h in self.grams:
                bo += self.grams[h][1]
        raise AssertionError("unreachable: every known word has a unigram")


def _lse(a, b):
    if a == float("-inf"):
        return b
    if b == float("-inf"):
        return a
    m = max(a, b)
    return m + math.log(math.exp(a - m) + math.exp(b - m))


def hotword_boost(text, hotwords, weight):
    """pyctcdecode's hotword score of a text: weight per complete word that is a hotword, plus
    weight * len(partial) / len(shortest hotword starting with it) for the last, unfinished
    word (``text`` not ending in a space)."""
    if not hotwords:
        return 0.0
    words = text.split(" ")
    done, part = words[:-1], words[-1]
    score = weight * sum(1 for w in done if w in hotwords)
    starts = [len(h) for h in hotwords if h.startswith(part)]
    if part and starts:
        score += weight * len(part) / min(starts)
    return score


def beam_search_lm_reference(log_probs, labels, blank, beam_width, cutoff_top_n, lm=None, alpha=0.0,
                             beta=0.0, hotwords=(), hotword_weight=10.0):
    """ctcdecode's prefix beam search with a language model (``ArpaReference``), written from its
    algorithm in log space, plus pyctcdecode-style hotwords. log_probs (T, V) -> list of
    (labels tuple, returned score = ctcdecode's approximate CTC log score) ranked as ctcdecode
    ranks them. Prefixes with probability 0 are dropped."""
    lp = log_probs.double().tolist()
    ninf = float("-inf")
    space = labels.index(" ") if " " in labels else -1
    char_based = lm is not None and all(len(w) <= 1 for w in lm.vocab - {"<s>", "</s>"})
    lexicon = None
    if lm is not None and not char_based:
        spell = [w for w in lm.vocab | {"<unk>"}
                 if all(ch in labels and ch != " " and labels.index(ch) != blank for ch in w)]
        lexicon = (set(spell), {w[:i] for w in spell for i in range(len(w) + 1)})
    text = lambda p: "".join(labels[c] for c in p)  # noqa: E731
    hot = set(hotwords)
    boost = lambda p: hotword_boost(text(p), hot, hotword_weight)  # noqa: E731
    order = lm.order if lm is not None else 0

    def words_of(p):
        return [w for w in text(p).split(" ") if w] if not char_based else list(text(p))

    def ngram_score(ws):
        ctx = ["<s>"] * (order - 1) + ws[:-1]
        return lm.cond(ctx[len(ctx) - (order - 1):] if order > 1 else [], ws[-1])

    def allowed(prefix, c):
        if lexicon is None:
            return True
        whole, parts = lexicon
        cur = text(prefix).split(" ")[-1]
        if c == space:
            return cur in whole
        return cur + labels[c] in parts

    beam = {(): (0.0, ninf)}
    for t in range(len(lp)):
        row = lp[t]
        cands = sorted(range(len(row)), key=lambda v: (-row[v], v))[:cutoff_top_n]
        scores = {p: _lse(*v) for p, v in beam.items()}
        order_p = sorted(beam, key=lambda p: -scores[p])
        min_cutoff, full = ninf, False
        if lm is not None:
            min_cutoff = scores[order_p[-1]] + row[blank] - max(0.0, beta)
            full = len(beam) == beam_width
        nxt = {}

        def add(key, i, v):
            cur = list(nxt.get(key, (ninf, ninf)))
            cur[i] = _lse(cur[i], v)
            nxt[key] = tuple(cur)

        for c in cands:
            lpc = row[c]
            for p in order_p:
                pb, pnb = beam[p]
                sc = scores[p]
                if full and lpc + sc < min_cutoff:
                    break
                if c == blank:
                    add(p, 0, lpc + sc)
                    continue
                last = p[-1] if p else None
                if c == last:
                    add(p, 1, lpc + pnb)
                if not allowed(p, c):
                    continue
                ext = p + (c,)
                v = lpc + pb if c == last else lpc + sc
                if lm is not None and (c == space or char_based):
                    ws = words_of(p) if not char_based else words_of(ext)
                    v += alpha * ngram_score(ws) + beta
                v += boost(ext) - boost(p)
                add(ext, 1, v)
        ranked = sorted(nxt.items(), key=lambda kv: -_lse(*kv[1]))[:beam_width]
        beam = {p: v for p, v in ranked if _lse(*v) > ninf}
        if not beam:
            break
    out = []
    for p, v in beam.items():
        sc = _lse(*v)
        ext = sc
        if lexicon is not None and p and p[-1] != space:
            cur = text(p).split(" ")[-1]
            ws = words_of(p)
            s = ngram_score(ws) if cur in lexicon[0] else OOV_SCORE
            ext += alpha * s + beta
        approx = ext - boost(p)
        if lm is not None:
            ws = words_of(p)
            sent = ["<s>"] * (order if not ws else order - 1) + ws + ["</s>"]
            sent_lp = sum(lm.cond(sent[i:i + order - 1], sent[i + order - 1])
                          for i in range(len(sent) - order + 1))
            approx -= len(p) * beta + alpha * sent_lp
        out.append((sc, p, approx))
    out.sort(key=lambda x: -x[0])
    return [(p, approx) for _, p, approx in out]
