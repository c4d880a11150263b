"""Task data in one format for the shapes generator and the file loaders, and batching.

A ``TaskData`` holds images (uint8 (n, 3, S, S), or file paths loaded on demand) and samples:
dicts with ``image`` (index or path), ``text`` (encoder prompt), ``target`` (str, or a pixel box
(x0, y0, x1, y1) for grounding), ``weight`` and the evaluation fields (``refs``, ``answers``,
``box``, ``label``). ``batch`` turns sample indices into model tensors:

    images (B, 3, S, S) float in [-1, 1]; text (B, Lt) = [<s>] + BPE + [</s>], pad-right;
    targets (B, Ls) = answer BPE (or 4 bins) + [</s>], pad-right; target_lengths (B,); weights (B,)
"""
from __future__ import annotations

import torch

from .tokenizer import EOS, PAD, Tokenizer


def load_image(path: str, size: int):
    """A file as uint8 (3, size, size) and its (width, height) before resizing. A missing file
    or one that does not decode raises ValueError naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            wh = im.size
            im = im.resize((size, size), Image.BICUBIC)
            t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3)
    except FileNotFoundError:
        raise ValueError(f"image {path!r} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:  # PIL's errors for bad or truncated files
        raise ValueError(f"image {path!r} cannot be decoded: {e}") from None
    return t.permute(2, 0, 1).contiguous(), wh


class TaskData:
    def __init__(self, task: str, samples: list, image_size: int, images: torch.Tensor | None = None,
                 skipped: dict | None = None):
        if not samples:
            raise ValueError("a dataset needs at least one sample")
        self.task, self.samples, self.image_size, self.images = task, samples, image_size, images
        self.skipped = dict(skipped or {})  # what a loader left out: reason -> count

    def __len__(self):
        return len(self.samples)

    def image(self, s):
        if isinstance(s["image"], int):
            return self.images[s["image"]]
        img, _ = load_image(s["image"], self.image_size)
        return img

    def target_ids(self, s, tok: Tokenizer) -> list[int]:
        """The sample's target + [EOS]: ``s["target_ids"]`` when set (e.g. a distillation
        teacher's output), else the encoded ``s["target"]``."""
        if "target_ids" in s:
            return [int(i) for i in s["target_ids"]] + [EOS]
        if self.task == "grounding":
            return tok.box_to_ids(s["target"], self.image_size) + [EOS]
        return tok.encode(" " + s["target"]) + [EOS]

    def count_cut(self, tok: Tokenizer, max_target_len: int) -> int:
        """How many samples ``batch`` cuts at ``max_target_len`` (target + EOS longer than it)."""
        return sum(len(self.target_ids(s, tok)) > max_target_len for s in self.samples)

    def batch(self, idx, tok: Tokenizer, max_text_len: int | None = None, max_target_len: int | None = None,
              stats: dict | None = None):
        """images (B, 3, S, S) in [-1, 1], text (B, Lt) = [BOS] + prompt + [EOS] right-padded (cut
        at ``max_text_len``), targets (B, Lo) = answer + [EOS] right-padded (answers longer than
        ``max_target_len`` - 1 tokens are cut, EOS kept), target lengths (B,), weights (B,).
        With ``stats`` (a dict), ``stats["cut"]`` counts the targets cut."""
        ss = [self.samples[i] for i in idx]
        images = torch.stack([self.image(s) for s in ss]).float().div_(127.5).sub_(1.0)
        texts = [tok.source(s["text"]) for s in ss]
        if max_text_len is not None:
            texts = [t[:max_text_len] for t in texts]
        tgts = [self.target_ids(s, tok) for s in ss]
        if max_target_len is not None:
            if stats is not None:
                stats["cut"] = stats.get("cut", 0) + sum(len(t) > max_target_len for t in tgts)
            tgts = [t if len(t) <= max_target_len else t[: max_target_len - 1] + [EOS] for t in tgts]
        text = torch.full((len(ss), max(map(len, texts))), PAD, dtype=torch.long)
        for i, t in enumerate(texts):
            text[i, : len(t)] = torch.tensor(t)
        targets = torch.full((len(ss), max(map(len, tgts))), PAD, dtype=torch.long)
        for i, t in enumerate(tgts):
            targets[i, : len(t)] = torch.tensor(t)
        lengths = torch.tensor([len(t) for t in tgts])
        weights = torch.tensor([float(s.get("weight", 1.0)) for s in ss])
        return images, text, targets, lengths, weights


def sample_texts(samples) -> list[str]:
    """Every text of ``samples`` (prompts, string targets, references, answers): the corpus a
    BPE tokenizer is trained on."""
    texts = []
    for s in samples:
        texts.append(s["text"])
        if isinstance(s["target"], str):
            texts.append(" " + s["target"])
        texts += [" " + r for r in s.get("refs", [])] + [" " + a for a in s.get("answers", [])]
    return texts
