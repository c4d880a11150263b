"""narvl.ops.linear (oneDNN fused matmul + bias + GELU on CPU inference) against ATen's
F.linear (+ F.gelu) on the same inputs, at the tiny model's layer shapes and the row counts that
inference sees (setups.LINEAR_ROWS). Rows below narvl's oneDNN threshold (8) run F.linear in
both columns, which the table shows as ~1.0x.

Run: python -m pytest bench/bench_linear.py --benchmark-json bench/results/linear_cpu.json
"""
import pytest
import torch
import torch.nn.functional as F

from narvl.ops.linear import linear
from setups import LINEAR_ROWS, LINEAR_SHAPES, linear_inputs


def aten(x, w, b, act):
    y = F.linear(x, w, b)
    return F.gelu(y) if act == "gelu" else y


@pytest.mark.parametrize("impl", ["narvl", "aten"])
@pytest.mark.parametrize("name", list(LINEAR_SHAPES))
@pytest.mark.parametrize("rows", LINEAR_ROWS)
def test_linear(benchmark, threads, impl, name, rows):
    x, w, b, act = linear_inputs(rows, name)
    fn = linear if impl == "narvl" else aten
    benchmark.group = f"linear-{name}-rows{rows}-{threads}thr"
    benchmark.extra_info.update(impl=impl, rows=rows, shape=name, threads=threads)
    with torch.inference_mode():
        benchmark.pedantic(lambda: fn(x, w, b, act), rounds=200 if rows < 100 else 30,
                           warmup_rounds=5, iterations=1)
