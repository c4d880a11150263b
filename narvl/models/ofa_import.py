"""Load OFA (and NARVL) checkpoints into narvl's models: ``from_ofa``.

Formats
- fairseq ``.pt`` as OFA and the NARVL authors release them: ``{"model": state, "args":
  Namespace | "cfg": DictConfig, "optimizer_history", "extra_state", ...}``. They are read by a
  restricted unpickler (``safe_load``): tensors, storages, containers and ``argparse.Namespace``
  are rebuilt; any other class or function named in the pickle is never imported or called. It
  becomes an ``Opaque`` record (its name, arguments and state as plain data).
- Hugging Face-format OFA (the OFA team's transformers port): ``pytorch_model.bin`` (read the
  same way) or ``model.safetensors``, a file or the directory holding it.
- A plain state dict (a ``.pt``/``.bin``/``.safetensors`` file or a dict) in either naming.

Key mapping (Hugging Face port -> fairseq; narvl uses the fairseq names):

| Hugging Face port | fairseq / narvl |
|---|---|
| ``encoder.layers.i.self_attn_mid_layer_norm`` | ``encoder.layers.i.attn_ln`` |
| ``decoder.layers.i.self_attn_mid_layer_norm`` | ``decoder.layers.i.self_attn_ln`` |
| ``*.ffn_layer_norm`` | ``*.ffn_layernorm`` |
| ``decoder.layers.i.cross_attn.*`` | ``decoder.layers.i.encoder_attn.*`` |
| ``decoder.layers.i.cross_attn_layer_norm`` | ``decoder.layers.i.encoder_attn_layer_norm`` |
| ``decoder.layers.i.cross_attn_mid_layer_norm`` | ``decoder.layers.i.cross_attn_ln`` |
| ``encoder.embed_tokens`` (= ``decoder.embed_tokens``, ``decoder.output_projection``) | ``embed_tokens`` (tied) |

Everything else keeps its name (``encoder.embed_images.*``, ``encoder.pos_q_linear``, ...).
The configuration comes from the shapes (width, layers, heads, FFN, ResNet depth, tables) and
from the architecture flags the checkpoint records (``ofa_settings``): a fairseq checkpoint's
``args`` (``argparse.Namespace``) or ``cfg.model`` / ``cfg.task`` (omegaconf, read as plain
data), a Hugging Face directory's ``config.json`` (or the one beside the weights file). Read
and applied: ``patch_image_size``, ``attn_scale_factor``, ``entangle_position_embedding`` and
``disable_entangle`` (fairseq's decoder adds its positions to the input unless
``disable_entangle``; the Hugging Face port only when ``entangle_position_embedding`` and not
``disable_entangle``). A flag that changes OFA's computation in a way narvl does not implement
(no NormFormer, ``scale_embedding``, post-LN layers, no embedding LayerNorms or type embedding,
``scale_resids``, an activation other than GELU, ``interpolate_position``, ...) raises a
``ValueError`` naming it, rather than loading weights that would compute something else. A
plain state dict has no flags: the released scripts' setup is assumed. For NARVL the encoder,
the decoder layers and the tied embeddings come from OFA, as the authors fine-tune; the queries
(``decoder.query_embed``) and the blank row of the embeddings are new
unless the checkpoint is a NARVL one. Keys that are not used (versions, index buffers, the
decoder's image-code tables, classification heads) and parameters left at their
initialisation are listed in ``model.ofa_report`` and in a warning: nothing is dropped silently.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import pickle
import re
import warnings

import torch

from .config import PRESETS, TASK_QUERIES, NARVLConfig

__all__ = ["from_ofa", "safe_load", "read_ofa_state", "read_ofa_checkpoint", "ofa_settings", "hf_to_fairseq",
           "infer_config", "Opaque"]


# --------------------------------------------------------------------------- restricted pickle
class Opaque:
    """A class or function the checkpoint names but narvl never imports: kept as plain data."""

    _name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        return obj

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"Opaque({self._name})"


def _opaque(module: str, name: str):
    return type(f"Opaque[{module}.{name}]", (Opaque,), {"_name": f"{module}.{name}"})


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    ("collections", "OrderedDict"), ("torch", "Size"), ("torch", "device"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"), ("builtins", "complex"),
    ("builtins", "bytearray"), ("argparse", "Namespace"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return _opaque(module, name)


class _SafePickleModule:
    """A ``pickle_module`` for ``torch.load`` whose unpickler imports only the allow-list."""
    Unpickler = _SafeUnpickler
    load = staticmethod(lambda f, **kw: _SafeUnpickler(f, **kw).load())
    __name__ = "narvl_safe_pickle"


def safe_load(path):
    """``torch.load`` of a checkpoint file without running any code it names (see the module
    docstring). Raises ``ValueError`` for a file that is not a torch checkpoint."""
    try:
        return torch.load(path, map_location="cpu", pickle_module=_SafePickleModule,
                          weights_only=False)
    except (pickle.UnpicklingError, EOFError, RuntimeError, AttributeError, TypeError,
            IndexError, KeyError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from e


# --------------------------------------------------------------------------- reading
_HF_RENAMES = [
    (re.compile(r"^encoder\.layers\.(\d+)\.self_attn_mid_layer_norm\."), r"encoder.layers.\1.attn_ln."),
    (re.compile(r"^decoder\.layers\.(\d+)\.self_attn_mid_layer_norm\."), r"decoder.layers.\1.self_attn_ln."),
    (re.compile(r"\.ffn_layer_norm\."), ".ffn_layernorm."),
    (re.compile(r"\.cross_attn_mid_layer_norm\."), ".cross_attn_ln."),
    (re.compile(r"\.cross_attn_layer_norm\."), ".encoder_attn_layer_norm."),
    (re.compile(r"\.cross_attn\."), ".encoder_attn."),
]


def hf_to_fairseq(key: str) -> str:
    """One Hugging Face-port key in fairseq naming (a leading ``model.`` is dropped)."""
    if key.startswith("model."):
        key = key[len("model."):]
    for pat, rep in _HF_RENAMES:
        key = pat.sub(rep, key)
    return key


def _is_state(d) -> bool:
    return isinstance(d, dict) and len(d) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


def read_ofa_state(source):
    """(state dict in fairseq names, image size hinted by the checkpoint's args or None,
    format name) of a path (file or directory) or a dict."""
    state, settings, fmt = read_ofa_checkpoint(source)
    return state, settings.get("image_size"), fmt


def read_ofa_checkpoint(source):
    """(state dict in fairseq names, ``NARVLConfig`` fields from the checkpoint's recorded
    architecture flags (``ofa_settings``), format name) of a path (file or directory) or a dict."""
    fmt = "state dict"
    path = None
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            for name in ("model.safetensors", "pytorch_model.bin"):
                if os.path.isfile(os.path.join(path, name)):
                    path = os.path.join(path, name)
                    break
            else:
                raise FileNotFoundError(f"{source}: no model.safetensors or pytorch_model.bin in the directory")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{source}: no such checkpoint file")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            try:
                obj = load_file(path)
            except Exception as e:  # safetensors raises its own error types
                raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
            fmt = "safetensors"
        else:
            obj = safe_load(path)
    elif isinstance(source, dict):
        obj = source
    else:
        raise TypeError(f"source must be a path or a state dict, got {type(source).__name__}")
    flags = None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        flags = _fairseq_settings(obj)
        obj, fmt = obj["model"], "fairseq"
    if not _is_state(obj):
        raise ValueError(f"{source!r}: holds no state dict of tensors (a fairseq checkpoint keeps it under 'model')")
    hf = any(".self_attn_mid_layer_norm." in k or ".cross_attn." in k or ".ffn_layer_norm." in k for k in obj)
    if hf:
        if fmt != "fairseq":
            fmt = "hugging face"
            flags = _hf_config(path) if path is not None else None
        obj = {hf_to_fairseq(k): v for k, v in obj.items()}
    settings = ofa_settings(flags, "fairseq" if fmt == "fairseq" else "hugging face")
    return collections.OrderedDict(obj), settings, fmt


# --------------------------------------------------------------------------- architecture flags
def _plain(obj, depth=0):
    """omegaconf containers and nodes read through the restricted unpickler (``Opaque``
    records holding ``_content`` / ``_val``), Namespaces and containers, as plain data."""
    if depth > 50:
        return None
    if isinstance(obj, Opaque):
        st = obj.state if isinstance(obj.state, dict) else {}
        if "_content" in st:
            return _plain(st["_content"], depth + 1)
        if "_val" in st:
            return _plain(st["_val"], depth + 1)
        return None
    if isinstance(obj, argparse.Namespace):
        return {k: _plain(v, depth + 1) for k, v in vars(obj).items()}
    if isinstance(obj, dict):
        return {k: _plain(v, depth + 1) for k, v in obj.items() if isinstance(k, str)}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, depth + 1) for v in obj]
    return obj


def _fairseq_settings(ckpt: dict) -> dict | None:
    """The architecture arguments of a fairseq checkpoint: ``args`` (Namespace), else
    ``cfg.model`` over ``cfg.task`` (fairseq stores a legacy model's Namespace there); None
    when it records neither."""
    args = ckpt.get("args")
    if isinstance(args, argparse.Namespace):
        return _plain(args)
    cfg = _plain(ckpt.get("cfg"))
    if not isinstance(cfg, dict):
        return None
    out = {}
    for section in ("task", "model"):  # model arguments win
        if isinstance(cfg.get(section), dict):
            out.update(cfg[section])
    return out or None


#: fairseq flag -> the value narvl's OFA architecture computes (anything else: ValueError); a
#: flag the checkpoint does not record is taken as the released scripts set it
_FAIRSEQ_FIXED = dict(no_scale_embedding=True, layernorm_embedding=True, patch_layernorm_embedding=True,
                      add_type_embedding=True, encoder_normalize_before=True, decoder_normalize_before=True,
                      scale_attn=True, scale_fc=True, scale_heads=True, scale_resids=False, activation_fn="gelu",
                      interpolate_position=False)
#: the same for the Hugging Face port's config.json (its defaults are these values)
_HF_FIXED = dict(scale_embedding=False, normformer=True, layernorm_embedding=True, patch_layernorm_embedding=True,
                 add_type_embedding=True, encoder_normalize_before=True, decoder_normalize_before=True,
                 activation_function="gelu", use_ofasys=False, use_image_feature=True, share_attn_bias=False,
                 interpolate_position=False, share_decoder_input_output_embed=True, use_gamma_feature=False)


def ofa_settings(flags: dict | None, fmt: str) -> dict:
    """``NARVLConfig`` fields (``image_size``, ``attn_scale_factor``,
    ``entangle_position_embedding``, ``decoder_entangle``) from a checkpoint's recorded
    architecture flags (``fmt`` "fairseq" or "hugging face"); ``ValueError`` naming a flag whose
    value narvl does not compute. A flag not recorded counts as the released scripts set it
    (NormFormer on, ``--disable-entangle``); no flags at all (a plain state dict): {}."""
    if not flags:
        return {}
    def flag(name, default):
        v = flags.get(name, default)
        return default if v is None else v
    fairseq = fmt == "fairseq"
    where = "the checkpoint was trained with" if fairseq else "config.json sets"
    for name, want in (_FAIRSEQ_FIXED if fairseq else _HF_FIXED).items():
        got = flag(name, want)
        if (got != want) if isinstance(want, str) else (bool(got) != want):
            raise ValueError(f"{where} {name}={got!r}; narvl's OFA architecture computes "
                             f"{name}={want!r} (OFA's released setup) only")
    entangle = bool(flag("entangle_position_embedding", False))
    # fairseq's decoder entangles unless --disable-entangle; the port needs entangle as well
    disabled = bool(flag("disable_entangle", True if fairseq else False))
    out = dict(entangle_position_embedding=entangle,
               decoder_entangle=not disabled if fairseq else entangle and not disabled)
    # the port's config does not record the fine-tuning resolution
    size = flags.get("patch_image_size") if fairseq else None
    factor = flag("attn_scale_factor", 2)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
        raise ValueError(f"the checkpoint's attn_scale_factor must be a positive number, got {factor!r}")
    out["attn_scale_factor"] = float(factor)
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"the checkpoint's patch_image_size must be a positive integer, got {size!r}")
        out["image_size"] = int(size)
    return out


def _hf_config(path: str) -> dict | None:
    """The Hugging Face ``config.json`` beside a weights file (in its directory), or None."""
    cfg = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    if not os.path.isfile(cfg):
        return None
    try:
        with open(cfg, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg}: not a readable JSON config ({e})") from e
    if not isinstance(d, dict):
        raise ValueError(f"{cfg}: expected a JSON object")
    return d


# --------------------------------------------------------------------------- configuration
def _count(state, pattern):
    pat = re.compile(pattern)
    return len({m.group(1) for k in state for m in [pat.match(k)] if m})


def infer_config(state, arch="narvl", task=None, image_size=None, **overrides) -> NARVLConfig:
    """The ``NARVLConfig`` whose shapes match an OFA/NARVL state dict (fairseq names)."""
    need = ["encoder.embed_tokens.weight", "encoder.layers.0.fc1.weight", "decoder.layers.0.fc1.weight",
            "encoder.token_rel_pos_table_list.0.weight", "encoder.image_rel_pos_table_list.0.weight",
            "encoder.embed_positions.weight"]
    absent = [k for k in need if k not in state]
    if absent:
        raise ValueError(f"not an OFA checkpoint: missing {absent}")
    V, d = state["encoder.embed_tokens.weight"].shape
    heads = state["encoder.token_rel_pos_table_list.0.weight"].shape[1]
    resnet = tuple(_count(state, rf"encoder\.embed_images\.layer{i}\.(\d+)\.conv1\.weight") for i in (1, 2, 3))
    if min(resnet) == 0:
        raise ValueError("the checkpoint has no ResNet stages 1-3 under encoder.embed_images "
                         "(OFA's ViT variants are not supported)")
    ib2 = state["encoder.image_rel_pos_table_list.0.weight"].shape[0] - 3
    ib = (int(round(ib2 ** 0.5)) + 1) // 2
    narvl_ckpt = "decoder.query_embed.weight" in state
    kw = dict(d_model=int(d), heads=int(heads),
              enc_layers=_count(state, r"encoder\.layers\.(\d+)\.fc1\.weight"),
              dec_layers=_count(state, r"decoder\.layers\.(\d+)\.fc1\.weight"),
              ffn_dim=int(state["encoder.layers.0.fc1.weight"].shape[0]), resnet_layers=resnet,
              vocab_size=int(V) if narvl_ckpt else int(V) + 1,
              text_buckets=(state["encoder.token_rel_pos_table_list.0.weight"].shape[0] + 1) // 2,
              image_buckets=ib, max_positions=int(state["encoder.embed_positions.weight"].shape[0]) - 2)
    preset = "custom"
    for name, p in PRESETS.items():
        if all(kw[k] == (tuple(v) if k == "resnet_layers" else v) for k, v in p.items()) \
                and kw["ffn_dim"] == 4 * kw["d_model"]:
            preset = name
    base = NARVLConfig.from_preset(preset if preset != "custom" else "tiny", task=task).to_dict()
    base.update(kw, preset=preset)
    if narvl_ckpt and task is None:
        base["num_queries"] = int(state["decoder.query_embed.weight"].shape[0])
    if image_size is not None:
        base["image_size"] = int(image_size)
    base.update(overrides)
    return NARVLConfig.from_dict(base)


# --------------------------------------------------------------------------- loading
_UNUSED = re.compile(r"(^|\.)version$|rp_bucket$|^decoder\.image_position_idx$|"
                     r"^decoder\.(embed_image_positions|image_pos_ln|image_rel_pos_table_list|"
                     r"code_layernorm_embedding)\.")
_TIED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "decoder.output_projection.weight")


def load_ofa_state_(model, state):
    """Copy an OFA/NARVL state dict (fairseq names) into ``model`` (a NARVL or ARBaseline of
    matching shapes). Returns {"loaded", "unused", "new"} key lists."""
    own = model.state_dict()
    emb = state["encoder.embed_tokens.weight"]
    V = model.cfg.vocab_size
    loaded, unused = [], []
    with torch.no_grad():
        w = model.embed_tokens.weight
        if emb.shape[1] != w.shape[1] or emb.shape[0] not in (V, V - 1):
            raise ValueError(f"embed_tokens has shape {tuple(emb.shape)}; the model needs ({V} or {V - 1}, {w.shape[1]})")
        w[: emb.shape[0]].copy_(emb)
        loaded.append("embed_tokens.weight")
        new = ["embed_tokens.weight[blank row]"] if emb.shape[0] == V - 1 else []
        for k in _TIED[1:]:
            if k in state and not torch.equal(state[k], emb):
                raise ValueError(f"{k} differs from encoder.embed_tokens.weight: narvl ties them, as OFA")
        for k, v in state.items():
            if k in _TIED:
                continue
            if k not in own or k.startswith("embed_tokens") or k.startswith("encoder.embed_tokens"):
                unused.append(k)
                continue
            if tuple(own[k].shape) != tuple(v.shape):
                raise ValueError(f"{k}: checkpoint shape {tuple(v.shape)} != model shape {tuple(own[k].shape)}")
            own[k].copy_(v)
            loaded.append(k)
    got = set(loaded) | {"encoder.embed_tokens.weight"}
    new += [k for k in own if k not in got and not k.endswith("num_batches_tracked")]
    return {"loaded": loaded, "unused": sorted(unused), "new": new}


def from_ofa(path, arch: str = "narvl", task: str | None = None, **overrides):
    """A ``NARVL`` (``arch="narvl"``) or ``ARBaseline`` (``arch="ar"``) holding the weights of an
    OFA or NARVL checkpoint (see the module docstring for formats and names). ``task`` sets the
    number of queries, image size and label smoothing as ``NARVLConfig.from_preset``;
    ``overrides`` set any other config field. The report of the load is ``model.ofa_report``:
    {"format", "loaded", "unused", "new"} (keys)."""
    from .ar import ARBaseline
    from .narvl import NARVL
    if arch not in ("narvl", "ar"):
        raise ValueError(f"arch must be 'narvl' or 'ar', got {arch!r}")
    if task is not None and task not in TASK_QUERIES:
        raise ValueError(f"task must be one of {sorted(TASK_QUERIES)}, got {task!r}")
    state, settings, fmt = read_ofa_checkpoint(path)
    image_size = overrides.pop("image_size", settings.pop("image_size", None))
    cfg = infer_config(state, arch, task, image_size, **{**settings, **overrides})
    model = (NARVL if arch == "narvl" else ARBaseline)(cfg)
    report = load_ofa_state_(model, state)
    report["format"] = fmt
    model.ofa_report = report
    unused = [k for k in report["unused"] if not _UNUSED.search(k)]
    msg = (f"from_ofa: {len(report['loaded'])} tensors loaded ({fmt}); "
           f"{len(report['unused'])} checkpoint keys unused"
           + (f" (not OFA bookkeeping: {unused[:8]}{' ...' if len(unused) > 8 else ''})" if unused else "")
           + f"; {len(report['new'])} model tensors keep their initialisation: {report['new'][:8]}"
           + (" ..." if len(report["new"]) > 8 else ""))
    warnings.warn(msg, stacklevel=2)
    return model


def _main(argv=None):
    """``python -m narvl.models.ofa_import CKPT OUT.safetensors [--arch narvl|ar] [--task T]
    [--num-bins 1000]``:
    convert an OFA checkpoint into a narvl safetensors checkpoint."""
    from ..checkpoint import save_checkpoint
    p = argparse.ArgumentParser(description=_main.__doc__)
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--arch", default="narvl", choices=["narvl", "ar"])
    p.add_argument("--task", default=None, choices=sorted(TASK_QUERIES))
    p.add_argument("--num-bins", type=int, default=1000, help="location bins (OFA: 1000)")
    a = p.parse_args(argv)
    model = from_ofa(a.checkpoint, arch=a.arch, task=a.task, num_bins=a.num_bins)
    save_checkpoint(a.out, model, meta={"config": model.cfg.to_json(), "arch": a.arch})
    print(f"wrote {a.out}: {model.cfg.preset} ({sum(t.numel() for t in model.parameters())} parameters)")


if __name__ == "__main__":
    _main()
