"""Backend selection and the native extension.

Every narvl op has one route: the functional API validates its input and calls the registered
operator (``torch.ops.narvl.*``), whose kernel for the tensors' device does the work.
``NARVL_BACKEND`` (read at every call) picks that kernel:

* ``auto`` (default): CUDA tensors -> Triton kernels, CPU tensors -> C++ kernels (``narvl._C``;
  the attention's CPU kernel is ATen). A CPU op that needs ``narvl._C`` fails loudly with the
  install command when the native build is absent.
* ``cpp``: the C++ kernels; CPU tensors only.
* ``triton``: the Triton kernels, through the same registered ops; on CPU tensors only under
  ``TRITON_INTERPRET=1`` (the interpreter: anyone can check the Triton path without a GPU),
  otherwise a clear error.

The float64 references in ``narvl.reference`` are test oracles, not a backend: call them directly.

``NARVL_CPU_FASTPATH=0`` turns off the CPU fast paths that call torch's private oneDNN ops
(``narvl.ops.linear``'s fused matmul, the packed ResNet): everything then runs on ATen. A fast
path whose op is missing or raises falls back to ATen by itself, once, with a logged warning.

``NARVL_CHECK`` sets the value checks of the loss functions:

* ``1`` (default): lengths and labels are checked (out of range, blank in targets): on the host
  for CPU tensors, by device-side asserts for CUDA tensors (no synchronisation; see
  ``narvl.checks``); NaN/inf in logits or log-probs flow into the loss and the gradient as in
  ``F.ctc_loss`` (mixed-precision training with ``GradScaler`` depends on it);
* ``0``: no value checks;
* ``strict``: the checks read on the host on every device (values in the message), and NaN/inf
  in the input raises a ``ValueError`` (for debugging).

Shape, dtype and device checks always run. Every switch is read in ``narvl.settings``.
"""
from __future__ import annotations

import functools
import logging
import warnings

import torch

from . import settings

BACKENDS = settings.BACKENDS

_native_error: str | None = None
try:  # registers torch.ops.narvl.* and their CPU kernels
    from . import _C  # noqa: F401

    NATIVE = True
except ImportError as exc:  # pragma: no cover - exercised by the no-build test in a subprocess
    NATIVE = False
    _native_error = str(exc)


def native_available() -> bool:
    return NATIVE


def native_module(feature: str):
    """The native extension ``narvl._C``; a feature that exists only there (``feature``, in
    words) fails loudly without it."""
    if not NATIVE:
        raise RuntimeError(f"{feature} need(s) the native extension narvl._C, which is not built "
                           f"({_native_error}); install with `pip install --no-build-isolation -e .`")
    return _C


def checks_enabled() -> bool:
    return settings.checks_enabled()


def strict_checks() -> bool:
    """``NARVL_CHECK=strict``: non-finite loss inputs raise instead of propagating."""
    return settings.strict_checks()


def interpret_mode() -> bool:
    return settings.triton_interpret()


def requested_backend() -> str:
    return settings.backend()


def resolve(device: torch.device) -> str:
    """The kernels that serve a call on ``device``: 'cpp' (CPU: narvl._C, or ATen where an op
    has no C++ kernel) or 'triton'."""
    name = requested_backend()
    dev = device.type
    if dev == "meta":  # shapes only (the ops' fake kernels): the path a CUDA tensor takes
        dev = "cuda"
    if dev not in ("cpu", "cuda"):
        raise ValueError(f"narvl runs on CPU and CUDA tensors, got a {dev} tensor")
    if name == "auto":
        return "triton" if dev == "cuda" else "cpp"
    if name == "cpp":
        if dev != "cpu":
            raise ValueError(f"NARVL_BACKEND=cpp runs on CPU tensors only, got a {dev} tensor")
        native_module("NARVL_BACKEND=cpp")
        return "cpp"
    if dev == "cpu" and not interpret_mode():
        raise RuntimeError(
            "NARVL_BACKEND=triton on CPU tensors needs the Triton interpreter: set "
            "TRITON_INTERPRET=1 before the first narvl call, or use CUDA tensors"
        )
    return "triton"


def kernels(device: torch.device, module: str, feature: str):
    """The kernel module that serves a narvl op on ``device``: ``narvl.kernels.<module>`` (Triton:
    CUDA, or CPU under NARVL_BACKEND=triton with the interpreter) or ``narvl._C`` (CPU; fails
    loudly, naming ``feature``, without the native build)."""
    if resolve(device) == "triton":
        return getattr(triton_kernels(), module)
    return native_module(feature)


def triton_kernels():
    """Imports ``narvl.kernels`` lazily (Triton reads TRITON_INTERPRET when kernels are defined)."""
    try:
        from . import kernels
    except ImportError as exc:
        raise RuntimeError(
            f"narvl: the Triton backend needs the `triton` package ({exc}); `pip install triton`"
        ) from exc
    return kernels


_log = logging.getLogger("narvl")
_failed_fastpaths: dict = {}  # name -> the error that turned it off


def cpu_fastpath_enabled(name: str) -> bool:
    """Whether the CPU fast path ``name`` ("onednn_linear", "packed_resnet") may run: not forced
    off by ``NARVL_CPU_FASTPATH=0`` and not turned off by an earlier failure."""
    if not settings.cpu_fastpath():
        return False
    return name not in _failed_fastpaths


def cpu_fastpath_failed(name: str, exc: BaseException) -> None:
    """A private-op fast path raised: remember it (later calls take the ATen route) and log it
    once, with the error."""
    if name not in _failed_fastpaths:
        _failed_fastpaths[name] = exc
        msg = (f"narvl: the CPU fast path {name!r} failed ({type(exc).__name__}: {exc}); "
               f"falling back to ATen for the rest of this process")
        _log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def failed_fastpaths() -> dict:
    """{name: error} of the CPU fast paths turned off by a failure in this process."""
    return dict(_failed_fastpaths)


@functools.lru_cache(maxsize=None)
def mkldnn_ops_available(*names: str) -> bool:
    """Whether this torch build has oneDNN and the ``torch.ops.mkldnn`` ops ``names`` (the fused
    primitives inductor's CPU backend emits; narvl's CPU inference routes call them)."""
    try:
        return torch.backends.mkldnn.is_available() and all(hasattr(torch.ops.mkldnn, n) for n in names)
    except (AttributeError, RuntimeError):
        return False
