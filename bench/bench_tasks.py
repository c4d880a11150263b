"""Trained checkpoints, per task: NARVL against the autoregressive baseline at batch 1 on the
same evaluation samples in one process (the latency column of the README's task table).

Run after training (``python train.py --task T --arch both --out RUNS/T`` for the tasks wanted):
    NARVL_RUNS=RUNS python -m pytest bench/bench_tasks.py --benchmark-json bench/results/tasks_cpu.json
Each round decodes the same ``SAMPLES`` evaluation samples one at a time with each model in turn
(greedy, encoder included, both prepared alike by ``prepare_for_inference``); per-sample time =
the model's part of the round / SAMPLES.
"""
import dataclasses
import os

import pytest
import torch

from narvl.checkpoint import load_model_state, read_checkpoint
from narvl.data import Tokenizer, shapes_task
from narvl.models import ARBaseline, NARVL, NARVLConfig, prepare_for_inference, time_generate
from narvl.models.inference import cpu_has_bf16
from setups import cpu_model

SAMPLES = 100
RUNS = os.environ.get("NARVL_RUNS")


def load(path, pack_linear=True, refine=None, dtype=None):
    """The inference copy of a checkpoint; ``refine``: NARVL's refinement passes in place of the
    checkpoint's; ``dtype``: the copy's (``prepare_for_inference(dtype=)``, no fallback)."""
    tensors, meta = read_checkpoint(path)
    cfg = NARVLConfig.from_json(meta["config"])
    if refine is not None:
        cfg = dataclasses.replace(cfg, refine_steps=refine)
    model = (NARVL if meta["arch"] == "narvl" else ARBaseline)(cfg)
    load_model_state(model, tensors, meta)
    return (prepare_for_inference(model, pack_linear=pack_linear, dtype=dtype, fallback=False),
            Tokenizer.from_json(meta["tokenizer"]), cfg)


def task_inputs(task, variants):
    """{name: inference copy} for (name, arch, pack_linear[, refine[, dtype]]) in ``variants`` and the
    task's SAMPLES batch-1 inputs; skips when a checkpoint is missing."""
    models = {}
    for name, arch, pack, *refine in variants:
        path = os.path.join(RUNS, task, arch, "last.safetensors")
        if not os.path.isfile(path):
            pytest.skip(f"no checkpoint at {path}")
        models[name], tok, cfg = load(path, pack, *refine)
    data = shapes_task(task, SAMPLES, cfg.image_size, seed=1000)  # train.py's evaluation split
    return models, [data.batch([i], tok, cfg.max_text_len)[:2] for i in range(SAMPLES)]


def time_copies(benchmark, group, task, models, inputs):
    """Times ``models`` (name -> serving copy) on ``inputs`` with ``time_generate``: a warm-up
    round, then 7 rounds taking turns. extra_info: per copy ``{name}_ms`` (the per-round ms per
    sample) and ``{name}_best_ms`` (the mean of each sample's best round)."""
    out = {}
    benchmark.pedantic(lambda: out.update(time_generate(models, inputs, rounds=7, warmup=SAMPLES)),
                       rounds=1, iterations=1)
    benchmark.group = group
    benchmark.extra_info.update(task=task, samples=SAMPLES, threads=torch.get_num_threads(),
                                cpu_model=cpu_model(),
                                **{f"{k}_ms": v.round_ms for k, v in out.items()},
                                **{f"{k}_best_ms": v.best_ms for k, v in out.items()})


@pytest.mark.parametrize("task", ["caption", "vqa", "grounding", "entailment"])
def test_task_latency(benchmark, task):
    """Both checkpoints of ``task`` in one process, timed by ``narvl.models.time_generate``: 7
    rounds in which NARVL, then AR, decodes the ``SAMPLES`` samples (a change in the machine's
    speed hits both alike). extra_info holds per model the per-round times (ms per sample,
    ``narvl_ms`` / ``ar_ms``) and the mean over samples of each sample's best round
    (``narvl_best_ms`` / ``ar_best_ms``, as train.py's latency)."""
    if RUNS is None:
        pytest.skip("set NARVL_RUNS to a directory of trained runs (RUNS/TASK/{narvl,ar}/last.safetensors)")
    models, inputs = task_inputs(task, [("narvl", "narvl", True), ("ar", "ar", True)])
    time_copies(benchmark, f"task-{task}", task, models, inputs)


