"""nn.Module front-ends: they validate their configuration and call the functional APIs."""
from __future__ import annotations

import torch

from .ops.attention import query_attention
from .ops.ctc import _REDUCTIONS, ctc_loss, qctc_loss
from .ops.linear import linear


def _check_config(blank, reduction):
    if isinstance(blank, bool) or not isinstance(blank, int) or blank < 0:
        raise ValueError(f"blank must be a non-negative int, got {blank!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


class CTCLoss(torch.nn.Module):
    """Drop-in for ``torch.nn.CTCLoss`` backed by narvl's kernels."""

    def __init__(self, blank: int = 0, reduction: str = "mean", zero_infinity: bool = False):
        super().__init__()
        _check_config(blank, reduction)
        self.blank, self.reduction, self.zero_infinity = blank, reduction, bool(zero_infinity)

    def forward(self, log_probs, targets, input_lengths, target_lengths):
        return ctc_loss(log_probs, targets, input_lengths, target_lengths, self.blank,
                        self.reduction, self.zero_infinity)


class QCTCLoss(torch.nn.Module):
    """Q-CTC loss on decoder logits (B, N, V); see ``narvl.qctc_loss``."""

    def __init__(self, blank: int = 0, reduction: str = "mean", zero_infinity: bool = True,
                 label_smoothing: float = 0.0):
        super().__init__()
        _check_config(blank, reduction)
        if not 0.0 <= float(label_smoothing) <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        self.blank, self.reduction = blank, reduction
        self.zero_infinity, self.label_smoothing = bool(zero_infinity), float(label_smoothing)

    def forward(self, logits, targets, target_lengths, query_lengths=None, weights=None):
        return qctc_loss(logits, targets, target_lengths, query_lengths=query_lengths,
                         blank=self.blank, reduction=self.reduction,
                         zero_infinity=self.zero_infinity, label_smoothing=self.label_smoothing,
                         weights=weights)


class Linear(torch.nn.Linear):
    """``torch.nn.Linear`` (same parameters and state-dict keys) computed by ``narvl.ops.linear``:
    oneDNN on CPU with 8 or more rows where it is faster, ATen otherwise. ``forward(x,
    activation=None)``; ``activation="gelu"`` gives gelu(x W^T + b), fused on the oneDNN route.
    Serving copies (``narvl.models.prepare_for_inference``) swap in ``PackedLinear``, which keeps
    a oneDNN-blocked copy of the weight."""

    def forward(self, x, activation=None):
        return linear(x, self.weight, self.bias, activation=activation)


class FeedForward(torch.nn.Sequential):
    """Linear(d, ffn) -> GELU -> Dropout -> Linear(ffn, d), as ``nn.Sequential`` (same state-dict
    keys ``0.*`` and ``3.*``). The first Linear and the GELU run as one
    ``narvl.ops.linear(..., activation="gelu")`` (fused on oneDNN's inference route)."""

    def __init__(self, d_model: int, ffn_dim: int, dropout: float = 0.0):
        super().__init__(Linear(d_model, ffn_dim), torch.nn.GELU(), torch.nn.Dropout(dropout),
                         Linear(ffn_dim, d_model))

    def forward(self, x):
        return self[3](self[2](self[0](x, activation="gelu")))


def split_heads(x, heads):
    """(B, L, H * Dh) -> (B, H, L, Dh)."""
    B, L, _ = x.shape
    return x.view(B, L, heads, -1).transpose(1, 2)


def merge_heads(x):
    """(B, H, L, Dh) -> (B, L, H * Dh)."""
    B, H, L, Dh = x.shape
    return x.transpose(1, 2).reshape(B, L, H * Dh)


def zero_bias_tables(layers, buckets, heads):
    """One learnable (buckets, heads) relative-position bias table per layer, zero-initialised."""
    tables = torch.nn.ModuleList(torch.nn.Embedding(buckets, heads) for _ in range(layers))
    for t in tables:
        torch.nn.init.zeros_(t.weight)
    return tables


class QueryDecoderLayer(torch.nn.Module):
    """NARVL decoder layer on learnable queries, pre-LN:
    x = x + SelfAttn(LN(x)) (no causal mask) ; x = x + CrossAttn(LN(x), memory) ; x = x + FFN(LN(x)).

    forward(x (B, N, d), memory (B, Lk, d), memory_lengths (B,) = None, self_bias (H, N, N) or
    (B, H, N, N) = None, cross_bias (H, N, Lk) or (B, H, N, Lk) = None) -> (B, N, d).
    Attention runs through narvl.query_attention (Triton on CUDA); the projections and the FFN
    through ``Linear``/``FeedForward`` (oneDNN's fused matmul + GELU where faster on CPU).
    """

    def __init__(self, d_model: int, n_heads: int, ffn_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        if d_model <= 0 or n_heads <= 0 or d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be a positive multiple of n_heads ({n_heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        ffn_dim = 4 * d_model if ffn_dim is None else ffn_dim
        self.d_model, self.n_heads = d_model, n_heads
        self.ln_self = torch.nn.LayerNorm(d_model)
        self.ln_cross = torch.nn.LayerNorm(d_model)
        self.ln_ffn = torch.nn.LayerNorm(d_model)
        self.qkv_self = Linear(d_model, 3 * d_model)
        self.out_self = Linear(d_model, d_model)
        self.q_cross = Linear(d_model, d_model)
        self.kv_cross = Linear(d_model, 2 * d_model)
        self.out_cross = Linear(d_model, d_model)
        self.ffn = FeedForward(d_model, ffn_dim, dropout)
        self.drop = torch.nn.Dropout(dropout)

    def _split(self, x):
        return split_heads(x, self.n_heads)

    def cross_kv(self, memory):
        """memory (B, Lk, d) -> cross-attention keys and values, each (B, H, Lk, d / H)."""
        k, v = self.kv_cross(memory).chunk(2, -1)
        return self._split(k), self._split(v)

    def self_block(self, x, self_bias=None):
        """x + SelfAttn(LN(x)) among all positions (no causal mask)."""
        q, k, v = self.qkv_self(self.ln_self(x)).chunk(3, -1)
        a = query_attention(self._split(q), self._split(k), self._split(v), attn_bias=self_bias)
        return x + self.drop(self.out_self(merge_heads(a)))

    def cross_ffn_block(self, x, cross_k, cross_v, memory_lengths=None, cross_bias=None):
        """x + CrossAttn(LN(x); cross_k, cross_v), then x + FFN(LN(x))."""
        q = self._split(self.q_cross(self.ln_cross(x)))
        a = query_attention(q, cross_k, cross_v, key_lengths=memory_lengths, attn_bias=cross_bias)
        x = x + self.drop(self.out_cross(merge_heads(a)))
        return x + self.drop(self.ffn(self.ln_ffn(x)))

    def forward(self, x, memory, memory_lengths=None, self_bias=None, cross_bias=None):
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be (B, N, {self.d_model}), got {tuple(x.shape)}")
        if memory.dim() != 3 or memory.shape[-1] != self.d_model or memory.shape[0] != x.shape[0]:
            raise ValueError(f"memory must be (B={x.shape[0]}, Lk, {self.d_model}), got {tuple(memory.shape)}")
        x = self.self_block(x, self_bias)
        return self.cross_ffn_block(x, *self.cross_kv(memory), memory_lengths, cross_bias)
