"""Parameter-efficient adaptation after eP-ALM: freeze the network, train a few parameters.

``enable_peft(model, soft_prompt=True)`` freezes every parameter, then adds and trains:
- an output-side projection ``out_adapter`` (Linear d -> d, initialised to the identity) applied
  before the tied vocabulary projection;
- optionally one soft-prompt token (1, d) prepended to the text tokens in the encoder;
- for ``NARVL``, the N learnable queries.
For the tiny preset that is under 1% of the parameters.
"""
from __future__ import annotations

import torch.nn as nn


def enable_peft(model: nn.Module, soft_prompt: bool = True) -> nn.Module:
    """Freezes ``model`` (a ``NARVL`` or ``ARBaseline``) and adds its trainable modules, through
    the model's own ``add_adapters_`` (what ``NARVL(cfg, peft=True)`` builds)."""
    if not hasattr(model, "add_adapters_"):
        raise TypeError(f"expected a NARVL or ARBaseline model, got {type(model).__name__}")
    return model.add_adapters_(soft_prompt)


def trainable_fraction(model: nn.Module) -> tuple[int, int, float]:
    """(trainable parameters, all parameters, trainable / all)."""
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return train, total, train / max(total, 1)
