"""Float64 reference of query attention (plain matmuls, no fused kernels)."""
from __future__ import annotations

import torch


def query_attention_reference(q, k, v, key_lengths=None, attn_bias=None, scale=None, causal=False):
    """softmax(q k^T * scale + bias, masked to keys j < key_lengths[b]) v, computed in float64.

    q (B, H, Lq, D), k and v (B, H, Lk, D), attn_bias (H, Lq, Lk) or (B, H, Lq, Lk); causal:
    query i also masked to keys j <= i + Lk - Lq.
    Returns float64 (B, H, Lq, D); differentiable in q, k, v and attn_bias.
    """
    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    s = torch.matmul(q.double(), k.double().transpose(-1, -2)) * scale
    if attn_bias is not None:
        s = s + attn_bias.double()
    if key_lengths is not None:
        Lk = k.shape[2]
        keep = torch.arange(Lk, device=q.device)[None, :] < torch.as_tensor(key_lengths, device=q.device)[:, None]
        s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
    if causal:
        Lq, Lk = q.shape[2], k.shape[2]
        i = torch.arange(Lq, device=q.device)[:, None]
        j = torch.arange(Lk, device=q.device)[None, :]
        s = s.masked_fill(j > i + (Lk - Lq), float("-inf"))
    return torch.matmul(torch.softmax(s, -1), v.double())
