"""The stages of ``train.py --arch epalm`` and ``--arch epalm-nar``: eP-ALM (``narvl.models.epalm``)
on a frozen OPT and a frozen ViT that this module pretrains itself when none is given, since
nothing can be downloaded.

1. ``language_model``: the user's local ``OPTForCausalLM`` directory (``--lm``), or a small OPT
   (``LM_SIZE``) trained from scratch as a causal LM on the training split's texts
   (``lm_sequences``): for captioning every reference caption, for the other tasks the prompt
   followed by the target (VQA: question + answer; grounding: the expression + its 4 location
   bins), each ``[BOS] + tokens + [EOS]``; the loss is the token-mean cross-entropy of every
   token after the BOS. Its vocabulary is the project tokenizer's (``narvl.data.Tokenizer``,
   ids 0 / 1 / 2 = ``<s>`` / ``<pad>`` / ``</s>``, which become the OPT config's bos / pad /
   eos_token_id), so a user's LM must have been trained on that vocabulary too.
2. ``vision_model``: the user's local ``ViTModel`` directory (``--vision``), or a small ViT
   (``VIT_SIZE``, no pooler) trained from scratch to classify generated scenes
   (``narvl.data.shapes.render_scene`` under a seed of its own, so never the evaluation split's):
   multi-label over ``9 cells x 14 attributes`` (``scene_labels``: which shape, colour and size
   sits in each cell of the 3 x 3 grid), a linear head on the [CLS] state after the ViT's final
   LayerNorm (the state eP-ALM injects), mean binary cross-entropy. The head serves this
   pretraining only and is not saved.
   A pretrained model is written with ``save_pretrained`` into a temporary directory renamed to
   OUT/pretrained/lm or OUT/pretrained/vision (with ``narvl_pretraining.json``: its steps, losses
   and what it was trained for), and reused from there by a later run once that record matches
   the run's tokenizer or image size.
3. ``train_adapter``: an ``EPALM`` on the two frozen models trains its connector and soft prompt
   (and, for the NAR head, its queries and blank row). Prompt = the LM's BOS + the task's text
   input (the caption instruction, the question, ...); target = the answer tokens of
   ``TaskData.batch``, cut like the other architectures' at ``max_target_len`` tokens with the
   EOS (the model appends the EOS itself). VQA's per-answer weights are not used.
4. ``Served``: ``generate(images, text, beam_width)`` over train.py's batches, the interface of
   its evaluation and of ``narvl.models.time_generate``.

Every stage runs ``fit``: AdamW over the trained parameters (weight decay on the matrices only),
gradient norm clipped at 1, with the learning-rate schedule and the batch order of the other
architectures, passed in by train.py (``Recipe``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import OPTConfig, OPTForCausalLM, ViTConfig, ViTModel

from ..data import TaskData, Tokenizer, shapes
from ..data.tokenizer import BOS, EOS, PAD
from .epalm import EPALM, check_model_dir

#: The OPT pretrained here (its vocabulary is the tokenizer's).
LM_SIZE = dict(hidden_size=256, num_hidden_layers=4, ffn_dim=1024, num_attention_heads=4,
               max_position_embeddings=128)
#: The ViT pretrained here (its image size is the run's).
VIT_SIZE = dict(patch_size=8, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                intermediate_size=512)
#: Peak learning rate of both pretrainings (from scratch, a few hundred steps).
PRETRAIN_LR = 1e-3
#: Peak learning rate of the adapter: the authors' 2e-5 serves 8 COCO epochs on OPT-2.7B; a few
#: hundred steps on these small models need a larger one.
ADAPTER_LR = 1e-3
#: Adapter optimizer steps (``train.py --steps`` overrides): about 1 s each on one Zen 1 core
#: for the caption task's batch of 32, so the default run's adapter stage takes about 10 min on
#: one core, less on two.
ADAPTER_STEPS = 600
ATTRIBUTES = shapes.SHAPES + list(shapes.COLORS) + ["small", "big"]
CELLS = len(shapes.POSITIONS)
RECORD = "narvl_pretraining.json"


@dataclasses.dataclass
class Recipe:
    """How a stage trains: ``steps`` AdamW steps of ``batch_size`` samples at peak ``lr``;
    ``schedule(steps, warmup)`` gives the multiplier of ``lr`` per step and
    ``order(step, batch_size, n, seed)`` the sample indices of a step."""
    steps: int
    batch_size: int
    lr: float
    warmup: int
    weight_decay: float
    seed: int
    schedule: Callable
    order: Callable
    progress: bool = True


def fit(params, loss_of, n: int, recipe: Recipe, desc: str) -> tuple[list, float]:
    """Trains ``params`` for ``recipe.steps`` steps; ``loss_of(indices)`` is the loss of the
    samples ``indices`` of ``n``. Returns (the loss per step, seconds). A non-finite loss stops
    it (FloatingPointError) before its step."""
    params = list(params)
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": recipe.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=recipe.lr)
    sched = recipe.schedule(recipe.steps, recipe.warmup)
    bar = None
    if recipe.progress:
        from tqdm import tqdm
        bar = tqdm(total=recipe.steps, desc=desc, dynamic_ncols=True)
    losses, t0 = [], time.time()
    for step in range(recipe.steps):
        for g in opt.param_groups:
            g["lr"] = recipe.lr * sched(step)
        loss = loss_of(recipe.order(step, recipe.batch_size, n, recipe.seed))
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"{desc}: loss is {value} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(round(value, 5))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}")
    if bar is not None:
        bar.close()
    seconds = time.time() - t0
    if losses:
        print(f"[narvl] {desc}: {len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}, {seconds:.0f} s")
    return losses, seconds


def _pad(rows, value):
    """Right-padded (B, T) long tensor of ``rows`` and its bool mask."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return ids, torch.arange(width)[None] < torch.tensor([len(r) for r in rows])[:, None]


