"""narvl.ops.linear (oneDNN fused matmul + bias + GELU on CPU) against ATen's F.linear (+ F.gelu)
on the same inputs, at the tiny model's layer shapes: inference at the row counts it sees
(setups.LINEAR_ROWS; rows below narvl's oneDNN threshold (8) run F.linear in both columns, ~1.0x)
and training (forward + backward) at a batch's 832 rows. ``narvl`` is the default route
(``NARVL_LINEAR_ROUTE=auto``: oneDNN on CPUs with AVX-512, ATen on the others), ``narvl-onednn``
pins oneDNN, so the table shows on each CPU whether the rule picks the faster route.

``test_linear_cold`` is what a batch-1 model pass sees: each call reads a different weight
(48 of each layer shape, about 60 MB, more than a 32 MB L3), so the weights come from memory
as in the model. There ``narvl-packed`` (the inference copies' route: the weight pre-packed once
by ``pack_weight``) meets ``narvl`` (auto) and ATen.

Run: python -m pytest bench/bench_linear.py --benchmark-json bench/results/linear_cpu.json
"""
import pytest
import torch
import torch.nn.functional as F

from narvl.ops.linear import linear, pack_weight
from setups import LINEAR_ROWS, LINEAR_SHAPES, linear_inputs


def aten(x, w, b, act):
    y = F.linear(x, w, b)
    return F.gelu(y) if act == "gelu" else y


IMPLS = ["narvl", "narvl-onednn", "aten"]


@pytest.fixture
def route(monkeypatch, impl):
    monkeypatch.setenv("NARVL_LINEAR_ROUTE", "onednn" if impl == "narvl-onednn" else "auto")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(LINEAR_SHAPES))
@pytest.mark.parametrize("rows", LINEAR_ROWS)
def test_linear(benchmark, threads, route, impl, name, rows):
    x, w, b, act = linear_inputs(rows, name)
    fn = aten if impl == "aten" else linear
    benchmark.group = f"linear-{name}-rows{rows}-{threads}thr"
    benchmark.extra_info.update(impl=impl, rows=rows, shape=name, threads=threads)
    with torch.inference_mode():
        benchmark.pedantic(lambda: fn(x, w, b, act), rounds=200 if rows < 100 else 30,
                           warmup_rounds=5, iterations=1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(LINEAR_SHAPES))
def test_linear_train(benchmark, threads, route, impl, name):
    """Forward + backward (grads for x, weight, bias) at a training batch's 832 rows."""
    x, w, b, act = linear_inputs(832, name)
    x, w, b = (t.requires_grad_(True) for t in (x, w, b))
    gy = torch.randn(x.shape[0], w.shape[0], generator=torch.Generator().manual_seed(1))
    fn = aten if impl == "aten" else linear
    benchmark.group = f"linear-train-{name}-rows832-{threads}thr"
    benchmark.extra_info.update(impl=impl, rows=832, shape=name, threads=threads, mode="fwdbwd")
    benchmark.pedantic(lambda: torch.autograd.grad(fn(x, w, b, act), (x, w, b), gy), rounds=20,
                       warmup_rounds=3, iterations=1)


COLD_WEIGHTS = 48  # per layer shape: 48 x (1 + 1 + 0.75) MB of float32 weights


@pytest.mark.parametrize("impl", ["narvl-packed", "narvl", "aten"])
@pytest.mark.parametrize("rows", [20, 26])
def test_linear_cold(benchmark, threads, impl, rows):
    """One call per weight over COLD_WEIGHTS weights of each tiny-model layer shape (ffn1+gelu,
    ffn2, qkv), as a pass over a model that does not fit in the cache; time per sweep."""
    g = torch.Generator().manual_seed(2)
    calls = []
    for i in range(COLD_WEIGHTS):
        for name, (K, N, act) in LINEAR_SHAPES.items():
            w, b = torch.randn(N, K, generator=g) / K ** 0.5, torch.randn(N, generator=g)
            x = torch.randn(rows, K, generator=g)
            calls.append((x, w, b, act, pack_weight(w) if impl == "narvl-packed" else None))
    if impl == "narvl-packed" and calls[0][4] is None:
        pytest.skip("this torch build cannot pack linear weights (no oneDNN)")
    fn = aten if impl == "aten" else linear

    def sweep():
        for x, w, b, act, p in calls:
            if p is None:
                fn(x, w, b, act)
            else:
                linear(x, w, b, act, packed=p)
    benchmark.group = f"linear-cold-rows{rows}-{threads}thr"
    benchmark.extra_info.update(impl=impl, rows=rows, shape="sweep", threads=threads,
                                weights=len(calls))
    with torch.inference_mode():
        benchmark.pedantic(sweep, rounds=15, warmup_rounds=2, iterations=1)
