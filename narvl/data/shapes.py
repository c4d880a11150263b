"""The embedded default dataset: scenes of shapes rendered with Pillow, generated
deterministically from a seed (offline, no downloads), with the four paper tasks.

A scene holds 1-3 objects in distinct cells of a 3x3 grid; each object has a shape (circle,
square, triangle, diamond, cross), a colour (red, green, blue, yellow, purple, cyan, orange), a size (small, big)
and a jitter inside its cell; the background is a random dark tint with noise.
From each scene's description:
- caption: one canonical caption (objects in reading order, "big red circle top left , blue
  square center and green triangle bottom"), the training target; two paraphrases join it as
  evaluation references (CIDEr, BLEU-4).
- vqa: colour / shape / count / existence / position questions with 10 simulated annotator
  answers, stored in the official evaluation's normal form as VQA v2 stores them (counts as
  digits; some questions get disagreeing annotators); training uses one annotator's answer
  weighted by its VQA soft score (1.0 / 0.9 / 0.6 / 0.3), as VQA training with confidences.
- grounding: a referring expression that identifies one object; target = its box as 4 bins.
- entailment: a hypothesis entailed (yes), contradicted (no) or undecidable (maybe).
"""
from __future__ import annotations

import random

import torch

from .dataset import sample_texts
from .metrics import vqa_accuracy, vqa_normalize

SHAPES = ["circle", "square", "triangle", "diamond", "cross"]
COLORS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 230),
          "yellow": (235, 220, 50), "purple": (160, 60, 200), "cyan": (40, 210, 220),
          "orange": (245, 140, 30)}
POSITIONS = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom",
             "bottom right"]
NUMBERS = ["zero", "one", "two", "three"]
NEUTRAL = ["made of wood", "heavy", "new", "old", "shiny", "expensive", "warm"]
TASKS = ("caption", "vqa", "grounding", "entailment")

PROMPTS = {
    "caption": " what does the image describe?",
    "vqa": " {}",
    "grounding": ' which region does the text " {} " describe?',
    "entailment": ' does the image describe " {} "?',
}


def _draw(draw, shape, box, fill):
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    else:  # cross
        w = (x1 - x0) / 3
        draw.rectangle((cx - w / 2, y0, cx + w / 2, y1), fill=fill)
        draw.rectangle((x0, cy - w / 2, x1, cy + w / 2), fill=fill)


