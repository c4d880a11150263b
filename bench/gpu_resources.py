"""Compiles narvl's Triton kernels for real GPUs on a machine without one, through the launchers.

A stub Triton driver (``StubDriver``) reports an H100's (sm_90) or an A100's (sm_80) target and
device properties and does nothing at load or launch time, so each launcher in ``kernels/``
runs on CPU tensors, picks its block sizes, warps and grid exactly as on that GPU, and Triton
compiles (and ptxas assembles) what the GPU would run. Each compiled kernel's resources are read
from its cubin with ``cuobjdump --dump-resource-usage`` (registers, local memory = spills and
stack, shared memory).

    python bench/gpu_resources.py --arch 90 --arch 80 --out bench/results/gpu_resources.json
    python bench/gpu_resources.py --arch 90 --subset      # the subset tests/test_gpu_compile.py runs

Must run without TRITON_INTERPRET (a subprocess in the tests). Compiled kernels are cached in
Triton's cache directory, so a second run takes seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
from setups import cpu_model  # noqa: E402

# Device properties the launchers and Triton read (values of the real cards).
PROPS = {
    90: {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
         "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120,
         "name": "H100 (sm_90)"},
    80: {"max_shared_mem": 166912, "multiprocessor_count": 108, "max_num_regs": 65536,
         "warpSize": 32, "sm_clock_rate": 1410000, "mem_clock_rate": 1215000, "mem_bus_width": 5120,
         "name": "A100 (sm_80)"},
}
LOCAL_BUDGET = 256  # bytes of local memory (spills + stack) per thread a kernel may use


def _cuobjdump():
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(cubin: bytes) -> dict:
    """{regs, local (stack frame + local memory, bytes per thread), shared, stack} of the one
    kernel in a cubin (cuobjdump's resource usage)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    vals = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    # spilled registers and private arrays live in the stack frame (STACK); LOCAL is any other
    # local memory: both are per-thread device-memory traffic
    stack, local = int(vals.get("STACK", 0)), int(vals.get("LOCAL", 0))
    return {"regs": int(vals.get("REG", 0)), "local": stack + local,
            "shared": int(vals.get("SHARED", 0)), "stack": stack}


def make_stub_driver(arch: int):
    """A triton DriverBase whose target is cuda:arch and whose loads and launches do nothing;
    every kernel loaded is recorded in ``driver.loaded`` with its resource usage."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    props = PROPS[arch]

    class StubDriver(DriverBase):
        def __init__(self):
            self.target = GPUTarget("cuda", arch, 32)
            self.loaded = []
            self.utils = types.SimpleNamespace(get_device_properties=lambda device: props,
                                               load_binary=self._load_binary,
                                               unload_module=lambda module: None)
            self.launcher_cls = lambda src, metadata: (lambda *args, **kwargs: None)

        @classmethod
        def is_active(cls):
            return True

        def map_python_to_cpp_type(self, ty):
            return "void*"

        def get_current_target(self):
            return self.target

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            raise NotImplementedError("the stub driver runs nothing")

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def set_current_device(self, device):
            pass

        def _load_binary(self, name, cubin, shared, device):
            use = resource_usage(cubin)
            self.loaded.append({"kernel": name, **use, "shared_meta": shared})
            # non-null module and function handles: Triton loads each kernel once, as on a GPU
            return 1, 1, use["regs"], use["local"], 1024

    return StubDriver()


def _attn(B, H, Lq, Lk, D, dtype, bias):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=g).to(dtype) for L in (Lq, Lk, Lk))
    b = torch.randn(H, Lq, Lk, generator=g).to(dtype) if bias else None
    return q, k, v, torch.full((B,), Lk, dtype=torch.long), b


def configs(subset: bool):
    """(name, callable that runs the launchers once) at the shapes NARVL uses (the caption, VQA
    and ASR shapes of the benchmarks, at every dtype, head dim and beam the kernels serve);
    ``subset`` keeps a representative few for the test suite."""
    from narvl.kernels import attention as ka
    from narvl.kernels import checks as kchecks
    from narvl.kernels import ctc as kc
    from narvl.kernels import decode as kd
    dts = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    out = []
    qctc = [(32, 20, 59458), (64, 6, 59458), (16, 200, 1000)]
    for (B, N, V) in qctc[:1] if subset else qctc:
        for dn in (["fp32", "bf16"] if subset else list(dts)):
            def run(B=B, N=N, V=V, dt=dts[dn]):
                x = torch.empty(B, N, V, dtype=dt)
                tg = torch.ones(B, 16, dtype=torch.long)
                tl = torch.full((B,), 4, dtype=torch.long)
                ql = torch.full((B,), N, dtype=torch.long)
                nll, smooth, lse, em = kc.qctc_fwd(x, tg, tl, ql, V - 1)
                kc.qctc_bwd(torch.ones(B), torch.ones(B), x, lse, em, tg, tl, ql, V - 1)
                # the whole loss (qctc_loss's route): reduction and device-side checks
                loss, nll, lse, em = kc.qctc_loss_fwd(x, tg, tl, None, None, V - 1, "mean", True,
                                                      0.1, True)
                kc.qctc_loss_bwd(torch.ones(()), x, nll, lse, em, tg, tl, None, None, V - 1, "mean",
                                 True, 0.1)
                kchecks.count_outside(tl, 0, 16, "target_lengths must lie in [0, S]")
                # ctc_loss's route on (T, B, C) log-probabilities, the same shape
                lp = torch.empty(N, B, V, dtype=dt)
                loss, nll, em = kc.ctc_loss_fwd(lp, tg, ql, tl, 0, "mean", True, True)
                kc.ctc_loss_bwd(torch.ones(()), lp, nll, em, tg, ql, tl, 0, "mean", True)
            out.append((f"qctc B{B} N{N} V{V} {dn}", run))
    attn = [(32, 12, 20, 930), (1, 4, 6, 28)]
    heads = [16, 64, 80, 128]
    # the subset: D64 bf16 with a bias, and D80 fp32 with a bias, where the dQ kernel uses the
    # most local memory (152 B per thread on sm_90 with Triton 3.9)
    grid = ([(attn[0], 64, "bf16", True), (attn[0], 80, "fp32", True)] if subset else
            [(a, D, dn, bias) for a in attn for D in heads for dn in dts for bias in (False, True)])
    for (B, H, Lq, Lk), D, dn, bias in grid:
        def run(B=B, H=H, Lq=Lq, Lk=Lk, D=D, dt=dts[dn], bias=bias):
            q, k, v, lens, b = _attn(B, H, Lq, Lk, D, dt, bias)
            o, lse = ka.attention_fwd(q, k, v, lens, b, D ** -0.5)
            ka.attention_bwd(torch.ones_like(q), q, k, v, o, lse, lens, b, D ** -0.5, bias)
        out.append((f"attention B{B} H{H} Lq{Lq} Lk{Lk} D{D} {dn} bias={bias}", run))
    # beams 64-128 (the GPU search's widest, MAX_BEAM) compile in 15-30 s each; the subset keeps
    # the common 10 and the widest.
    beams = [10, 128] if subset else [1, 10, 32, 64, 100, 128]
    for beam in beams:
        def run(beam=beam):
            x = torch.empty(4, 20, 59458)
            kd.greedy_decode(x, torch.full((4,), 20, dtype=torch.long), 59457)
            kd.beam_search(x, torch.full((4,), 20, dtype=torch.long), beam, 59457, 40, 1.0, 1, 1)
        out.append((f"decode beam{beam} cutoff40", run))
    return out


def run_grid(arch: int, subset: bool, only=None, log=print):
    from triton.runtime import driver as tdriver
    drv = make_stub_driver(arch)
    tdriver.set_active(drv)
    rows = []
    try:
        for name, fn in configs(subset):
            if only and not re.search(only, name):
                continue
            start = len(drv.loaded)
            t0 = time.time()
            try:
                fn()
                err = None
            except Exception as exc:  # a compile failure is a row, not the end of the table
                err = f"{type(exc).__name__}: {str(exc)[:300]}"
            for k in drv.loaded[start:]:
                ok = k["local"] <= LOCAL_BUDGET and k["shared"] <= PROPS[arch]["max_shared_mem"]
                rows.append({"arch": arch, "config": name, **k, "ok": ok})
                log(f"sm_{arch} {name:<46} {k['kernel']:<18} regs {k['regs']:3d} local {k['local']:6d} "
                    f"shared {k['shared']:6d} {'ok' if ok else 'OVER BUDGET'}")
            if err:
                rows.append({"arch": arch, "config": name, "kernel": None, "error": err, "ok": False})
                log(f"sm_{arch} {name:<46} FAILED {err}")
            log(f"    ({time.time() - t0:.1f} s)")
    finally:
        try:
            tdriver.reset_active()
        except RuntimeError:  # no real GPU driver on this machine: nothing to go back to
            pass
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, action="append", choices=sorted(PROPS))
    p.add_argument("--subset", action="store_true")
    p.add_argument("--only", default=None, help="regex on the config name")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("gpu_resources: run without TRITON_INTERPRET (it compiles for a GPU)")
    archs = args.arch or [90]
    rows = []
    if len(archs) == 1:
        rows = run_grid(archs[0], args.subset, args.only)
    else:  # one process per arch: Triton keeps a JIT function's target per device for the process
        for arch in archs:
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "rows.json")
                cmd = [sys.executable, os.path.abspath(__file__), "--arch", str(arch), "--out", out]
                cmd += (["--subset"] if args.subset else []) + (["--only", args.only] if args.only else [])
                subprocess.run(cmd, check=False)
                rows += json.load(open(out))["rows"]
    if args.out:
        import triton
        with open(args.out, "w") as f:
            json.dump({"triton": triton.__version__, "cpu": cpu_model(), "local_budget": LOCAL_BUDGET,
                       "rows": rows}, f, indent=1)
    bad = [r for r in rows if not r["ok"]]
    print(f"{len(rows)} kernels, {len(bad)} over budget or failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
