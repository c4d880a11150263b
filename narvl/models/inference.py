"""Serving copies of a model: the same function, arranged for batch-1 serving on CPU.

``prepare_for_inference(model)`` returns a deep copy in eval mode with gradients off, in which
the plain modules of ``narvl.models`` are swapped, in place and keeping their parameters, for the
inference-only modules below. These own all packing, fusing and caching; the plain modules
compute and nothing else.

- the ResNet: every BatchNorm folded into its conv (``fold_batchnorm_``) and, for float32 CPU
  weights, ``PackedResNetStages`` (``pack_for_cpu_``): each folded conv pre-packed into oneDNN's
  blocked layout and each bottleneck run as fused oneDNN primitives (conv+ReLU,
  conv+residual-add+ReLU), about half the backbone's time at batch 1 (bench/bench_model.py);
  inputs that are not float32 CPU without grad or autocast run the folded modules;
- ``FusedAttention``: q/k/v in one (3d, d) matmul (self-attention), k/v of the cross-attention
  memory in one (2d, d), NormFormer's ``c_attn`` folded into ``out_proj`` (out_proj(a * c) =
  (W diag(c)) a), each with a oneDNN-packed copy;
- ``PackedLinear`` (every ``narvl.nn.Linear``) and ``PackedTiedOutput`` (the tied output
  projection): a oneDNN-blocked copy of the weight, so calls of 8 or more rows run one oneDNN
  matmul (+GELU) without reordering the weight; 1-7 rows (an AR step) keep ATen's ``addmm``
  (``narvl.ops.linear``);
- ``CachedEncoder``, ``CachedDecoderStack``: the position biases (absolute + relative, OFA's)
  kept per shape in a bounded LRU cache; ``CachedQueryDecoder`` also keeps NARVL's first decoder
  self-attention block, which sees only the learnable queries and so is a constant.

``prepare_for_inference(model, dtype=torch.bfloat16)`` builds the copy in bfloat16 (BatchNorm
folded in float32 first; the copy's encoder casts float images to its dtype; the decoders' logits
are read in float32). On a CPU without bfloat16 instructions (AVX512-BF16 or AMX-BF16;
``cpu_has_bf16``) bfloat16 runs emulated and slower than float32, so the copy stays float32 with
a ``RuntimeWarning`` unless ``fallback=False``. The fp32-only fast paths (the packed ResNet, the
oneDNN-packed linear weights) step aside for bfloat16: its calls run ATen's own kernels, which
use oneDNN's bfloat16 matmuls and convolutions where the CPU has them.

The encoder gets the same treatment in ``NARVL`` and ``ARBaseline``, so latency comparisons
between them stay like for like (``train.py``, ``bench/``). Every snapshot (packed weights, fused
weights, biases, the first block) is recomputed when the copy's own parameters change in place
(``narvl.models.cache.ParamStamp``). The caches hold no per-call state and take a lock around
their bookkeeping, so one copy can serve several threads.
"""
from __future__ import annotations

import copy
import threading
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _backend
from ..nn import Linear, merge_heads, split_heads
from ..ops.linear import linear, pack_weight
from .cache import DEFAULT_CACHE_BYTES, PackedWeight, ParamStamp, ShapeCache, param_refs
from .decoder import DecoderStack
from .encoder import Encoder
from .layers import OFAAttention, TiedOutput
from .narvl import QueryDecoder
from .resnet import ResNetStages, fold_batchnorm_

__all__ = ["prepare_for_inference", "time_generate", "Timing", "pack_for_cpu_", "fold_batchnorm_",
           "mkldnn_fusion_available", "PackedLinear", "PackedTiedOutput", "FusedAttention",
           "FusedWeights", "CachedEncoder", "CachedDecoderStack", "CachedQueryDecoder",
           "PackedResNetStages", "cpu_has_bf16"]


def cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 arithmetic (the ``avx512_bf16`` or ``amx_bf16`` flag of
    /proc/cpuinfo: Intel Cooper Lake and later Xeons, AMD Zen 4 and later). False where the
    flags cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


