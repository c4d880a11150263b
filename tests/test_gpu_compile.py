"""The Triton kernels compile for real GPUs (sm_90 H100, sm_80 A100) on this CPU machine, through
the real launchers and a stub Triton driver (bench/gpu_resources.py), and stay within budget:
no more than 256 bytes of local memory (spills + stack) per thread, shared memory within the
architecture's. The full grid of shapes is bench/results/gpu_resources.json; this is its
representative subset (Q-CTC fp32/bf16 at the caption shape, attention D64 bf16 and D80 fp32
with a bias at the cross-attention shape, greedy + beams 10 and 128, the widest)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

@pytest.mark.parametrize("arch", [90, 80])
def test_kernels_compile_for_the_gpu_within_budget(tmp_path, arch):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "res.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_resources.py"), "--arch", str(arch),
                           "--subset", "--out", str(out)], capture_output=True, text=True, timeout=1200,
                          cwd=ROOT, env=env)
    assert out.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = json.load(open(out))["rows"]
    kernels = {r["kernel"] for r in rows}
    assert {r["config"] for r in rows} >= {"decode beam10 cutoff40", "decode beam128 cutoff40",
                                           "attention B32 H12 Lq20 Lk930 D80 fp32 bias=True"}
    assert {"_row_kernel", "_lattice_kernel", "_qctc_grad_kernel", "_fwd_kernel",
            "_dkdv_kernel", "_dq_kernel", "_argmax_kernel", "_collapse_kernel", "_topk_kernel",
            "_qctc_reduce_kernel", "_range_kernel", "_ctc_grad_kernel",
            "_beam_kernel"} <= kernels, kernels
    for r in rows:
        assert "error" not in r, r
        assert r["local"] <= 256 and 0 < r["regs"] <= 255, r


def test_stub_driver_reports_local_memory(tmp_path):
    """The budget check can fail: a kernel with a large private array goes to local memory and
    cuobjdump's count says so."""
    pytest.importorskip("triton")
    code = r'''
import sys, torch, triton, triton.language as tl
sys.path.insert(0, {bench!r})
import gpu_resources as gr
from triton.runtime import driver
@triton.jit
def spill(X, I, N: tl.constexpr):
    acc = tl.zeros((N,), tl.float32)
    for i in range(0, 64):
        j = tl.load(I + i)
        acc += tl.load(X + (tl.arange(0, N) * 7 + j) % N)
    tl.store(X + tl.arange(0, N), acc)
d = gr.make_stub_driver(90)
driver.set_active(d)
spill[(1,)](torch.zeros(16384), torch.zeros(64, dtype=torch.int32), N=16384, num_warps=1)
print(d.loaded[0]["local"], d.loaded[0]["regs"])
'''.replace("{bench!r}", repr(os.path.join(ROOT, "bench")))
    script = tmp_path / "spill.py"  # Triton reads a @jit function's source from its file
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                          cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    local, regs = (int(v) for v in proc.stdout.split()[-2:])
    assert local > 256 and regs > 0
