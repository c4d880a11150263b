"""OFA's multimodal encoder, shared by ``NARVL`` and ``ARBaseline`` (OFA ``unify_transformer``).

    images (B, 3, S, S) --embed_images (ResNet stages 1-3)--> (B, 1024, h, w), h = w = S / 16
        --flatten, image_proj + type_embedding[1], patch_layernorm_embedding--> (B, h*w, d)
    text (B, Lt) (OFA ids, right-padded with pad_id) --embed_tokens + type_embedding[0],
        layernorm_embedding--> (B, Lt, d)
    (with ``cfg.entangle_position_embedding``, OFA's option, the raw image / text position
    embeddings are added to the content before the type embedding)
    x = [image ; (soft prompt) ; text], padded positions zeroed
        --EncoderLayer x enc_layers (pre-LN + NormFormer), layer_norm--> memory (B, h*w + Lt, d)

Positions enter as attention biases (and, only with OFA's ``--entangle-position-embedding``,
also in the content as above):
- absolute: p = [image_pos_ln(embed_image_positions[r * 42 + c + 1]) ; pos_ln(embed_positions[0..L))],
  bias = (pos_q_linear(p) * (d / H * 2) ** -0.5) @ pos_k_linear(p)^T per head, shared by layers;
- per layer, relative: text x text from ``token_rel_pos_table_list[i]`` (OFA's log buckets),
  image x image from ``image_rel_pos_table_list[i]`` (dr, dc); none between text and image.
Both depend only on (h, w, text length): serving copies (``narvl.models.prepare_for_inference``)
keep them per shape in a bounded LRU cache that follows the parameters. ``position_embeddings``
gives the decoders the same p for their cross-attention bias.
Attention runs through ``narvl.query_attention`` with the keys past ``lengths`` masked.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import checks
from ..nn import Linear
from .config import NARVLConfig
from .layers import (EncoderLayer, image_position_ids, image_rel_buckets, ofa_embedding, pos_bias,
                     token_rel_buckets, zero_tables)
from .resnet import ResNetStages


class Encoder(nn.Module):
    """See the module docstring. ``embed_tokens`` is shared with the decoder's tied output;
    ``soft_prompt``: one trainable token (1, 1, d) prepended to the text (parameter-efficient
    mode, ``narvl.models.enable_peft``).
    forward(images (B, 3, S, S), text (B, Lt)) -> (memory (B, h*w + P + Lt, d), lengths (B,))."""

    def __init__(self, cfg: NARVLConfig, embed_tokens: nn.Embedding, soft_prompt: bool = False):
        super().__init__()
        d, H = cfg.d_model, cfg.heads
        self.cfg = cfg
        self.heads = H
        self.embed_tokens = embed_tokens
        self.embed_images = ResNetStages(cfg.resnet_layers)
        self.image_proj = Linear(ResNetStages.out_channels, d)
        self.type_embedding = ofa_embedding(2, d)  # 0 text, 1 image
        self.layernorm_embedding = nn.LayerNorm(d)
        self.patch_layernorm_embedding = nn.LayerNorm(d)
        self.embed_positions = ofa_embedding(cfg.max_positions + 2, d)
        self.embed_image_positions = ofa_embedding(cfg.image_buckets ** 2 + 1, d)
        self.pos_ln, self.image_pos_ln = nn.LayerNorm(d), nn.LayerNorm(d)
        self.pos_q_linear, self.pos_k_linear = Linear(d, d), Linear(d, d)
        self.pos_scaling = float(d / H * cfg.attn_scale_factor) ** -0.5
        self.layers = nn.ModuleList(EncoderLayer(d, H, cfg.ffn_dim, cfg.dropout, cfg.attn_scale_factor)
                                    for _ in range(cfg.enc_layers))
        tb, ib = cfg.text_buckets, cfg.image_buckets
        self.token_rel_pos_table_list = zero_tables(cfg.enc_layers, 2 * tb - 1, H)
        self.image_rel_pos_table_list = zero_tables(cfg.enc_layers, (2 * ib - 1) ** 2 + 3, H)
        self.layer_norm = nn.LayerNorm(d)
        self.drop = nn.Dropout(cfg.dropout)
        self.soft_prompt = None  # (1, P, d) parameter in the parameter-efficient mode
        if soft_prompt:
            self.add_soft_prompt_()

    def add_soft_prompt_(self):
        """Adds the trainable soft-prompt token (1, 1, d), N(0, 0.02^2)."""
        w = self.embed_positions.weight
        self.soft_prompt = nn.Parameter(torch.randn(1, 1, w.shape[1], device=w.device) * 0.02)
        return self

    @property
    def backbone(self) -> ResNetStages:
        """The ResNet stages (OFA's ``embed_images``)."""
        return self.embed_images

    def position_modules(self):
        return [self.embed_positions, self.embed_image_positions, self.pos_ln, self.image_pos_ln,
                self.pos_q_linear, self.pos_k_linear, self.token_rel_pos_table_list,
                self.image_rel_pos_table_list]

    def position_embeddings(self, h: int, w: int, n_text: int) -> torch.Tensor:
        """(h*w + n_text, d): OFA's layer-normalised positions of [image patches ; text]."""
        dev = self.embed_positions.weight.device
        img = self.image_pos_ln(self.embed_image_positions(
            image_position_ids(h, w, self.cfg.image_buckets).to(dev)))
        txt = self.pos_ln(self.embed_positions.weight[:n_text])
        return torch.cat([img, txt], 0)

    def _compute_biases(self, h, w, n_text, dtype):
        cfg = self.cfg
        n_img = h * w
        dev = self.embed_positions.weight.device
        p = self.position_embeddings(h, w, n_text)
        abs_bias = pos_bias(self.pos_q_linear, self.pos_k_linear, p, p, self.heads, self.pos_scaling)
        t_idx = token_rel_buckets(n_text, cfg.text_buckets, cfg.max_positions).to(dev)
        i_idx = image_rel_buckets(h, w, cfg.image_buckets).to(dev)
        out = []
        for ttab, itab in zip(self.token_rel_pos_table_list, self.image_rel_pos_table_list):
            b = abs_bias.clone()  # one copy per layer; the relative tables add into their blocks
            b[:, n_img:, n_img:] += ttab.weight[t_idx].permute(2, 0, 1)
            b[:, :n_img, :n_img] += itab.weight[i_idx].permute(2, 0, 1)
            out.append(b.to(dtype))
        return out

    def layer_biases(self, h: int, w: int, n_text: int, dtype):
        """Each layer's attention bias (H, L, L), absolute + relative, contiguous."""
        return [b.contiguous() for b in self._compute_biases(h, w, n_text, dtype)]

    def check_inputs(self, images, text):
        cfg = self.cfg
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise TypeError("images must be a floating-point tensor (B, 3, S, S)")
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2:] != (cfg.image_size, cfg.image_size):
            raise ValueError(f"images must be (B, 3, {cfg.image_size}, {cfg.image_size}), "
                             f"got {tuple(images.shape)}")
        if not isinstance(text, torch.Tensor) or text.dtype not in (torch.int32, torch.int64):
            raise TypeError("text must be an integer tensor (B, Lt) of token ids")
        if text.dim() != 2 or text.shape[0] != images.shape[0]:
            raise ValueError(f"text must be (B={images.shape[0]}, Lt), got {tuple(text.shape)}")
        if images.shape[0] == 0:
            raise ValueError("empty batch: images has batch size 0")
        if text.shape[1] > cfg.max_text_len:
            raise ValueError(f"text has {text.shape[1]} tokens, more than max_text_len = {cfg.max_text_len}")
        nonpad = text != cfg.pad_id
        if not checks.enabled():  # NARVL_CHECK=0, or a torch.compile / torch.export trace
            return nonpad
        if text.numel():
            lo, hi = (int(t) for t in torch.aminmax(text))
            if lo < 0 or hi >= cfg.vocab_size:
                raise ValueError(f"text token ids must lie in [0, {cfg.vocab_size})")
        if text.shape[1] > 1 and bool((nonpad[:, 1:] & ~nonpad[:, :-1]).any()):
            raise ValueError("text must be right-padded with pad_id (a token follows a pad)")
        return nonpad

    def forward(self, images: torch.Tensor, text: torch.Tensor):
        nonpad = self.check_inputs(images, text)
        B = images.shape[0]
        feats = self.embed_images(images)                          # (B, 1024, h, w)
        h, w = feats.shape[-2:]
        img = self.image_proj(feats.flatten(2).transpose(1, 2))    # (B, h*w, d)
        tok = self.embed_tokens(text)
        if self.soft_prompt is not None:
            tok = torch.cat([self.soft_prompt.expand(B, -1, -1).to(tok.dtype), tok], 1)
        n_text = tok.shape[1]
        if self.cfg.entangle_position_embedding:  # OFA's --entangle-position-embedding
            ids = image_position_ids(h, w, self.cfg.image_buckets).to(img.device)
            img = img + self.embed_image_positions(ids).to(img.dtype)
            tok = tok + self.embed_positions.weight[:n_text].to(tok.dtype)
        img = self.patch_layernorm_embedding(img + self.type_embedding.weight[1])
        tok = self.layernorm_embedding(tok + self.type_embedding.weight[0])
        x = self.drop(torch.cat([img, tok], 1))
        n_prompt = n_text - text.shape[1]
        lengths = nonpad.sum(1) + (h * w + n_prompt)
        # OFA zeroes the padded positions; the host skips the multiply when nothing is padded
        # (CPU tensors; devices and traces always multiply: no synchronisation)
        if n_prompt < n_text and (x.device.type != "cpu" or torch.compiler.is_compiling()
                                  or not bool(nonpad.all())):
            keep = torch.cat([nonpad.new_ones(B, h * w + n_prompt), nonpad], 1)
            x = x * keep[..., None].to(x.dtype)
        for layer, bias in zip(self.layers, self.layer_biases(h, w, n_text, x.dtype)):
            x = layer(x, lengths, bias)
        return self.layer_norm(x), lengths
