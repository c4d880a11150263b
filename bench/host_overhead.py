"""Host overhead of each op's eager GPU path, measured without a GPU.

The ops run on CPU tensors routed to their Triton kernels, compiled for an H100 (sm_90) under the
stub driver of ``bench/gpu_resources.py``: validation, allocation, the launchers and Triton's own
launch path run as on a GPU, and each launch is a no-op. The value checks take their device
route (as on CUDA tensors). For each call it reports the host time per call (median of rounds),
the launches it makes (Triton kernels plus ATen ops that compute or fill, ``bench/launches.py``)
and the host reads of tensor values (synchronisations on a GPU; must be 0).

    python bench/host_overhead.py --out bench/results/host_overhead_<cpu>.json

ATen ops on these CPU tensors really run (on a GPU they would be asynchronous launches of
about the same host cost); their tensors are tiny (lengths, per-sample terms), except the
inputs, which are allocated once. Run without TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
from gpu_resources import make_stub_driver  # noqa: E402
from launches import LaunchCounter  # noqa: E402
from setups import cpu_model  # noqa: E402

# goals of the GPU path's host overhead (microseconds per call)
GOALS = {"qctc_loss fwd+bwd": 60.0, "query_attention fwd": 30.0}


def calls(B=32, N=20, V=1000, S=18):
    """name -> (shape note, call). Q-CTC at the caption shape with a 1,000-entry vocabulary (the
    host path does not depend on V); attention at the cross-attention shape of the base preset."""
    import narvl
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, N, V, generator=g).requires_grad_()
    tg = torch.randint(1, V - 1, (B, S), generator=g)
    tl = torch.randint(1, S + 1, (B,), generator=g)
    one = torch.ones(())

    def qctc():
        x.grad = None
        narvl.qctc_loss(x, tg, tl, blank=V - 1, label_smoothing=0.1).backward(one)

    def qctc_fwd():
        with torch.no_grad():
            narvl.qctc_loss(x, tg, tl, blank=V - 1)

    lp = torch.randn(N, B, V, generator=g).log_softmax(-1).requires_grad_()
    il = torch.full((B,), N)

    def ctc():
        lp.grad = None
        narvl.ctc_loss(lp, tg, il, tl, blank=V - 1).backward(one)

    H, Lq, Lk, D = 12, 20, 930, 64
    q = torch.randn(B, H, Lq, D, generator=g, dtype=torch.bfloat16).requires_grad_()
    k = torch.randn(B, H, Lk, D, generator=g, dtype=torch.bfloat16)
    v = torch.randn(B, H, Lk, D, generator=g, dtype=torch.bfloat16)
    kl = torch.full((B,), Lk)
    gout = torch.randn(B, H, Lq, D, generator=g, dtype=torch.bfloat16)

    def attn_fwd():
        with torch.no_grad():
            narvl.query_attention(q, k, v, key_lengths=kl)

    def attn():
        q.grad = None
        narvl.query_attention(q, k, v, key_lengths=kl).backward(gout)

    sc = torch.randn(B, N, V, generator=g).log_softmax(-1)
    sl = torch.full((B,), N)

    def greedy():
        narvl.ctc_greedy_decode(sc, sl, blank=0)

    def beam():
        narvl.ctc_prefix_beam_search(sc, sl, beam_width=10, blank=0)

    qctc_shape = f"B{B} N{N} V{V} S{S} fp32"
    attn_shape = f"B{B} H{H} Lq{Lq} Lk{Lk} D{D} bf16, key_lengths"
    return {
        "qctc_loss fwd+bwd": (qctc_shape + ", label smoothing 0.1", qctc),
        "qctc_loss fwd": (qctc_shape, qctc_fwd),
        "ctc_loss fwd+bwd": (f"T{N} B{B} C{V} S{S} fp32", ctc),
        "query_attention fwd": (attn_shape, attn_fwd),
        "query_attention fwd+bwd": (attn_shape, attn),
        "ctc_greedy_decode": (f"B{B} T{N} V{V}, lengths", greedy),
        "ctc_prefix_beam_search": (f"B{B} T{N} V{V} beam 10", beam),
    }


def measure(rounds=15, iters=50, only=None, log=print):
    import importlib

    import narvl
    import narvl._backend
    from triton.runtime import driver as tdriver

    tdriver.set_active(make_stub_driver(90))
    narvl._backend.resolve = lambda device: "triton"  # CPU tensors on the Triton path
    try:  # the checks' CUDA route
        importlib.import_module("narvl.checks").on_host = lambda device: False
    except ImportError:  # a version without narvl.checks: its checks read on the host everywhere
        pass
    torch.set_num_threads(1)
    rows = []
    for name, (shape, fn) in calls().items():
        if only and only not in name:
            continue
        t0 = time.perf_counter()
        try:
            fn()  # compiles (sm_90) on the first call
        except Exception as exc:  # e.g. a version that reads the stub's unwritten outputs
            rows.append({"call": name, "shape": shape, "error": f"{type(exc).__name__}: {exc}"})
            log(f"{name:<26} failed: {type(exc).__name__}: {exc}")
            continue
        compile_s = time.perf_counter() - t0
        for _ in range(5):
            fn()
        with LaunchCounter() as c:
            fn()
        per = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            per.append((time.perf_counter() - t0) / iters * 1e6)
        row = {"call": name, "shape": shape, "us_per_call_median": round(statistics.median(per), 1),
               "us_per_call_best": round(min(per), 1), "launches": len(c.launches()),
               "launch_list": [n for _, n in c.launches()], "host_reads": len(c.syncs()),
               "goal_us": GOALS.get(name), "first_call_s": round(compile_s, 1)}
        rows.append(row)
        log(f"{name:<26} {row['us_per_call_median']:8.1f} us (best {row['us_per_call_best']:.1f})  "
            f"{row['launches']:3d} launches  {row['host_reads']} host reads   {shape}")
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--only", default=None, help="substring of the call name")
    args = p.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("host_overhead: run without TRITON_INTERPRET (it compiles for a GPU)")
    rows = measure(args.rounds, args.iters, args.only)
    if args.out:
        import triton
        with open(args.out, "w") as f:
            json.dump({"what": __doc__.split("\n")[0], "cpu": cpu_model(), "threads": 1,
                       "torch": torch.__version__, "triton": triton.__version__,
                       "date": time.strftime("%Y-%m-%d"), "target": "sm_90 (stub driver, no-op launches)",
                       "rounds": args.rounds, "iters_per_round": args.iters, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
