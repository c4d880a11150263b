"""eP-ALM (Shukor et al., ICCV 2023): a frozen OPT language model made to perceive images by a frozen
ViT, through one trainable linear connection and a trainable soft prompt.

``EPALM(lm, vision)`` wraps an ``OPTForCausalLM`` and a ``ViTModel`` and freezes both. It runs the
LM's own modules (``lm.model.decoder``: ``embed_tokens``, ``embed_positions``, ``project_in``, each of
``layers``, ``final_layer_norm``, ``project_out``, then ``lm.lm_head``) in its own layer loop, which
inserts the visual tokens; the OPT code itself is not copied. Shapes: B batch, T text tokens,
P soft-prompt tokens, K injected visual tokens, L LM layers, d the LM width (``hidden_size``),
e its token-embedding width (``word_embed_proj_dim``), V its vocabulary, d_v the ViT width,
N the NAR head's queries.

Perception, once per sample (the ViT runs under ``torch.no_grad``: nothing of it is kept for
backward). The ViT runs with ``output_hidden_states``; of its last K block outputs
(B, 1 + patches, d_v) the [CLS] token (position 0) goes through the ViT's final LayerNorm (the
authors' ViT returns ``norm(x)`` after every block, ``models/vit.py``, VisionTransformer.forward)
and then through the trainable connector ``Linear(d_v, d)``: one Linear shared by the K tokens
(``shared_connector=True``, the paper's choice and the default here; the released image configs
leave ``shared_connector`` unset, which builds one Linear per token, ``models/epalm.py``
ePALM.__init__), or one per token. That gives v_0 .. v_{K-1} (B, d), ordered shallow to deep.

Input: ``[soft prompt (P, e) | text tokens (T, e)]`` -> ``project_in`` -> (B, P + T, d); OPT's
learned positions are added to the text only, the text keeping positions 0 .. T-1 whatever P is
(eP-ALM: ``models/opt.py`` OPTDecoder.forward computes the positions from the text mask alone and
adds them to ``inputs_embeds[:, prompt_len:]``). The soft prompt is ``prompt_len`` trainable
vectors (P, e); with ``prompt_mlp`` they are re-parametrised as eP-ALM's ``InputPrompts`` does:
``Linear(e, e) -> Tanh -> Linear(e, e)`` applied to them. Its keys are always attended.

Injection (eP-ALM's ``vis_prefix`` schedule, ``models/opt.py`` OPTDecoder.forward): with
n = end - start and s = n // K if n > K else 1, every layer ``idx`` with
``start_layer_idx <= idx < end_layer_idx`` and ``idx % text_step == 0`` (the absolute index, as
there) takes token j = min((idx - start) // s, K - 1). The first such layer prepends v_j at
position 0 before it runs (the sequence grows to 1 + P + T and the mask gains a column every
position attends); each later one overwrites position 0 with its v_j before it runs. After
``end_layer_idx`` position 0 rides along through the remaining layers, attended by the text, and
is dropped from the output. One deliberate difference: the authors grow their additive 4-D mask
with ``F.pad(mask, (1, 0, 1, 0), value=0)``, which also lets the visual *query* attend to every
position, later text and padding included; its state after the last injected layer then carries
future tokens into the layers >= ``end_layer_idx`` (when end < L), and their cached decoding
differs from a full pass. Here position 0 is causal like the rest: it attends to itself only, so
the computation is a causal LM over ``[v | soft prompt | text]`` and the KV cache is exact.

Attention runs in the LM's ``eager`` implementation (forced at construction), fed an explicit
additive mask (B, 1, T_q, T_k): 0 where the key is a real position not after the query, the
dtype's minimum elsewhere. Layerdrop and head masks are not applied. Dropout inside the frozen
modules follows ``train()`` / ``eval()``, as in the authors' training.

Padding: prompts come right-padded (mask 1 = real token), at least one real token per row (e.g.
OPT's BOS ``</s>``, which its tokenizer prepends). Padded keys are masked; every sample keeps its
own positions, so a batch computes what each sample computes alone.

Heads:
- ``head="ar"``: text = prompt + answer + EOS (the model appends EOS after each answer's last real
  token; ``target_ids`` holds no EOS); the loss is the token-mean cross-entropy of the answer
  tokens and the EOS, the prompt's own tokens carrying no loss (the authors' VQA script trains on
  the whole question-answer text and sums per sample; this follows the task's answer-only loss).
  ``generate`` runs the ViT, the soft prompt and the prompt once per sample into a
  ``transformers.DynamicCache`` (the layers from the first injected one on hold 1 + P + T
  positions, the earlier ones P + T), then feeds one token per step at the sample's next
  position, right after its last real prompt token (the cached padding stays masked). Beam search
  keeps ``beam_width`` live hypotheses per sample, scored by their summed log-probabilities; a
  candidate ending in EOS among the best ``beam_width`` of a step is finished, scored by
  log-probability / length (EOS counted), and the best ``beam_width`` finished ones are kept; a
  sample stops once it holds ``beam_width`` finished hypotheses and its best live one, scored the
  same way, does not beat the worst of them (the stopping rule of transformers' beam search);
  at ``max_new_tokens`` the live ones compete too, and the best score wins. With
  ``beam_width=1`` this is greedy decoding.
- ``head="nar"``: N trainable queries (N, e) follow the prompt: ``[v | soft prompt | prompt |
  queries]``, at positions ``len_b .. len_b + N - 1`` right after the sample's last real token,
  causal like every position. One pass gives (B, N, e) states; their logits are the LM's tied
  ``lm_head`` (V columns, frozen) plus one blank column ``h . w_blank + b_blank`` (trainable),
  (B, N, V + 1), blank = V. The loss is ``narvl.qctc_loss(logits, answer + EOS, blank=V,
  zero_infinity=True)``; decoding is ``narvl.ctc_greedy_decode`` (``beam_width=1``) or
  ``narvl.ctc_prefix_beam_search``, cut at the first EOS and at ``max_new_tokens``.

Defaults follow the authors' image configs (``configs/image/ePALM_caption.yaml``,
``ePALM_vqa.yaml``: OPT-2.7B, 32 layers, ``start_layer_idx: 19``, ``end_layer_idx: 31``,
``injected_hidden_states: 6``, ``text_step: 1``, ``prompt_len: 10``, the prompt MLP on by default):
for an L-layer LM, start = floor(19 L / 32) and end = max(floor(31 L / 32), start + 1) (14 and 23
for OPT-350m's 24 layers); K = 6, lowered until the ViT has K blocks and the schedule uses every
token. ``frozen_dtype=torch.bfloat16`` keeps the LM and the ViT in bf16 (the authors' accelerate
runs keep the LM in half precision); connector, prompt, queries and blank stay float32, and
activations are cast where they cross.

``save_adapter`` writes only the trained parameters to a safetensors file (with the settings that
must match to load it back), ``load_adapter`` reads one.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import DynamicCache, OPTForCausalLM, ViTModel

from ..checkpoint import read_checkpoint, save_file_atomic
from ..ops.ctc import qctc_loss
from ..ops.decode import ctc_greedy_decode, ctc_prefix_beam_search
from .peft import trainable_fraction

ADAPTER_FORMAT = "narvl.epalm.adapter/1"
_AUTHORS_DEPTH, _AUTHORS_START, _AUTHORS_END = 32, 19, 31  # OPT-2.7B in the image configs
_DEFAULT_INJECTED = 6
_DEFAULT_PROMPT_LEN = 10
_DEFAULT_NUM_QUERIES = 20
HEADS = ("ar", "nar")


def _check_int(value, name, lo, hi=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def _check_bool(value, name):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def default_layer_range(num_layers: int) -> tuple[int, int]:
    """(start_layer_idx, end_layer_idx) of the authors' image configs, layers [19, 31) of a
    32-layer OPT, scaled to ``num_layers``."""
    start = _AUTHORS_START * num_layers // _AUTHORS_DEPTH
    return start, max(_AUTHORS_END * num_layers // _AUTHORS_DEPTH, start + 1)


def injection_schedule(num_layers, injected, start, end, text_step):
    """eP-ALM's schedule: a list of (layer index, visual token index), layers ascending."""
    n = end - start
    step = n // injected if n > injected else 1
    return [(idx, min((idx - start) // step, injected - 1))
            for idx in range(start, min(end, num_layers)) if idx % text_step == 0]


def _additive_mask(valid, n_queries, dtype):
    """(B, 1, n_queries, S_k) additive mask: the queries are the last ``n_queries`` of the S_k key
    positions; a query sees the real keys (``valid`` (B, S_k) bool) up to its own position."""
    s_k = valid.shape[1]
    keys = torch.arange(s_k, device=valid.device)
    queries = torch.arange(s_k - n_queries, s_k, device=valid.device)
    allowed = valid[:, None, :] & (keys[None, :] <= queries[:, None])[None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=valid.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def check_model_dir(path, model_type: str, name: str) -> None:
    """Raises ValueError (naming ``name``) unless ``path`` is a Hugging Face directory whose
    ``config.json`` declares ``model_type``."""
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise ValueError(f"{name} {os.fspath(path)!r} is not a Hugging Face model directory (no config.json)")
    try:
        with open(config, encoding="utf-8") as f:
            found = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{name} {os.fspath(path)!r}: unreadable config.json ({e})") from e
    if found != model_type:
        raise ValueError(f"{name} {os.fspath(path)!r} holds a {found!r} model, expected {model_type!r}")


class SoftPrompt(nn.Module):
    """``length`` trainable input vectors (length, dim), optionally re-parametrised by eP-ALM's
    MLP ``Linear(dim, dim) -> Tanh -> Linear(dim, dim)``."""

    def __init__(self, length: int, dim: int, mlp: bool, device=None):
        super().__init__()
        kw = dict(device=device, dtype=torch.float32)
        self.tokens = nn.Parameter(torch.empty(length, dim, **kw))
        nn.init.normal_(self.tokens)  # nn.Embedding's initialisation, as eP-ALM's prompt table
        self.mlp = (nn.Sequential(nn.Linear(dim, dim, **kw), nn.Tanh(), nn.Linear(dim, dim, **kw))
                    if mlp else None)

    def forward(self) -> torch.Tensor:
        """Returns the prompt (length, dim)."""
        return self.tokens if self.mlp is None else self.mlp(self.tokens)


class EPALM(nn.Module):
    """eP-ALM on a frozen ``OPTForCausalLM`` and a frozen ``ViTModel`` (see the module docstring).

    Args:
        lm: an OPT-style decoder-only LM (``lm.model.decoder.layers``, ``lm.lm_head``); frozen,
            switched to eager attention.
        vision: a ``ViTModel``; frozen.
        head: ``"ar"`` (autoregressive LM head) or ``"nar"`` (N queries + blank, Q-CTC).
        num_queries: N for ``head="nar"`` (default 20); must be None for ``"ar"``.
        injected_hidden_states: K, the last K ViT blocks whose [CLS] is injected (default 6,
            lowered to fit the ViT and the schedule).
        start_layer_idx, end_layer_idx: the LM layers [start, end) that take visual tokens
            (default: the authors' [19, 31) of 32 layers, scaled to the LM's depth).
        text_step: inject at the layers whose index is a multiple of ``text_step`` (default 1).
        prompt_len: P soft-prompt tokens (default 10; 0 disables the prompt).
        prompt_mlp: re-parametrise the prompt by eP-ALM's MLP (default True).
        shared_connector: one Linear for all K tokens (default) or one per token.
        frozen_dtype: None keeps the frozen modules' dtype; a floating dtype (e.g.
            ``torch.bfloat16``) casts the LM and the ViT to it.
    """

    def __init__(self, lm: nn.Module, vision: nn.Module, head: str = "ar", num_queries=None, *,
                 injected_hidden_states=None, start_layer_idx=None, end_layer_idx=None,
                 text_step: int = 1, prompt_len: int = _DEFAULT_PROMPT_LEN, prompt_mlp: bool = True,
                 shared_connector: bool = True, frozen_dtype=None):
        super().__init__()
        dec = getattr(getattr(lm, "model", None), "decoder", None)
        if not (isinstance(getattr(dec, "layers", None), nn.ModuleList) and len(dec.layers) > 0
                and all(hasattr(dec, a) for a in ("embed_tokens", "embed_positions", "project_in",
                                                  "project_out", "final_layer_norm"))
                and isinstance(getattr(lm, "lm_head", None), nn.Module) and hasattr(lm, "config")
                and hasattr(lm, "set_attn_implementation")):
            raise TypeError(f"lm must be an OPT-style decoder-only LM (OPTForCausalLM with "
                            f".model.decoder.layers and .lm_head), got {type(lm).__name__}")
        vcfg = getattr(vision, "config", None)
        if not (isinstance(getattr(vision, "layernorm", None), nn.Module)
                and all(hasattr(vcfg, a) for a in ("image_size", "num_channels", "hidden_size",
                                                   "num_hidden_layers"))):
            raise TypeError(f"vision must be a ViTModel (with .layernorm and a ViT config), got "
                            f"{type(vision).__name__}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if head == "ar" and num_queries is not None:
            raise ValueError("num_queries applies to head='nar' only; leave it None for head='ar'")
        if head == "nar":
            num_queries = _check_int(_DEFAULT_NUM_QUERIES if num_queries is None else num_queries,
                                     "num_queries", 1)
        if frozen_dtype is not None and not (isinstance(frozen_dtype, torch.dtype)
                                             and frozen_dtype.is_floating_point):
            raise TypeError(f"frozen_dtype must be None or a floating torch.dtype, got {frozen_dtype!r}")
        cfg = lm.config
        num_layers = len(dec.layers)
        eos = getattr(cfg, "eos_token_id", None)
        if isinstance(eos, bool) or not isinstance(eos, int) or not 0 <= eos < cfg.vocab_size:
            raise ValueError(f"lm.config.eos_token_id must be a token id in [0, {cfg.vocab_size}), "
                             f"got {eos!r}")

        default_start, default_end = default_layer_range(num_layers)
        start = default_start if start_layer_idx is None else start_layer_idx
        end = default_end if end_layer_idx is None else end_layer_idx
        _check_int(start, "start_layer_idx", 0, num_layers - 1)
        _check_int(end, "end_layer_idx", start + 1, num_layers)
        _check_int(text_step, "text_step", 1)
        n_injected = sum(1 for idx in range(start, end) if idx % text_step == 0)
        if n_injected == 0:
            raise ValueError(f"no layer in [start_layer_idx={start}, end_layer_idx={end}) is a multiple "
                             f"of text_step={text_step}: nothing would be injected")
        vit_depth = vcfg.num_hidden_layers
        if injected_hidden_states is None:
            k = min(_DEFAULT_INJECTED, vit_depth, n_injected)
            while len({j for _, j in injection_schedule(num_layers, k, start, end, text_step)}) < k:
                k -= 1
        else:
            k = _check_int(injected_hidden_states, "injected_hidden_states", 1, vit_depth)
        schedule = injection_schedule(num_layers, k, start, end, text_step)
        if len({j for _, j in schedule}) < k:
            raise ValueError(f"injected_hidden_states={k}: the layers {[i for i, _ in schedule]} take only "
                             f"the tokens {sorted({j for _, j in schedule})}; lower it or widen "
                             f"[start_layer_idx, end_layer_idx)")
        _check_int(prompt_len, "prompt_len", 0)
        _check_bool(prompt_mlp, "prompt_mlp")
        _check_bool(shared_connector, "shared_connector")

        for p in list(lm.parameters()) + list(vision.parameters()):
            p.requires_grad_(False)
        if frozen_dtype is not None:
            lm.to(frozen_dtype)
            vision.to(frozen_dtype)
        lm.set_attn_implementation("eager")
        self.lm, self.vision = lm, vision
        self.head, self.num_queries = head, num_queries
        self.injected_hidden_states, self.start_layer_idx, self.end_layer_idx = k, start, end
        self.text_step, self.prompt_len, self.prompt_mlp = text_step, prompt_len, prompt_mlp
        self.shared_connector = shared_connector
        self.schedule = schedule
        self.eos_token_id = eos
        self.vocab_size = cfg.vocab_size
        self.embed_dim = dec.embed_tokens.embedding_dim
        size = vcfg.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)

        device = dec.embed_tokens.weight.device
        kw = dict(device=device, dtype=torch.float32)
        self.connector = nn.ModuleList(nn.Linear(vcfg.hidden_size, cfg.hidden_size, **kw)
                                       for _ in range(1 if shared_connector else k))
        self.prompt = SoftPrompt(prompt_len, self.embed_dim, prompt_mlp, device) if prompt_len else None
        if head == "nar":
            std = getattr(cfg, "init_std", 0.02)
            self.queries = nn.Parameter(torch.empty(num_queries, self.embed_dim, **kw))
            nn.init.normal_(self.queries, std=std)
            self.blank_weight = nn.Parameter(torch.zeros(self.embed_dim, **kw))
            self.blank_bias = nn.Parameter(torch.zeros((), **kw))

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_pretrained(cls, lm_path, vision_path, head: str = "ar", num_queries=None, **options):
        """Loads an ``OPTForCausalLM`` and a ``ViTModel`` from local Hugging Face directories
        (``local_files_only``: nothing is downloaded) and wraps them.

        Args:
            lm_path, vision_path: directories holding ``config.json`` and the weights.
            head, num_queries, options: as for ``EPALM``.
        Returns:
            an ``EPALM``.
        """
        for name, path, kind in (("lm_path", lm_path, "opt"), ("vision_path", vision_path, "vit")):
            if not isinstance(path, (str, os.PathLike)):
                raise TypeError(f"{name} must be a path, got {type(path).__name__}")
            check_model_dir(path, kind, name)
        dtype = options.get("frozen_dtype")
        extra = {"dtype": dtype} if isinstance(dtype, torch.dtype) and dtype.is_floating_point else {}
        lm = OPTForCausalLM.from_pretrained(lm_path, local_files_only=True, attn_implementation="eager",
                                            **extra)
        vision = ViTModel.from_pretrained(vision_path, local_files_only=True, **extra)
        return cls(lm.eval(), vision.eval(), head, num_queries, **options)

    # ------------------------------------------------------------------ parameters
    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The trained parameters by name (connector, soft prompt, and for ``"nar"`` the queries and
        the blank row): everything outside ``lm`` and ``vision``."""
        return {n: p for n, p in self.named_parameters()
                if not (n.startswith("lm.") or n.startswith("vision."))}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters that require gradients (the adapter's)."""
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_fraction(self) -> tuple[int, int, float]:
        """(trainable parameters, all parameters, trainable / all)."""
        return trainable_fraction(self)

    @property
    def _lm_dtype(self):
        return self.lm.model.decoder.embed_tokens.weight.dtype

    @property
    def _adapter_dtype(self):
        return self.connector[0].weight.dtype

    @property
    def _device(self):
        return self.connector[0].weight.device

    # ------------------------------------------------------------------ input checks
    def _check_images(self, images):
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor, got {images.dtype}")
        channels = self.vision.config.num_channels
        if images.dim() != 4 or images.shape[1] != channels or tuple(images.shape[2:]) != self.image_size:
            raise ValueError(f"images must be (B, {channels}, {self.image_size[0]}, {self.image_size[1]}) "
                             f"(the ViT config's num_channels and image_size), got {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise ValueError("images has an empty batch (B = 0)")
        return images.to(self._device)

    def _check_text(self, ids, mask, ids_name, mask_name, batch, need_token):
        """Returns (ids with padding set to 0, mask bool, lengths (B,)) on the model's device."""
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"{ids_name} must be a torch.Tensor, got {type(ids).__name__}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"{ids_name} must hold integer token ids, got {ids.dtype}")
        if ids.dim() != 2 or ids.shape[0] != batch:
            raise ValueError(f"{ids_name} must be (B={batch}, T), got {tuple(ids.shape)}")
        if ids.shape[1] == 0:
            raise ValueError(f"{ids_name} has no token column")
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"{mask_name} must be a torch.Tensor, got {type(mask).__name__}")
        if mask.is_floating_point() or mask.is_complex():
            raise TypeError(f"{mask_name} must be bool or integer (1 = real token), got {mask.dtype}")
        if mask.shape != ids.shape:
            raise ValueError(f"{mask_name} must have the shape of {ids_name} {tuple(ids.shape)}, "
                             f"got {tuple(mask.shape)}")
        dev = self._device
        ids, mask = ids.to(dev), mask.to(dev)
        if mask.dtype != torch.bool:
            if bool(((mask != 0) & (mask != 1)).any()):
                raise ValueError(f"{mask_name} must hold 0 and 1 only")
            mask = mask.bool()
        if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
            raise ValueError(f"{mask_name} must be right-padded (each row ones, then zeros)")
        lengths = mask.sum(1)
        if need_token and bool((lengths == 0).any()):
            raise ValueError(f"{mask_name}: every row needs at least one real token (e.g. the BOS)")
        real = ids[mask]
        if real.numel() and bool(((real < 0) | (real >= self.vocab_size)).any()):
            raise ValueError(f"{ids_name} must lie in [0, {self.vocab_size}) (the LM's vocabulary) "
                             f"where {mask_name} is 1")
        return ids.masked_fill(~mask, 0).long(), mask, lengths

    def _check_positions(self, longest, name):
        limit = self.lm.config.max_position_embeddings
        if longest > limit:
            raise ValueError(f"{name}: {longest} positions exceed the LM's max_position_embeddings = {limit}")

    # ------------------------------------------------------------------ computation
    def visual_tokens(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The K injected tokens v_0 .. v_{K-1}, each (B, d) in the LM's dtype.

        The ViT runs under ``torch.no_grad``; only the connector is differentiated."""
        k = self.injected_hidden_states
        with torch.no_grad():
            vdtype = self.vision.layernorm.weight.dtype
            states = self.vision(pixel_values=images.to(vdtype), output_hidden_states=True).hidden_states
            cls = torch.stack([self.vision.layernorm(h[:, 0]) for h in states[-k:]])
        cls = cls.to(self._adapter_dtype)
        return [self.connector[0 if self.shared_connector else j](cls[j]).to(self._lm_dtype)
                for j in range(k)]

    def _input_states(self, embeds, positions, with_prompt):
        """(B, P + S, d) layer-0 states of ``[soft prompt | embeds]``: embeds (B, S, e) at
        ``positions`` (B, S); the prompt, when ``with_prompt``, gets no position."""
        dec = self.lm.model.decoder
        x = embeds
        if with_prompt and self.prompt is not None:
            x = torch.cat([self.prompt().to(x.dtype).expand(x.shape[0], -1, -1), x], 1)
        if dec.project_in is not None:
            x = dec.project_in(x)
        pos = dec.embed_positions(attention_mask=None, position_ids=positions).to(x.dtype)
        n = x.shape[1] - embeds.shape[1]
        return torch.cat([x[:, :n], x[:, n:] + pos], 1)

    def _layers(self, hidden, valid, visual, cache):
        """Runs the LM layers with the injection; returns (B, S, e) output states.

        Args:
            hidden: (B, S, d) input states of the S new positions.
            valid: (B, S_k) bool, the real positions among the cached and new ones (no visual column).
            visual: the list of K tokens (B, d) for a pass over the whole sequence, or
                None for a step whose cache already holds the visual position.
            cache: a ``DynamicCache`` (filled in place) or None.
        """
        dec = self.lm.model.decoder
        first = self.schedule[0][0]
        token_at = dict(self.schedule)
        mask = _additive_mask(valid, hidden.shape[1], hidden.dtype)
        holds_visual = False
        for idx, layer in enumerate(dec.layers):
            if visual is not None and idx in token_at:
                v = visual[token_at[idx]].unsqueeze(1)
                hidden = torch.cat([v, hidden[:, 1:] if holds_visual else hidden], 1)
                holds_visual = True
            if idx == first:
                ones = valid.new_ones(valid.shape[0], 1)
                mask = _additive_mask(torch.cat([ones, valid], 1), hidden.shape[1], hidden.dtype)
            hidden = layer(hidden, attention_mask=mask, past_key_values=cache, use_cache=cache is not None)[0]
        if holds_visual:
            hidden = hidden[:, 1:]
        if dec.final_layer_norm is not None:
            hidden = dec.final_layer_norm(hidden)
        if dec.project_out is not None:
            hidden = dec.project_out(hidden)
        return hidden

    def _text_states(self, visual, ids, mask, extra=None, extra_positions=None, cache=None):
        """One pass over ``[soft prompt | text (B, T) | extra]``, ``extra`` being optional (B, N, e)
        inputs at ``extra_positions`` (B, N). Returns (output states (B, T [+ N], e) with the soft
        prompt dropped, key mask (B, P + T [+ N]) bool)."""
        batch, t = ids.shape
        dec = self.lm.model.decoder
        limit = self.lm.config.max_position_embeddings
        embeds = dec.embed_tokens(ids)
        positions = torch.arange(t, device=ids.device).clamp(max=limit - 1).expand(batch, t)
        valid = torch.cat([mask.new_ones(batch, self.prompt_len), mask], 1)
        if extra is not None:
            embeds = torch.cat([embeds, extra], 1)
            positions = torch.cat([positions, extra_positions], 1)
            valid = torch.cat([valid, mask.new_ones(batch, extra.shape[1])], 1)
        hidden = self._layers(self._input_states(embeds, positions, True), valid, visual, cache)
        return hidden[:, self.prompt_len:], valid

    def _logits(self, states):
        """LM logits (..., V) of output states (..., e), in the adapter's dtype (float32)."""
        return self.lm.lm_head(states).to(self._adapter_dtype)

    def text_logits(self, images, ids, mask) -> torch.Tensor:
        """LM logits at the text positions of one full pass.

        Args:
            images: (B, C, H, W) float.
            ids, mask: (B, T) right-padded text and its mask (1 = real token).
        Returns:
            (B, T, V) logits (float32), logits[:, t] predicting token t + 1.
        """
        return self._text_logits(images, ids, mask, "ids", "mask")

    def _text_logits(self, images, ids, mask, ids_name, mask_name):
        images = self._check_images(images)
        ids, mask, lengths = self._check_text(ids, mask, ids_name, mask_name, images.shape[0], True)
        self._check_positions(int(lengths.max()), ids_name)
        states, _ = self._text_states(self.visual_tokens(images), ids, mask)
        return self._logits(states)

    def _query_logits(self, images, ids, mask, lengths):
        n = self.num_queries
        batch = ids.shape[0]
        self._check_positions(int(lengths.max()) + n, "prompt_ids")
        queries = self.queries.to(self._lm_dtype).expand(batch, -1, -1)
        positions = lengths[:, None] + torch.arange(n, device=ids.device)
        states, _ = self._text_states(self.visual_tokens(images), ids, mask, queries, positions)
        h = states[:, -n:]
        blank = h.to(self._adapter_dtype) @ self.blank_weight + self.blank_bias
        return torch.cat([self._logits(h), blank.unsqueeze(-1)], -1)

    def query_logits(self, images, prompt_ids, prompt_mask) -> torch.Tensor:
        """The NAR head's logits (``head="nar"``).

        Args:
            images: (B, C, H, W) float.
            prompt_ids, prompt_mask: (B, T_p) right-padded prompt and its mask.
        Returns:
            (B, N, V + 1) float32 logits; column V is the blank.
        """
        self._require_head("nar", "query_logits")
        images = self._check_images(images)
        ids, mask, lengths = self._check_text(prompt_ids, prompt_mask, "prompt_ids", "prompt_mask",
                                              images.shape[0], True)
        return self._query_logits(images, ids, mask, lengths)

    def forward(self, images, prompt_ids, prompt_mask) -> torch.Tensor:
        """The head's logits: ``text_logits`` (``"ar"``, (B, T_p, V)) or ``query_logits``
        (``"nar"``, (B, N, V + 1))."""
        if self.head == "ar":
            return self._text_logits(images, prompt_ids, prompt_mask, "prompt_ids", "prompt_mask")
        return self.query_logits(images, prompt_ids, prompt_mask)

    def _require_head(self, head, what):
        if self.head != head:
            raise ValueError(f"{what} needs head={head!r}; this model has head={self.head!r}")

    def loss(self, images, prompt_ids, prompt_mask, target_ids, target_mask) -> torch.Tensor:
        """Training loss of a batch.

        Args:
            images: (B, C, H, W) float.
            prompt_ids, prompt_mask: (B, T_p) right-padded prompt (at least one real token a row).
            target_ids, target_mask: (B, T_t) right-padded answers, without EOS (the model appends it).
        Returns:
            a scalar: for ``"ar"`` the mean cross-entropy over the answer tokens and the EOS; for
            ``"nar"`` ``narvl.qctc_loss`` (reduction 'mean', blank = V, zero_infinity) of the
            query logits against answer + EOS.
        """
        images = self._check_images(images)
        batch = images.shape[0]
        ids, mask, lp = self._check_text(prompt_ids, prompt_mask, "prompt_ids", "prompt_mask", batch, True)
        tids, tmask, lt = self._check_text(target_ids, target_mask, "target_ids", "target_mask", batch, False)
        eos = self.eos_token_id
        if self.head == "nar":
            logits = self._query_logits(images, ids, mask, lp)
            targets = torch.cat([tids, tids.new_zeros(batch, 1)], 1)
            targets = targets.scatter(1, lt[:, None], eos)
            return qctc_loss(logits, targets, lt + 1, blank=self.vocab_size, zero_infinity=True)
        # pack prompt, answer and EOS per sample, right-padded: (B, S)
        total = lp + lt + 1
        s = int(total.max())
        self._check_positions(s, "target_ids")
        col = torch.arange(s, device=ids.device).expand(batch, s)
        in_prompt = col < lp[:, None]
        in_answer = (col >= lp[:, None]) & (col < (lp + lt)[:, None])
        from_prompt = ids.gather(1, col.clamp(max=ids.shape[1] - 1))
        from_answer = tids.gather(1, (col - lp[:, None]).clamp(0, tids.shape[1] - 1))
        packed = torch.where(in_prompt, from_prompt, torch.where(in_answer, from_answer, eos))
        pmask = col < total[:, None]
        packed = packed.masked_fill(~pmask, 0)
        states, _ = self._text_states(self.visual_tokens(images), packed, pmask)
        labelled = (col >= lp[:, None]) & pmask  # answer tokens and the EOS
        sel = labelled[:, 1:]
        logits = self._logits(states[:, :-1][sel])
        return F.cross_entropy(logits, packed[:, 1:][sel])

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, images, prompt_ids, prompt_mask, max_new_tokens: int = 20,
                 beam_width: int = 1) -> list[list[int]]:
        """Decodes an answer per sample.

        Args:
            images: (B, C, H, W) float.
            prompt_ids, prompt_mask: (B, T_p) right-padded prompt (at least one real token a row).
            max_new_tokens: the most tokens generated per sample (EOS included).
            beam_width: 1 for greedy decoding; more for beam search (``"ar"``) or CTC prefix beam
                search (``"nar"``).
        Returns:
            B lists of token ids: the generated tokens, cut before the first EOS.
        """
        _check_int(max_new_tokens, "max_new_tokens", 1)
        _check_int(beam_width, "beam_width", 1)
        images = self._check_images(images)
        ids, mask, lengths = self._check_text(prompt_ids, prompt_mask, "prompt_ids", "prompt_mask",
                                              images.shape[0], True)
        eos = self.eos_token_id
        if self.head == "nar":
            logits = self._query_logits(images, ids, mask, lengths).float()
            blank = self.vocab_size
            if beam_width == 1:
                tokens, lens = ctc_greedy_decode(logits, blank=blank)
                seqs = [tokens[b, : lens[b]].tolist() for b in range(tokens.shape[0])]
            else:
                res = ctc_prefix_beam_search(logits, beam_width=beam_width, blank=blank, nbest=1,
                                             input="logits")
                seqs = [res.tokens[b, 0, : res.lengths[b, 0]].tolist() for b in range(logits.shape[0])]
            return [(s[: s.index(eos)] if eos in s else s)[:max_new_tokens] for s in seqs]
        self._check_positions(int(lengths.max()) + max_new_tokens - 1, "max_new_tokens")
        return self._beam_search(images, ids, mask, lengths, max_new_tokens, beam_width)

    def _beam_search(self, images, ids, mask, lengths, max_new_tokens, width):
        """Cached beam search of the AR head (greedy for ``width`` 1); see the module docstring."""
        batch, vocab, eos = ids.shape[0], self.vocab_size, self.eos_token_id
        dec = self.lm.model.decoder
        cache = DynamicCache(config=self.lm.config)
        states, valid = self._text_states(self.visual_tokens(images), ids, mask, cache=cache)
        last = states[torch.arange(batch, device=ids.device), lengths - 1]
        logp = F.log_softmax(self._logits(last).float(), -1)  # (B * width, V) after the first step
        cache.batch_repeat_interleave(width)
        valid = valid.repeat_interleave(width, 0)
        positions = lengths.repeat_interleave(width)
        logp = logp.repeat_interleave(width, 0)
        scores = torch.full((batch, width), float("-inf"), device=ids.device)
        scores[:, 0] = 0.0
        alive = ids.new_zeros(batch, width, 0)
        finished = [[] for _ in range(batch)]  # (score / length, tokens)
        done = [False] * batch
        for t in range(max_new_tokens):
            cand = (scores.unsqueeze(-1) + logp.view(batch, width, vocab)).view(batch, -1)
            top, idx = cand.topk(min(2 * width, cand.shape[1]), dim=1)
            beam, tok = idx // vocab, idx % vocab
            next_beam = beam.new_zeros(batch, width)
            next_tok = tok.new_full((batch, width), eos)
            next_score = top.new_full((batch, width), float("-inf"))
            top_l, beam_l, tok_l = top.tolist(), beam.tolist(), tok.tolist()
            for b in range(batch):
                if done[b]:
                    continue
                kept = 0
                for r, (sc, bm, tk) in enumerate(zip(top_l[b], beam_l[b], tok_l[b])):
                    if sc == float("-inf") or kept == width:
                        break
                    if tk == eos:
                        if r < width:
                            finished[b].append((sc / (t + 1), alive[b, bm].tolist()))
                        continue
                    next_beam[b, kept], next_tok[b, kept], next_score[b, kept] = bm, tk, sc
                    kept += 1
                finished[b] = sorted(finished[b], key=lambda h: -h[0])[:width]
                done[b] = kept == 0 or (len(finished[b]) == width
                                        and float(next_score[b, 0]) / (t + 1) <= finished[b][-1][0])
            rows = torch.arange(batch, device=ids.device)[:, None]
            alive = torch.cat([alive[rows, next_beam], next_tok.unsqueeze(-1)], -1)
            scores = next_score
            if all(done) or t == max_new_tokens - 1:
                break
            cache.reorder_cache((rows * width + next_beam).view(-1))
            valid = torch.cat([valid, valid.new_ones(valid.shape[0], 1)], 1)
            x = self._input_states(dec.embed_tokens(next_tok.view(-1, 1)), (positions + t).view(-1, 1), False)
            h = self._layers(x, valid, None, cache)
            logp = F.log_softmax(self._logits(h[:, -1]).float(), -1)
        out = []
        for b in range(batch):
            hyps = list(finished[b])
            if not done[b]:
                n = alive.shape[-1]
                hyps += [(sc / n, alive[b, w].tolist()) for w, sc in enumerate(scores[b].tolist())
                         if sc != float("-inf")]
            out.append(max(hyps, key=lambda h: h[0])[1] if hyps else [])
        return out

    # ------------------------------------------------------------------ adapter files
    def _adapter_settings(self) -> dict:
        return {"head": self.head, "num_queries": self.num_queries,
                "injected_hidden_states": self.injected_hidden_states,
                "start_layer_idx": self.start_layer_idx, "end_layer_idx": self.end_layer_idx,
                "text_step": self.text_step, "prompt_len": self.prompt_len, "prompt_mlp": self.prompt_mlp,
                "shared_connector": self.shared_connector, "vocab_size": self.vocab_size,
                "lm_hidden_size": self.lm.config.hidden_size, "embed_dim": self.embed_dim,
                "vision_hidden_size": self.vision.config.hidden_size,
                "shapes": {n: list(p.shape) for n, p in self.adapter_parameters().items()}}

    def save_adapter(self, path) -> None:
        """Writes the trained parameters (``adapter_parameters``) to the safetensors file ``path``,
        atomically (a temporary file in the same directory, then ``os.replace``), with the settings
        ``load_adapter`` checks as metadata."""
        path = os.fspath(path)
        tensors = {n: p.detach().to("cpu", copy=True).contiguous()
                   for n, p in self.adapter_parameters().items()}
        metadata = {"format": ADAPTER_FORMAT,
                    "settings": json.dumps(self._adapter_settings(), sort_keys=True)}
        save_file_atomic(tensors, path, metadata)

    def load_adapter(self, path) -> None:
        """Loads an adapter file written by ``save_adapter`` into this model's trained parameters.

        Raises ``ValueError`` when the file is missing, is not such an adapter, or was saved by a
        model with other settings or shapes."""
        path = os.fspath(path)
        tensors, metadata = read_checkpoint(path)
        if metadata.get("format") != ADAPTER_FORMAT:
            raise ValueError(f"path {path!r}: not an eP-ALM adapter (metadata format "
                             f"{metadata.get('format')!r}, expected {ADAPTER_FORMAT!r})")
        try:
            saved = json.loads(metadata.get("settings", ""))
        except ValueError as e:
            raise ValueError(f"path {path!r}: unreadable adapter settings ({e})") from e
        mine = self._adapter_settings()
        if not isinstance(saved, dict):
            raise ValueError(f"path {path!r}: unreadable adapter settings")
        differ = sorted(k for k in mine.keys() | saved.keys() if mine.get(k) != saved.get(k))
        if differ:
            raise ValueError(f"path {path!r}: adapter saved with other settings: "
                             + ", ".join(f"{k}={saved.get(k)!r} (model: {mine.get(k)!r})" for k in differ))
        params = self.adapter_parameters()
        if tensors.keys() != params.keys():
            raise ValueError(f"path {path!r}: tensors {sorted(tensors)} do not match the adapter's "
                             f"{sorted(params)}")
        for n, t in tensors.items():
            if t.shape != params[n].shape or not t.is_floating_point():
                raise ValueError(f"path {path!r}: tensor {n} is {t.dtype} {tuple(t.shape)}, expected "
                                 f"floating {tuple(params[n].shape)}")
        with torch.no_grad():
            for n, t in tensors.items():
                params[n].copy_(t)


def trained_fraction_for_configs(lm_config, vision_config, head: str = "ar", num_queries=None,
                                 **options) -> tuple[int, int, float]:
    """(trained parameters, all parameters, trained / all) of eP-ALM on an OPT config and a ViT
    config, built on the meta device (no memory, no weights).

    Args:
        lm_config: an ``OPTConfig``; vision_config: a ``ViTConfig``.
        head, num_queries, options: as for ``EPALM``.
    """
    with torch.device("meta"):
        model = EPALM(OPTForCausalLM(lm_config), ViTModel(vision_config), head, num_queries, **options)
    return model.trainable_fraction()
