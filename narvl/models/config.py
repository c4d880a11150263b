"""NARVL model configuration and the presets of the paper (Shi et al., CVPR 2024) and of OFA.

| preset | d | enc layers | dec layers | heads | ResNet stages 1-3 |
|---|---|---|---|---|---|
| tiny | 256 | 4 | 4 | 4 | resnet50 [3,4,6] |
| medium | 512 | 4 | 4 | 8 | resnet101 [3,4,23] |
| base | 768 | 6 | 6 | 12 | resnet101 [3,4,23] |
| large | 1024 | 12 | 12 | 16 | resnet152 [3,8,36] |
| huge | 1280 | 24 | 12 | 16 | resnet152 [3,8,36] |

FFN = 4d. Image size (480 px, 512 for grounding), the number of queries (VQA 6, grounding 5,
entailment 3, captioning 20) and the vocabulary are fields, so a preset serves every task.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

PRESETS = {
    "tiny": dict(d_model=256, enc_layers=4, dec_layers=4, heads=4, resnet_layers=(3, 4, 6)),
    "medium": dict(d_model=512, enc_layers=4, dec_layers=4, heads=8, resnet_layers=(3, 4, 23)),
    "base": dict(d_model=768, enc_layers=6, dec_layers=6, heads=12, resnet_layers=(3, 4, 23)),
    "large": dict(d_model=1024, enc_layers=12, dec_layers=12, heads=16, resnet_layers=(3, 8, 36)),
    "huge": dict(d_model=1280, enc_layers=24, dec_layers=12, heads=16, resnet_layers=(3, 8, 36)),
}

#: Queries per task (the paper); label smoothing per task (the authors' code).
TASK_QUERIES = {"vqa": 6, "grounding": 5, "entailment": 3, "caption": 20}
TASK_LABEL_SMOOTHING = {"vqa": 0.1, "grounding": 0.1, "entailment": 0.0, "caption": 0.1}
#: Greedy CTC merges repeats for VQA and captioning, not for grounding and entailment.
TASK_MERGE_REPEATS = {"vqa": True, "grounding": False, "entailment": False, "caption": True}


@dataclass
class NARVLConfig:
    """Configuration of ``NARVL`` and ``ARBaseline``.

    The vocabulary is ``[specials + text BPE (+ OFA's <mask> and image codes)][num_bins location
    bins][blank]``: ``vocab_size`` counts all of it and the blank is the last index
    (``blank_id = vocab_size - 1``), as in the authors' code (OFA's 59,457 entries + the blank =
    59,458, blank 59,457; ``<bin_0>`` = 58,457). Position fields are OFA's (``max_positions``,
    ``text_buckets``, ``image_buckets``, ``attn_scale_factor``).
    """

    d_model: int = 256
    enc_layers: int = 4
    dec_layers: int = 4
    heads: int = 4
    ffn_dim: int | None = None  # default 4 * d_model
    resnet_layers: tuple = (3, 4, 6)
    image_size: int = 480
    num_queries: int = 20
    vocab_size: int = 59458
    num_bins: int = 1000
    bos_id: int = 0
    pad_id: int = 1
    eos_id: int = 2
    max_text_len: int = 128
    max_target_len: int = 32  # AR output length bound
    max_positions: int = 1024  # OFA's position tables hold max_positions + 2 rows
    text_buckets: int = 256  # OFA's token_bucket_size
    image_buckets: int = 42  # OFA's image_bucket_size: image grids up to 42 x 42 patches
    attn_scale_factor: float = 2.0  # q scaled by (head_dim * factor) ** -0.5, as OFA
    # OFA's --entangle-position-embedding: the encoder also adds the raw position embeddings
    # (embed_positions, embed_image_positions) to the text and image content, before the type
    # embedding and the embedding LayerNorms. Off in OFA's and the NARVL authors' released setups.
    entangle_position_embedding: bool = False
    # the decoder adds embed_positions[0..T) to its input (tokens or queries) before
    # layernorm_embedding: fairseq OFA without --disable-entangle (every released script sets it)
    decoder_entangle: bool = False
    # Glancing training (Qian et al. 2021, GLAT; with CTC as Gu & Kong 2021): a first decoder
    # pass without gradients, the Viterbi alignment of the target under it, and the inputs of
    # round(glance_ratio * errors) random queries replaced by the embeddings of the labels the
    # alignment puts there (errors: frames where the first pass's argmax differs from the
    # alignment). Training only (NARVL); inference stays one pass. 0 turns it off.
    glance_ratio: float = 0.0
    # with glancing, the weight w of the plain (unglanced) pass's loss: (1 - w) * glanced + w * plain
    # (0: the glanced pass alone, as GLAT; > 0 also trains the one-pass decoding used at inference)
    glance_plain_weight: float = 0.0
    # Joint training with an auxiliary autoregressive decoder (as joint CTC-attention training in
    # speech recognition): NARVL also owns an OFA decoder stack (``aux_decoder``) on the same
    # encoder output and tied embeddings, and its training loss adds aux_ar_weight times that
    # decoder's teacher-forced, label-smoothed cross-entropy on the same targets. The encoder gets
    # the token-level gradients an AR model gets; inference never runs the aux decoder (serving
    # copies drop it). 0 turns it off (no aux decoder is built).
    aux_ar_weight: float = 0.0
    # Deep supervision (intermediate CTC, Lee & Watanabe 2021; DSLP, Huang et al. 2022): in
    # training, each decoder layer but the last also goes through the final ``layer_norm`` and
    # the tied output projection, and the loss adds layer_ctc_weight times the mean of those
    # layers' Q-CTC losses to the last layer's. Training only: inference reads the last layer.
    # 0 turns it off.
    layer_ctc_weight: float = 0.0
    # Inference: after the one pass, refine_steps more decoder passes (Mask-Predict style): the
    # most confident slots keep their label and feed its embedding as their input, the others
    # keep their learnable query and are predicted again (a model trained with glancing has
    # learnt to read such inputs). 0 = one pass, the paper's decoding.
    refine_steps: int = 0
    dropout: float = 0.1
    label_smoothing: float = 0.1
    merge_repeats: bool = True
    preset: str = field(default="custom", compare=False)

    def __post_init__(self):
        self.resnet_layers = tuple(int(x) for x in self.resnet_layers)
        if self.ffn_dim is None:
            self.ffn_dim = 4 * self.d_model
        for name in ("d_model", "enc_layers", "dec_layers", "heads", "ffn_dim", "image_size",
                     "num_queries", "vocab_size", "max_text_len", "max_target_len", "max_positions",
                     "text_buckets", "image_buckets"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.d_model % self.heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of heads ({self.heads})")
        if len(self.resnet_layers) != 3 or min(self.resnet_layers) < 1:
            raise ValueError(f"resnet_layers must be 3 positive block counts, got {self.resnet_layers}")
        if self.image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16 (stride 16), got {self.image_size}")
        if self.grid > self.image_buckets:
            raise ValueError(f"image_size {self.image_size} gives a {self.grid}x{self.grid} patch grid, "
                             f"more than image_buckets = {self.image_buckets} per side")
        if max(self.max_text_len + 1, self.num_queries, self.max_target_len) > self.max_positions:
            raise ValueError(f"max_text_len, num_queries and max_target_len must fit in "
                             f"max_positions = {self.max_positions}")
        for name in ("entangle_position_embedding", "decoder_entangle"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not self.attn_scale_factor > 0:
            raise ValueError(f"attn_scale_factor must be > 0, got {self.attn_scale_factor}")
        if self.num_bins < 0:
            raise ValueError(f"num_bins must be >= 0, got {self.num_bins}")
        for name in ("bos_id", "pad_id", "eos_id"):
            v = getattr(self, name)
            if not 0 <= v < self.vocab_size - 1:
                raise ValueError(f"{name} = {v} must lie in [0, vocab_size - 1) (the blank is last)")
        if self.vocab_size < self.num_bins + 5:
            raise ValueError(f"vocab_size ({self.vocab_size}) must hold 4 specials, "
                             f"{self.num_bins} bins and the blank")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not isinstance(self.glance_ratio, (int, float)) or isinstance(self.glance_ratio, bool) \
                or not 0.0 <= self.glance_ratio <= 1.0:
            raise ValueError(f"glance_ratio must be in [0, 1], got {self.glance_ratio!r}")
        self.glance_ratio = float(self.glance_ratio)
        if not isinstance(self.glance_plain_weight, (int, float)) or isinstance(self.glance_plain_weight, bool) \
                or not 0.0 <= self.glance_plain_weight <= 1.0:
            raise ValueError(f"glance_plain_weight must be in [0, 1], got {self.glance_plain_weight!r}")
        self.glance_plain_weight = float(self.glance_plain_weight)
        if not isinstance(self.aux_ar_weight, (int, float)) or isinstance(self.aux_ar_weight, bool) \
                or not 0.0 <= self.aux_ar_weight < float("inf"):
            raise ValueError(f"aux_ar_weight must be a finite number >= 0, got {self.aux_ar_weight!r}")
        self.aux_ar_weight = float(self.aux_ar_weight)
        if not isinstance(self.layer_ctc_weight, (int, float)) or isinstance(self.layer_ctc_weight, bool) \
                or not 0.0 <= self.layer_ctc_weight < float("inf"):
            raise ValueError(f"layer_ctc_weight must be a finite number >= 0, got {self.layer_ctc_weight!r}")
        self.layer_ctc_weight = float(self.layer_ctc_weight)
        if not isinstance(self.refine_steps, int) or isinstance(self.refine_steps, bool) or self.refine_steps < 0:
            raise ValueError(f"refine_steps must be a non-negative integer, got {self.refine_steps!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")

    @property
    def blank_id(self) -> int:
        return self.vocab_size - 1

    @property
    def bin_offset(self) -> int:
        """Index of ``<bin_0>``."""
        return self.vocab_size - 1 - self.num_bins

    @property
    def grid(self) -> int:
        """Side of the stride-16 feature map (image tokens = grid ** 2)."""
        return self.image_size // 16

    @classmethod
    def from_preset(cls, name: str, task: str | None = None, **overrides) -> "NARVLConfig":
        """A paper preset; ``task`` sets the number of queries, label smoothing and merging."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
        kw = dict(PRESETS[name], preset=name)
        if task is not None:
            if task not in TASK_QUERIES:
                raise ValueError(f"task must be one of {sorted(TASK_QUERIES)}, got {task!r}")
            kw.update(num_queries=TASK_QUERIES[task], label_smoothing=TASK_LABEL_SMOOTHING[task],
                      merge_repeats=TASK_MERGE_REPEATS[task],
                      image_size=512 if task == "grounding" else 480)
        kw.update(overrides)
        return cls(**kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["resnet_layers"] = list(self.resnet_layers)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "NARVLConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown NARVLConfig fields: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> "NARVLConfig":
        return cls.from_dict(json.loads(s))
