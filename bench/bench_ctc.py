"""Q-CTC / CTC: narvl's fused kernels against torch's log_softmax + F.ctc_loss, same inputs,
and narvl against the machine's memory-bandwidth floor, measured in the same run.

Run: python -m pytest bench/bench_ctc.py --benchmark-json bench/results/ctc_cpu.json
Peak extra memory is measured in a fresh subprocess per variant (peak RSS growth, Linux).

The floor: Q-CTC must read the logits once in the forward, and read them and write the gradient
once in the backward. ``test_ctc_bandwidth_floor`` measures, with the same threads and on the
same tensor, the read bandwidth R (``x.sum()``) and the copy bandwidth C (``y.copy_(x)``,
bytes read + written), and reports floor_fwd = S / R and floor_fwdbwd = S / R + 2 S / C (S =
the logits' bytes) next to narvl's medians, with the CPU model.
"""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import narvl
from setups import CTC_SHAPES, cpu_model, ctc_inputs

HERE = os.path.dirname(os.path.abspath(__file__))


def narvl_loss(x, targets, tl, blank):
    return narvl.qctc_loss(x, targets, tl, blank=blank, zero_infinity=True)


def torch_loss(x, targets, tl, blank):
    lp = torch.log_softmax(x.float(), -1).transpose(0, 1)
    n = torch.full((x.shape[0],), x.shape[1], dtype=torch.long)
    return F.ctc_loss(lp, targets, n, tl, blank=blank, zero_infinity=True)


IMPLS = {"narvl": narvl_loss, "torch": torch_loss}


def make_run(fn, mode, x, targets, tl, blank):
    """The timed call: the loss under no_grad ("fwd"), or the loss and its gradient ("fwdbwd")."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(x, targets, tl, blank)
        return run
    xr = x.requires_grad_(True)
    return lambda: torch.autograd.grad(fn(xr, targets, tl, blank), xr)[0]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", list(CTC_SHAPES))
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_ctc(benchmark, threads, impl, shape, mode):
    x, targets, tl, blank = ctc_inputs(shape)
    fn = IMPLS[impl]
    benchmark.group = f"ctc-{shape}-{mode}-{threads}thr"
    benchmark.extra_info.update(shape=CTC_SHAPES[shape], threads=threads, impl=impl)
    benchmark.pedantic(make_run(fn, mode, x, targets, tl, blank), rounds=5, warmup_rounds=1, iterations=1)


_MEM_CHILD = r"""
import sys, json, torch
sys.path.insert(0, {here!r})
from setups import ctc_inputs
import bench_ctc

def status(key):  # kB, from /proc (Linux)
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])

x, targets, tl, blank = ctc_inputs({shape!r})
x.requires_grad_(True)
torch.set_num_threads(1)
base = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
g = torch.autograd.grad(bench_ctc.IMPLS[{impl!r}](x, targets, tl, blank), x)[0]
peak = status("VmHWM:")
print(json.dumps(dict(extra_mib=(peak - base) / 1024, grad_mib=g.numel() * g.element_size() / 2**20)))
"""


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", ["caption"])
def test_ctc_peak_memory(benchmark, impl, shape):
    """Peak RSS growth of one forward + backward in a fresh process (1 thread); the figures go
    into the benchmark JSON's extra_info (the timing of this entry is the child process's)."""
    code = _MEM_CHILD.format(here=HERE, shape=shape, impl=impl)
    res = {}

    def child():
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        res.update(json.loads(out.stdout.strip().splitlines()[-1]))
    benchmark.group = "ctc-peak-memory"
    benchmark.pedantic(child, rounds=1, iterations=1)
    benchmark.extra_info.update(shape=CTC_SHAPES[shape], impl=impl, cpu_model=cpu_model(),
                                peak_extra_mib=res["extra_mib"], grad_mib=res["grad_mib"])
    print(f"\n{impl} {shape}: peak extra {res['extra_mib']:.0f} MiB, gradient {res['grad_mib']:.0f} MiB")
    if impl == "narvl":
        # no more than one gradient-sized buffer (plus slack for small tensors)
        assert res["extra_mib"] <= 1.15 * res["grad_mib"] + 16


def _median_seconds(fn, reps=9):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


@pytest.mark.parametrize("shape", ["caption", "vqa"])
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_ctc_bandwidth_floor(benchmark, threads, shape, mode):
    """narvl's Q-CTC median next to the bandwidth floor measured in this run (see the module
    docstring); extra_info holds R, C, the floor and the ratio."""
    x, targets, tl, blank = ctc_inputs(shape)
    S = x.numel() * x.element_size()
    y = torch.empty_like(x)
    read_bw = S / _median_seconds(lambda: x.sum())
    copy_bw = 2 * S / _median_seconds(lambda: y.copy_(x))
    floor = S / read_bw + (2 * S / copy_bw if mode == "fwdbwd" else 0.0)
    run = make_run(narvl_loss, mode, x, targets, tl, blank)
    benchmark.group = f"ctc-floor-{shape}-{mode}-{threads}thr"
    benchmark.pedantic(run, rounds=9, warmup_rounds=2, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: the call ran once, nothing was timed
        return
    med = benchmark.stats.stats.median
    benchmark.extra_info.update(shape=CTC_SHAPES[shape], threads=threads, impl="narvl", mode=mode,
                                cpu_model=cpu_model(), logits_mb=S / 1e6, read_gbps=read_bw / 1e9,
                                copy_gbps=copy_bw / 1e9, floor_ms=floor * 1e3, narvl_ms=med * 1e3,
                                ratio_to_floor=med / floor)
    print(f"\n[{cpu_model()}] {shape} {mode} {threads} thr: narvl {med * 1e3:.2f} ms, floor {floor * 1e3:.2f} ms "
          f"(read {read_bw / 1e9:.1f} GB/s, copy {copy_bw / 1e9:.1f} GB/s): {med / floor:.2f}x the floor")
