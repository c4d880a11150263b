"""Task metrics (higher is better), written for narvl.

- ``vqa_accuracy``: the official VQA accuracy (VQA v2's vqaEval with the EvalAI answer
  processing): mean over the leave-one-annotator-out subsets of min(#matching answers / 3, 1);
  the prediction is always normalised (``vqa_normalize``: punctuation, number words to digits,
  articles dropped, contractions restored), the annotators' answers only when they disagree.
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
    """Light normalisation for exact-match labels: lower case, punctuation to spaces, no articles."""
    a = re.sub(r"[^\w\s]", " ", a.lower())
    return " ".join(w for w in a.split() if w not in _ARTICLES)


# ---- the official VQA answer normalisation (vqaEval.py), written for narvl -----------------

# number words the evaluation maps to digits ("none" counts as 0)
_VQA_NUMBERS = {w: str(i) for i, w in enumerate(
    ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"])}
_VQA_NUMBERS["none"] = "0"

# contractions written without their apostrophe, and the form the evaluation restores
_VQA_CONTRACTIONS = {}
for _fixed in (
        "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't "
        "haven't he'd he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've it'll ma'am "
        "mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't shan't she'd've "
        "should've shouldn't shouldn't've somebody'd've somebody'll somebody's someone'd "
        "someone'd've someone'll someone's something'd something'd've something'll that's there'd "
        "there'd've there're there's they'd they'd've they'll they're they've wasn't we'd've we've "
        "weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll "
        "who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll "
        "you'd you'd've you'll you're you've").split():
    parts = _fixed.split("'")
    if len(parts) == 2:  # one apostrophe: the form written without it
        _VQA_CONTRACTIONS[parts[0] + parts[1]] = _fixed
    else:  # two: the forms missing one of them (not the form missing both)
        _VQA_CONTRACTIONS[parts[0] + parts[1] + "'" + parts[2]] = _fixed
        _VQA_CONTRACTIONS[parts[0] + "'" + parts[1] + parts[2]] = _fixed
# entries of the official table that follow no rule (kept as they are, quirks included)
_VQA_CONTRACTIONS.update({
    "let's": "let's", "she's": "she's", "somebody'd": "somebodyd", "twas": "'twas",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've"})

_VQA_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
              "`", ",", "?", "!"]
_VQA_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")   # a period not followed by a digit
_VQA_COMMA_NUMBER = re.compile(r"(\d)(,)(\d)")    # a comma inside a number ("1,000")


def _vqa_punctuation(text: str) -> str:
    """Each punctuation mark is deleted when it touches a space or the text holds a number with a
    comma, else replaced by a space; then periods not before a digit go (as vqaEval, whose
    re.sub passes re.UNICODE as the count, so at most 32 of them)."""
    out = text
    number_comma = _VQA_COMMA_NUMBER.search(text) is not None
    for p in _VQA_PUNCT:
        if p + " " in text or " " + p in text or number_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _VQA_PERIOD.sub("", out, count=32)


def _vqa_digits_articles(text: str) -> str:
    """Lower case; number words to digits; articles dropped; contractions restored."""
    words = [_VQA_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_VQA_CONTRACTIONS.get(w, w) for w in words)


def _vqa_clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_normalize(answer: str) -> str:
    """The official normalisation of a VQA answer (what the evaluation applies to predictions)."""
    return _vqa_digits_articles(_vqa_punctuation(_vqa_clean(answer)))


def vqa_accuracy(pred: str, answers) -> float:
    """Official VQA accuracy of one prediction against its annotators' answers (10 in VQA v2).

    For each annotator i: min(1, #{j != i : answer_j == pred} / 3), averaged over i. The
    prediction is normalised with ``vqa_normalize``; the annotators' answers too when they are
    not all the same string, else only stripped (as vqaEval).
    """
    if isinstance(answers, str) or not len(answers):
        raise ValueError("answers must be a non-empty list of strings")
    gts = [_vqa_clean(str(a)) for a in answers]
    if len(set(gts)) > 1:
        gts = [vqa_normalize(a) for a in gts]
    p = vqa_normalize(str(pred))
    hits = [a == p for a in gts]
    total = sum(hits)
    return sum(min(1.0, (total - h) / 3.0) for h in hits) / len(gts)


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
