"""NARVL: the non-autoregressive vision-language model (Shi et al., CVPR 2024).

    memory = Encoder(images, text)                  (B, Lm, d), OFA's encoder
    h = layernorm_embedding(query_embed) (N, d) --OFA DecoderLayer x dec_layers (self-attention
        among all N queries, no causal mask; cross-attention into memory with its lengths;
        OFA's position biases)--> layer_norm       (B, N, d)
    logits = h @ embed_tokens.weight^T (tied)        (B, N, V)

The modules carry OFA's fairseq names (``encoder.*``, ``decoder.*``), as the authors build NARVL
on OFA (amazon-science/NARVL ``ofa_cmlm_transformer.py``); ``narvl.models.from_ofa`` loads OFA
checkpoints into it.

Training: ``model(images, text, targets, target_lengths, weights=None)`` returns the Q-CTC loss
``narvl.qctc_loss(logits, targets, target_lengths, blank=V-1, label_smoothing=eps, weights=w)``,
i.e. (1-eps) * mean_b(w_b * CTC_b / L_b) - eps * mean(log_softmax(logits)) with zero_infinity.
Targets are the answer tokens followed by EOS (EOS is a CTC label).
Inference: ``model.generate(images, text, beam_width=1)`` decodes all N slots in one pass:
greedy (argmax per query, merge repeats when ``merge_repeats``, drop blanks) or CTC prefix
beam search; the output stops at the first EOS.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from ..ops.ctc import ctc_min_frames, qctc_loss
from ..ops.decode import ctc_greedy_decode, ctc_prefix_beam_search
from ..ops.forced_align import ctc_forced_align
from .config import NARVLConfig
from .decoder import DecoderStack, shifted_inputs, smoothed_ce
from .encoder import Encoder
from .layers import TiedOutput, ofa_embedding
from ..nn import Linear


class Glance(NamedTuple):
    """What ``NARVL.glance`` did to a batch (see there)."""

    inputs: torch.Tensor
    mask: torch.Tensor
    path: torch.Tensor
    errors: torch.Tensor
    infeasible: int


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


class QueryDecoder(DecoderStack):
    """NARVL's decoder (the authors' ``CMLMNATransformerDecoder`` with query input): OFA's
    decoder stack fed N learnable queries ``query_embed`` (N, d) instead of tokens, with
    self-attention among all queries (no causal mask).
    forward(memory (B, Lm, d), memory_lengths (B,), encoder, query_input (B, N, d) = None) ->
    hidden states (B, N, d) after ``layer_norm``; ``query_input`` replaces the queries.
    ``every_layer``: a list of every layer's states through ``layer_norm`` (deep supervision)."""

    def __init__(self, cfg: NARVLConfig):
        super().__init__(cfg)
        self.query_embed = nn.Embedding(cfg.num_queries, cfg.d_model)  # N(0, 1), as DETR's

    def forward(self, memory, memory_lengths, encoder, query_input=None, every_layer: bool = False):
        B, dtype = memory.shape[0], memory.dtype
        N = self.query_embed.weight.shape[0]
        self_b, cross_b = self.biases(N, encoder, memory.shape[1] - self.cfg.grid ** 2, dtype)
        x = self.query_embed.weight[None].expand(B, -1, -1) if query_input is None else query_input
        return self.run_layers(self.embed(x.to(dtype)), memory, memory_lengths, self_b, cross_b,
                               every_layer=every_layer)


def add_adapters(model: nn.Module, soft_prompt: bool):
    """The parameter-efficient mode of ``NARVL`` and ``ARBaseline`` (after eP-ALM): every
    parameter so far frozen, then trainable: an output-side projection ``out_adapter`` (d -> d,
    the identity at first), optionally the encoder's soft-prompt token, and NARVL's queries."""
    if getattr(model, "aux_decoder", None) is not None:
        raise ValueError("the parameter-efficient mode freezes the encoder, so joint training's aux decoder "
                         "(cfg.aux_ar_weight > 0) would train the adapters towards a frozen random decoder: "
                         "use aux_ar_weight = 0")
    for p in model.parameters():
        p.requires_grad_(False)
    d = model.cfg.d_model
    dev = model.embed_tokens.weight.device
    adapter = Linear(d, d).to(dev)
    with torch.no_grad():
        adapter.weight.copy_(torch.eye(d))
        adapter.bias.zero_()
    model.out_adapter = adapter
    if soft_prompt:
        model.encoder.add_soft_prompt_()
    if hasattr(model, "queries"):
        model.queries.requires_grad_(True)


