"""Test-only oracle: the OFA team's own PyTorch port of OFA, shipped in ``modelscope``
(``modelscope/models/multi_modal/ofa/modeling_ofa.py``), imported without the rest of modelscope.

Its only imports outside torch/transformers are fairseq's ``LayerNorm`` (for its ViT, unused
here), given a stand-in. ``load()`` returns the module, or None with the reason when modelscope
or transformers is not installed (``pip install -e ".[oracle]"``).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

import torch


def load():
    """(modeling_ofa module, None) or (None, reason)."""
    try:
        spec = importlib.util.find_spec("modelscope")
        importlib.import_module("transformers")
    except ImportError as e:
        return None, f"the OFA oracle needs transformers and modelscope ({e})"
    if spec is None or not spec.submodule_search_locations:
        return None, "the OFA oracle needs modelscope (pip install -e '.[oracle]')"
    root = os.path.join(spec.submodule_search_locations[0], "models", "multi_modal", "ofa")
    if not os.path.isfile(os.path.join(root, "modeling_ofa.py")):
        return None, f"modelscope has no OFA port at {root}"
    if "fairseq" not in sys.modules:  # only its ViT imports fairseq (LayerNorm)
        fs, fsm = types.ModuleType("fairseq"), types.ModuleType("fairseq.modules")
        fsm.LayerNorm = torch.nn.LayerNorm
        fs.modules = fsm
        sys.modules["fairseq"], sys.modules["fairseq.modules"] = fs, fsm
    if "_narvl_ofa_oracle" not in sys.modules:
        pkg = types.ModuleType("_narvl_ofa_oracle")
        pkg.__path__ = [root]
        sys.modules["_narvl_ofa_oracle"] = pkg
    return importlib.import_module("_narvl_ofa_oracle.modeling_ofa"), None


def tiny_ofa(mod, d=64, layers=(2, 2), heads=4, resnet="resnet50", vocab=120, seed=0, **config):
    """A small OFAModel (eval) with every weight perturbed, so a wrong implementation cannot
    match by accident: norms, BatchNorm statistics, c_attn and the relative tables included.
    ``config``: other ``OFAConfig`` fields (e.g. ``entangle_position_embedding``)."""
    cfg = mod.OFAConfig(vocab_size=vocab, d_model=d, encoder_layers=layers[0], decoder_layers=layers[1],
                        encoder_attention_heads=heads, decoder_attention_heads=heads,
                        encoder_ffn_dim=4 * d, decoder_ffn_dim=4 * d, resnet_type=resnet,
                        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, **config)
    torch.manual_seed(seed)
    m = mod.OFAModel(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("c_attn"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif "norm" in name or "_ln" in name or name.endswith(("bn1.weight", "bn2.weight", "bn3.weight")) \
                    or "downsample.1" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            elif "rel_pos_table" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        for name, b in m.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return m
