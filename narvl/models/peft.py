"""Parameter-efficient adaptation after eP-ALM: freeze the network, train a few parameters.

``enable_peft(model, soft_prompt=True)`` freezes every parameter, then adds and trains:
- an output-side projection ``out_adapter`` (Linear d -> d, initialised to the identity) applied
  before the tied vocabulary projection;
- optionally one soft-prompt token (1, d) prepended to the text tokens in the encoder;
- for ``NARVL``, the N learnable queries.
For the tiny preset that is under 1% of the parameters.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..nn import Linear


def enable_peft(model: nn.Module, soft_prompt: bool = True) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    d = model.cfg.d_model
    dev = next(model.parameters()).device
    adapter = Linear(d, d).to(dev)
    with torch.no_grad():
        adapter.weight.copy_(torch.eye(d))
        adapter.bias.zero_()
    model.out_adapter = adapter
    if soft_prompt:
        model.encoder.soft_prompt = nn.Parameter(torch.randn(1, 1, d, device=dev) * 0.02)
    if hasattr(model, "queries"):
        model.queries.requires_grad_(True)
    return model


def trainable_fraction(model: nn.Module) -> tuple[int, int, float]:
    """(trainable parameters, all parameters, trainable / all)."""
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return train, total, train / max(total, 1)