_SERVING_DTYPES = (torch.float32, torch.bfloat16)


def _serving_dtype(model: nn.Module, dtype, fallback: bool):
    """The dtype of the serving copy: ``dtype`` (None: the model's), or float32 for bfloat16 on
    a CPU without bfloat16 instructions when ``fallback``."""
    if dtype is None:
        return None
    if dtype not in _SERVING_DTYPES:
        raise TypeError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype!r}")
    if not isinstance(fallback, bool):
        raise TypeError(f"fallback must be a bool, got {fallback!r}")
    on_cpu = next(model.parameters()).device.type == "cpu"
    if dtype == torch.bfloat16 and on_cpu and fallback and not cpu_has_bf16():
        warnings.warn("prepare_for_inference: this CPU has no bfloat16 instructions (avx512_bf16 / "
                      "amx_bf16), where bfloat16 runs emulated and slower than float32; the serving "
                      "copy stays float32 (fallback=False builds it in bfloat16 anyway)",
                      RuntimeWarning, stacklevel=3)
        return torch.float32
    return dtype


def _become(module: nn.Module, cls: type, base: type | None = None) -> nn.Module:
    """Swaps ``module``'s class for ``cls`` (a subclass of ``base``, default its first base,
    adding inference-only behaviour), in place: the parameters, buffers and state-dict keys stay
    those of the plain module."""
    base = cls.__mro__[1] if base is None else base
    if not isinstance(module, base):
        raise TypeError(f"{cls.__name__} is built from a {base.__name__}, got {type(module).__name__}")
    module.__class__ = cls
    return module


# ------------------------------------------------------------------------------ linear layers


class PackedLinear(Linear):
    """A ``narvl.nn.Linear`` with a oneDNN-blocked copy of its weight (``PackedWeight``), packed
    again whenever the weight changes. ``from_linear(m)`` converts ``m`` in place."""

    @classmethod
    def from_linear(cls, m: Linear) -> PackedLinear:
        _become(m, cls)
        m._pack = PackedWeight(m, "weight")
        return m

    def packed_weight(self) -> torch.Tensor | None:
        """The packed weight for a call without gradients, else None."""
        return self._pack.get()

    def forward(self, x, activation=None):
        return linear(x, self.weight, self.bias, activation=activation, packed=self._pack.get())


class PackedTiedOutput(TiedOutput):
    """``TiedOutput`` with a oneDNN-blocked copy of the token embedding's weight."""

    def __init__(self, embed_tokens: nn.Embedding):
        super().__init__()
        self._pack = PackedWeight(embed_tokens, "weight")

    def packed_weight(self) -> torch.Tensor | None:
        return self._pack.get()

    def forward(self, x, weight):
        return linear(x, weight.to(x.dtype), packed=self._pack.get())


# --------------------------------------------------------------------------------- attention


@dataclass
class FusedWeights:
    """An attention's fused weights: ``w_qkv`` (3d, d) and ``b_qkv`` (3d,) of q, k, v stacked,
    ``w_out`` (d, d) = out_proj.weight diag(c_attn); ``packed``: the oneDNN-packed copy of each
    part used so far ("q", "kv", "qkv", "out"; None where packing is off or unavailable)."""
    w_qkv: torch.Tensor
    b_qkv: torch.Tensor
    w_out: torch.Tensor
    packed: dict = field(default_factory=dict)


