"""OFA's transformer pieces, computed as OFA computes them (OFA-Sys/OFA ``models/ofa/unify_*``).

Module and parameter names follow OFA's fairseq checkpoints, so a released state dict maps onto
these modules key for key (``narvl.models.ofa_import``).

- ``OFAAttention``: q/k/v/out projections, q scaled by ``(head_dim * attn_scale_factor) ** -0.5``
  (OFA's factor 2), an additive bias (positions), key padding by lengths, then NormFormer's
  per-head scale ``c_attn`` before ``out_proj``. The attention itself is
  ``narvl.query_attention`` (Triton on CUDA, SDPA or the C++ kernel on CPU).

These modules compute and nothing else: no caches, no packed weights, no branches on the grad
mode. ``narvl.models.prepare_for_inference`` builds serving copies from them.
- ``EncoderLayer``: pre-LN self-attention + NormFormer ``attn_ln``, then pre-LN FFN with
  NormFormer's ``ffn_layernorm`` between GELU and ``fc2``.
- ``DecoderLayer``: the same with a cross-attention block (``encoder_attn``, ``cross_attn_ln``).
- ``token_rel_buckets`` / ``image_rel_buckets``: OFA's relative-position bucket ids.

Shapes: x (B, L, d); biases (H, Lq, Lk) shared by the batch; lengths (B,) valid keys per sample.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..nn import Linear, merge_heads, split_heads
from ..ops.attention import query_attention
from ..ops.linear import linear


def token_rel_buckets(n: int, bucket_size: int = 256, max_position: int = 1024) -> torch.Tensor:
    """(n, n) bucket ids of OFA's text relative positions, entry [i, j] for rel = i - j:
    |rel| <= bucket_size / 2 keeps its own bucket, longer distances are log-spaced up to
    ``max_position``; ids lie in [0, 2 * bucket_size - 1)."""
    pos = torch.arange(n, dtype=torch.long)
    rel = pos[:, None] - pos[None, :]
    mid = bucket_size // 2
    far = rel.abs().clamp_min(mid).float()  # float32 as OFA, so ceil() lands on the same ids
    log_id = torch.ceil(torch.log(far / mid) / math.log((max_position - 1) / mid) * (mid - 1)).long() + mid
    out = torch.where(rel.abs() <= mid, rel, log_id * torch.sign(rel))
    return out + bucket_size - 1


def image_position_ids(h: int, w: int, bucket_size: int = 42) -> torch.Tensor:
    """(h * w,) rows of ``embed_image_positions`` for an h x w patch grid: r * bucket + c + 1."""
    r = torch.arange(h)[:, None]
    c = torch.arange(w)[None, :]
    return (r * bucket_size + c + 1).reshape(-1)


def image_rel_buckets(h: int, w: int, bucket_size: int = 42) -> torch.Tensor:
    """(h*w, h*w) bucket ids of OFA's 2-D image relative positions: (dr + b - 1) * (2b - 1) +
    (dc + b - 1) for dr, dc = query - key row / column."""
    r = torch.arange(h).repeat_interleave(w)
    c = torch.arange(w).repeat(h)
    dr = r[:, None] - r[None, :] + bucket_size - 1
    dc = c[:, None] - c[None, :] + bucket_size - 1
    return dr * (2 * bucket_size - 1) + dc


def pos_bias(q_lin: nn.Module, k_lin: nn.Module, pq: torch.Tensor, pk: torch.Tensor, heads: int,
             scaling: float) -> torch.Tensor:
    """OFA's absolute-position attention bias (H, Lq, Lk) = (q_lin(pq) * scaling) k_lin(pk)^T
    per head; pq (Lq, d), pk (Lk, d) are already layer-normalised."""
    q = q_lin(pq).view(pq.shape[0], heads, -1).transpose(0, 1) * scaling
    k = k_lin(pk).view(pk.shape[0], heads, -1).transpose(0, 1)
    return torch.matmul(q, k.transpose(1, 2))


class OFAAttention(nn.Module):
    """See the module docstring. forward(x (B, Lq, d), kv (B, Lk, d) = x, key_lengths (B,) =
    None, bias (H, Lq, Lk) = None, causal=False) -> (B, Lq, d). The steps are public so that the
    decoders can reuse keys and values: ``project_q``, ``project_kv``, ``project_qkv``, ``attend``.
    Serving copies swap in ``narvl.models.inference.FusedAttention`` (fused, packed weights)."""

    def __init__(self, d: int, heads: int, scale_factor: float = 2.0):
        super().__init__()
        self.heads = heads
        self.scaling = float(d // heads * scale_factor) ** -0.5
        self.q_proj, self.k_proj = Linear(d, d), Linear(d, d)
        self.v_proj, self.out_proj = Linear(d, d), Linear(d, d)
        self.c_attn = nn.Parameter(torch.ones(heads))

    def project_q(self, x):
        """(B, H, Lq, Dh) queries of x (B, Lq, d)."""
        return split_heads(self.q_proj(x), self.heads)

    def project_kv(self, kv):
        """(B, H, Lk, Dh) keys and values of kv (B, Lk, d)."""
        return split_heads(self.k_proj(kv), self.heads), split_heads(self.v_proj(kv), self.heads)

    def project_qkv(self, x):
        """Queries, keys and values (B, H, L, Dh) of x (B, L, d) (self-attention)."""
        return (self.project_q(x),) + self.project_kv(x)

    def attention(self, q, k, v, key_lengths=None, bias=None, causal=False):
        """Projected q (B, H, Lq, Dh), k / v (B, H, Lk, Dh) -> per-head output (B, H, Lq, Dh)."""
        return query_attention(q, k, v, key_lengths=key_lengths,
                               attn_bias=None if bias is None else bias.to(q.dtype), scale=self.scaling,
                               causal=causal)

    def attend(self, q, k, v, key_lengths=None, bias=None, causal=False):
        """Projected q (B, H, Lq, Dh), k / v (B, H, Lk, Dh) -> output (B, Lq, d)."""
        a = self.attention(q, k, v, key_lengths, bias, causal)
        a = a * self.c_attn.to(a.dtype)[None, :, None, None]
        return self.out_proj(merge_heads(a))

    def forward(self, x, kv=None, key_lengths=None, bias=None, causal=False):
        if kv is None:
            q, k, v = self.project_qkv(x)
        else:
            q, (k, v) = self.project_q(x), self.project_kv(kv)
        return self.attend(q, k, v, key_lengths, bias, causal)


class _FFN(nn.Module):
    """fc2(ffn_layernorm(gelu(fc1(final_layer_norm(x))))) with OFA's names (a mixin)."""

    def _ffn_init(self, d, ffn):
        self.final_layer_norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = Linear(d, ffn), Linear(ffn, d)
        self.ffn_layernorm = nn.LayerNorm(ffn)

    def ffn(self, x):
        h = self.fc1(self.final_layer_norm(x), activation="gelu")
        return x + self.drop(self.fc2(self.ffn_layernorm(h)))