def _save_pretrained(model, directory, record):
    """``model.save_pretrained`` + the record, in a temporary directory renamed to ``directory``."""
    tmp = f"{os.path.abspath(directory)}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        model.save_pretrained(tmp)
        with open(os.path.join(tmp, RECORD), "w", encoding="utf-8") as f:
            json.dump(record, f)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_record(directory):
    try:
        with open(os.path.join(directory, RECORD), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{directory!r}: no readable {RECORD} ({e}); remove the directory to pretrain "
                         f"again") from e


# ------------------------------------------------------------------------------ language model


def lm_sequences(data: TaskData, tok: Tokenizer, max_len: int) -> list[list[int]]:
    """The LM pretraining corpus of a training split: ``[BOS] + tokens + [EOS]`` per reference
    caption (captioning) or per prompt + target (the other tasks), cut at ``max_len`` tokens."""
    seqs = []
    for s in data.samples:
        if data.task == "caption":
            seqs += [[BOS] + tok.encode(" " + r) + [EOS] for r in s.get("refs") or [s["target"]]]
        else:
            seqs.append([BOS] + tok.encode(s["text"]) + data.target_ids(s, tok))
    return [q[:max_len] for q in seqs]


def pretrain_lm(tok: Tokenizer, data: TaskData, recipe: Recipe):
    """A new OPT of ``LM_SIZE`` over the tokenizer's vocabulary, trained as a causal LM on
    ``lm_sequences(data)``. Returns (the model in eval mode, its record)."""
    torch.manual_seed(recipe.seed)
    lm = OPTForCausalLM(OPTConfig(vocab_size=tok.vocab_size, bos_token_id=BOS, pad_token_id=PAD,
                                  eos_token_id=EOS, word_embed_proj_dim=LM_SIZE["hidden_size"], **LM_SIZE))
    seqs = lm_sequences(data, tok, lm.config.max_position_embeddings)

    def loss_of(idx):
        ids, mask = _pad([seqs[i] for i in idx], PAD)
        return lm(input_ids=ids, attention_mask=mask.long(), labels=ids.masked_fill(~mask, -100)).loss

    lm.train()
    losses, seconds = fit(lm.parameters(), loss_of, len(seqs), recipe, "OPT pretraining")
    return lm.eval(), dict(steps=len(losses), losses=losses, seconds=round(seconds, 1), sequences=len(seqs),
                           batch_size=recipe.batch_size, lr=recipe.lr, tokenizer=tok.to_json())


