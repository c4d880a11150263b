"""Every environment switch narvl reads, with its default and effect, in one place.

The Python ones are read here, at each call (a test or a user may change them between calls);
the C++ kernels read theirs themselves (``csrc/``), as listed.

| switch | default | values and effect |
| --- | --- | --- |
| ``NARVL_BACKEND`` | ``auto`` | ``auto``: CUDA tensors -> Triton, CPU -> C++; ``cpp``; ``triton`` (CPU tensors only with ``TRITON_INTERPRET=1``) |
| ``NARVL_CHECK`` | ``1`` | ``1``: value checks of lengths and labels (CPU: host; CUDA: device asserts, no sync); ``0``: none; ``strict``: checks on the host on every device, and NaN/inf in loss inputs raise |
| ``TRITON_INTERPRET`` | ``0`` | ``1``: Triton kernels run on CPU tensors in Triton's interpreter (read when the kernels are defined) |
| ``NARVL_CPU_FASTPATH`` | ``1`` | ``0``: no CPU fast path through torch's private oneDNN ops (fused linear, packed ResNet) |
| ``NARVL_LINEAR_ROUTE`` | ``auto`` | ``auto``: CPU linear layers take oneDNN where the CPU has AVX-512, ATen elsewhere (packed serving weights: oneDNN); ``onednn``, ``aten``: pinned |
| ``NARVL_CPU_LEVEL`` | (the CPU's) | caps the C++ row kernels' ISA level: ``3`` AVX2, ``0`` baseline (C++, read once) |
| ``NARVL_STREAM_STORES`` | ``1`` | ``0``: the C++ Q-CTC backward writes the gradient with plain stores, not non-temporal ones (C++, read once) |
| ``NARVL_GRAD_CACHE`` | ``1`` | ``0``: C++ gradient buffers of 8 MiB or more are freed instead of recycled (C++, read once) |
"""
from __future__ import annotations

import os

#: name -> (default, effect), the table above; the README's table lists the same switches
SWITCHES = {
    "NARVL_BACKEND": ("auto", "kernels per device: auto, cpp or triton"),
    "NARVL_CHECK": ("1", "value checks: 1, 0 or strict"),
    "TRITON_INTERPRET": ("0", "Triton kernels on CPU tensors, in Triton's interpreter"),
    "NARVL_CPU_FASTPATH": ("1", "0 turns off the CPU fast paths through torch's private oneDNN ops"),
    "NARVL_LINEAR_ROUTE": ("auto", "linear route: auto (oneDNN with AVX-512, else ATen), onednn or aten"),
    "NARVL_CPU_LEVEL": ("", "caps the C++ row kernels' ISA level (3, 0); read by the C++ kernels"),
    "NARVL_STREAM_STORES": ("1", "0: plain stores for the C++ Q-CTC gradient; read by the C++ kernels"),
    "NARVL_GRAD_CACHE": ("1", "0: large C++ gradient buffers freed, not recycled; read by the C++ kernels"),
}

_OFF = ("0", "false", "off", "no")
BACKENDS = ("auto", "cpp", "triton")
LINEAR_ROUTES = ("auto", "onednn", "aten")


def _raw(name: str) -> str:
    return os.environ.get(name, SWITCHES[name][0]).strip()


def _flag(name: str) -> bool:
    v = _raw(name).lower()
    return v not in _OFF and v != ""


def backend() -> str:
    """``NARVL_BACKEND``, validated: one of ``BACKENDS``."""
    name = _raw("NARVL_BACKEND").lower() or "auto"
    if name == "reference":
        raise ValueError("NARVL_BACKEND=reference is not a backend: the float64 references in "
                         "narvl.reference are test oracles; call them directly "
                         "(e.g. narvl.reference.qctc_loss_reference)")
    if name not in BACKENDS:
        raise ValueError(f"NARVL_BACKEND={name!r} is not one of {BACKENDS}")
    return name


def checks_enabled() -> bool:
    """``NARVL_CHECK`` is not ``0``: the loss functions check lengths and labels."""
    return _raw("NARVL_CHECK").lower() not in _OFF


def strict_checks() -> bool:
    """``NARVL_CHECK=strict``: non-finite loss inputs raise instead of propagating."""
    return _raw("NARVL_CHECK").lower() == "strict"


def triton_interpret() -> bool:
    """``TRITON_INTERPRET`` is on (Triton itself reads it when kernels are defined)."""
    return _flag("TRITON_INTERPRET")


def cpu_fastpath() -> bool:
    """``NARVL_CPU_FASTPATH`` is not ``0`` (an empty value leaves the fast paths on)."""
    return _raw("NARVL_CPU_FASTPATH").lower() not in _OFF


def linear_route() -> str:
    """``NARVL_LINEAR_ROUTE``, validated: one of ``LINEAR_ROUTES``."""
    mode = _raw("NARVL_LINEAR_ROUTE").lower() or "auto"
    if mode not in LINEAR_ROUTES:
        raise ValueError(f"NARVL_LINEAR_ROUTE={mode!r} is not one of {LINEAR_ROUTES}")
    return mode


def current() -> dict:
    """{switch: value in effect} of every switch (the default where unset)."""
    return {name: os.environ.get(name, default) for name, (default, _) in SWITCHES.items()}
