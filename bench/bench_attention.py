"""Query attention on CPU: narvl's path against plain SDPA (same inputs, same math).

Run: python -m pytest bench/bench_attention.py --benchmark-json bench/results/attention_cpu.json
Implementations: ``narvl`` (narvl.query_attention: SDPA with bias and key lengths folded into
its float mask), ``narvl-op`` (the op's explicit CPU kernel, matmul + logsumexp), ``sdpa``
(torch SDPA given a prebuilt float mask: the peer).
"""
import pytest
import torch
import torch.nn.functional as F

import narvl
from setups import ATTN_SHAPES, attention_inputs


def mask_of(k, lens, bias):
    keep = torch.arange(k.shape[2])[None, :] < lens[:, None]
    return bias + torch.zeros(keep.shape, dtype=k.dtype).masked_fill(~keep, float("-inf"))[:, None, None, :]


IMPLS = {
    "narvl": lambda q, k, v, lens, bias, mask: narvl.query_attention(q, k, v, lens, bias),
    "narvl-op": lambda q, k, v, lens, bias, mask: torch.ops.narvl.query_attention_fwd(
        q, k, v, lens, bias, q.shape[-1] ** -0.5)[0],
    "sdpa": lambda q, k, v, lens, bias, mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", list(ATTN_SHAPES))
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_attention(benchmark, threads, impl, shape, mode):
    q, k, v, lens, bias = attention_inputs(shape)
    fn = IMPLS[impl]
    benchmark.group = f"attn-{shape}-{mode}-{threads}thr"
    benchmark.extra_info.update(shape=ATTN_SHAPES[shape], threads=threads, impl=impl)
    if mode == "fwd":
        mask = mask_of(k, lens, bias)

        def run():
            with torch.no_grad():
                return fn(q, k, v, lens, bias, mask)
    else:
        ins = [x.requires_grad_(True) for x in (q, k, v, bias)]

        def run():  # the peer builds its mask from the trainable bias inside the step, as narvl
            mask = mask_of(k, lens, ins[3]) if impl == "sdpa" else None
            out = fn(ins[0], ins[1], ins[2], lens, ins[3], mask)
            return torch.autograd.grad(out.sum(), ins)
    benchmark.pedantic(run, rounds=5, warmup_rounds=1, iterations=1)
