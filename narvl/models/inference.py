"""Inference copies of a model: the same function, arranged for batch-1 serving on CPU.

``prepare_for_inference(model)`` returns a deep copy in eval mode with gradients off, every
BatchNorm of the ResNet stages folded into its conv (``fold_batchnorm_``) and, for float32 CPU
weights, the folded convs pre-packed for fused oneDNN primitives (``pack_for_cpu_``). The
transformer layers need no preparation: ``narvl.nn.Linear``/``FeedForward`` pick oneDNN's fused
matmul (+GELU) by themselves for inference calls with 8+ rows; the encoder keeps its
relative-position biases per text length (``Encoder.cache_biases_``). The shared encoder gets the same
treatment in ``NARVL`` and ``ARBaseline``, so latency comparisons between them stay like for like
(``train.py``, ``bench/``). NARVL also computes its first decoder layer's self-attention block
once (``NARVL.cache_first_self_attention_``): that block sees only the learnable queries, so its
output is a constant at inference (0.2 ms of a batch-1 caption decode here).
"""
from __future__ import annotations

import copy

import torch.nn as nn

from .resnet import fold_batchnorm_, pack_for_cpu_


def prepare_for_inference(model: nn.Module, image_size: int | None = None) -> nn.Module:
    """A prepared copy of ``model`` (a ``NARVL`` or ``ARBaseline``); ``model`` is unchanged.
    ``image_size`` (default ``model.cfg.image_size``) picks the packed conv layout only."""
    if not hasattr(model, "encoder") or not hasattr(model, "cfg"):
        raise TypeError(f"expected a NARVL or ARBaseline model, got {type(model).__name__}")
    infer = copy.deepcopy(model).eval()
    backbone = infer.encoder.backbone
    fold_batchnorm_(backbone)
    pack_for_cpu_(backbone, image_size or model.cfg.image_size)
    infer.encoder.cache_biases_()  # relative-position biases: constants per text length
    if hasattr(infer, "cache_first_self_attention_"):  # NARVL: its queries are constants here
        infer.cache_first_self_attention_()
    for p in infer.parameters():
        p.requires_grad_(False)
    return infer