def load_lm(path, tok: Tokenizer, flag: str = "--lm") -> OPTForCausalLM:
    """The ``OPTForCausalLM`` of a local directory (eval mode, eager attention), checked to cover
    the tokenizer's vocabulary; ValueError naming ``flag`` otherwise."""
    check_model_dir(path, "opt", flag)
    try:
        lm = OPTForCausalLM.from_pretrained(path, local_files_only=True, attn_implementation="eager")
    except (OSError, ValueError) as e:
        raise ValueError(f"{flag} {path!r}: {e}") from e
    if lm.config.vocab_size < tok.vocab_size:
        raise ValueError(f"{flag} {path!r}: its vocabulary has {lm.config.vocab_size} tokens, the tokenizer "
                         f"{tok.vocab_size}: the LM must be trained on this project's tokenizer (the one "
                         f"--data, --bpe-vocab and --num-bins make), e.g. an earlier run's OUT/pretrained/lm")
    return lm.eval()


def language_model(path, directory, tok: Tokenizer, data: TaskData, recipe: Recipe):
    """(frozen-to-be OPT, its record for metrics.json): the one at ``path`` (``--lm``, never
    written), else the one in ``directory``, pretrained there first when missing."""
    if path is not None:
        return load_lm(path, tok), dict(source="given", path=path, steps=0)
    source = "reused"
    if not os.path.exists(directory):
        lm, record = pretrain_lm(tok, data, recipe)
        _save_pretrained(lm, directory, record)
        source = "pretrained"
    else:
        print(f"[narvl] reusing the pretrained OPT in {directory}")
    record = _read_record(directory)
    if record.pop("tokenizer", None) != tok.to_json():
        raise ValueError(f"{directory!r} was pretrained with another tokenizer (other --data, --bpe-vocab or "
                         f"--num-bins): remove it or choose another --out")
    return load_lm(directory, tok, "pretrained LM"), dict(source=source, path=directory, **record)


# ------------------------------------------------------------------------------ vision model


def scene_labels(objects) -> torch.Tensor:
    """(CELLS * len(ATTRIBUTES),) float multi-hot: entry ``cell * len(ATTRIBUTES) + a`` is 1 when
    the object in ``cell`` has attribute ``a`` (its shape, its colour, small or big)."""
    y = torch.zeros(CELLS, len(ATTRIBUTES))
    for o in objects:
        for attr in (o["shape"], o["color"], "big" if o["big"] else "small"):
            y[o["cell"], ATTRIBUTES.index(attr)] = 1.0
    return y.flatten()


def scenes(n: int, image_size: int, seed: int):
    """``n`` generated scenes of their own seed: (uint8 images (n, 3, S, S), labels (n, CELLS * 14))."""
    rng = random.Random(f"narvl-epalm-vision-pretraining-{seed}")
    images = torch.empty(n, 3, image_size, image_size, dtype=torch.uint8)
    labels = torch.empty(n, CELLS * len(ATTRIBUTES))
    for i in range(n):
        images[i], objects = shapes.render_scene(rng, image_size)
        labels[i] = scene_labels(objects)
    return images, labels


def pretrain_vision(image_size: int, n_scenes: int, recipe: Recipe):
    """A new ViT of ``VIT_SIZE`` trained on ``scenes``. Returns (the ViT in eval mode, its record)."""
    images, labels = scenes(n_scenes, image_size, recipe.seed)
    torch.manual_seed(recipe.seed)
    vit = ViTModel(ViTConfig(image_size=image_size, num_channels=3, **VIT_SIZE), add_pooling_layer=False)
    head = nn.Linear(vit.config.hidden_size, labels.shape[1])

    def loss_of(idx):
        x = images[idx].float().div_(127.5).sub_(1.0)  # [-1, 1], as TaskData.batch
        cls = vit(pixel_values=x).last_hidden_state[:, 0]
        return F.binary_cross_entropy_with_logits(head(cls), labels[idx])

    vit.train()
    losses, seconds = fit(list(vit.parameters()) + list(head.parameters()), loss_of, n_scenes, recipe,
                          "ViT pretraining")
    return vit.eval(), dict(steps=len(losses), losses=losses, seconds=round(seconds, 1), scenes=n_scenes,
                            labels=dict(cells=CELLS, attributes=ATTRIBUTES), batch_size=recipe.batch_size, lr=recipe.lr,
                            image_size=image_size)