def test_caption_linear_packing(benchmark):
    """What the packed linear weights of ``prepare_for_inference`` buy: the caption checkpoints
    prepared with and without them (``pack_linear``), the four copies taking turns (7 rounds).
    extra_info: per copy the per-round ms per sample and the best-of-rounds mean."""
    if RUNS is None:
        pytest.skip("set NARVL_RUNS to a directory of trained runs (RUNS/caption/{narvl,ar}/last.safetensors)")
    models, inputs = task_inputs("caption", [("narvl", "narvl", True), ("ar", "ar", True),
                                             ("narvl_unpacked", "narvl", False), ("ar_unpacked", "ar", False)])
    time_copies(benchmark, "task-caption-packing", "caption", models, inputs)


def test_caption_refinement_latency(benchmark):
    """What NARVL's refinement passes cost at batch 1: the caption NARVL checkpoint with 0, 1 and
    2 passes (``refine_steps``) and the AR baseline, taking turns (7 rounds). extra_info: per
    copy the per-round ms per sample and the best-of-rounds mean."""
    if RUNS is None:
        pytest.skip("set NARVL_RUNS to a directory of trained runs (RUNS/caption/{narvl,ar}/last.safetensors)")
    models, inputs = task_inputs("caption", [("narvl_r0", "narvl", True, 0), ("narvl_r1", "narvl", True, 1),
                                             ("narvl_r2", "narvl", True, 2), ("ar", "ar", True)])
    time_copies(benchmark, "task-caption-refinement", "caption", models, inputs)


def test_caption_bf16_copies(benchmark):
    """The caption checkpoints served in float32 and in bfloat16 (``prepare_for_inference(dtype=
    torch.bfloat16)``), the four copies taking turns (7 rounds). Runs only on a CPU with bfloat16
    instructions (AVX512-BF16 or AMX-BF16): elsewhere bfloat16 is emulated, and
    ``prepare_for_inference`` keeps float32. extra_info: per copy the per-round ms per sample
    and the best-of-rounds mean."""
    if RUNS is None:
        pytest.skip("set NARVL_RUNS to a directory of trained runs (RUNS/caption/{narvl,ar}/last.safetensors)")
    if not cpu_has_bf16():
        pytest.skip(f"{cpu_model()} has no bfloat16 instructions (avx512_bf16 / amx_bf16)")
    bf16 = torch.bfloat16
    models, inputs = task_inputs("caption", [("narvl", "narvl", True), ("ar", "ar", True),
                                             ("narvl_bf16", "narvl", True, None, bf16),
                                             ("ar_bf16", "ar", True, None, bf16)])
    time_copies(benchmark, "task-caption-bf16", "caption", models, inputs)


def test_caption_checkpoints_latency(benchmark):
    """Every caption checkpoint under RUNS/caption/*/last.safetensors (the study's variants:
    decoder depth, queries, ...) and the AR baseline, taking turns (7 rounds). extra_info: per
    checkpoint directory the per-round ms per sample and the best-of-rounds mean."""
    if RUNS is None:
        pytest.skip("set NARVL_RUNS to a directory of trained runs (RUNS/caption/*/last.safetensors)")
    root = os.path.join(RUNS, "caption")
    names = sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "last.safetensors")))
    if len(names) < 2:
        pytest.skip(f"fewer than two checkpoints under {root}")
    models, inputs = task_inputs("caption", [(name, name, True) for name in names])
    time_copies(benchmark, "task-caption-checkpoints", "caption", models, inputs)
