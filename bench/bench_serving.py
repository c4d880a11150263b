"""NARVL served on CPU by narvl against the runtimes users deploy on: the batch-1 and batch-8
``logits`` call (encoder + one decoder pass) of the same model, in one process, taking turns.

Engines (each skipped with a message when its package is absent; ``pip install "narvl[serving]"``
and ``pip install openvino`` for the peers):
  narvl        ``prepare_for_inference`` serving copy (fp32)
  eager        the plain model (fp32)
  compile      ``torch.compile`` (inductor) of the plain model
  onnxruntime  ``export_onnx`` of the plain model, ONNX Runtime CPU, fp32
  openvino     the same ONNX file, OpenVINO CPU, fp32; ``openvino_bf16`` with the bf16 precision
               hint (AMX / AVX512-BF16 CPUs; elsewhere OpenVINO runs fp32)
Shapes: the demo's caption model (tiny preset, 64 px, 500-entry vocabulary) and the base preset
at 480 px, random weights (speed does not depend on the values). Every fp32 engine's argmax
agrees with the eager model's on the measured input (99% of the slots), or the row fails; the
bf16 row's agreement is recorded.

    python -m pytest bench/bench_serving.py --benchmark-json bench/results/serving_cpu.json
"""
import os
import tempfile
import time

import numpy as np
import pytest
import torch

from narvl.models import NARVL, NARVLConfig, export_onnx, prepare_for_inference
from setups import cpu_model

ROUNDS = 15
SHAPES = {"tiny64": ("tiny", 64, 500), "base480": ("base", 480, 500)}


def _model(shape):
    preset, size, vocab = SHAPES[shape]
    cfg = NARVLConfig.from_preset(preset, task="caption", image_size=size, vocab_size=vocab, num_bins=0,
                                  max_text_len=48, entangle_position_embedding=True)
    torch.manual_seed(0)
    return NARVL(cfg).eval()


def _engines(model, path):
    """{name: callable(images, text) -> logits as a numpy array} and {name: why skipped}."""
    engines, skipped = {}, {}
    fast = prepare_for_inference(model)
    engines["narvl"] = lambda im, tx: fast.logits(im, tx).numpy()
    engines["eager"] = lambda im, tx: model.logits(im, tx).numpy()
    compiled = torch.compile(model.logits)
    engines["compile"] = lambda im, tx: compiled(im, tx).numpy()
    try:
        import onnxruntime as ort
        export_onnx(model, path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        engines["onnxruntime"] = lambda im, tx: sess.run(None, {"images": im.numpy(), "text": tx.numpy()})[0]
    except ImportError as exc:
        skipped["onnxruntime"] = str(exc)
    if "onnxruntime" not in engines:
        skipped["openvino"] = "no ONNX file (the export needs onnx, onnxscript and onnxruntime)"
        return engines, skipped
    try:
        import openvino as ov
    except ImportError as exc:
        skipped["openvino"] = str(exc)
        return engines, skipped
    core = ov.Core()
    for name, hint in (("openvino", "f32"), ("openvino_bf16", "bf16")):
        c = core.compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                             "INFERENCE_NUM_THREADS": torch.get_num_threads()})
        engines[name] = (lambda c: lambda im, tx: c([im.numpy(), tx.numpy()])[0])(c)
    return engines, skipped


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_serving_logits(benchmark, shape, batch):
    """``ROUNDS`` rounds in which every engine runs the same input once (after 3 warm-up calls
    each). extra_info: per engine the per-round ms, median and best, argmax agreement with eager."""
    model = _model(shape)
    cfg = model.cfg
    g = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g)
    text = torch.randint(4, cfg.vocab_size - 1, (batch, 12), generator=g)
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        engines, skipped = _engines(model, os.path.join(tmp, "narvl.onnx"))
        want = model.logits(images, text).argmax(-1).numpy()
        agree = {}
        for name, run in engines.items():
            for _ in range(3):
                out = run(images, text)
            agree[name] = float((np.asarray(out).argmax(-1) == want).mean())
        times = {name: [] for name in engines}

        def rounds():
            for _ in range(ROUNDS):
                for name, run in engines.items():
                    t0 = time.perf_counter()
                    run(images, text)
                    times[name].append((time.perf_counter() - t0) * 1e3)

        benchmark.pedantic(rounds, rounds=1, iterations=1)
    benchmark.group = f"serving-{shape}-b{batch}"
    benchmark.extra_info.update(
        shape=shape, batch=batch, threads=torch.get_num_threads(), cpu_model=cpu_model(), rounds=ROUNDS,
        skipped=skipped, argmax_agreement=agree, ms=times,
        median_ms={k: float(np.median(v)) for k, v in times.items()},
        best_ms={k: float(min(v)) for k, v in times.items()})
    for name, a in agree.items():
        if not name.endswith("_bf16"):
            assert a >= 0.99, (name, a)
