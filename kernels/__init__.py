"""Triton kernels of narvl (installed as ``narvl.kernels``).

Each module holds the ``@triton.jit`` kernels of one op family and their launchers (allocation,
grid, block sizes). Launchers take and return torch tensors; they run on CUDA tensors, and on CPU
tensors under ``TRITON_INTERPRET=1``.
"""
from .. import settings
from . import _interpreter

if settings.triton_interpret():
    _interpreter.gpu_dot()

from . import attention, checks, ctc, decode, forced_align  # noqa: E402,F401
