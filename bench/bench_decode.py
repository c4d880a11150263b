"""CTC decoding: narvl against flashlight-text's LexiconFreeDecoder and pyctcdecode, same inputs.

Run: python -m pytest bench/bench_decode.py --benchmark-json bench/results/decode_cpu.json
Peers install with `pip install flashlight-text pyctcdecode` (skipped when absent). Times are
per batch; the report divides by B for per-sequence numbers. pyctcdecode is pure Python and
slow at V = 59458: it runs on the first 2 sequences only (and is reported per sequence).
"""
import pytest
import torch

import narvl
from setups import BEAMS, CUTOFF_TOP_N, DECODE_SHAPES, decode_inputs


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
    benchmark.extra_info.update(shape=(B, T, V), threads=threads, impl=impl, beam=beam, per=B)
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
    benchmark.extra_info.update(shape=(B, T, V), threads=1, impl="pyctcdecode", beam=10, per=2)
    benchmark.pedantic(lambda: [dec.decode_beams(arr[b], beam_width=10) for b in range(2)],
                       rounds=1, warmup_rounds=0, iterations=1)


@pytest.mark.parametrize("shape", list(DECODE_SHAPES))
def test_greedy(benchmark, threads, shape):
    lp, blank = decode_inputs(shape)
    B, T, V = lp.shape
    benchmark.group = f"greedy-{shape}-{threads}thr"
    benchmark.extra_info.update(shape=(B, T, V), threads=threads, impl="narvl-greedy", beam=1, per=B)
    benchmark.pedantic(lambda: narvl.ctc_greedy_decode(lp, blank=blank), rounds=5, warmup_rounds=1,
                       iterations=1)
