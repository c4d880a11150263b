"""Checkpoints in safetensors (no pickle), written atomically (temporary file + os.replace).

A checkpoint holds the model's tensors (``model.*``; tied weights stored once), optionally the
AdamW state (``optim.{i}.{exp_avg,exp_avg_sq,step}``) and the RNG state, and string metadata:
``config`` (NARVLConfig JSON), ``tokenizer`` (JSON), ``arch``, ``task``, ``step``, ``peft`` and
anything else passed in ``meta``.
"""
from __future__ import annotations

import json
import os
import tempfile

import torch


def _dedup(state):
    seen, out, tied = {}, {}, {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.numel() else None
        if key is not None and key in seen:
            tied[k] = seen[key]
            continue
        if key is not None:
            seen[key] = k
        out[k] = v.detach().contiguous().cpu()
    return out, tied


def save_checkpoint(path, model, optimizer=None, meta=None):
    tensors, tied = _dedup({f"model.{k}": v for k, v in model.state_dict().items()})
    if optimizer is not None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        for i, p in enumerate(params):
            for name, v in optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor):
                    tensors[f"optim.{i}.{name}"] = v.detach().contiguous().cpu()
    tensors["rng.torch"] = torch.get_rng_state()
    md = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (meta or {}).items()}
    md["tied"] = json.dumps(tied)
    save_file_atomic(tensors, path, md)


def save_file_atomic(tensors: dict, path, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file`` written atomically: a temporary file in the same directory
    (created if needed), then ``os.replace``; a failed write leaves no file behind."""
    from safetensors.torch import save_file

    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=d)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_checkpoint(path):
    """(tensors dict, metadata dict of str) without unpickling anything."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types on a corrupt header
        raise ValueError(f"checkpoint {path!r} is not a readable safetensors file: {e}") from None
    return tensors, meta


def load_model_state(model, tensors, meta):
    tied = json.loads(meta.get("tied", "{}"))
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    for k, src in tied.items():
        state[k[len("model."):]] = state[src[len("model."):]]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


def load_optimizer_state(optimizer, tensors):
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        st = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"optim.{i}.")}
        if st:
            optimizer.state[p] = {k: v.to(p.device) if k != "step" else v for k, v in st.items()}
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
