"""Sequence-level knowledge distillation (Kim & Rush, 2016), as the NARVL authors train their
published models: an autoregressive teacher decodes the training split once, and NARVL trains on
the teacher's outputs instead of the references.

``distill_data(teacher_path, data, tok, cfg, cache_dir, beam_width)`` returns a copy of ``data``
whose samples carry ``target_ids`` (the teacher's tokens; ``TaskData.batch`` appends EOS). The
decoded targets are cached in ``cache_dir`` under a key of the teacher file's hash, the beam
width and the split's contents, and reused when the key matches.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile

import torch

from ..checkpoint import load_model_state, read_checkpoint
from ..data import TaskData, Tokenizer
from .ar import ARBaseline
from .config import NARVLConfig
from .inference import prepare_for_inference


def load_teacher(path: str, task: str, tok: Tokenizer, cfg: NARVLConfig) -> ARBaseline:
    """The AR checkpoint at ``path``, checked against the student: same task, same vocabulary
    (tokenizer), same image size and text length. Raises ValueError naming what differs."""
    tensors, meta = read_checkpoint(path)
    arch, t_task = meta.get("arch"), meta.get("task")
    if arch != "ar":
        raise ValueError(f"distillation teacher {path!r} is a {arch!r} model; it must be an AR "
                         f"checkpoint (train.py --arch ar)")
    if t_task != task:
        raise ValueError(f"distillation teacher {path!r} was trained for task {t_task!r}, the student "
                         f"for {task!r}")
    t_cfg = NARVLConfig.from_json(meta["config"])
    if meta.get("tokenizer") != tok.to_json() or t_cfg.vocab_size != cfg.vocab_size:
        raise ValueError(f"distillation teacher {path!r} has another vocabulary than the student "
                         f"({t_cfg.vocab_size} vs {cfg.vocab_size} entries, or other BPE merges / "
                         f"bins): train the teacher on the same data and tokenizer settings")
    for name in ("image_size", "max_text_len"):
        if getattr(t_cfg, name) != getattr(cfg, name):
            raise ValueError(f"distillation teacher {path!r} has {name} = {getattr(t_cfg, name)}, "
                             f"the student {getattr(cfg, name)}")
    teacher = ARBaseline(t_cfg)
    load_model_state(teacher, tensors, meta)
    return teacher


def _sha1_file(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _split_key(data: TaskData) -> str:
    h = hashlib.sha1()
    for s in data.samples:
        h.update(repr((s["text"], s["image"] if not isinstance(s["image"], int) else int(s["image"]))).encode())
    if data.images is not None:
        h.update(data.images.numpy().tobytes())
    return h.hexdigest()


@torch.inference_mode()
def teacher_targets(teacher: ARBaseline, data: TaskData, tok: Tokenizer, beam_width: int = 1,
                    batch: int = 64) -> list:
    """The teacher's decoded token ids (no EOS) for every sample of ``data``."""
    infer = prepare_for_inference(teacher)
    out = []
    for i in range(0, len(data), batch):
        idx = list(range(i, min(i + batch, len(data))))
        images, text, *_ = data.batch(idx, tok, teacher.cfg.max_text_len)
        out += infer.generate(images, text, beam_width=beam_width)
    return out


def distill_data(teacher_path: str, data: TaskData, tok: Tokenizer, cfg: NARVLConfig, task: str,
                 cache_dir: str, beam_width: int = 1, log=print):
    """(distilled copy of ``data``, info dict). See the module docstring."""
    teacher = load_teacher(teacher_path, task, tok, cfg)
    key = dict(teacher_sha1=_sha1_file(teacher_path), beam_width=beam_width, split=_split_key(data),
               n=len(data))
    cache = os.path.join(cache_dir, "distill_targets.json")
    targets = None
    if os.path.isfile(cache):
        try:
            with open(cache, encoding="utf-8") as f:
                saved = json.load(f)
            if saved.get("key") == key:
                targets = saved["targets"]
                log(f"[narvl] distillation: reusing {len(targets)} teacher outputs from {cache}")
        except (OSError, ValueError, KeyError) as e:
            log(f"[narvl] distillation: ignoring unreadable cache {cache} ({e})")
    reused = targets is not None
    if targets is None:
        log(f"[narvl] distillation: decoding {len(data)} training samples with {teacher_path} "
            f"(beam {beam_width})")
        targets = teacher_targets(teacher, data, tok, beam_width)
        os.makedirs(cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".distill-", suffix=".tmp", dir=cache_dir)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(dict(key=key, targets=targets), f)
        os.replace(tmp, cache)
    samples = [dict(s, target_ids=list(t)) for s, t in zip(data.samples, targets)]
    changed = sum(data.target_ids(s, tok)[:-1] != list(t) for s, t in zip(data.samples, targets))
    info = dict(teacher=os.path.abspath(teacher_path), beam_width=beam_width, cache=cache,
                cache_reused=reused, samples=len(samples), differ_from_reference=changed)
    return TaskData(data.task, samples, data.image_size, data.images, data.skipped), info