class FusedAttention(OFAAttention):
    """``OFAAttention`` on fused weights (``FusedWeights``, recomputed when a parameter changes):
    one matmul for q, k, v (self-attention), one for k, v (cross-attention memory), ``c_attn``
    folded into ``out_proj``. ``from_attention(m, pack=True)`` converts ``m`` in place; ``pack``:
    also keep oneDNN-packed copies of the fused weights."""

    @classmethod
    def from_attention(cls, m: OFAAttention, pack: bool = True) -> FusedAttention:
        _become(m, cls)
        m._fused = ShapeCache(param_refs(m), max_bytes=1 << 62)
        m._pack_fused = bool(pack)
        return m

    def _fuse(self):
        d = self.out_proj.weight.shape[0]
        projs = (self.q_proj, self.k_proj, self.v_proj)
        with torch.no_grad():
            w = torch.cat([p.weight for p in projs])
            b = torch.cat([p.bias if p.bias is not None else p.weight.new_zeros(d) for p in projs])
            c = self.c_attn.to(w.dtype).repeat_interleave(d // self.heads)
            return FusedWeights(w, b, (self.out_proj.weight * c[None, :]).contiguous())

    def fused_weights(self) -> FusedWeights:
        return self._fused.get("w", self._fuse)

    def _packed(self, fw: FusedWeights, part: str):
        """The packed copy of ``part`` of ``fw``, packed at its first use (a self-attention
        packs only qkv and out, a cross-attention q, kv and out)."""
        got = fw.packed.get(part, False)
        if got is False:
            d = fw.w_out.shape[0]
            src = {"q": fw.w_qkv[:d], "kv": fw.w_qkv[d:], "qkv": fw.w_qkv, "out": fw.w_out}[part]
            got = fw.packed[part] = pack_weight(src) if self._pack_fused else None
        return got

    def project_q(self, x):
        fw, d = self.fused_weights(), x.shape[-1]
        return split_heads(linear(x, fw.w_qkv[:d], fw.b_qkv[:d], packed=self._packed(fw, "q")), self.heads)

    def _split(self, y, parts):
        """(B, L, parts * d) -> ``parts`` tensors (B, H, L, Dh) (views)."""
        B, L, _ = y.shape
        return y.view(B, L, parts, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)

    def project_kv(self, kv):
        fw, d = self.fused_weights(), kv.shape[-1]
        return tuple(self._split(linear(kv, fw.w_qkv[d:], fw.b_qkv[d:], packed=self._packed(fw, "kv")), 2))

    def project_qkv(self, x):
        fw = self.fused_weights()
        return tuple(self._split(linear(x, fw.w_qkv, fw.b_qkv, packed=self._packed(fw, "qkv")), 3))

    def attend(self, q, k, v, key_lengths=None, bias=None, causal=False):
        a = self.attention(q, k, v, key_lengths, bias, causal)
        fw = self.fused_weights()
        packed = self._packed(fw, "out") if a.dtype == fw.w_out.dtype else None
        return linear(merge_heads(a), fw.w_out.to(a.dtype), self.out_proj.bias, packed=packed)


# ------------------------------------------------------------------------ position biases


class CachedEncoder(Encoder):
    """``Encoder`` keeping each shape's layer biases (at most ``max_bytes`` of them, least
    recently used first out), recomputed when the position parameters change."""

    @classmethod
    def from_encoder(cls, m: Encoder, max_bytes: int = DEFAULT_CACHE_BYTES) -> CachedEncoder:
        _become(m, cls)
        m._bias_cache = ShapeCache([r for p in m.position_modules() for r in param_refs(p)], max_bytes)
        return m

    def forward(self, images, text):
        dt = self.image_proj.weight.dtype  # a bfloat16 copy takes float32 images
        if isinstance(images, torch.Tensor) and images.is_floating_point() and images.dtype != dt:
            images = images.to(dt)
        return Encoder.forward(self, images, text)

    def layer_biases(self, h, w, n_text, dtype):
        with torch.no_grad():
            return self._bias_cache.get((h, w, n_text, dtype),
                                        lambda: Encoder.layer_biases(self, h, w, n_text, dtype))


class _CachedBiases:
    """Mixin of the serving decoders: the position biases kept per shape in ``self._cache``
    (a ``ShapeCache`` over the decoder's and the encoder's position parameters and
    ``extra_refs``)."""

    def _init_cache(self, encoder, extra_refs, max_bytes):
        mods = self.position_modules() + encoder.position_modules()
        self._cache = ShapeCache([r for m in mods for r in param_refs(m)] + list(extra_refs), max_bytes)

    def biases(self, T, encoder, n_text, dtype):
        with torch.no_grad():
            return self._cache.get(("bias", T, n_text, dtype),
                                   lambda: super(_CachedBiases, self).biases(T, encoder, n_text, dtype))


class CachedDecoderStack(_CachedBiases, DecoderStack):
    """``DecoderStack`` (the AR baseline's) keeping its position biases per shape."""

    @classmethod
    def from_decoder(cls, m: DecoderStack, encoder: Encoder, max_bytes: int = DEFAULT_CACHE_BYTES):
        _become(m, cls, DecoderStack)
        m._init_cache(encoder, (), max_bytes)
        return m


class CachedQueryDecoder(_CachedBiases, QueryDecoder):
    """NARVL's ``QueryDecoder`` keeping its position biases per shape and layer 0's
    self-attention block over the learnable queries, x1 (1, N, d): a constant at inference, so
    a pass on the queries starts from x1 (``query_input`` passes run every layer)."""

    @classmethod
    def from_decoder(cls, m: QueryDecoder, encoder: Encoder, max_bytes: int = DEFAULT_CACHE_BYTES):
        _become(m, cls, QueryDecoder)
        m._init_cache(encoder, param_refs(m.query_embed) + param_refs(m.layernorm_embedding)
                      + param_refs(m.layers[0]), max_bytes)
        return m

    def _first_block(self, self_bias0, dtype):
        with torch.no_grad():
            return self.layers[0].self_block(self.embed(self.query_embed.weight.to(dtype)[None]), self_bias0)

    def forward(self, memory, memory_lengths, encoder, query_input=None):
        if query_input is not None:
            return QueryDecoder.forward(self, memory, memory_lengths, encoder, query_input)
        B, dtype = memory.shape[0], memory.dtype
        N = self.query_embed.weight.shape[0]
        self_b, cross_b = self.biases(N, encoder, memory.shape[1] - self.cfg.grid ** 2, dtype)
        x = self._cache.get(("first", dtype), lambda: self._first_block(self_b[0], dtype))
        l0 = self.layers[0]
        x = l0.cross_ffn_block(x.expand(B, -1, -1), *l0.encoder_attn.project_kv(memory), memory_lengths, cross_b)
        return self.run_layers(x, memory, memory_lengths, self_b, cross_b, start=1)


# ----------------------------------------------------------------------------- the ResNet

_FASTPATH = "packed_resnet"


def mkldnn_fusion_available() -> bool:
    """True when torch's oneDNN fused-conv ops (``torch.ops.mkldnn._convolution_pointwise``,
    used by inductor's CPU backend) exist in this build."""
    return _backend.mkldnn_ops_available("_convolution_pointwise", "_reorder_convolution_weight")


def _pack(conv: nn.Conv2d, input_size):
    """(oneDNN-blocked weight, bias, padding, stride) of a folded conv; ``input_size`` is the
    (B, C, H, W) it is packed for (any other size still runs; oneDNN reorders)."""
    pad, stride = list(conv.padding), list(conv.stride)
    w = torch.ops.mkldnn._reorder_convolution_weight(conv.weight.detach().float().contiguous(), pad,
                                                      stride, [1, 1], 1, list(input_size))
    return w, conv.bias.detach().float().contiguous(), pad, stride


def _conv(x, p, unary):
    w, b, pad, stride = p
    return torch.ops.mkldnn._convolution_pointwise(x, w, b, pad, stride, [1, 1], 1, unary, [], "")


def _run_packed(plan, x):
    stem, blocks = plan
    x = F.max_pool2d(_conv(x, stem, "relu"), 3, 2, 1)
    for c1, c2, c3, ds in blocks:
        idt = x if ds is None else _conv(x, ds, "none")
        y = _conv(_conv(x, c1, "relu"), c2, "relu")
        w, b, pad, stride = c3
        # relu(conv3(y) + idt) as one primitive (sum post-op, then ReLU)
        x = torch.ops.mkldnn._convolution_pointwise.binary(y, idt, w, b, pad, stride, [1, 1], 1,
                                                             "add", 1.0, "relu", [], "")
    return x


def _plan(backbone: ResNetStages, s: int):
    stem = _pack(backbone.conv1, (1, 3, s, s))
    s = (s + 1) // 2  # 7x7/2 conv, then 3x3/2 max-pool
    s = (s + 1) // 2
    blocks = []
    c = 64
    for stage in (backbone.layer1, backbone.layer2, backbone.layer3):
        for m in stage:
            s2 = (s + 1) // 2 if m.conv2.stride[0] == 2 else s
            blocks.append((_pack(m.conv1, (1, c, s, s)), _pack(m.conv2, (1, m.conv1.out_channels, s, s)),
                           _pack(m.conv3, (1, m.conv2.out_channels, s2, s2)),
                           _pack(m.downsample, (1, c, s, s)) if m.downsample is not None else None))
            s, c = s2, m.conv3.out_channels
    return stem, blocks


class PackedResNetStages(ResNetStages):
    """A BN-folded ``ResNetStages`` run as fused oneDNN primitives on pre-packed weights for
    float32 CPU inputs without grad or autocast (other inputs: the folded modules). Built by
    ``pack_for_cpu_``; packs again at the next call when the folded weights change, or in a copy
    (oneDNN's packed weights are opaque tensors that cannot be copied)."""

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_packed"] = state["_pack_stamp"] = None
        state.pop("_lock", None)
        return state

    def _repack(self):
        with self._lock:
            if self._packed is None or self._pack_stamp.stale():
                self._packed, self._pack_stamp = _plan(self, self._pack_size), ParamStamp(param_refs(self))
        return self._packed

    def __setstate__(self, state):
        super().__setstate__(state)
        self._lock = threading.Lock()

    def forward(self, x):
        if (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
                and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
                and _backend.cpu_fastpath_enabled(_FASTPATH)):
            try:
                plan = self._packed
                if plan is None or self._pack_stamp.stale():  # a copy, or weights changed
                    plan = self._repack()
                return _run_packed(plan, x)
            except RuntimeError as e:  # a private op that raises: the folded modules from now on
                _backend.cpu_fastpath_failed(_FASTPATH, e)
        return super().forward(x)


@torch.no_grad()
def pack_for_cpu_(backbone: ResNetStages, image_size: int = 224) -> bool:
    """Turns a BN-folded backbone (``fold_batchnorm_``) into a ``PackedResNetStages``, in place.
    Returns False (and leaves plain modules) when the ops are absent or the weights are not
    float32 CPU tensors. ``image_size`` only picks the packed layout (batch 1, S x S)."""
    if not isinstance(backbone.bn1, nn.Identity):
        raise ValueError("pack_for_cpu_ needs a BN-folded backbone: call fold_batchnorm_ first")
    w = backbone.conv1.weight
    ok = (mkldnn_fusion_available() and w.device.type == "cpu" and w.dtype == torch.float32
          and _backend.cpu_fastpath_enabled(_FASTPATH))
    plan = None
    if ok:
        try:
            plan = _plan(backbone, int(image_size))
        except RuntimeError as e:
            _backend.cpu_fastpath_failed(_FASTPATH, e)
    if plan is None:
        if isinstance(backbone, PackedResNetStages):
            backbone.__class__ = ResNetStages
        return False
    if not isinstance(backbone, PackedResNetStages):
        _become(backbone, PackedResNetStages)
    backbone._lock = threading.Lock()
    backbone._packed, backbone._pack_stamp = plan, ParamStamp(param_refs(backbone))
    backbone._pack_size = int(image_size)
    return True


# ------------------------------------------------------------------------- the serving copy


def prepare_for_inference(model: nn.Module, image_size: int | None = None,
                          cache_bytes: int = DEFAULT_CACHE_BYTES, pack_linear: bool = True,
                          dtype: torch.dtype | None = None, fallback: bool = True) -> nn.Module:
    """A serving copy of ``model`` (a ``NARVL`` or ``ARBaseline``); ``model`` is unchanged.
    ``image_size`` (default ``model.cfg.image_size``) picks the packed conv layout only;
    ``cache_bytes`` caps each per-shape bias cache (LRU); ``pack_linear=False`` keeps the linear
    weights unpacked (the packed copies add about the linear weights' size in memory);
    ``dtype``: torch.float32 or torch.bfloat16 (default: the model's); ``fallback``: a bfloat16
    copy asked for on a CPU without bfloat16 instructions stays float32, with a RuntimeWarning
    (``cpu_has_bf16``); the copy's parameters have the dtype it runs in."""
    if not hasattr(model, "encoder") or not hasattr(model, "cfg") or not hasattr(model, "decoder"):
        raise TypeError(f"expected a NARVL or ARBaseline model, got {type(model).__name__}")
    dtype = _serving_dtype(model, dtype, fallback)
    infer = copy.deepcopy(model).eval()
    if getattr(infer, "aux_decoder", None) is not None:
        infer.aux_decoder = None  # joint training's AR decoder: never used at inference
    backbone = infer.encoder.backbone
    fold_batchnorm_(backbone)  # in the model's precision, before any cast
    if dtype is not None:
        infer.to(dtype)
    pack_for_cpu_(backbone, image_size or model.cfg.image_size)
    for m in list(infer.modules()):
        if isinstance(m, OFAAttention) and not isinstance(m, FusedAttention):
            FusedAttention.from_attention(m, pack=pack_linear)
        elif isinstance(m, Linear) and pack_linear and not isinstance(m, PackedLinear):
            PackedLinear.from_linear(m)
    if pack_linear:
        infer.output = PackedTiedOutput(infer.embed_tokens)
    enc = infer.encoder
    if not isinstance(enc, CachedEncoder):
        CachedEncoder.from_encoder(enc, cache_bytes)
    dec = infer.decoder
    if isinstance(dec, QueryDecoder) and not isinstance(dec, CachedQueryDecoder):
        CachedQueryDecoder.from_decoder(dec, enc, cache_bytes)
    elif not isinstance(dec, (QueryDecoder, CachedDecoderStack)):
        CachedDecoderStack.from_decoder(dec, enc, cache_bytes)
    for p in infer.parameters():
        p.requires_grad_(False)
    return infer


@dataclass
class Timing:
    """``best_ms``: mean over samples of each sample's best time (ms); ``round_ms``: per round,
    the mean time per sample (ms)."""
    best_ms: float
    round_ms: list


@torch.inference_mode()
def time_generate(models: dict, inputs: list, beam_width: int = 1, rounds: int = 5, warmup: int = 3):
    """Batch-1 decode latency, encoder included, of each of ``models`` (name -> inference copy)
    on the same ``inputs`` [(images (1, 3, S, S), text (1, Lt))] -> {name: ``Timing``}.

    After ``warmup`` samples each, ``rounds`` rounds in which the models take turns, each
    decoding all inputs one after another (as a server would), so a change in the machine's
    speed hits them alike. ``best_ms`` keeps each sample's best over the rounds: the estimate
    least disturbed by other processes on a shared machine (``train.py``, ``bench/bench_tasks.py``).
    """
    for m in models.values():
        for images, text in inputs[:warmup]:
            m.generate(images, text, beam_width=beam_width)
    best = {k: [float("inf")] * len(inputs) for k in models}
    per_round = {k: [] for k in models}
    for _ in range(rounds):
        for k, m in models.items():
            row = best[k]
            t_round = time.perf_counter()
            for i, (images, text) in enumerate(inputs):
                t0 = time.perf_counter()
                m.generate(images, text, beam_width=beam_width)
                row[i] = min(row[i], time.perf_counter() - t0)
            per_round[k].append((time.perf_counter() - t_round) / len(inputs) * 1e3)
    return {k: Timing(sum(best[k]) / len(inputs) * 1e3, per_round[k]) for k in models}
