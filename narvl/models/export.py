"""ONNX export of NARVL and its AR baseline, for ONNX Runtime, OpenVINO and other ONNX runtimes.

``export_onnx(model, path)`` traces the model with ``torch.export`` (non-strict, batch and text
length dynamic), replaces narvl's attention ops by the same computation in plain ATen ops
(``narvl.ops.attention.plain_attention`` and ``plain_fwd``), and converts the program with
``torch.onnx.export`` (the dynamo exporter; needs ``onnx`` and ``onnxscript``, the optional
extra ``narvl[serving]``). Value checks are skipped inside the trace (no values exist there);
the exported graph computes what the eager model computes on valid inputs.

Graphs (inputs -> outputs, ``float32``/``int64``):
* ``NARVL``: ``images`` (B, 3, S, S), ``text`` (B, Lt) -> ``logits`` (B, N, V): all query slots
  in one pass (``NARVL.logits``); decode with ``narvl.ctc_greedy_decode`` or the beam search.
  Refinement passes (``cfg.refine_steps``) are not part of the graph.
* ``ARBaseline``: ``images``, ``text``, ``prev_tokens`` (B, T) -> ``logits`` (B, T, V), the
  teacher-forced logits (``ARBaseline.forward_logits``): one call per decoding step over the
  whole prefix (the graph holds no KV cache).
"""
from __future__ import annotations

import os
import tempfile

import torch
import torch.nn as nn

from .ar import ARBaseline
from .inference import CachedEncoder
from .narvl import NARVL


class _NARVLLogits(nn.Module):
    """The graph's entry: ``NARVL.logits``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, text):
        return self.model.logits(images, text)


class _ARLogits(_NARVLLogits):
    """The graph's entry: ``ARBaseline.forward_logits``."""

    def forward(self, images, text, prev_tokens):
        return self.model.forward_logits(images, text, prev_tokens)


def _decompositions():
    from ..ops.attention import plain_attention, plain_fwd

    return {torch.ops.narvl.query_attention.default: plain_attention,
            torch.ops.narvl.query_attention_fwd.default: plain_fwd}


def export_onnx(model: nn.Module, path: str, *, batch_size: int = 2, text_len: int = 8,
                target_len: int = 4, dynamic: bool = True, opset: int | None = None) -> str:
    """Writes ``model``'s logits graph as an ONNX file at ``path`` (atomically) and returns it.

    Args:
        model: a ``NARVL`` or ``ARBaseline`` (plain, not a ``prepare_for_inference`` copy:
            the serving copies' packed CPU layouts are not ONNX operators). Exported in eval
            mode on CPU in float32; the model itself is not changed.
        path: the output file (its directory must exist).
        batch_size, text_len, target_len: the example shapes traced (``target_len``: AR's
            ``prev_tokens`` length; at least 2 with ``dynamic``); with ``dynamic`` the graph
            accepts any batch size, text length in [1, ``cfg.max_text_len``] and (AR) decoding
            length in [1, ``cfg.max_target_len``].
        opset: the ONNX opset (default: the exporter's).
    Returns:
        ``path``.
    Raises:
        TypeError: ``model`` is not a NARVL or ARBaseline, or the sizes are not ints.
        ValueError: a size out of range, or ``path`` is a directory or in a missing directory.
        ImportError: ``onnx`` / ``onnxscript`` are not installed (``pip install narvl[serving]``).
    """
    if not isinstance(model, (NARVL, ARBaseline)):
        raise TypeError(f"model must be a NARVL or ARBaseline, got {type(model).__name__}")
    if isinstance(model.encoder, CachedEncoder):
        raise TypeError("model is a prepare_for_inference serving copy; export the model it was made from")
    cfg = model.cfg
    lo = 2 if dynamic else 1  # a traced size of 1 would be fixed in the graph, not dynamic
    for name, v, hi in (("batch_size", batch_size, None), ("text_len", text_len, cfg.max_text_len),
                        ("target_len", target_len, cfg.max_target_len)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if v < lo or (hi is not None and v > hi):
            raise ValueError(f"{name} must lie in [{lo}, {hi if hi is not None else 'inf'}]"
                             f"{' (dynamic export)' if dynamic else ''}, got {v}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"path {path!r} is a directory")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"path {path!r}: directory {folder!r} does not exist")
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ImportError("export_onnx needs onnx and onnxscript: pip install 'narvl[serving]'") from exc

    import copy

    m = copy.deepcopy(model).float().eval().cpu()
    if getattr(m, "aux_decoder", None) is not None:
        m.aux_decoder = None  # joint training's AR decoder: not part of inference
    g = torch.Generator().manual_seed(0)
    S, first = cfg.image_size, 4  # token ids from 4: clear of BOS / pad / EOS / unk
    images = torch.randn(batch_size, 3, S, S, generator=g)
    text = torch.randint(first, cfg.vocab_size - 1, (batch_size, text_len), generator=g)
    inputs, names = (images, text), ["images", "text"]
    B = torch.export.Dim("batch", min=1, max=4096)
    dims = [{0: B}, {0: B, 1: torch.export.Dim("text_len", min=1, max=cfg.max_text_len)}]
    if isinstance(m, ARBaseline):
        prev = torch.randint(first, cfg.vocab_size - 1, (batch_size, target_len), generator=g)
        prev[:, 0] = cfg.bos_id
        inputs, names = inputs + (prev,), names + ["prev_tokens"]
        dims.append({0: B, 1: torch.export.Dim("target_len", min=1, max=cfg.max_target_len)})
    with torch.no_grad():
        entry = (_ARLogits if isinstance(m, ARBaseline) else _NARVLLogits)(m)
        ep = torch.export.export(entry, inputs, dynamic_shapes=tuple(dims) if dynamic else None,
                                 strict=False)
        ep = ep.run_decompositions(_decompositions())
    left = sorted({str(n.target) for n in ep.graph.nodes if str(n.target).startswith("narvl.")})
    if left:
        raise RuntimeError(f"narvl ops without a plain decomposition in the exported graph: {left}")
    program = torch.onnx.export(ep, input_names=names, output_names=["logits"], opset_version=opset,
                                dynamo=True, verbose=False)
    fd, tmp = tempfile.mkstemp(suffix=".onnx.tmp", dir=folder)
    os.close(fd)
    try:
        program.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
