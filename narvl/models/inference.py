"""Inference copies of a model: the same function, arranged for batch-1 serving on CPU.

``prepare_for_inference(model)`` returns a deep copy in eval mode with gradients off, every
BatchNorm of the ResNet stages folded into its conv (``fold_batchnorm_``) and, for float32 CPU
weights, the folded convs pre-packed for fused oneDNN primitives (``pack_for_cpu_``). Every
attention keeps fused weights (``OFAAttention.fuse_for_inference_``: q/k/v in one matmul, k/v of
the cross-attention memory in one, NormFormer's ``c_attn`` folded into ``out_proj``). Every
linear weight (``narvl.nn.Linear``, the fused attention weights, the tied output projection) is
pre-packed once into oneDNN's blocked layout, so calls of 8 or more rows run one oneDNN matmul
(+GELU) without reordering the weight each time; calls of 1-7 rows (an AR step) keep ATen's
``addmm`` (``narvl.ops.linear``). The encoder keeps its position biases (absolute + relative, OFA's) per
text length (``Encoder.cache_biases_``) and the decoders theirs. The shared encoder gets the same
treatment in ``NARVL`` and ``ARBaseline``, so latency comparisons between them stay like for like
(``train.py``, ``bench/``). NARVL also computes its first decoder layer's self-attention block
once (``NARVL.cache_first_self_attention_``): that block sees only the learnable queries, so its
output is a constant at inference.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..nn import Linear
from .cache import DEFAULT_CACHE_BYTES, PackedWeight
from .layers import OFAAttention
from .resnet import fold_batchnorm_, pack_for_cpu_


def prepare_for_inference(model: nn.Module, image_size: int | None = None,
                          cache_bytes: int = DEFAULT_CACHE_BYTES, pack_linear: bool = True) -> nn.Module:
    """A prepared copy of ``model`` (a ``NARVL`` or ``ARBaseline``); ``model`` is unchanged.
    ``image_size`` (default ``model.cfg.image_size``) picks the packed conv layout only;
    ``cache_bytes`` caps the encoder's per-text-length bias cache (LRU); ``pack_linear=False``
    keeps the linear weights unpacked (the packed copies add about the linear weights' size
    in memory). Every snapshot of the copy (packed convs and weights, bias caches, NARVL's first
    block) is recomputed when the copy's own parameters change in place
    (``narvl.models.cache.ParamStamp``)."""
    if not hasattr(model, "encoder") or not hasattr(model, "cfg"):
        raise TypeError(f"expected a NARVL or ARBaseline model, got {type(model).__name__}")
    infer = copy.deepcopy(model).eval()
    backbone = infer.encoder.backbone
    fold_batchnorm_(backbone)
    pack_for_cpu_(backbone, image_size or model.cfg.image_size)
    for m in infer.modules():
        if isinstance(m, OFAAttention):
            m.fuse_for_inference_(pack=pack_linear)  # q/k/v in one matmul, c_attn folded into out_proj
        elif isinstance(m, Linear) and pack_linear:
            m.pack_for_inference_()  # oneDNN-blocked weight, no reorder per call
    if pack_linear:
        infer.out_pack = PackedWeight(infer.embed_tokens, "weight")  # the tied output projection
    infer.encoder.cache_biases_(cache_bytes)  # position biases: constants per text length
    infer.cache_first_self_attention_(cache_bytes)  # decoder position biases (+ NARVL's first block)
    for p in infer.parameters():
        p.requires_grad_(False)
    return infer


@dataclass
class Timing:
    """``best_ms``: mean over samples of each sample's best time (ms); ``round_ms``: per round,
    the mean time per sample (ms)."""
    best_ms: float
    round_ms: list


@torch.inference_mode()
def time_generate(models: dict, inputs: list, beam_width: int = 1, rounds: int = 5, warmup: int = 3):
    """Batch-1 decode latency, encoder included, of each of ``models`` (name -> inference copy)
    on the same ``inputs`` [(images (1, 3, S, S), text (1, Lt))] -> {name: ``Timing``}.

    After ``warmup`` samples each, ``rounds`` rounds in which the models take turns, each
    decoding all inputs one after another (as a server would), so a change in the machine's
    speed hits them alike. ``best_ms`` keeps each sample's best over the rounds: the estimate
    least disturbed by other processes on a shared machine (``train.py``, ``bench/bench_tasks.py``).
    """
    for m in models.values():
        for images, text in inputs[:warmup]:
            m.generate(images, text, beam_width=beam_width)
    best = {k: [float("inf")] * len(inputs) for k in models}
    per_round = {k: [] for k in models}
    for _ in range(rounds):
        for k, m in models.items():
            row = best[k]
            t_round = time.perf_counter()
            for i, (images, text) in enumerate(inputs):
                t0 = time.perf_counter()
                m.generate(images, text, beam_width=beam_width)
                row[i] = min(row[i], time.perf_counter() - t0)
            per_round[k].append((time.perf_counter() - t_round) / len(inputs) * 1e3)
    return {k: Timing(sum(best[k]) / len(inputs) * 1e3, per_round[k]) for k in models}
