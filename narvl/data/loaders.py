"""Loaders for the datasets users bring, into ``TaskData`` (images read from disk on demand).

- ``load_vqa_v2(questions_json, annotations_json, image_dir)``: VQA v2 question and annotation
  files; images ``{image_dir}/COCO_{data_subtype}_{image_id:012d}.jpg``. Training target = the
  most frequent answer (``multiple_choice_answer`` when present), normalised as the official
  evaluation does, weight = its VQA accuracy; evaluation keeps the 10 raw answers.
- ``load_coco_captions(captions_json, image_dir, per_caption=False)``: COCO ``captions_*.json``;
  references = all captions of the image; evaluation (default) has one sample per image (target =
  its first caption), training (``per_caption=True``) one sample per caption (target = that
  caption), so no caption is left out.
- ``load_refcoco(refs_json, image_dir, split=None)``: a JSON list of referring expressions,
  each ``{"file_name" | "image", "bbox": [x, y, w, h] (COCO pixels), "sentences": [str or
  {"sent": str}], "split"?}``; one sample per sentence; the box is rescaled to ``image_size``.
- ``load_snli_ve(jsonl, image_dir)``: SNLI-VE lines with ``Flickr30k_ID``, ``sentence2`` and
  ``gold_label`` (entailment / contradiction / neutral -> yes / no / maybe); images
  ``{image_dir}/{Flickr30k_ID}.jpg``.
- ``load_spec(task, spec, image_size, base_dir, split)``: one of the above from a dict of file
  names (``SPEC_KEYS[task]``), as ``train.py --data`` reads them from a JSON file (``split``
  "train" gives COCO one sample per caption).
"""
from __future__ import annotations

import json
import os
from collections import Counter

from .dataset import TaskData, load_image
from .metrics import vqa_accuracy, vqa_normalize
from .shapes import PROMPTS

SNLI_LABELS = {"entailment": "yes", "contradiction": "no", "neutral": "maybe"}


