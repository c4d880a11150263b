"""OFA's decoder stack without its input, shared by NARVL's query decoder and the AR baseline.

Positions enter as attention biases (and into the input only with ``cfg.decoder_entangle``,
i.e. OFA without ``--disable-entangle``, which every released script sets):
    p = pos_ln(embed_positions[0..T))                                         (T, d)
    self bias of layer i = (self_pos_q_linear(p) * s) self_pos_k_linear(p)^T
                           + token_rel_pos_table_list[i][bucket(q - k)]       (H, T, T)
    cross bias           = (cross_pos_q_linear(p) * s) cross_pos_k_linear(p_enc)^T   (H, T, Lm)
with s = (d / H * attn_scale_factor) ** -0.5 and p_enc the encoder's ``position_embeddings``.
The input x (B, T, d) goes through ``layernorm_embedding``, the ``DecoderLayer``s and the final
``layer_norm``. Module names are OFA's fairseq names (``decoder.*``). Serving copies
(``narvl.models.prepare_for_inference``) keep the biases per shape.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import NARVLConfig
from .layers import DecoderLayer, ofa_embedding, pos_bias, token_rel_buckets, zero_tables
from ..nn import Linear


class DecoderStack(nn.Module):
    """See the module docstring."""

    def __init__(self, cfg: NARVLConfig):
        super().__init__()
        d, H = cfg.d_model, cfg.heads
        self.cfg, self.heads = cfg, H
        self.embed_positions = ofa_embedding(cfg.max_positions + 2, d)
        self.pos_ln = nn.LayerNorm(d)
        self.self_pos_q_linear, self.self_pos_k_linear = Linear(d, d), Linear(d, d)
        self.cross_pos_q_linear, self.cross_pos_k_linear = Linear(d, d), Linear(d, d)
        self.pos_scaling = float(d / H * cfg.attn_scale_factor) ** -0.5
        self.token_rel_pos_table_list = zero_tables(cfg.dec_layers, 2 * cfg.text_buckets - 1, H)
        self.layernorm_embedding = nn.LayerNorm(d)
        self.layers = nn.ModuleList(DecoderLayer(d, H, cfg.ffn_dim, cfg.dropout, cfg.attn_scale_factor)
                                    for _ in range(cfg.dec_layers))
        self.layer_norm = nn.LayerNorm(d)
        self.drop = nn.Dropout(cfg.dropout)

    def position_modules(self):
        return [self.embed_positions, self.pos_ln, self.self_pos_q_linear, self.self_pos_k_linear,
                self.cross_pos_q_linear, self.cross_pos_k_linear, self.token_rel_pos_table_list]

    def _positions(self, T):
        return self.pos_ln(self.embed_positions.weight[:T])

    def self_biases(self, T: int, dtype) -> list:
        """Per layer (H, T, T): absolute + relative self-attention bias of positions 0..T-1."""
        p = self._positions(T)
        absb = pos_bias(self.self_pos_q_linear, self.self_pos_k_linear, p, p, self.heads, self.pos_scaling)
        idx = token_rel_buckets(T, self.cfg.text_buckets, self.cfg.max_positions).to(p.device)
        return [(absb + t.weight[idx].permute(2, 0, 1)).to(dtype) for t in self.token_rel_pos_table_list]

    def cross_bias(self, T: int, src_pos: torch.Tensor, dtype) -> torch.Tensor:
        """(H, T, Lm) cross-attention bias against the encoder positions src_pos (Lm, d)."""
        p = self._positions(T)
        return pos_bias(self.cross_pos_q_linear, self.cross_pos_k_linear, p, src_pos, self.heads,
                        self.pos_scaling).to(dtype)

    def biases(self, T: int, encoder, n_text: int, dtype):
        """(self biases per layer, cross bias), contiguous, for T positions and an encoder
        output holding ``n_text`` text positions after the image grid."""
        g = self.cfg.grid
        src = encoder.position_embeddings(g, g, n_text)
        return ([b.contiguous() for b in self.self_biases(T, dtype)],
                self.cross_bias(T, src, dtype).contiguous())

    def run_layers(self, x, memory, memory_lengths, self_biases, cross_bias, start: int = 0, causal=False,
                   every_layer: bool = False):
        """Layers ``start``.. on x (B, T, d) (already through ``embed``), then ``layer_norm``.
        ``every_layer``: a list of each layer's output through ``layer_norm``, the last one last."""
        states = []
        for i in range(start, len(self.layers)):
            x = self.layers[i](x, memory, memory_lengths, self_biases[i], cross_bias, causal=causal)
            if every_layer and i < len(self.layers) - 1:
                states.append(self.layer_norm(x))
        x = self.layer_norm(x)
        return states + [x] if every_layer else x

    def embed(self, x, start: int = 0):
        """The decoder input x (B, T, d) of positions start..start+T-1, through
        ``layernorm_embedding`` (``cfg.decoder_entangle``: their raw position embeddings added
        first, as OFA's decoder without ``--disable-entangle``)."""
        if self.cfg.decoder_entangle:
            x = x + self.embed_positions.weight[start:start + x.shape[1]].to(x.dtype)
        return self.drop(self.layernorm_embedding(x))

    def teacher_forced(self, memory, memory_lengths, encoder, embed_tokens, prev_tokens):
        """Causal decoding of ``prev_tokens`` (B, T) (BOS first) over the encoder output memory
        (B, Lm, d) -> the states after ``layer_norm`` (B, T, d); ``embed_tokens`` embeds them."""
        T = prev_tokens.shape[1]
        n_text = memory.shape[1] - self.cfg.grid ** 2
        self_b, cross_b = self.biases(T, encoder, n_text, memory.dtype)
        x = self.embed(embed_tokens(prev_tokens).to(memory.dtype))
        return self.run_layers(x, memory, memory_lengths, self_b, cross_b, causal=True)


def shifted_inputs(cfg: NARVLConfig, targets, target_lengths):
    """Teacher forcing's inputs for ``targets`` (B, S) of ``target_lengths`` (B,): BOS then the
    targets shifted right, ``pad_id`` past each length -> (inputs (B, S), valid (B, S) bool)."""
    S = targets.shape[1]
    valid = torch.arange(S, device=targets.device)[None, :] < target_lengths.to(targets.device)[:, None]
    y_in = torch.cat([torch.full_like(targets[:, :1], cfg.bos_id), targets[:, :-1]], 1)
    return torch.where(valid, y_in, torch.full_like(y_in, cfg.pad_id)), valid


def smoothed_ce(logits, targets, valid, label_smoothing: float, weights=None):
    """Label-smoothed cross-entropy of logits (B, S, V) against targets (B, S), summed over the
    ``valid`` (B, S) positions with per-sample ``weights`` (B,) and divided by their count."""
    B, S = targets.shape
    ce = F.cross_entropy(logits.float().reshape(B * S, -1), targets.reshape(-1), reduction="none",
                         label_smoothing=label_smoothing).view(B, S) * valid
    if weights is not None:
        if not isinstance(weights, torch.Tensor) or weights.shape != (B,):
            raise ValueError(f"weights must be a ({B},) tensor")
        ce = ce * weights.to(ce)[:, None]
    return ce.sum() / valid.sum().clamp_min(1)