def render_scene(rng: random.Random, size: int):
    """Returns (uint8 tensor (3, size, size), objects: list of dicts with shape, color, big,
    cell, box (x0, y0, x1, y1) pixels)."""
    from PIL import Image, ImageDraw

    bg = tuple(rng.randint(20, 70) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    cell = size / 3
    n = rng.choice((1, 2, 2, 3, 3))
    cells = sorted(rng.sample(range(9), n))
    objs = []
    for c in cells:
        big = rng.random() < 0.5
        half = cell * (0.45 if big else 0.28)
        cx = (c % 3 + 0.5) * cell + rng.uniform(-0.5, 0.5) * (cell / 2 - half)
        cy = (c // 3 + 0.5) * cell + rng.uniform(-0.5, 0.5) * (cell / 2 - half)
        box = (round(cx - half), round(cy - half), round(cx + half), round(cy + half))
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        _draw(draw, shape, box, COLORS[color])
        objs.append(dict(shape=shape, color=color, big=big, cell=c, box=box))
    t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3)
    t = t.permute(2, 0, 1).contiguous()
    noise = torch.randint(-12, 13, t.shape, generator=torch.Generator().manual_seed(rng.getrandbits(31)))
    return (t.to(torch.int16) + noise).clamp(0, 255).to(torch.uint8), objs


def _name(o):
    return f"{'big' if o['big'] else 'small'} {o['color']} {o['shape']}"


def _join(parts):
    return parts[0] if len(parts) == 1 else " , ".join(parts[:-1]) + " and " + parts[-1]


def captions(objs):
    """(canonical, [references]) for a scene."""
    canon = _join([f"{_name(o)} {POSITIONS[o['cell']]}" for o in objs])
    p1 = _join([f"a {_name(o)} at the {POSITIONS[o['cell']]}" for o in objs])
    p2 = _join([f"{_name(o)} {POSITIONS[o['cell']]}" for o in reversed(objs)])
    return canon, [canon, p1, p2]


def _exprs(o):
    """Referring expressions for an object, shortest first; the last is always unique."""
    return [o["shape"], f"{o['color']} {o['shape']}", _name(o), f"{_name(o)} at the {POSITIONS[o['cell']]}"]


def _unique_expr(o, objs):
    """The shortest expression that names ``o`` and no other object of the scene."""
    for k, expr in enumerate(_exprs(o)):
        if sum(_exprs(x)[k] == expr for x in objs) == 1:
            return expr
    return _exprs(o)[-1]


def _vqa(rng, objs):
    kind = rng.randrange(6)
    o = rng.choice(objs)
    shapes = [x["shape"] for x in objs]
    if kind == 0 and shapes.count(o["shape"]) == 1:
        q, a, alts = f"what color is the {o['shape']}?", o["color"], list(COLORS)
    elif kind == 1:
        q, a, alts = f"what shape is at the {POSITIONS[o['cell']]}?", o["shape"], SHAPES
    elif kind == 2:
        q, a, alts = "how many shapes are there?", NUMBERS[len(objs)], NUMBERS[1:]
    elif kind == 3:
        if rng.random() < 0.5:
            color, shape = o["color"], o["shape"]
        else:
            color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        yes = any(x["color"] == color and x["shape"] == shape for x in objs)
        q, a, alts = f"is there a {color} {shape}?", "yes" if yes else "no", ["yes", "no"]
    elif kind == 4:
        q, a, alts = f"where is the {_unique_expr(o, objs)}?", POSITIONS[o["cell"]], POSITIONS
    else:
        color = rng.choice([x["color"] for x in objs] + list(COLORS))
        q, a = f"how many {color} shapes are there?", NUMBERS[sum(x["color"] == color for x in objs)]
        alts = NUMBERS
    n_wrong = rng.choice((0, 0, 0, 0, 1, 2, 3, 4)) if len(alts) > 1 else 0
    wrong = [rng.choice([x for x in alts if x != a]) for _ in range(n_wrong)]
    answers = [a] * (10 - n_wrong) + wrong
    rng.shuffle(answers)
    # stored as VQA v2 stores them: in the official evaluation's normal form ("two" -> "2")
    answers = [vqa_normalize(x) for x in answers]
    pick = rng.choice(answers)
    return q, answers, pick, vqa_accuracy(pick, answers)


def _entail(rng, objs):
    kind = rng.randrange(3)
    o = rng.choice(objs)
    if kind == 0:  # entailed
        h = rng.choice([f"there is a {o['color']} {o['shape']}", f"there are {NUMBERS[len(objs)]} shapes",
                        f"the {o['color']} {o['shape']} is {'big' if o['big'] else 'small'}"])
        return h, "yes"
    if kind == 1:  # contradicted
        colors = [c for c in COLORS if not any(x["color"] == c and x["shape"] == o["shape"] for x in objs)]
        n = rng.choice([k for k in (1, 2, 3) if k != len(objs)])
        h = rng.choice([f"there is a {rng.choice(colors)} {o['shape']}", f"there are {NUMBERS[n]} shapes",
                        f"the {o['color']} {o['shape']} is {'small' if o['big'] else 'big'}"])
        if h.startswith("the ") and sum(x["color"] == o["color"] and x["shape"] == o["shape"] for x in objs) > 1:
            h = f"there are {NUMBERS[n]} shapes"
        return h, "no"
    return f"the {o['color']} {o['shape']} is {rng.choice(NEUTRAL)}", "maybe"


def generate(task: str, n: int, image_size: int = 64, seed: int = 0):
    """n samples of ``task``: (images uint8 (n, 3, S, S), samples: list of dicts with ``text``
    (the encoder prompt), ``target`` (str, or a box for grounding), ``weight`` and the
    evaluation fields ``refs`` / ``answers`` / ``box`` / ``label``)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    rng = random.Random(f"narvl-shapes-{task}-{seed}")
    images = torch.empty(n, 3, image_size, image_size, dtype=torch.uint8)
    samples = []
    for i in range(n):
        images[i], objs = render_scene(rng, image_size)
        s = {"image": i, "weight": 1.0}
        if task == "caption":
            canon, refs = captions(objs)
            s.update(text=PROMPTS["caption"], target=canon, refs=refs)
        elif task == "vqa":
            q, answers, pick, w = _vqa(rng, objs)
            s.update(text=PROMPTS["vqa"].format(q), target=pick, weight=w, answers=answers)
        elif task == "grounding":
            o = rng.choice(objs)
            s.update(text=PROMPTS["grounding"].format(_unique_expr(o, objs)), target=list(o["box"]),
                     box=list(o["box"]))
        else:
            h, label = _entail(rng, objs)
            s.update(text=PROMPTS["entailment"].format(h), target=label, label=label)
        samples.append(s)
    return images, samples


def corpus(image_size: int = 64, seed: int = 0, n: int = 2000):
    """Every text the four tasks can produce (prompts, targets, references) for BPE training."""
    texts = []
    for task in TASKS:
        texts += sample_texts(generate(task, n, image_size, seed)[1])
    return texts
