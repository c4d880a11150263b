"""The Triton interpreter's ``tl.dot`` made to compute what a GPU computes.

* bf16 operands: the interpreter keeps bf16 tensors as their raw uint16 bits (numpy has no bf16)
  and its dot multiplies those bits as integers. A GPU's bf16 MMA multiplies the bf16 values
  exactly into fp32 and accumulates in fp32, which is numpy's float32 matmul of the widened
  operands (bf16 -> fp32 is exact: the bits shifted left by 16).
* fp32 operands: the interpreter ignores ``input_precision``. With "tf32" the tensor cores read
  only the upper 19 bits (sign, exponent, 10 mantissa bits) of each operand, so the operands are
  truncated to that before the fp32 matmul. With "tf32x3" Triton splits each operand into a
  tf32 head and a tf32 tail and adds three products (head·head + head·tail + tail·head): the
  same three products are computed here.

fp16 already matches (numpy widens it to fp32 exactly). With this, the kernels run the same
low-precision dots under the interpreter as on the GPU, and the interpreter tests measure the
GPU's rounding.
"""
import warnings

import numpy as np


def gpu_dot() -> bool:
    """Patches ``InterpreterBuilder.create_dot`` once; False (with a warning) when this Triton's
    interpreter does not have the expected shape, so its dots stay its own (wrong on bf16)."""
    try:
        import triton.language as tl
        from triton._C.libtriton import ir
        from triton.runtime import interpreter as ti

        original = ti.InterpreterBuilder.create_dot
        handle = ti.TensorHandle
        tf32, tf32x3 = ir.INPUT_PRECISION.TF32, ir.INPUT_PRECISION.TF32x3
    except (ImportError, AttributeError) as exc:  # pragma: no cover - depends on the Triton version
        warnings.warn(f"narvl: cannot make the Triton interpreter's dot compute as a GPU does ({exc})", RuntimeWarning)
        return False
    if getattr(original, "_narvl_gpu_dot", False):
        return True

    def tf32_of(x):
        return (x.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)

    def widen(x):
        if x.dtype.scalar == tl.bfloat16:
            return handle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return x

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a, b = widen(a), widen(b)
        fp32 = a.dtype.scalar == tl.float32 and b.dtype.scalar == tl.float32
        if fp32 and input_precision == tf32:
            a, b = (handle(tf32_of(x.data), tl.float32) for x in (a, b))
        elif fp32 and input_precision == tf32x3:
            (ah, bh) = (tf32_of(x.data) for x in (a, b))
            (al, bl) = (tf32_of(x.data - h) for x, h in ((a, ah), (b, bh)))
            d = original(self, handle(ah, tl.float32), handle(bl, tl.float32), d, input_precision,
                         max_num_imprecise_acc)
            d = original(self, handle(al, tl.float32), handle(bh, tl.float32), d, input_precision,
                         max_num_imprecise_acc)
            a, b = handle(ah, tl.float32), handle(bh, tl.float32)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    create_dot._narvl_gpu_dot = True
    ti.InterpreterBuilder.create_dot = create_dot
    return True