def load_vision(path, image_size: int, flag: str = "--vision") -> ViTModel:
    """The ``ViTModel`` of a local directory (eval mode), checked to take ``image_size`` RGB images;
    ValueError naming ``flag`` otherwise."""
    check_model_dir(path, "vit", flag)
    try:
        vit = ViTModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{flag} {path!r}: {e}") from e
    size, channels = vit.config.image_size, vit.config.num_channels
    if size != image_size or channels != 3:
        raise ValueError(f"{flag} {path!r}: the ViT takes {channels}-channel {size} px images, the data are "
                         f"RGB {image_size} px (--image-size)")
    return vit.eval()


def vision_model(path, directory, image_size: int, n_scenes: int, recipe: Recipe):
    """(frozen-to-be ViT, its record for metrics.json): the one at ``path`` (``--vision``, never
    written), else the one in ``directory``, pretrained there first when missing."""
    if path is not None:
        return load_vision(path, image_size), dict(source="given", path=path, steps=0)
    source = "reused"
    if not os.path.exists(directory):
        vit, record = pretrain_vision(image_size, n_scenes, recipe)
        _save_pretrained(vit, directory, record)
        source = "pretrained"
    else:
        print(f"[narvl] reusing the pretrained ViT in {directory}")
    record = _read_record(directory)
    if record.get("image_size") != image_size:
        raise ValueError(f"{directory!r} was pretrained on {record.get('image_size')} px images, not "
                         f"--image-size {image_size}: remove it or choose another --out")
    return load_vision(directory, image_size, "pretrained ViT"), dict(source=source, path=directory, **record)


# ------------------------------------------------------------------------------ adapter


def lm_prompt(text: torch.Tensor, bos: int):
    """The LM prompt of train.py's encoder text (B, T) = ``[BOS] prompt [EOS]`` padded with PAD:
    (ids (B, T), mask (B, T) bool) of ``[bos] prompt``, right-padded."""
    mask = (text != PAD) & (text != EOS)
    ids = text.masked_fill(~mask, PAD)
    ids[:, 0] = bos
    return ids, mask


def lm_bos(model: EPALM) -> int:
    """The LM config's BOS id, else the tokenizer's."""
    bos = getattr(model.lm.config, "bos_token_id", None)
    return bos if isinstance(bos, int) and not isinstance(bos, bool) else BOS


def train_adapter(model: EPALM, data: TaskData, tok: Tokenizer, recipe: Recipe, max_text_len: int,
                  max_target_len: int) -> tuple[list, float, int]:
    """Trains ``model``'s adapter on ``data`` (see the module docstring), leaving it in eval mode.
    Returns (the loss per step, seconds, targets cut at ``max_target_len``)."""
    bos, stats = lm_bos(model), {}

    def loss_of(idx):
        images, text, targets, lengths, _ = data.batch(idx, tok, max_text_len, max_target_len, stats=stats)
        ids, mask = lm_prompt(text, bos)
        answer = torch.arange(targets.shape[1])[None] < (lengths - 1)[:, None]  # the EOS left out
        return model.loss(images, ids, mask, targets, answer)

    model.train()
    losses, seconds = fit(model.trainable_parameters(), loss_of, len(data), recipe,
                          f"eP-ALM adapter ({model.head} head)")
    model.eval()
    return losses, seconds, stats.get("cut", 0)


def settings(model: EPALM) -> dict:
    """The adapter's settings, for metrics.json."""
    return dict(head=model.head, num_queries=model.num_queries, prompt_len=model.prompt_len,
                injected_hidden_states=model.injected_hidden_states, start_layer_idx=model.start_layer_idx,
                end_layer_idx=model.end_layer_idx, lm_layers=len(model.lm.model.decoder.layers),
                lm_hidden_size=model.lm.config.hidden_size, vision_layers=model.vision.config.num_hidden_layers,
                vision_hidden_size=model.vision.config.hidden_size,
                vision_patch_size=model.vision.config.patch_size)


class Served:
    """An eP-ALM model behind train.py's ``generate(images, text, beam_width)``: ``text`` is its
    encoder text, turned into the LM prompt by ``lm_prompt``; at most ``max_new_tokens`` tokens."""

    def __init__(self, model: EPALM, max_new_tokens: int):
        self.model, self.max_new_tokens, self.bos = model.eval(), max_new_tokens, lm_bos(model)

    def generate(self, images, text, beam_width: int = 1) -> list[list[int]]:
        ids, mask = lm_prompt(text, self.bos)
        return self.model.generate(images, ids, mask, max_new_tokens=self.max_new_tokens, beam_width=beam_width)
