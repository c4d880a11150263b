"""CTC decoding: narvl against flashlight-text's LexiconFreeDecoder and pyctcdecode, same inputs.

Run: python -m pytest bench/bench_decode.py --benchmark-json bench/results/decode_cpu.json
Peers install with `pip install flashlight-text pyctcdecode` (skipped when absent). Times are
per batch; the report divides by B for per-sequence numbers. pyctcdecode is pure Python and
slow at V = 59458: it runs on the first 2 sequences only (and is reported per sequence).
"""
import statistics
import time

import pytest
import torch

import narvl

from setups import BEAMS, CUTOFF_TOP_N, DECODE_SHAPES, cpu_model, decode_inputs


def narvl_beam(lp, blank, beam):
    return narvl.ctc_prefix_beam_search(lp, beam_width=beam, blank=blank, cutoff_top_n=CUTOFF_TOP_N,
                                        nbest=1)


def flashlight_beam(lp, blank, beam):
    fl = pytest.importorskip("flashlight.lib.text.decoder")
    opts = fl.LexiconFreeDecoderOptions(beam_size=beam, beam_size_token=CUTOFF_TOP_N,
                                        beam_threshold=1e30, lm_weight=0.0, sil_score=0.0,
                                        log_add=True, criterion_type=fl.CriterionType.CTC)
    dec = fl.LexiconFreeDecoder(opts, fl.ZeroLM(), blank, blank, [])
    B, T, V = lp.shape
    step = 4 * T * V

    def run():
        base = lp.data_ptr()
        return [dec.decode(base + b * step, T, V)[0].tokens for b in range(B)]

    return run


@pytest.mark.parametrize("beam", BEAMS)
@pytest.mark.parametrize("shape", list(DECODE_SHAPES))
@pytest.mark.parametrize("impl", ["narvl", "flashlight"])
def test_beam(benchmark, threads, impl, shape, beam):
    lp, blank = decode_inputs(shape)
    B, T, V = lp.shape
    benchmark.group = f"beam-{shape}-b{beam}-{threads}thr"
    benchmark.extra_info.update(shape=(B, T, V), threads=threads, impl=impl, beam=beam, per=B,
                                cpu_model=cpu_model())
    if impl == "narvl":
        run = lambda: narvl_beam(lp, blank, beam)  # noqa: E731
    else:
        if threads != 1:
            pytest.skip("flashlight-text's decoder is single-threaded")
        run = flashlight_beam(lp, blank, beam)
    benchmark.pedantic(run, rounds=3, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("shape", ["caption", "asr"])
def test_beam_pyctcdecode(benchmark, shape):
    pyctc = pytest.importorskip("pyctcdecode")
    lp, blank = decode_inputs(shape)
    B, T, V = lp.shape
    labels = [f"<{i}>" for i in range(V)]
    labels[blank] = ""
    dec = pyctc.build_ctcdecoder(labels)
    arr = lp[:2].numpy()
    benchmark.group = f"beam-{shape}-b10-1thr"
    benchmark.extra_info.update(shape=(B, T, V), threads=1, impl="pyctcdecode", beam=10, per=2,
                                cpu_model=cpu_model())
    benchmark.pedantic(lambda: [dec.decode_beams(arr[b], beam_width=10) for b in range(2)],
                       rounds=1, warmup_rounds=0, iterations=1)


@pytest.mark.parametrize("shape", list(DECODE_SHAPES))
def test_greedy(benchmark, threads, shape):
    lp, blank = decode_inputs(shape)
    B, T, V = lp.shape
    benchmark.group = f"greedy-{shape}-{threads}thr"
    benchmark.extra_info.update(shape=(B, T, V), threads=threads, impl="narvl-greedy", beam=1, per=B,
                                cpu_model=cpu_model())
    benchmark.pedantic(lambda: narvl.ctc_greedy_decode(lp, blank=blank), rounds=5, warmup_rounds=1,
                       iterations=1)


def _best_ms(fn, reps=15):
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


@pytest.mark.parametrize("shape", ["vqa", "caption"])
def test_beam_vs_flashlight_alternating(benchmark, shape):
    """narvl and flashlight-text at beam 10, one thread, in alternating rounds on the same tensor
    (with a read of the tensor between them): this VM's speed drifts by up to 1.5x within
    minutes, and rounds that alternate see the same drift. extra_info: each one's median and
    best round (ms per batch), their ratios, and the per-frame times next to the read's."""
    pytest.importorskip("flashlight.lib.text.decoder")
    lp, blank = decode_inputs(shape)
    B, T, V = lp.shape
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {"narvl": lambda: narvl_beam(lp, blank, 10), "flashlight": flashlight_beam(lp, blank, 10),
                "read": lambda: lp.sum()}
        ms = {k: [] for k in runs}
        for fn in runs.values():
            fn()
        for _ in range(15):
            for k, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                ms[k].append((time.perf_counter() - t0) * 1e3)
        med = {k: statistics.median(v) for k, v in ms.items()}
        best = {k: min(v) for k, v in ms.items()}
        benchmark.group = f"alternating-{shape}-b10-1thr"
        benchmark.extra_info.update(
            shape=(B, T, V), threads=1, impl="narvl", beam=10, per=B, cpu_model=cpu_model(), rounds=15,
            median_ms=med, best_ms=best, ratio_median=med["flashlight"] / med["narvl"],
            ratio_best=best["flashlight"] / best["narvl"],
            narvl_us_per_frame=med["narvl"] * 1e3 / (B * T), read_us_per_frame=med["read"] * 1e3 / (B * T),
            flashlight_us_per_frame=med["flashlight"] * 1e3 / (B * T))
        benchmark.pedantic(runs["narvl"], rounds=3, warmup_rounds=0, iterations=1)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("shape", ["vqa", "caption"])
def test_beam_per_frame_vs_read(benchmark, shape):
    """The search's time per frame next to the time to read one frame's log-probs (one thread,
    the same tensor, best of 15 each, alternating in this run): how far the search sits above
    its memory floor. The benchmark itself times the search; extra_info holds both per frame."""
    lp, blank = decode_inputs(shape)
    B, T, V = lp.shape
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        search = lambda: narvl_beam(lp, blank, 10)  # noqa: E731
        read = lambda: lp.sum()  # noqa: E731
        ms_search, ms_read = min(_best_ms(search) for _ in range(2)), min(_best_ms(read) for _ in range(2))
        benchmark.group = f"frame-{shape}-b10-1thr"
        benchmark.extra_info.update(shape=(B, T, V), threads=1, impl="narvl", beam=10, per=B, cpu_model=cpu_model(),
                                    search_us_per_frame=ms_search * 1e3 / (B * T),
                                    read_us_per_frame=ms_read * 1e3 / (B * T),
                                    read_gbps=lp.numel() * 4 / (ms_read * 1e-3) / 1e9)
        benchmark.pedantic(search, rounds=5, warmup_rounds=1, iterations=1)
    finally:
        torch.set_num_threads(old)