class EncoderLayer(_FFN):
    """OFA's encoder layer (pre-LN + NormFormer). forward(x (B, L, d), lengths (B,), bias
    (H, L, L)) -> (B, L, d)."""

    def __init__(self, d, heads, ffn, dropout, scale_factor=2.0):
        super().__init__()
        self.self_attn = OFAAttention(d, heads, scale_factor)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.attn_ln = nn.LayerNorm(d)
        self._ffn_init(d, ffn)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, lengths, bias):
        h = self.self_attn(self.self_attn_layer_norm(x), key_lengths=lengths, bias=bias)
        x = x + self.drop(self.attn_ln(h))
        return self.ffn(x)


class DecoderLayer(_FFN):
    """OFA's decoder layer (pre-LN + NormFormer): self-attention (``self_attn``,
    ``self_attn_ln``), cross-attention into the encoder output (``encoder_attn``,
    ``cross_attn_ln``), FFN."""

    def __init__(self, d, heads, ffn, dropout, scale_factor=2.0):
        super().__init__()
        self.self_attn = OFAAttention(d, heads, scale_factor)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.self_attn_ln = nn.LayerNorm(d)
        self.encoder_attn = OFAAttention(d, heads, scale_factor)
        self.encoder_attn_layer_norm = nn.LayerNorm(d)
        self.cross_attn_ln = nn.LayerNorm(d)
        self._ffn_init(d, ffn)
        self.drop = nn.Dropout(dropout)

    def self_block(self, x, bias, cache=None, causal=False):
        """x + self-attention. With ``cache`` (a dict, updated in place with the keys and
        values so far), x holds only the new positions."""
        q, k, v = self.self_attn.project_qkv(self.self_attn_layer_norm(x))
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        h = self.self_attn.attend(q, k, v, bias=bias, causal=causal)
        return x + self.drop(self.self_attn_ln(h))

    def cross_ffn_block(self, x, cross_k, cross_v, mem_lengths, cross_bias):
        q = self.encoder_attn.project_q(self.encoder_attn_layer_norm(x))
        h = self.encoder_attn.attend(q, cross_k, cross_v, key_lengths=mem_lengths, bias=cross_bias)
        x = x + self.drop(self.cross_attn_ln(h))
        return self.ffn(x)

    def forward(self, x, memory, mem_lengths, self_bias, cross_bias, causal=False):
        x = self.self_block(x, self_bias, causal=causal)
        return self.cross_ffn_block(x, *self.encoder_attn.project_kv(memory), mem_lengths, cross_bias)


def zero_tables(layers: int, rows: int, heads: int) -> nn.ModuleList:
    """One zero-initialised (rows, heads) relative-position table per layer (as OFA)."""
    tables = nn.ModuleList(nn.Embedding(rows, heads) for _ in range(layers))
    for t in tables:
        nn.init.zeros_(t.weight)
    return tables


def ofa_embedding(rows: int, d: int) -> nn.Embedding:
    """OFA's embedding init: normal with std d ** -0.5."""
    e = nn.Embedding(rows, d)
    nn.init.normal_(e.weight, std=d ** -0.5)
    return e


class TiedOutput(nn.Module):
    """The output projection tied to the token embedding, without parameters of its own:
    forward(x (..., d), weight (V, d)) -> logits (..., V) = x @ weight^T. Serving copies swap in
    ``narvl.models.inference.PackedTiedOutput``."""

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return linear(x, weight.to(x.dtype))
