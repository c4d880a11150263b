"""Task metrics (higher is better), written for narvl.

- ``vqa_accuracy``: official VQA accuracy, mean over the 10 leave-one-annotator-out subsets of
  min(#matching answers / 3, 1), after light normalisation (case, punctuation, articles).
- ``bleu4``: corpus BLEU-4 as coco-caption computes it (clipped n-gram precisions, geometric
  mean, brevity penalty against the closest reference length).
- ``cider``: CIDEr-D (n = 1..4 tf-idf vectors with document frequencies from the references,
  clipped by the reference counts, Gaussian length penalty sigma = 6, x10, mean over references
  and n).
- ``box_iou`` / ``grounding_accuracy``: Acc@IoU >= 0.5.
- ``accuracy``: exact match.
"""
from __future__ import annotations

import math
import re
from collections import Counter

_ARTICLES = {"a", "an", "the"}


def normalize_answer(a: str) -> str:
    a = re.sub(r"[^\w\s]", " ", a.lower())
    return " ".join(w for w in a.split() if w not in _ARTICLES)


def vqa_accuracy(pred: str, answers) -> float:
    answers = [normalize_answer(x) for x in answers]
    if not answers:
        raise ValueError("answers must not be empty")
    p = normalize_answer(pred)
    m = [x == p for x in answers]
    tot = sum(m)
    return sum(min((tot - mi) / 3.0, 1.0) for mi in m) / len(answers)


def _tok(s: str):
    return re.sub(r"[^\w\s]", " ", s.lower()).split()


def _ngrams(words, n):
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def bleu4(preds, refs) -> float:
    """Corpus BLEU-4 in [0, 1]. preds: list of str; refs: list of lists of str."""
    if len(preds) != len(refs) or not preds:
        raise ValueError("preds and refs must be non-empty and of equal length")
    match, total = [0] * 4, [0] * 4
    hyp_len = ref_len = 0
    for p, rs in zip(preds, refs):
        pw, rws = _tok(p), [_tok(r) for r in rs]
        hyp_len += len(pw)
        ref_len += min((abs(len(r) - len(pw)), len(r)) for r in rws)[1]
        for n in range(1, 5):
            h = _ngrams(pw, n)
            mx = Counter()
            for r in rws:
                mx |= _ngrams(r, n)
            match[n - 1] += sum(min(c, mx[g]) for g, c in h.items())
            total[n - 1] += max(len(pw) - n + 1, 0)
    if min(match) == 0:
        return 0.0
    logp = sum(math.log(m / t) for m, t in zip(match, total)) / 4
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / max(hyp_len, 1))
    return bp * math.exp(logp)


def cider(preds, refs, sigma: float = 6.0) -> float:
    """Corpus CIDEr-D, raw scale (papers report x100: OFA's 138.2 is 1.382 here)."""
    if len(preds) != len(refs) or not preds:
        raise ValueError("preds and refs must be non-empty and of equal length")
    ref_ng = [[[_ngrams(_tok(r), n) for n in range(1, 5)] for r in rs] for rs in refs]
    df = Counter()
    for rs in ref_ng:
        for n in range(4):
            df.update(set(g for r in rs for g in r[n]))
    log_n = math.log(float(len(refs)))

    def vec(counts):
        out, norms = [], []
        for n in range(4):
            v = {g: c * (log_n - math.log(max(1.0, df[g]))) for g, c in counts[n].items()}
            out.append(v)
            norms.append(math.sqrt(sum(x * x for x in v.values())))
        return out, norms

    total = 0.0
    for p, rs, rng_ in zip(preds, refs, ref_ng):
        pw = _tok(p)
        pv, pn = vec([_ngrams(pw, n) for n in range(1, 5)])
        score = [0.0] * 4
        for r, rc in zip(rs, rng_):
            rv, rn = vec(rc)
            delta = len(pw) - len(_tok(r))
            for n in range(4):
                dot = sum(min(val, rv[n][g]) * rv[n][g] for g, val in pv[n].items() if g in rv[n])
                if pn[n] and rn[n]:
                    score[n] += dot / (pn[n] * rn[n]) * math.exp(-(delta ** 2) / (2 * sigma ** 2))
        total += sum(s / len(rs) for s in score) / 4 * 10.0
    return total / len(preds)


def box_iou(a, b) -> float:
    """IoU of two (x0, y0, x1, y1) boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = lambda r: max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])  # noqa: E731
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def grounding_accuracy(pred_boxes, gt_boxes, thresh: float = 0.5) -> float:
    """Fraction with IoU >= thresh; a None prediction (not 4 bins) counts as a miss."""
    if len(pred_boxes) != len(gt_boxes) or not gt_boxes:
        raise ValueError("pred_boxes and gt_boxes must be non-empty and of equal length")
    return sum(p is not None and box_iou(p, g) >= thresh for p, g in zip(pred_boxes, gt_boxes)) / len(gt_boxes)


def accuracy(preds, labels) -> float:
    if len(preds) != len(labels) or not labels:
        raise ValueError("preds and labels must be non-empty and of equal length")
    return sum(normalize_answer(p) == normalize_answer(l) for p, l in zip(preds, labels)) / len(labels)