def _read_json(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{what}: no such file {path!r}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: {path!r} is not valid JSON ({e})") from None


def _need(d, keys, what):
    missing = [k for k in keys if k not in d]
    if missing:
        raise ValueError(f"{what}: entry lacks {missing}: {str(d)[:120]}")


def load_vqa_v2(questions_json, annotations_json, image_dir, image_size=480):
    q = _read_json(questions_json, "questions_json")
    a = _read_json(annotations_json, "annotations_json")
    if "questions" not in q:
        raise ValueError("questions_json: no 'questions' list")
    if "annotations" not in a:
        raise ValueError("annotations_json: no 'annotations' list")
    subtype = q.get("data_subtype", a.get("data_subtype", "val2014"))
    ann = {}
    for x in a["annotations"]:
        _need(x, ("question_id", "answers"), "annotations_json")
        ann[x["question_id"]] = x
    samples = []
    for x in q["questions"]:
        _need(x, ("question_id", "image_id", "question"), "questions_json")
        if x["question_id"] not in ann:
            raise ValueError(f"annotations_json: no annotation for question {x['question_id']}")
        y = ann[x["question_id"]]
        answers = [str(r["answer"]) for r in y["answers"]]  # raw: vqa_accuracy normalises as vqaEval
        best = vqa_normalize(y.get("multiple_choice_answer", "")) or \
            Counter(vqa_normalize(a) for a in answers).most_common(1)[0][0]
        w = vqa_accuracy(best, answers) if answers else 0.0
        samples.append(dict(image=os.path.join(image_dir, f"COCO_{subtype}_{x['image_id']:012d}.jpg"),
                            text=PROMPTS["vqa"].format(x["question"]), target=best, weight=w,
                            answers=answers))
    return TaskData("vqa", samples, image_size)


def load_coco_captions(captions_json, image_dir, image_size=480, per_caption=False):
    d = _read_json(captions_json, "captions_json")
    if "images" not in d or "annotations" not in d:
        raise ValueError("captions_json: needs 'images' and 'annotations'")
    caps = {}
    for x in d["annotations"]:
        _need(x, ("image_id", "caption"), "captions_json")
        caps.setdefault(x["image_id"], []).append(x["caption"].strip())
    samples, no_caption = [], 0
    for im in d["images"]:
        _need(im, ("id", "file_name"), "captions_json images")
        refs = caps.get(im["id"])
        no_caption += not refs
        for r in (refs or [])[: None if per_caption else 1]:
            samples.append(dict(image=os.path.join(image_dir, im["file_name"]), text=PROMPTS["caption"],
                                target=r.lower(), refs=refs, weight=1.0))
    if not samples:
        raise ValueError(f"captions_json: {captions_json!r} has no image with a caption")
    return TaskData("caption", samples, image_size,
                    skipped={"images without captions": no_caption} if no_caption else None)


def load_refcoco(refs_json, image_dir, image_size=512, split=None):
    refs = _read_json(refs_json, "refs_json")
    if not isinstance(refs, list):
        raise ValueError("refs_json: expected a JSON list of referring expressions")
    samples = []
    for r in refs:
        if split is not None and r.get("split") != split:
            continue
        _need(r, ("bbox", "sentences"), "refs_json")
        fname = r.get("file_name", r.get("image"))
        if fname is None:
            raise ValueError("refs_json: entry lacks 'file_name' (or 'image')")
        path = os.path.join(image_dir, fname)
        x, y, w, h = map(float, r["bbox"])
        if w <= 0 or h <= 0:
            raise ValueError(f"refs_json: bbox must have positive width and height, got {r['bbox']}")
        W, H = r.get("width"), r.get("height")
        if W is None or H is None:
            _, (W, H) = load_image(path, 16)
        sx, sy = image_size / W, image_size / H
        box = [x * sx, y * sy, (x + w) * sx, (y + h) * sy]
        for s in r["sentences"]:
            sent = s["sent"] if isinstance(s, dict) else str(s)
            samples.append(dict(image=path, text=PROMPTS["grounding"].format(sent), target=box, box=box,
                                weight=1.0))
    return TaskData("grounding", samples, image_size)


def load_snli_ve(jsonl, image_dir, image_size=480):
    samples = []
    try:
        f = open(jsonl, encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"jsonl: no such file {jsonl!r}") from None
    with f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                x = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"jsonl line {ln}: not valid JSON ({e})") from None
            _need(x, ("Flickr30k_ID", "sentence2", "gold_label"), f"jsonl line {ln}")
            if x["gold_label"] not in SNLI_LABELS:
                raise ValueError(f"jsonl line {ln}: gold_label must be one of {sorted(SNLI_LABELS)}, "
                                 f"got {x['gold_label']!r}")
            label = SNLI_LABELS[x["gold_label"]]
            samples.append(dict(image=os.path.join(image_dir, f"{x['Flickr30k_ID']}.jpg"),
                                text=PROMPTS["entailment"].format(x["sentence2"].strip().rstrip(".")),
                                target=label, label=label, weight=1.0))
    return TaskData("entailment", samples, image_size)


# train.py --data: the keys of one split's entry, per task (paths relative to the spec file).
SPEC_KEYS = {
    "vqa": ("questions", "annotations", "images"),
    "caption": ("captions", "images"),
    "grounding": ("refs", "images"),        # optional "split"
    "entailment": ("jsonl", "images"),
}


def load_spec(task: str, spec: dict, image_size: int, base_dir: str = ".", split: str = "eval") -> TaskData:
    """``TaskData`` for ``task`` from one split's entry of a ``--data`` file, e.g. for VQA
    ``{"questions": "q.json", "annotations": "a.json", "images": "val2014/"}``; relative paths
    are taken from ``base_dir``."""
    if task not in SPEC_KEYS:
        raise ValueError(f"task must be one of {sorted(SPEC_KEYS)}, got {task!r}")
    if not isinstance(spec, dict):
        raise ValueError(f"a {task} data entry must be an object with keys {list(SPEC_KEYS[task])}")
    allowed = set(SPEC_KEYS[task]) | ({"split"} if task == "grounding" else set())
    missing = [k for k in SPEC_KEYS[task] if k not in spec]
    unknown = sorted(set(spec) - allowed)
    if missing or unknown:
        raise ValueError(f"a {task} data entry needs keys {list(SPEC_KEYS[task])}"
                         + (f"; missing {missing}" if missing else "")
                         + (f"; unknown {unknown}" if unknown else ""))
    path = {k: os.path.join(base_dir, str(spec[k])) for k in SPEC_KEYS[task]}
    if task == "vqa":
        return load_vqa_v2(path["questions"], path["annotations"], path["images"], image_size)
    if task == "caption":
        return load_coco_captions(path["captions"], path["images"], image_size, per_caption=split == "train")
    if task == "grounding":
        return load_refcoco(path["refs"], path["images"], image_size, split=spec.get("split"))
    return load_snli_ve(path["jsonl"], path["images"], image_size)

