"""Input validation shared by narvl's ops: one exception type per kind of fault, and where value
checks run.

* A wrong type (a list where a tensor is needed, float lengths, a non-int blank) raises
  ``TypeError``; a wrong shape, size, device, range or value raises ``ValueError``. Both name the
  argument.
* Shape, dtype and device checks read only metadata: they always run, on every device, and cost
  no synchronisation.
* Value checks (lengths in range, labels in the vocabulary and not the blank) run while
  ``NARVL_CHECK`` is on (the default) and not under ``torch.compile``. Where they run:

  - CPU tensors: on the host, before the kernel (reading a CPU tensor costs no
    synchronisation); the ``ValueError`` names the argument, the sample and the value.
  - CUDA tensors: on the device, inside the op's own kernels or one small check kernel, raised
    with a device-side assert that names the argument. The host never waits for them; a failing
    check stops the CUDA stream, and the error surfaces at the next synchronisation as a
    ``RuntimeError`` ("device-side assert triggered", with the message in the kernel's output).
    Kernels clamp lengths and skip out-of-range labels, so a bad value never reads outside a
    tensor before its assert fires.
  - ``NARVL_CHECK=strict``: on the host on every device (one synchronisation per call), with
    the values in the message, and NaN/inf in loss inputs raise too.
"""
from __future__ import annotations

import torch

from . import settings


class NaNScoresError(ValueError):
    """Decoder scores holding NaN. The decoders' one value fault that only their kernels see:
    their row scans count NaN without an extra pass. The C++ kernels raise it (translated from
    their own exception type), as does the Triton launcher where it reads the counts on the
    host (the interpreter); the public functions raise it again naming their argument
    ("log_probs contains NaN", the ctcdecode drop-in's "probs contains NaN"). A subclass of
    ``ValueError``, so ``except ValueError`` still catches it. On CUDA tensors the kernels fire a
    device-side assert instead (no synchronisation; a ``RuntimeError`` at the next one)."""


def enabled() -> bool:
    """Value checks run: ``NARVL_CHECK`` is on and no ``torch.compile`` trace is in progress."""
    return settings.checks_enabled() and not torch.compiler.is_compiling()


def on_host(device: torch.device) -> bool:
    """Whether the value checks of a call on ``device`` read the values on the host: CPU tensors
    (free), or any device under ``NARVL_CHECK=strict``. Otherwise they are asserted on the
    device, without a synchronisation."""
    return device.type == "cpu" or settings.strict_checks()


def check_int(x, name: str, lo: int, hi: int | None = None) -> None:
    """A Python int in [lo, hi) (hi None: >= lo): TypeError / ValueError naming ``name``."""
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if x < lo or (hi is not None and x >= hi):
        rng = f"[{lo}, {hi})" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} = {x} must be {rng}")


def as_lengths(x, name: str, batch: int, device: torch.device) -> torch.Tensor:
    """Lengths as given (tensor, list, tuple or one int) -> a (batch,) int64 tensor on ``device``;
    TypeError for non-integers, ValueError for the wrong shape. Values are checked separately."""
    if isinstance(x, (list, tuple)):
        x = torch.tensor(x, dtype=torch.long)
    elif isinstance(x, int):
        x = torch.tensor([x], dtype=torch.long)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, tuple or list of integers, got {type(x).__name__}")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got {x.dtype}")
    x = x.reshape(-1) if x.dim() == 0 else x
    if x.dim() != 1 or x.shape[0] != batch:
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(x.shape)}")
    return x.to(device=device, dtype=torch.long)


# A fault is (bad mask, message(), summary): message() reads the values for the host's error;
# summary names the check without values, for a device-side assert.

_FULL: dict = {}


def full_lengths(batch: int, length: int, device: torch.device) -> torch.Tensor:
    """The default lengths, (batch,) int64 all equal to ``length``: made once per (batch, length,
    device) and kept (read-only for every kernel), so a call without lengths launches no fill.
    Under ``torch.compile`` or a fake/meta tensor mode, a fresh tensor."""
    device = torch.device(device)
    if (torch.compiler.is_compiling() or device.type == "meta"
            or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None):
        return torch.full((batch,), length, dtype=torch.long, device=device)
    key = (batch, length, device.type, device.index)
    t = _FULL.get(key)
    if t is None:
        if len(_FULL) >= 256:
            _FULL.clear()
        t = _FULL[key] = torch.full((batch,), length, dtype=torch.long, device=device)
    return t


def range_fault(x: torch.Tensor, lo: int, hi: int, name: str, what: str):
    """The fault of lengths that must lie in [lo, hi]."""
    bad = (x < lo) | (x > hi)

    def message():
        i = int(bad.nonzero()[0, 0])
        return f"{name}[{i}] = {int(x[i])} is outside [{lo}, {hi}] ({what})"
    return bad, message, f"{name}: a value is outside [{lo}, {hi}] ({what})"


def label_faults(targets: torch.Tensor, target_lengths: torch.Tensor, vocab: int, blank: int):
    """The faults of live labels outside [0, vocab) and of live labels equal to blank."""
    S = targets.shape[1]
    live = torch.arange(S, device=targets.device)[None, :] < target_lengths[:, None]
    oob = live & ((targets < 0) | (targets >= vocab))
    isblank = live & (targets == blank)

    def oob_message():
        b, k = (int(v) for v in oob.nonzero()[0])
        return f"targets[{b}, {k}] = {int(targets[b, k])} is outside [0, {vocab})"

    def blank_message():
        b, k = (int(v) for v in isblank.nonzero()[0])
        return f"targets[{b}, {k}] equals the blank index {blank}"
    return [(oob, oob_message, f"targets: a live label is outside [0, {vocab})"),
            (isblank, blank_message, f"targets: a live label equals the blank index {blank}")]


def raise_first(faults) -> None:
    """Host checks: the faults' masks read with one host read in all; the first failing one
    raises its ValueError."""
    faults = [f for f in faults if f[0].numel()]
    if not faults:
        return
    if bool(torch.stack([f[0].any() for f in faults]).any()):
        for m, message, _ in faults:
            if bool(m.any()):
                raise ValueError(message())


def assert_none(faults, where: str) -> None:
    """Device checks for a call whose kernels do not check: each fault becomes one
    ``torch._assert_async`` naming it (no synchronisation; see the module's docstring)."""
    for m, _, summary in faults:
        if m.numel():
            torch._assert_async(~m.any(), f"{where}: {summary}")


def finite(x: torch.Tensor, name: str) -> None:
    """``NARVL_CHECK=strict`` only: NaN/inf in ``x`` raise (by default they propagate, as in
    ``F.ctc_loss``)."""
    if settings.strict_checks() and not torch.compiler.is_compiling() and x.numel():
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            idx = tuple(int(v) for v in bad.nonzero()[0])
            raise ValueError(f"{name}{list(idx)} = {x[idx].item()} is not finite (NARVL_CHECK=strict)")
