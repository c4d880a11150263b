"""Device-side value checks: one small program asserts that a tensor of lengths lies in a range.

Compiled with ``debug=True``, which turns ``tl.device_assert`` on for this kernel only: a failing
check stops the CUDA stream and prints its message; the host never waits for it. Under the
interpreter the asserts are inert, so the launcher returns the number of faults and
``assert_in_range`` reads it on the host (free for CPU tensors).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(debug=True)
def _range_kernel(X, n, lo, hi, BAD, MESSAGE: tl.constexpr, BLOCK: tl.constexpr):
    bad = tl.zeros((BLOCK,), tl.int32)
    for i0 in range(0, n, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        x = tl.load(X + offs, mask=offs < n, other=lo)
        bad += ((x < lo) | (x > hi)).to(tl.int32)
    total = tl.sum(bad, 0)
    tl.store(BAD, total)
    tl.device_assert(total == 0, MESSAGE)


def count_outside(x, lo, hi, message):
    """Launches the check over x (1-D integers): -> a 0-d int32 tensor, the count of entries
    outside [lo, hi]; on CUDA a non-zero count also fires the device assert with ``message``."""
    x = x.reshape(-1).contiguous()
    bad = torch.empty((), dtype=torch.int32, device=x.device)
    _range_kernel[(1,)](x, x.numel(), int(lo), int(hi), bad, MESSAGE=f"narvl: {message}",
                        BLOCK=max(16, min(1024, triton.next_power_of_2(max(x.numel(), 1)))),
                        num_warps=1)
    return bad
