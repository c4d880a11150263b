"""The GPU suite's whole control flow (checks, benchmarks, profile), on CPU tensors in the Triton
interpreter at tiny shapes: `python bench/gpu_suite.py --dry-run` must work without a GPU."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_suite_dry_run(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_suite.py"), "--out", str(out),
                           "--dry-run"], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    checks = json.load(open(out / "gpu_checks.json"))
    assert checks["complete"] and checks["failed"] == 0 and checks["dry_run"]
    ops = {r["op"].split(".")[0] for r in checks["rows"]}
    assert ops == {"qctc_loss", "ctc_loss", "attention", "ctc_greedy_decode", "beam_search"}, ops
    assert all(r["ok"] and r["err"] <= r["bound"] for r in checks["rows"])
    bench = json.load(open(out / "gpu_bench.json"))
    assert bench["complete"] and bench["copy_GBps"] > 0
    timed = {(r["group"].split()[0], r["impl"]) for r in bench["rows"] if r["ms"]}
    assert {("qctc", "narvl"), ("qctc", "torch"), ("attn", "narvl"), ("attn", "sdpa-math"),
            ("decode", "narvl-gpu greedy")} <= timed, timed
    prof = json.load(open(out / "gpu_profile.json"))
    assert [p["call"] for p in prof if "error" not in p] == [p["call"] for p in prof] and len(prof) == 6


def test_gpu_suite_refuses_to_run_without_a_gpu_or_dry_run(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the suite would run for real")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_suite.py"), "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode != 0 and "no CUDA device" in proc.stderr
