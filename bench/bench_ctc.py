"""Q-CTC / CTC: narvl's fused kernels against torch's log_softmax + F.ctc_loss, same inputs.

Run: python -m pytest bench/bench_ctc.py --benchmark-json bench/results/ctc_cpu.json
Peak extra memory is measured in a fresh subprocess per variant (peak RSS growth, Linux).
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import narvl
from setups import CTC_SHAPES, ctc_inputs

HERE = os.path.dirname(os.path.abspath(__file__))


def narvl_loss(x, targets, tl, blank):
    return narvl.qctc_loss(x, targets, tl, blank=blank, zero_infinity=True)


def torch_loss(x, targets, tl, blank):
    lp = torch.log_softmax(x.float(), -1).transpose(0, 1)
    n = torch.full((x.shape[0],), x.shape[1], dtype=torch.long)
    return F.ctc_loss(lp, targets, n, tl, blank=blank, zero_infinity=True)


IMPLS = {"narvl": narvl_loss, "torch": torch_loss}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", list(CTC_SHAPES))
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_ctc(benchmark, threads, impl, shape, mode):
    x, targets, tl, blank = ctc_inputs(shape)
    fn = IMPLS[impl]
    benchmark.group = f"ctc-{shape}-{mode}-{threads}thr"
    benchmark.extra_info.update(shape=CTC_SHAPES[shape], threads=threads, impl=impl)
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(x, targets, tl, blank)
    else:
        xr = x.requires_grad_(True)

        def run():
            return torch.autograd.grad(fn(xr, targets, tl, blank), xr)[0]
    benchmark.pedantic(run, rounds=5, warmup_rounds=1, iterations=1)


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
def test_ctc_peak_memory(impl, shape, record_property):
    code = _MEM_CHILD.format(here=HERE, shape=shape, impl=impl)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    record_property("peak_extra_memory", res)
    print(f"\n{impl} {shape}: peak extra {res['extra_mib']:.0f} MiB, gradient {res['grad_mib']:.0f} MiB")
    if impl == "narvl":
        # no more than one gradient-sized buffer (plus slack for small tensors)
        assert res["extra_mib"] <= 1.15 * res["grad_mib"] + 16
