"""The OFA-style multimodal encoder shared by ``NARVL`` and ``ARBaseline``.

    images (B, 3, S, S) --ResNet stages 1-3--> (B, 1024, g, g), g = S / 16
        --flatten, Linear(1024, d) + row/col position + type--> image tokens (B, g*g, d)
    text (B, Lt) (pad_id right-padded) --embed * sqrt(d) + position + type--> (B, Lt, d)
    [image tokens ; (soft prompt) ; text tokens] --LN, pre-LN transformer x enc_layers, LN-->
    memory (B, g*g + P + Lt, d), memory_lengths (B,) = g*g + P + text lengths

Each layer adds its own learnable relative-position attention bias (H, L, L), gathered from
buckets as OFA: text-text by clipped distance (``text_buckets``), image-image by clipped
(dy, dx) (``image_buckets``), one bucket each for text->image and image->text. Attention runs
through ``narvl.query_attention`` (keys past ``memory_lengths`` masked; Triton on CUDA), the
projections and FFNs through ``narvl.nn.Linear``/``FeedForward``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn import FeedForward, Linear, merge_heads, split_heads, zero_bias_tables
from ..ops.attention import query_attention
from .cache import DEFAULT_CACHE_BYTES, LRUCache, ParamStamp
from .config import NARVLConfig
from .resnet import ResNetStages


class EncoderLayer(nn.Module):
    """Pre-LN: x += SelfAttn(LN(x); bias, key lengths); x += FFN(LN(x))."""

    def __init__(self, d, heads, ffn, dropout):
        super().__init__()
        self.heads = heads
        self.ln_attn, self.ln_ffn = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = Linear(d, 3 * d)
        self.out = Linear(d, d)
        self.ffn = FeedForward(d, ffn, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, lengths, bias):
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(self.ln_attn(x)).chunk(3, -1))
        a = query_attention(q, k, v, key_lengths=lengths, attn_bias=bias.to(q.dtype))
        x = x + self.drop(self.out(merge_heads(a)))
        return x + self.drop(self.ffn(self.ln_ffn(x)))


class Encoder(nn.Module):
    """See the module docstring. ``embed_tokens`` is shared with the decoder's tied output."""

    def __init__(self, cfg: NARVLConfig, embed_tokens: nn.Embedding):
        super().__init__()
        d, g = cfg.d_model, cfg.grid
        self.cfg = cfg
        self.embed_tokens = embed_tokens
        self.backbone = ResNetStages(cfg.resnet_layers)
        self.image_proj = Linear(ResNetStages.out_channels, d)
        self.row_pos = nn.Embedding(g, d)
        self.col_pos = nn.Embedding(g, d)
        self.text_pos = nn.Embedding(cfg.max_text_len + 1, d)
        self.type_embed = nn.Embedding(2, d)  # 0 text, 1 image
        self.ln_embed = nn.LayerNorm(d)
        self.drop = nn.Dropout(cfg.dropout)
        tb, ib = cfg.text_buckets, cfg.image_buckets
        self._img_off = 2 * tb - 1
        self._cross_off = self._img_off + (2 * ib - 1) ** 2
        self.n_rel = self._cross_off + 2
        self.rel_bias = zero_bias_tables(cfg.enc_layers, self.n_rel, cfg.heads)
        self.layers = nn.ModuleList(EncoderLayer(d, cfg.heads, cfg.ffn_dim, cfg.dropout)
                                    for _ in range(cfg.enc_layers))
        self.ln_out = nn.LayerNorm(d)
        self.soft_prompt = None  # (P, d) parameter in the parameter-efficient mode
        self._rel_cache = LRUCache(64 << 20)  # (n_text, device) -> (L, L) bucket ids
        self._bias_cache = None  # LRUCache (n_text, dtype, device) -> per-layer biases, inference only
        self._bias_stamp = None  # the tables the cached biases were gathered from

    def rel_index(self, n_text: int, device) -> torch.Tensor:
        """(L, L) bucket ids for [g*g image tokens ; n_text text positions]."""
        key = (n_text, str(device))
        idx = self._rel_cache.get(key)
        if idx is None:
            cfg = self.cfg
            g, tb, ib = cfg.grid, cfg.text_buckets, cfg.image_buckets
            n_img = g * g
            L = n_img + n_text
            ys = torch.arange(n_img) // g
            xs = torch.arange(n_img) % g
            dy = (ys[None, :] - ys[:, None]).clamp(-(ib - 1), ib - 1) + ib - 1
            dx = (xs[None, :] - xs[:, None]).clamp(-(ib - 1), ib - 1) + ib - 1
            t = torch.arange(n_text)
            dt = (t[None, :] - t[:, None]).clamp(-(tb - 1), tb - 1) + tb - 1
            idx = torch.empty(L, L, dtype=torch.long)
            idx[:n_img, :n_img] = self._img_off + dy * (2 * ib - 1) + dx
            idx[n_img:, n_img:] = dt
            idx[n_img:, :n_img] = self._cross_off      # text query -> image key
            idx[:n_img, n_img:] = self._cross_off + 1  # image query -> text key
            idx = self._rel_cache.put(key, idx.to(device))
        return idx

    def forward(self, images: torch.Tensor, text: torch.Tensor):
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
        if text.numel():
            lo, hi = (int(t) for t in torch.aminmax(text))
            if lo < 0 or hi >= cfg.vocab_size:
                raise ValueError(f"text token ids must lie in [0, {cfg.vocab_size})")
        nonpad = text != cfg.pad_id
        if text.shape[1] > 1 and bool((nonpad[:, 1:] & ~nonpad[:, :-1]).any()):
            raise ValueError("text must be right-padded with pad_id (a token follows a pad)")
        B, d = images.shape[0], cfg.d_model
        feats = self.backbone(images)                              # (B, 1024, g, g)
        g = feats.shape[-1]
        img = self.image_proj(feats.flatten(2).transpose(1, 2))   # (B, g*g, d)
        pos = (self.row_pos.weight[:, None, :] + self.col_pos.weight[None, :, :]).reshape(g * g, d)
        img = img + pos + self.type_embed.weight[1]
        tok = self.embed_tokens(text) * math.sqrt(d)
        if self.soft_prompt is not None:
            tok = torch.cat([self.soft_prompt.expand(B, -1, -1).to(tok.dtype), tok], 1)
        n_text = tok.shape[1]
        tok = tok + self.text_pos.weight[:n_text] + self.type_embed.weight[0]
        x = self.drop(self.ln_embed(torch.cat([img, tok], 1)))
        n_prompt = n_text - text.shape[1]
        lengths = nonpad.sum(1) + (g * g + n_prompt)
        lengths = lengths.clamp_min(g * g)
        for layer, bias in zip(self.layers, self.layer_biases(n_text, x.dtype, x.device)):
            x = layer(x, lengths, bias)
        return self.ln_out(x), lengths

    def layer_biases(self, n_text: int, dtype, device):
        """Each layer's relative-position bias (H, L, L), gathered from its table in one go.
        After ``cache_biases_()`` (inference copies) they are kept per text length, in an LRU
        cache of bounded size, and recomputed when the tables change."""
        cache = self._bias_cache if not torch.is_grad_enabled() else None
        key = (n_text, dtype, device)
        if cache is not None:
            if self._bias_stamp.stale():  # the tables changed since the biases were gathered
                cache.clear()
                self._bias_stamp = ParamStamp(self._bias_stamp.refs)
            hit = cache.get(key)
            if hit is not None:
                return hit
        idx = self.rel_index(n_text, device)
        table = torch.stack([rel.weight for rel in self.rel_bias])      # (layers, buckets, H)
        biases = table[:, idx].permute(0, 3, 1, 2).to(dtype).unbind(0)  # layers x (H, L, L)
        if cache is not None:
            biases = cache.put(key, [b.contiguous() for b in biases])
        return biases

    def cache_biases_(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        """Inference only: keep each text length's biases, at most ``max_bytes`` of them (least
        recently used first out; a text length whose biases exceed the cap is not kept)."""
        self._bias_cache = LRUCache(max_bytes)
        self._bias_stamp = ParamStamp([(rel, "weight") for rel in self.rel_bias])
        return self
