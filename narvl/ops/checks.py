"""``torch.ops.narvl.assert_in_range``: the value check of a tensor of lengths as an op.

It returns nothing. CPU kernel: reads the values and raises a ``ValueError`` with the first
offender. CUDA kernel: one Triton program with a device-side assert (``kernels/checks.py``), no
synchronisation. Fake kernel (``torch.compile``, ``FakeTensorMode``): nothing.
Callers take it for non-CPU tensors (``narvl.checks.on_host`` false); CPU tensors are checked on
the host before it.
"""
from __future__ import annotations

import torch

from .. import _backend, _library, settings  # noqa: F401  (_library defines the schema)


@torch.library.register_fake("narvl::assert_in_range")
def _fake(x, lo, hi, message):
    return None


@torch.library.register_kernel("narvl::assert_in_range", ("cpu", "cuda"))
def _kernel(x, lo, hi, message):
    if _backend.resolve(x.device) == "triton":
        bad = _backend.triton_kernels().checks.count_outside(x, lo, hi, message)
        if not (settings.triton_interpret() and x.device.type == "cpu"):
            return None  # the device assert reports a fault; the host does not wait
        if int(bad) == 0:  # the interpreter: its asserts are inert, the count is read instead
            return None
    flat = x.reshape(-1)
    bad = (flat < lo) | (flat > hi)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{message}: entry {i} = {int(flat[i])} is outside [{lo}, {hi}]")
    return None
