"""train.py: a short training smoke run per architecture, checkpoint (safetensors, atomic),
--resume, --eval-only, --freeze-backbone, DDP with 2 gloo processes, argument errors."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402

SMALL = ["--image-size", "32", "--train-size", "64", "--eval-size", "12", "--latency-samples", "3",
         "--batch-size", "8", "--no-progress", "--warmup", "2"]


def run(tmp_path, *args):
    out = str(tmp_path)
    assert train.main([*SMALL, "--out", out, *args]) == 0
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("task,arch", [("caption", "narvl"), ("caption", "ar"), ("grounding", "narvl"),
                                       ("vqa", "ar"), ("entailment", "narvl")])
def test_smoke_metrics_json(tmp_path, task, arch, capsys):
    m = run(tmp_path, "--task", task, "--arch", arch, "--steps", "3")
    for key in ("task", "arch", "metric_name", "metric", "latency_ms", "params", "train_seconds"):
        assert key in m
    assert m["task"] == task and m["arch"] == arch and m["latency_ms"] > 0 and m["params"] > 1e6
    assert 0.0 <= m["metric"] <= (1000.0 if task == "caption" else 100.0)
    assert "[narvl] task=" in capsys.readouterr().out
    assert os.path.isfile(tmp_path / "last.safetensors")
    with open(tmp_path / "last.safetensors", "rb") as f:  # safetensors, not a pickle
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    assert header["__metadata__"]["arch"] == arch and header["__metadata__"]["step"] == "3"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_bf16_autocast_smoke(tmp_path):
    m = run(tmp_path, "--task", "caption", "--arch", "narvl", "--steps", "2", "--bf16")
    assert m["latency_ms"] > 0


def test_resume_continues_and_eval_only(tmp_path):
    run(tmp_path, "--task", "vqa", "--steps", "2")
    m = run(tmp_path, "--task", "vqa", "--steps", "4", "--resume")
    from narvl.checkpoint import read_checkpoint
    tensors, meta = read_checkpoint(str(tmp_path / "last.safetensors"))
    assert meta["step"] == "4" and any(k.startswith("optim.") for k in tensors)
    ev = tmp_path / "ev"
    m2 = train.main([*SMALL, "--eval-only", str(tmp_path / "last.safetensors"), "--out", str(ev)])
    assert m2 == 0
    with open(ev / "metrics.json") as f:
        e = json.load(f)
    assert e["task"] == "vqa" and e["metric"] == m["metric"] and e["train_seconds"] == 0.0


def test_resume_requires_matching_task(tmp_path):
    run(tmp_path, "--task", "entailment", "--steps", "1")
    with pytest.raises(SystemExit, match="entailment"):
        train.main([*SMALL, "--out", str(tmp_path), "--task", "vqa", "--resume", "--steps", "2"])


def test_freeze_backbone_reports_fraction(tmp_path):
    m = run(tmp_path, "--task", "vqa", "--steps", "2", "--freeze-backbone")
    assert 0 < m["trainable_fraction"] < 0.01
    m2 = run(tmp_path / "r", "--task", "vqa", "--steps", "3", "--freeze-backbone")
    assert m2["trainable_params"] == m["trainable_params"]


def test_bad_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match="safetensors"):
        train.main([*SMALL, "--eval-only", str(bad), "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="does not exist"):
        train.main([*SMALL, "--eval-only", str(tmp_path / "none"), "--out", str(tmp_path)])


@pytest.mark.parametrize("args", [["--steps", "-1"], ["--batch-size", "0"], ["--image-size", "40"],
                                  ["--task", "ocr"], ["--lr", "0"]])
def test_bad_arguments(args, tmp_path):
    with pytest.raises(SystemExit):
        train.main([*SMALL, "--out", str(tmp_path), *args])


def test_ddp_two_processes(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "train.py"), *SMALL, "--task", "entailment", "--steps", "2",
           "--out", str(tmp_path)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    with open(tmp_path / "metrics.json") as f:
        m = json.load(f)
    assert m["world_size"] == 2 and m["task"] == "entailment"
