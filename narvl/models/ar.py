"""ARBaseline: the autoregressive (OFA-style) baseline NARVL is compared against.

Same ``Encoder``; a causal transformer decoder (pre-LN; learned positions; tied output):

    y_in = [BOS, y_0 .. y_{L-2}] --embed * sqrt(d) + pos--> causal self-attention, cross-attention
    into memory (key lengths, ``narvl.query_attention``), FFN, x dec_layers --> LN --> E^T
    loss = sum_b w_b * sum_t CE_ls(logits_bt, y_bt) / sum_b L_b   (label smoothing eps)

``generate`` decodes token by token with a KV cache (cross-attention keys/values computed once):
greedy at beam 1, beam search with length-normalised scores above.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.attention import query_attention
from .config import NARVLConfig
from ..nn import QueryDecoderLayer, merge_heads
from ..ops.linear import linear
from .encoder import Encoder
from .narvl import check_targets


class ARDecoderLayer(QueryDecoderLayer):
    """``QueryDecoderLayer`` (same modules and state-dict keys, same cross-attention and FFN)
    with a causal self-attention that can run incrementally on a KV cache."""

    def forward(self, x, cross_k, cross_v, mem_lengths, cache=None):
        """x (B, T, d). Without ``cache``: causal over T (training). With ``cache`` (a dict,
        updated in place): x holds the next T new positions, attending to the cached ones."""
        q, k, v = (self._split(t) for t in self.qkv_self(self.ln_self(x)).chunk(3, -1))
        if cache is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            if "k" in cache:
                k = torch.cat([cache["k"], k], 2)
                v = torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
            if q.shape[2] == 1:  # one new position sees every cached one: no mask needed
                a = query_attention(q, k, v)
            else:
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.drop(self.out_self(merge_heads(a)))
        return self.cross_ffn_block(x, cross_k, cross_v, mem_lengths)


class ARBaseline(nn.Module):
    """See the module docstring. ``cfg``: a ``NARVLConfig`` (``num_queries`` unused;
    ``max_target_len`` bounds the output length)."""

    def __init__(self, cfg: NARVLConfig):
        super().__init__()
        if not isinstance(cfg, NARVLConfig):
            raise TypeError(f"cfg must be a NARVLConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        d = cfg.d_model
        self.embed_tokens = nn.Embedding(cfg.vocab_size, d)
        nn.init.normal_(self.embed_tokens.weight, std=d ** -0.5)
        self.encoder = Encoder(cfg, self.embed_tokens)
        self.embed_pos = nn.Embedding(cfg.max_target_len, d)
        self.layers = nn.ModuleList(ARDecoderLayer(d, cfg.heads, cfg.ffn_dim, cfg.dropout)
                                    for _ in range(cfg.dec_layers))
        self.ln_out = nn.LayerNorm(d)
        self.out_adapter = None
        self.drop = nn.Dropout(cfg.dropout)

    def _embed(self, tokens, start):
        T = tokens.shape[1]
        x = self.embed_tokens(tokens) * math.sqrt(self.cfg.d_model)
        return self.drop(x + self.embed_pos.weight[start:start + T])

    def _out(self, x):
        x = self.ln_out(x)
        if self.out_adapter is not None:
            x = self.out_adapter(x)
        return linear(x, self.embed_tokens.weight.to(x.dtype))

    def forward(self, images, text, targets, target_lengths, weights=None):
        """Teacher-forced cross-entropy with label smoothing (scalar). targets (B, S) answer +
        EOS, right-padded; target_lengths (B,); weights (B,) optional per-sample weights."""
        cfg = self.cfg
        B = images.shape[0]
        check_targets(cfg, targets, target_lengths, B)
        S = targets.shape[1]
        if S > cfg.max_target_len:
            raise ValueError(f"targets have {S} positions, more than max_target_len = {cfg.max_target_len}")
        memory, lengths = self.encoder(images, text)
        targets = targets.to(images.device).long()
        valid = torch.arange(S, device=targets.device)[None, :] < target_lengths.to(targets.device)[:, None]
        y_in = torch.cat([torch.full_like(targets[:, :1], cfg.bos_id), targets[:, :-1]], 1)
        y_in = torch.where(valid, y_in, torch.full_like(y_in, cfg.pad_id))
        x = self._embed(y_in, 0)
        for layer in self.layers:
            ck, cv = layer.cross_kv(memory)
            x = layer(x, ck, cv, lengths)
        logits = self._out(x).float()
        ce = F.cross_entropy(logits.reshape(B * S, -1), targets.reshape(-1), reduction="none",
                             label_smoothing=cfg.label_smoothing).view(B, S) * valid
        if weights is not None:
            if not isinstance(weights, torch.Tensor) or weights.shape != (B,):
                raise ValueError(f"weights must be a ({B},) tensor")
            ce = ce * weights.to(ce)[:, None]
        return ce.sum() / valid.sum().clamp_min(1)

    def _start(self, images, text):
        memory, lengths = self.encoder(images, text)
        cross = [layer.cross_kv(memory) for layer in self.layers]
        return cross, lengths

    def _step(self, tok, pos, cross, lengths, caches):
        x = self._embed(tok[:, None], pos)
        for layer, (ck, cv), cache in zip(self.layers, cross, caches):
            x = layer(x, ck, cv, lengths, cache)
        return F.log_softmax(self._out(x[:, 0]).float(), -1)

    @torch.no_grad()
    def generate(self, images, text, beam_width: int = 1, max_len: int | None = None,
                 stop_at_eos: bool = True, length_penalty: float = 1.0):
        """Token-by-token decoding. Returns a list of B token-id lists (no EOS). ``max_len``
        (default ``max_target_len``) bounds the steps; ``stop_at_eos=False`` always runs
        ``max_len`` steps (benchmarks at a fixed output length)."""
        cfg = self.cfg
        if not isinstance(beam_width, int) or beam_width < 1:
            raise ValueError(f"beam_width must be a positive integer, got {beam_width!r}")
        max_len = cfg.max_target_len if max_len is None else int(max_len)
        if not 1 <= max_len <= cfg.max_target_len:
            raise ValueError(f"max_len must lie in [1, {cfg.max_target_len}], got {max_len}")
        blank = cfg.blank_id
        cross, lengths = self._start(images, text)
        B = lengths.shape[0]
        caches = [dict() for _ in self.layers]
        if beam_width == 1:
            tok = torch.full((B,), cfg.bos_id, dtype=torch.long, device=lengths.device)
            out = []
            done = torch.zeros(B, dtype=torch.bool, device=lengths.device)
            for t in range(max_len):
                lp = self._step(tok, t, cross, lengths, caches)
                lp[:, blank] = float("-inf")
                if not stop_at_eos:
                    lp[:, cfg.eos_id] = float("-inf")
                tok = lp.argmax(-1)
                out.append(tok)
                done |= tok == cfg.eos_id
                if stop_at_eos and bool(done.all()):
                    break
            seqs = torch.stack(out, 1).tolist()
            return [s[: s.index(cfg.eos_id)] if cfg.eos_id in s else s for s in seqs]
        return self._beam(cross, lengths, caches, beam_width, max_len, stop_at_eos, length_penalty)

    def _beam(self, cross, lengths, caches, K, max_len, stop_at_eos, alpha):
        cfg = self.cfg
        B = lengths.shape[0]
        dev = lengths.device
        rep = torch.arange(B, device=dev).repeat_interleave(K)
        cross = [(ck[rep], cv[rep]) for ck, cv in cross]
        lengths = lengths[rep]
        scores = torch.full((B, K), float("-inf"), device=dev)
        scores[:, 0] = 0.0
        tok = torch.full((B * K,), cfg.bos_id, dtype=torch.long, device=dev)
        hist = torch.empty(B * K, 0, dtype=torch.long, device=dev)
        finished = [[] for _ in range(B)]
        for t in range(max_len):
            lp = self._step(tok, t, cross, lengths, caches)
            lp[:, cfg.blank_id] = float("-inf")
            if not stop_at_eos:
                lp[:, cfg.eos_id] = float("-inf")
            V = lp.shape[-1]
            cand = (scores.view(B * K, 1) + lp).view(B, K * V)
            top, idx = cand.topk(2 * K, dim=1)
            beam, tokn = idx // V, idx % V
            new_scores = torch.full((B, K), float("-inf"), device=dev)
            new_src = torch.zeros(B, K, dtype=torch.long, device=dev)
            new_tok = torch.full((B, K), cfg.pad_id, dtype=torch.long, device=dev)
            top_l, beam_l, tok_l = top.tolist(), beam.tolist(), tokn.tolist()
            for b in range(B):
                k = 0
                for s, src, w in zip(top_l[b], beam_l[b], tok_l[b]):
                    if s == float("-inf") or k == K:
                        break
                    if w == cfg.eos_id:
                        if len(finished[b]) < K:
                            seq = hist[b * K + src].tolist()
                            finished[b].append((s / (len(seq) + 1) ** alpha, seq))
                        continue
                    new_scores[b, k], new_src[b, k], new_tok[b, k] = s, src, w
                    k += 1
            if stop_at_eos and all(len(f) >= K for f in finished):
                break
            flat_src = (torch.arange(B, device=dev)[:, None] * K + new_src).view(-1)
            for c in caches:
                c["k"], c["v"] = c["k"][flat_src], c["v"][flat_src]
            tok = new_tok.view(-1)
            hist = torch.cat([hist[flat_src], tok[:, None]], 1)
            scores = new_scores
        out = []
        for b in range(B):
            cands = list(finished[b])
            for k in range(K):
                s = float(scores[b, k])
                if s != float("-inf"):
                    cands.append((s / hist.shape[1] ** alpha, hist[b * K + k].tolist()))
            out.append(max(cands, key=lambda c: c[0])[1] if cands else [])
        return out
