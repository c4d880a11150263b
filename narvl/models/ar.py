"""ARBaseline: the autoregressive OFA model NARVL is compared against (OFA's own decoder).

Same ``Encoder``; OFA's decoder (``DecoderStack``) on token inputs with a causal self-attention:

    prev = [BOS, y_0 .. y_{L-2}] --embed_tokens, layernorm_embedding--> DecoderLayer x dec_layers
        (causal self-attention + OFA's self position bias; cross-attention into memory with OFA's
        cross position bias and key lengths) --> layer_norm --> E^T (tied)
    loss = sum_b w_b * sum_t CE_ls(logits_bt, y_bt) / sum_b L_b   (label smoothing eps)

``forward_logits(images, text, prev_tokens)`` gives the teacher-forced logits (B, T, V).
``generate`` decodes token by token with a KV cache (cross-attention keys/values computed once,
position biases sliced per step): greedy at beam 1, beam search with length-normalised scores
above.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import checks
from .config import NARVLConfig
from .decoder import DecoderStack, shifted_inputs, smoothed_ce
from .encoder import Encoder
from .layers import TiedOutput, ofa_embedding
from .narvl import add_adapters, check_targets


class ARBaseline(nn.Module):
    """See the module docstring. ``cfg``: a ``NARVLConfig`` (``num_queries`` unused;
    ``max_target_len`` bounds the output length); ``peft``, ``soft_prompt``: as ``NARVL``'s."""

    def __init__(self, cfg: NARVLConfig, peft: bool = False, soft_prompt: bool = True):
        super().__init__()
        if not isinstance(cfg, NARVLConfig):
            raise TypeError(f"cfg must be a NARVLConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.embed_tokens = ofa_embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = Encoder(cfg, self.embed_tokens)
        self.decoder = DecoderStack(cfg)
        self.output = TiedOutput()
        self.out_adapter = None
        if peft:
            self.add_adapters_(soft_prompt)

    def add_adapters_(self, soft_prompt: bool = True):
        """Switches to the parameter-efficient mode (``narvl.models.narvl.add_adapters``), in place."""
        add_adapters(self, soft_prompt)
        return self

    def project_out(self, x):
        """Decoder states (..., d) after ``layer_norm`` -> logits (..., V)."""
        if self.out_adapter is not None:
            x = self.out_adapter(x)
        return self.output(x, self.embed_tokens.weight)

    def _n_text(self, memory):
        return memory.shape[1] - self.cfg.grid ** 2

    def decode_teacher_forced(self, memory, lengths, prev_tokens):
        """memory (B, Lm, d), lengths (B,), prev_tokens (B, T) -> logits (B, T, V)."""
        return self.project_out(self.decoder.teacher_forced(memory, lengths, self.encoder,
                                                            self.embed_tokens, prev_tokens))

    def forward_logits(self, images, text, prev_tokens):
        """Teacher-forced logits (B, T, V) of ``prev_tokens`` (B, T) (BOS first, right-padded
        with pad_id), as OFA's decoder computes them."""
        cfg = self.cfg
        if not isinstance(prev_tokens, torch.Tensor) or prev_tokens.dtype not in (torch.int32, torch.int64):
            raise TypeError("prev_tokens must be an integer tensor (B, T)")
        if prev_tokens.dim() != 2 or prev_tokens.shape[0] != images.shape[0] or prev_tokens.shape[1] == 0:
            raise ValueError(f"prev_tokens must be (B={images.shape[0]}, T >= 1), got {tuple(prev_tokens.shape)}")
        if prev_tokens.shape[1] > cfg.max_positions:
            raise ValueError(f"prev_tokens has {prev_tokens.shape[1]} positions, more than max_positions")
        if checks.enabled():  # values: not under NARVL_CHECK=0 or a torch.compile / export trace
            lo, hi = (int(t) for t in torch.aminmax(prev_tokens))
            if lo < 0 or hi >= cfg.vocab_size:
                raise ValueError(f"prev_tokens ids must lie in [0, {cfg.vocab_size})")
        memory, lengths = self.encoder(images, text)
        return self.decode_teacher_forced(memory, lengths, prev_tokens.to(memory.device).long())

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
        y_in, valid = shifted_inputs(cfg, targets, target_lengths)
        logits = self.decode_teacher_forced(memory, lengths, y_in)
        return smoothed_ce(logits, targets, valid, cfg.label_smoothing, weights)

    def _start(self, images, text, max_len):
        memory, lengths = self.encoder(images, text)
        dec = self.decoder
        cross = [layer.encoder_attn.project_kv(memory) for layer in dec.layers]
        self_b, cross_b = dec.biases(max_len, self.encoder, self._n_text(memory), memory.dtype)
        return (cross, self_b, cross_b), lengths

    def _step(self, tok, pos, state, lengths, caches):
        """One decoding step: tok (B,) at position ``pos`` -> log-probs (B, V); ``caches``
        (one dict per layer) hold the self-attention keys and values so far."""
        cross, self_b, cross_b = state
        dec = self.decoder
        x = dec.embed(self.embed_tokens(tok[:, None]).to(cross[0][0].dtype), start=pos)
        cb = cross_b[:, pos:pos + 1]
        for layer, (ck, cv), sb, cache in zip(dec.layers, cross, self_b, caches):
            x = layer.self_block(x, sb[:, pos:pos + 1, :pos + 1], cache)
            x = layer.cross_ffn_block(x, ck, cv, lengths, cb)
        return F.log_softmax(self.project_out(dec.layer_norm(x[:, 0])).float(), -1)

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
        cross, lengths = self._start(images, text, max_len)
        B = lengths.shape[0]
        caches = [dict() for _ in self.decoder.layers]
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
        cross = ([(ck[rep], cv[rep]) for ck, cv in cross[0]],) + tuple(cross[1:])
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
