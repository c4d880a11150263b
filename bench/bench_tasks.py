"""Trained checkpoints, per task: NARVL against the autoregressive baseline at batch 1 on the
same evaluation samples in one process (the latency column of the README's task table).

Run after training (``python train.py --task T --arch both --out RUNS/T`` for the tasks wanted):
    NARVL_RUNS=RUNS python -m pytest bench/bench_tasks.py --benchmark-json bench/results/tasks_cpu.json
Each round decodes the same ``SAMPLES`` evaluation samples one at a time with each model in turn
(greedy, encoder included, both prepared alike by ``prepare_for_inference``); per-sample time =
the model's part of the round / SAMPLES.
"""
import os

import pytest
import torch

from narvl.checkpoint import load_model_state, read_checkpoint
from narvl.data import Tokenizer, shapes_task
from narvl.models import ARBaseline, NARVL, NARVLConfig, prepare_for_inference, time_generate

SAMPLES = 100
RUNS = os.environ.get("NARVL_RUNS")


def load(path):
    tensors, meta = read_checkpoint(path)
    cfg = NARVLConfig.from_json(meta["config"])
    model = (NARVL if meta["arch"] == "narvl" else ARBaseline)(cfg)
    load_model_state(model, tensors, meta)
    return prepare_for_inference(model), Tokenizer.from_json(meta["tokenizer"]), cfg


@pytest.mark.parametrize("task", ["caption", "vqa", "grounding", "entailment"])
def test_task_latency(benchmark, task):
    """Both checkpoints of ``task`` in one process, timed by ``narvl.models.time_generate``: 7
    rounds in which NARVL, then AR, decodes the ``SAMPLES`` samples (a change in the machine's
    speed hits both alike). extra_info holds per model the per-round times (ms per sample,
    ``narvl_ms`` / ``ar_ms``) and the mean over samples of each sample's best round
    (``narvl_best_ms`` / ``ar_best_ms``, as train.py's latency)."""
    if RUNS is None:
        pytest.skip("set NARVL_RUNS to a directory of trained runs (RUNS/TASK/{narvl,ar}/last.safetensors)")
    models = {}
    for arch in ("narvl", "ar"):
        path = os.path.join(RUNS, task, arch, "last.safetensors")
        if not os.path.isfile(path):
            pytest.skip(f"no checkpoint at {path}")
        models[arch], tok, cfg = load(path)
    data = shapes_task(task, SAMPLES, cfg.image_size, seed=1000)  # train.py's evaluation split
    inputs = [data.batch([i], tok, cfg.max_text_len)[:2] for i in range(SAMPLES)]
    out = {}
    benchmark.pedantic(lambda: out.update(time_generate(models, inputs, rounds=7, warmup=SAMPLES)),  # a warm-up round
                       rounds=1, iterations=1)
    benchmark.group = f"task-{task}"
    benchmark.extra_info.update(
        task=task, samples=SAMPLES, threads=torch.get_num_threads(),
        narvl_ms=out["narvl"].round_ms, ar_ms=out["ar"].round_ms,
        narvl_best_ms=out["narvl"].best_ms, ar_best_ms=out["ar"].best_ms)