class NARVL(nn.Module):
    """See the module docstring. ``cfg``: a ``NARVLConfig``; ``peft``: the parameter-efficient
    mode (``add_adapters``; the soft prompt when ``soft_prompt``). ``narvl.models.enable_peft``
    switches a built model to it."""

    def __init__(self, cfg: NARVLConfig, peft: bool = False, soft_prompt: bool = True):
        super().__init__()
        if not isinstance(cfg, NARVLConfig):
            raise TypeError(f"cfg must be a NARVLConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.embed_tokens = ofa_embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = Encoder(cfg, self.embed_tokens)
        self.decoder = QueryDecoder(cfg)
        # training only: the auxiliary AR decoder of joint training (cfg.aux_ar_weight > 0)
        self.aux_decoder = DecoderStack(cfg) if cfg.aux_ar_weight > 0 else None
        self.output = TiedOutput()
        self.out_adapter = None  # (d, d) linear in the parameter-efficient mode
        if peft:
            self.add_adapters_(soft_prompt)

    def add_adapters_(self, soft_prompt: bool = True):
        """Switches to the parameter-efficient mode (``add_adapters``), in place."""
        add_adapters(self, soft_prompt)
        return self

    @property
    def queries(self) -> nn.Parameter:
        """The N learnable query embeddings (N, d)."""
        return self.decoder.query_embed.weight

    def project_out(self, x):
        """Decoder states (..., d) -> logits (..., V): ``out_adapter`` (if any), then the tied
        output projection."""
        if self.out_adapter is not None:
            x = self.out_adapter(x)
        return self.output(x, self.embed_tokens.weight)

    def decode_logits(self, memory, memory_lengths, query_input=None):
        """memory (B, Lm, d), memory_lengths (B,) -> logits (B, N, V). ``query_input`` (B, N, d):
        the decoder's input in place of the learnable queries (glancing training)."""
        return self.project_out(self.decoder(memory, memory_lengths, self.encoder, query_input))

    def logits(self, images, text):
        memory, lengths = self.encoder(images, text)
        return self.decode_logits(memory, lengths)

    def forward(self, images, text, targets, target_lengths, weights=None):
        """Q-CTC loss (scalar). targets (B, S) answer + EOS, right-padded; target_lengths (B,);
        weights (B,) optional per-sample weights (VQA answer confidence). In training mode with
        ``cfg.glance_ratio > 0`` the loss is that of the glanced pass (``glance``), mixed with
        the plain pass's as ``(1 - w) * glanced + w * plain`` for ``w = cfg.glance_plain_weight``.
        With ``cfg.layer_ctc_weight > 0`` each pass's loss adds that weight times the mean Q-CTC
        loss of the decoder's inner layers (deep supervision; training only)."""
        check_targets(self.cfg, targets, target_lengths, images.shape[0])
        cfg = self.cfg
        memory, lengths = self.encoder(images, text)

        def loss_of(logits):
            return qctc_loss(logits, targets, target_lengths, blank=cfg.blank_id,
                             label_smoothing=cfg.label_smoothing, weights=weights, zero_infinity=True)

        def decoded(query_input=None):
            """One decoder pass -> (logits (B, N, V), its loss), deep supervision included."""
            if not (self.training and cfg.layer_ctc_weight > 0):
                logits = self.decode_logits(memory, lengths, query_input)
                return logits, loss_of(logits)
            *inner, last = self.decoder(memory, lengths, self.encoder, query_input, every_layer=True)
            logits = self.project_out(last)
            loss = loss_of(logits)
            if inner:
                loss = loss + cfg.layer_ctc_weight * sum(loss_of(self.project_out(h)) for h in inner) / len(inner)
            return logits, loss

        if not (self.training and cfg.glance_ratio > 0):
            loss = decoded()[1]
        else:
            w = cfg.glance_plain_weight
            first, first_loss = decoded() if w > 0 else (None, None)  # the plain pass, trained too
            g = self.glance(memory, lengths, targets, target_lengths, cfg.glance_ratio, first=first)
            loss = decoded(g.inputs)[1]
            if first is not None:
                loss = (1 - w) * loss + w * first_loss
        if self.training and self.aux_decoder is not None:
            loss = loss + cfg.aux_ar_weight * self.aux_ar_loss(memory, lengths, targets, target_lengths, weights)
        return loss

    def aux_ar_loss(self, memory, memory_lengths, targets, target_lengths, weights=None):
        """The auxiliary AR decoder's teacher-forced, label-smoothed cross-entropy (scalar) of
        ``targets`` (B, S) over the encoder output memory (B, Lm, d), reduced as the AR
        baseline's loss (joint training, ``cfg.aux_ar_weight``)."""
        if self.aux_decoder is None:
            raise ValueError("this model has no aux_decoder (cfg.aux_ar_weight is 0)")
        check_targets(self.cfg, targets, target_lengths, memory.shape[0])
        targets = targets.to(memory.device).long()
        y_in, valid = shifted_inputs(self.cfg, targets, target_lengths)
        states = self.aux_decoder.teacher_forced(memory, memory_lengths, self.encoder, self.embed_tokens, y_in)
        return smoothed_ce(self.project_out(states), targets, valid, self.cfg.label_smoothing, weights)

    def glance(self, memory, memory_lengths, targets, target_lengths, ratio: float, first=None) -> Glance:
        """Glancing (GLAT, Qian et al. 2021) with CTC's best alignment (Gu & Kong 2021).

        A first decoder pass without gradients gives log-probabilities (B, N, V); the target's
        Viterbi path under them (``narvl.ctc_forced_align``) puts one label or the blank on each
        of the N query slots. In sample b, ``round(ratio * errors_b)`` slots chosen uniformly at
        random (``errors_b``: slots whose argmax differs from the path) get the embedding of the
        path's label there (``embed_tokens``, the blank's row for a blank) as their input in
        place of their learnable query. Samples whose target needs more frames than there are
        queries have no path and are not glanced (``Glance.infeasible`` counts them).

        ``first``: the first pass's logits (B, N, V) if already computed (only read, without
        gradients). Returns a ``Glance``: ``inputs`` (B, N, d) for ``decode_logits(..., query_input=)``
        (differentiable into ``query_embed`` and ``embed_tokens``), ``mask`` (B, N) bool of the
        glanced slots, ``path`` (B, N) the alignment (blank where infeasible), ``errors`` (B,).
        """
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio must be in [0, 1], got {ratio!r}")
        cfg = self.cfg
        B, N = memory.shape[0], cfg.num_queries
        blank = cfg.blank_id
        with torch.no_grad():
            first = (self.decode_logits(memory.detach(), memory_lengths) if first is None else first).float()
            feasible = ctc_min_frames(targets, target_lengths) <= N
            path = torch.full((B, N), blank, dtype=torch.long, device=memory.device)
            idx = feasible.nonzero().flatten()
            if idx.numel():
                lp = torch.log_softmax(first[idx], -1)
                path[idx] = ctc_forced_align(lp, targets[idx], target_lengths=target_lengths[idx],
                                             blank=blank)[0]
            errors = ((first.argmax(-1) != path) & feasible[:, None]).sum(-1)
            count = torch.floor(ratio * errors.double() + 0.5).long()
            # the k slots of lowest random rank in each row
            rank = torch.rand(B, N, device=memory.device).argsort(-1).argsort(-1)
            mask = rank < count[:, None]
        queries = self.decoder.query_embed.weight[None].expand(B, -1, -1)
        inputs = torch.where(mask[..., None], self.embed_tokens(path), queries)
        return Glance(inputs, mask, path, errors, int((~feasible).sum()))

    def refine(self, memory, memory_lengths, logits, steps: int):
        """Mask-Predict style refinement of one-pass ``logits`` (B, N, V): in pass k of
        ``steps``, the round(N * (steps - k) / (steps + 1)) slots of highest probability keep
        their argmax label and take its embedding as their decoder input; the other slots keep
        their learnable query and take the new pass's logits. Returns (B, N, V)."""
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
        N = self.cfg.num_queries
        queries = self.decoder.query_embed.weight[None].to(memory.dtype)
        for k in range(steps):
            conf, lab = logits.float().softmax(-1).max(-1)
            n_keep = int(N * (steps - k) / (steps + 1) + 0.5)
            keep = conf.argsort(-1, descending=True).argsort(-1) < n_keep
            x = torch.where(keep[..., None], self.embed_tokens(lab).to(memory.dtype), queries)
            logits = torch.where(keep[..., None], logits, self.decode_logits(memory, memory_lengths, x))
        return logits

    @torch.no_grad()
    def generate(self, images, text, beam_width: int = 1, cutoff_top_n: int = 40):
        """Decode every sample in one decoder pass (then ``cfg.refine_steps`` refinement passes,
        ``refine``). Returns a list of B token-id lists (no blanks, no EOS)."""
        if not isinstance(beam_width, int) or beam_width < 1:
            raise ValueError(f"beam_width must be a positive integer, got {beam_width!r}")
        cfg = self.cfg
        memory, lengths = self.encoder(images, text)
        logits = self.refine(memory, lengths, self.decode_logits(memory, lengths), cfg.refine_steps).float()
        if beam_width == 1:  # without merge_repeats (grounding, entailment): one label per slot
            tokens, lens = ctc_greedy_decode(logits, blank=cfg.blank_id, merge_repeats=cfg.merge_repeats)
            seqs = [tokens[b, : lens[b]].tolist() for b in range(tokens.shape[0])]
        else:
            # the search normalises the logits itself, in the same scan as its top-k
            res = ctc_prefix_beam_search(logits, beam_width=beam_width, blank=cfg.blank_id,
                                         cutoff_top_n=cutoff_top_n, nbest=1, input="logits")
            seqs = [res.tokens[b, 0, : res.lengths[b, 0]].tolist() for b in range(logits.shape[0])]
        return [s[: s.index(cfg.eos_id)] if cfg.eos_id in s else s for s in seqs]
