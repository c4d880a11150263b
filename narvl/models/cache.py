"""Inference caches that stay bounded and never go stale.

- ``LRUCache``: a size-capped (bytes) least-recently-used map of tensors or lists of tensors, for
  per-shape constants such as the encoder's relative-position biases per text length (at the base
  preset and 480 px one text length holds ~260 MB of biases, so an unbounded dict grows without
  limit as new lengths arrive). A value larger than the cap is not stored.
- ``ParamStamp``: the identity and version counter of the parameters a snapshot was computed
  from. Any in-place change (an optimizer step, ``load_state_dict``, ``copy_``) or a replaced
  parameter makes ``stale()`` true, and the owner recomputes its snapshot. Writes through
  ``param.data`` bypass version counters (PyTorch does not count them), and so do in-place writes
  to inference tensors inside ``torch.inference_mode``: call ``prepare_for_inference`` again
  after such writes.
"""
from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict

import torch

from ..ops.linear import pack_weight

#: default cap of each per-shape cache (bytes); ``prepare_for_inference(cache_bytes=...)``
DEFAULT_CACHE_BYTES = 256 << 20


def _nbytes(value) -> int:
    if value is None:
        return 0
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if dataclasses.is_dataclass(value):
        return sum(_nbytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    return sum(_nbytes(v) for v in value)


class LRUCache:
    """``get(key)`` / ``put(key, value)`` with at most ``max_bytes`` held; least recently used
    entries go first. ``nbytes`` and ``len()`` tell what it holds."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._d: OrderedDict = OrderedDict()
        self.nbytes = 0

    def __len__(self):
        return len(self._d)

    def get(self, key):
        value = self._d.get(key)
        if value is not None:
            self._d.move_to_end(key)
        return value[0] if value is not None else None

    def put(self, key, value):
        n = _nbytes(value)
        if key in self._d:
            self.nbytes -= self._d.pop(key)[1]
        if n > self.max_bytes:
            return value
        while self._d and self.nbytes + n > self.max_bytes:
            _, (_, m) = self._d.popitem(last=False)
            self.nbytes -= m
        self._d[key] = (value, n)
        self.nbytes += n
        return value

    def clear(self):
        self._d.clear()
        self.nbytes = 0

    def __getstate__(self):
        # a copy (deepcopy, pickle) starts empty: entries are recomputable, and some (oneDNN's
        # packed weights) are opaque tensors that cannot be copied
        return {"max_bytes": self.max_bytes, "_d": OrderedDict(), "nbytes": 0}


class ParamStamp:
    """See the module docstring. ``refs``: (module, attribute name) pairs of tensors."""

    def __init__(self, refs):
        self.refs = [(m, name) for m, name in refs if getattr(m, name, None) is not None]
        # read through the module's own dicts: nn.Module.__getattr__ costs more than the check
        self._slots = [(m._parameters if name in m._parameters else
                        m._buffers if name in m._buffers else m.__dict__, name) for m, name in self.refs]
        self.value = self._read()

    def _read(self):
        out = []
        for d, name in self._slots:
            t = d.get(name)
            if t is None:  # deleted or moved out of its dict: stale
                out.append(None)
                continue
            # inference tensors keep no version counter (they change in place only inside
            # inference_mode); their identity and storage still count
            out.append((id(t), t.data_ptr(), 0 if t.is_inference() else t._version))
        return out

    def stale(self) -> bool:
        return self._read() != self.value


def param_refs(module: torch.nn.Module):
    """(owning module, name) of every parameter and buffer of ``module``."""
    return [(m, n) for m in module.modules()
            for n in list(m._parameters) + list(m._buffers)]


class ShapeCache:
    """Per-shape constants computed from some parameters (inference only): an ``LRUCache``
    emptied whenever a ``ParamStamp`` over those parameters goes stale.
    ``get(key, compute)`` returns the kept value or stores ``compute()``."""

    def __init__(self, refs, max_bytes: int = DEFAULT_CACHE_BYTES):
        self.lru = LRUCache(max_bytes)
        self.stamp = ParamStamp(refs)
        self._lock = threading.Lock()

    def __len__(self):
        return len(self.lru)

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def get(self, key, compute):
        """The value kept under ``key``, else ``compute()`` (stored). Safe to call from several
        threads: the bookkeeping runs under a lock, ``compute`` outside it (two threads missing
        the same key both compute it; the values are equal)."""
        with self._lock:
            if self.stamp.stale():
                self.lru.clear()
                self.stamp = ParamStamp(self.stamp.refs)
            value = self.lru.get(key)
        if value is None:
            value = compute()
            with self._lock:
                self.lru.put(key, value)
        return value


class PackedWeight:
    """A oneDNN-blocked snapshot (``narvl.ops.linear.pack_weight``) of the weight
    ``getattr(module, name)``, packed again whenever that weight changes. ``get()`` returns it
    for a call without gradients, None with gradients on or where packing is unavailable
    (the serving modules of ``narvl.models.inference`` hold these)."""

    def __init__(self, module: torch.nn.Module, name: str = "weight"):
        self.module, self.name = module, name
        self._cache = ShapeCache([(module, name)], max_bytes=1 << 62)

    def get(self):
        if torch.is_grad_enabled():
            return None
        return self._cache.get("w", lambda: [pack_weight(getattr(self.module, self.name))])[0]
