"""Trained checkpoints, per task: NARVL against the autoregressive baseline at batch 1 on the
same evaluation samples in one process (the latency column of the README's task table).

Run after training (``python train.py --task T --arch both --out RUNS/T`` for the tasks wanted):
    NARVL_RUNS=RUNS python -m pytest bench/bench_tasks.py --benchmark-json bench/results/tasks_cpu.json
Each round decodes the same ``SAMPLES`` evaluation samples one at a time (greedy, encoder
included, both models prepared alike by ``prepare_for_inference``); per-sample time = round time / SAMPLES.
"""
import copy
import os

import pytest
import torch

from narvl.checkpoint import load_model_state, read_checkpoint
from narvl.data import Tokenizer, shapes_task
from narvl.models import ARBaseline, NARVL, NARVLConfig, prepare_for_inference

SAMPLES = 100
RUNS = os.environ.get("NARVL_RUNS")


def load(path):
    tensors, meta = read_checkpoint(path)
    cfg = NARVLConfig.from_json(meta["config"])
    model = (NARVL if meta["arch"] == "narvl" else ARBaseline)(cfg)
    load_model_state(model, tensors, meta)
    return prepare_for_inference(model), Tokenizer.from_json(meta["tokenizer"]), cfg


@pytest.mark.parametrize("arch", ["narvl", "ar"])
@pytest.mark.parametrize("task", ["caption", "vqa", "grounding", "entailment"])
def test_task_latency(benchmark, task, arch):
    if RUNS is None:
        pytest.skip("set NARVL_RUNS to a directory of trained runs (RUNS/TASK/{narvl,ar}/last.safetensors)")
    path = os.path.join(RUNS, task, arch, "last.safetensors")
    if not os.path.isfile(path):
        pytest.skip(f"no checkpoint at {path}")
    model, tok, cfg = load(path)
    data = shapes_task(task, SAMPLES, cfg.image_size, seed=1000)  # train.py's evaluation split
    inputs = [data.batch([i], tok, cfg.max_text_len)[:2] for i in range(SAMPLES)]
    benchmark.group = f"task-{task}"
    benchmark.extra_info.update(task=task, arch=arch, samples=SAMPLES, threads=torch.get_num_threads())

    def run():
        for images, text in inputs:
            model.generate(images, text)
    with torch.inference_mode():
        benchmark.pedantic(run, rounds=5, warmup_rounds=1, iterations=1)
