"""NARVL: the non-autoregressive vision-language model (Shi et al., CVPR 2024).

    memory = Encoder(images, text)                                   (B, Lm, d)
    h = queries (N, d) --QueryDecoderLayer x dec_layers (self-attention among all N queries, no
        causal mask, + learnable relative bias; cross-attention into memory with its lengths)--> LN
    logits = h @ embed_tokens.weight^T (tied)                          (B, N, V)

Training: ``model(images, text, targets, target_lengths, weights=None)`` returns the Q-CTC loss
``narvl.qctc_loss(logits, targets, target_lengths, blank=V-1, label_smoothing=eps, weights=w)``,
i.e. (1-eps) * mean_b(w_b * CTC_b / L_b) - eps * mean(log_softmax(logits)) with zero_infinity.
Targets are the answer tokens followed by EOS (EOS is a CTC label).
Inference: ``model.generate(images, text, beam_width=1)`` decodes all N slots in one pass:
greedy (argmax per query, merge repeats when ``merge_repeats``, drop blanks) or CTC prefix
beam search; the output stops at the first EOS.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..nn import QueryDecoderLayer, zero_bias_tables
from ..ops.ctc import qctc_loss
from ..ops.linear import linear
from ..ops.decode import ctc_greedy_decode, ctc_prefix_beam_search
from .cache import ParamStamp, param_refs
from .config import NARVLConfig
from .encoder import Encoder


def check_targets(cfg, targets, target_lengths, batch, name="targets"):
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an integer tensor (B, S)")
    if targets.dim() != 2 or targets.shape[0] != batch:
        raise ValueError(f"{name} must be (B={batch}, S), got {tuple(targets.shape)}")
    if not isinstance(target_lengths, torch.Tensor) or target_lengths.shape != (batch,):
        raise ValueError(f"target_lengths must be a ({batch},) integer tensor")
    if target_lengths.is_floating_point():
        raise TypeError("target_lengths must be an integer tensor")
    if bool(((target_lengths < 1) | (target_lengths > targets.shape[1])).any()):
        raise ValueError(f"target_lengths must lie in [1, {targets.shape[1]}] (targets end with EOS)")


class NARVL(nn.Module):
    """See the module docstring. ``cfg``: a ``NARVLConfig``."""

    def __init__(self, cfg: NARVLConfig):
        super().__init__()
        if not isinstance(cfg, NARVLConfig):
            raise TypeError(f"cfg must be a NARVLConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        d, N = cfg.d_model, cfg.num_queries
        self.embed_tokens = nn.Embedding(cfg.vocab_size, d)
        nn.init.normal_(self.embed_tokens.weight, std=d ** -0.5)
        self.encoder = Encoder(cfg, self.embed_tokens)
        self.queries = nn.Parameter(torch.randn(N, d))  # N(0, 1), as DETR's query embeddings
        self.query_rel = zero_bias_tables(cfg.dec_layers, 2 * N - 1, cfg.heads)
        self.layers = nn.ModuleList(QueryDecoderLayer(d, cfg.heads, cfg.ffn_dim, cfg.dropout)
                                    for _ in range(cfg.dec_layers))
        self.ln_out = nn.LayerNorm(d)
        self.out_adapter = None  # (d, d) linear in the parameter-efficient mode
        self._first_self = None  # (1, N, d): layer 0's self-attention block, cached for inference
        self._self_biases = None  # per-layer (H, N, N) self-attention biases, cached for inference
        self._first_stamp = None  # the parameters both caches were computed from
        r = torch.arange(N)
        self.register_buffer("_qrel_idx", (r[None, :] - r[:, None]) + N - 1, persistent=False)

    def _self_bias(self, i, dtype):
        return self.query_rel[i](self._qrel_idx).permute(2, 0, 1).to(dtype)

    @torch.no_grad()
    def cache_first_self_attention_(self):
        """Inference only: layer 0's self-attention block sees only the learnable queries, so
        its output x1 = q + SelfAttn(LN(q)) is the same for every input, as are the layers'
        relative self-attention biases. Compute them once and let ``decode_logits`` start from
        x1 (``prepare_for_inference`` calls this on its copy; the cache is ignored whenever
        gradients are on, and recomputed when the parameters it depends on change)."""
        q = self.queries[None]
        self._first_stamp = ParamStamp([(self, "queries")] + param_refs(self.query_rel)
                                       + param_refs(self.layers[0]))
        self._self_biases = [self._self_bias(i, q.dtype).contiguous() for i in range(len(self.layers))]
        self._first_self = self.layers[0].self_block(q, self._self_biases[0]).detach()
        return self

    def decode_logits(self, memory, memory_lengths):
        """memory (B, Lm, d), memory_lengths (B,) -> logits (B, N, V)."""
        B = memory.shape[0]
        first = self._first_self
        if first is not None and first.dtype == memory.dtype and first.device == memory.device \
                and not torch.is_grad_enabled():
            if self._first_stamp.stale():  # the queries or layer 0 changed: recompute
                first = self.cache_first_self_attention_()._first_self
            x = first.expand(B, -1, -1)
            x = self.layers[0].cross_ffn_block(x, *self.layers[0].cross_kv(memory), memory_lengths)
            start, biases = 1, self._self_biases
        else:
            x, start, biases = self.queries.to(memory.dtype).expand(B, -1, -1), 0, None
        for i in range(start, len(self.layers)):
            bias = biases[i] if biases is not None else self._self_bias(i, x.dtype)
            x = self.layers[i](x, memory, memory_lengths, self_bias=bias)
        x = self.ln_out(x)
        if self.out_adapter is not None:
            x = self.out_adapter(x)
        return linear(x, self.embed_tokens.weight.to(x.dtype))

    def logits(self, images, text):
        memory, lengths = self.encoder(images, text)
        return self.decode_logits(memory, lengths)

    def forward(self, images, text, targets, target_lengths, weights=None):
        """Q-CTC loss (scalar). targets (B, S) answer + EOS, right-padded; target_lengths (B,);
        weights (B,) optional per-sample weights (VQA answer confidence)."""
        check_targets(self.cfg, targets, target_lengths, images.shape[0])
        logits = self.logits(images, text)
        return qctc_loss(logits, targets, target_lengths, blank=self.cfg.blank_id,
                         label_smoothing=self.cfg.label_smoothing, weights=weights,
                         zero_infinity=True)

    @torch.no_grad()
    def generate(self, images, text, beam_width: int = 1, cutoff_top_n: int = 40):
        """Decode every sample in one decoder pass. Returns a list of B token-id lists (no
        blanks, no EOS)."""
        if not isinstance(beam_width, int) or beam_width < 1:
            raise ValueError(f"beam_width must be a positive integer, got {beam_width!r}")
        cfg = self.cfg
        logits = self.logits(images, text).float()
        if beam_width == 1:
            if cfg.merge_repeats:
                tokens, lens = ctc_greedy_decode(logits, blank=cfg.blank_id)
                seqs = [tokens[b, : lens[b]].tolist() for b in range(tokens.shape[0])]
            else:  # one label per slot (grounding, entailment): argmax, drop blanks
                seqs = [[t for t in row if t != cfg.blank_id] for row in logits.argmax(-1).tolist()]
        else:
            # the search normalises the logits itself, in the same scan as its top-k
            res = ctc_prefix_beam_search(logits, beam_width=beam_width, blank=cfg.blank_id,
                                         cutoff_top_n=cutoff_top_n, nbest=1, input="logits")
            seqs = [res.tokens[b, 0, : res.lengths[b, 0]].tolist() for b in range(logits.shape[0])]
        return [s[: s.index(cfg.eos_id)] if cfg.eos_id in s else s for s in seqs]
