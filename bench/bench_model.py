"""Model level: NARVL (one decoder pass) against the autoregressive baseline (one pass per token,
KV cache), over output length at batch 1 and 32: the paper's Figure 1. And one training step
with the narvl kernels against the same model on plain-torch peers (log_softmax + F.ctc_loss,
SDPA, ATen linears: ``setups.use_torch_peers``).

Run: python -m pytest bench/bench_model.py --benchmark-json bench/results/model_cpu.json
Both models: tiny preset (d 256, 4+4 layers, ResNet-50 stages 1-3), 64-px images (16 image
tokens), 10 text tokens, both prepared alike (``prepare_for_inference``: BN folded, packed
convs), greedy decoding; AR runs exactly ``out_len`` steps (EOS masked), NARVL has ``out_len``
queries. Latency includes the encoder. ``test_backbone`` times the shared ResNet stages eval /
BN-folded / packed for fused oneDNN.
"""
import pytest
import torch

from setups import (BACKBONE_BATCHES, MODEL_BATCHES, MODEL_IMAGE_SIZE, MODEL_OUT_LENS, backbone_variants,
                    cpu_model, model_pair, train_inputs, use_torch_peers)


@pytest.mark.parametrize("arch", ["narvl", "ar"])
@pytest.mark.parametrize("out_len", MODEL_OUT_LENS)
@pytest.mark.parametrize("batch", MODEL_BATCHES)
def test_generate(benchmark, threads, arch, out_len, batch):
    nar, ar, make = model_pair(out_len)
    images, text = make(batch)
    benchmark.group = f"generate-b{batch}-L{out_len}-{threads}thr"
    benchmark.extra_info.update(arch=arch, out_len=out_len, batch=batch, threads=threads)
    if arch == "narvl":
        fn = lambda: nar.generate(images, text)  # noqa: E731
    else:
        fn = lambda: ar.generate(images, text, max_len=out_len, stop_at_eos=False)  # noqa: E731
    with torch.inference_mode():
        benchmark.pedantic(fn, rounds=10 if batch == 1 else 3, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("backend", ["narvl", "torch"])
def test_train_step(benchmark, threads, backend, monkeypatch):
    model, (images, text, targets, lengths) = train_inputs()
    if backend == "torch":  # the peers compute the same loss (dropout off for the check)
        with torch.no_grad():
            want = model.eval()(images, text, targets, lengths).item()
            use_torch_peers(monkeypatch)
            got = model(images, text, targets, lengths).item()
        model.train()
        assert abs(got - want) <= 1e-4 * abs(want), (got, want)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    benchmark.group = f"train-step-{threads}thr"
    benchmark.extra_info.update(backend=backend, threads=threads, batch=images.shape[0], cpu_model=cpu_model())

    def step():
        loss = model(images, text, targets, lengths)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    benchmark.pedantic(step, rounds=5, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("variant", ["eval", "folded", "packed"])
@pytest.mark.parametrize("batch", BACKBONE_BATCHES)
def test_backbone(benchmark, threads, variant, batch):
    net = backbone_variants()[variant]
    x = torch.randn(batch, 3, MODEL_IMAGE_SIZE, MODEL_IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    benchmark.group = f"backbone-b{batch}-{threads}thr"
    benchmark.extra_info.update(variant=variant, batch=batch, threads=threads, image_size=MODEL_IMAGE_SIZE)
    with torch.inference_mode():
        benchmark.pedantic(lambda: net(x), rounds=20 if batch == 1 else 5, warmup_rounds=2, iterations=1)
