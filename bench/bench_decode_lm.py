"""CTC beam search with an n-gram language model: narvl against pyctcdecode + kenlm (word LM) and
flashlight-text's LexiconFreeDecoder (character LM), same emissions, same ARPA files, one thread.

Run: python -m pytest bench/bench_decode_lm.py --benchmark-json bench/results/decode_lm_cpu.json
Peers: `pip install pyctcdecode kenlm flashlight-text` (each skipped when absent).

The data are generated (lm_data.py): a Zipf corpus over 400 made-up words, a word bigram and a
character trigram ARPA estimated from it, and (B, T, V) emissions whose frames spell sentences of
that corpus through noise (characters held 1-3 frames, blanks between). Times are per batch;
the report divides by `per` for per-sequence numbers.

Settings:
- word LM (labels: blank, space, a-z, apostrophe): narvl's `CTCBeamDecoder(model_path=...)`
  (ctcdecode's semantics: the word score at each space, lexicon-constrained) against
  pyctcdecode's `build_ctcdecoder(labels, kenlm_model_path=...)`, alpha 0.5, beta 1.0. pyctcdecode
  is pure Python: it decodes the first 4 sequences (per = 4).
- character LM (labels: blank, '|', a-z): narvl's character-based mode (ctcdecode: the LM scores
  every label) against flashlight-text's `LexiconFreeDecoder`, which queries the LM at every
  token. The flashlight-text wheel on PyPI (0.0.7) ships no KenLM binding, so its LM is a
  `flashlight...decoder.LM` subclass over `kenlm.Model` (the way torchaudio's custom-LM example
  plugs one in): its Python callbacks are part of what a PyPI user of flashlight-text pays.
  lm_weight = alpha, no word score. The two decoders' scores differ in their details (ctcdecode's
  beta per label vs none); the comparison is of speed at the same beam, top-n and LM.
"""
import pytest
import torch

import narvl
from lm_data import CHAR_LABELS, WORD_LABELS, lm_files, lm_emissions
from setups import cpu_model

BEAMS = (10, 32)
ALPHA, BETA = 0.5, 1.0


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return lm_files(tmp_path_factory.mktemp("lm"))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _info(benchmark, impl, lm, lp, beam, per):
    B, T, V = lp.shape
    benchmark.group = f"lm-{lm}-b{beam}"
    benchmark.extra_info.update(shape=(B, T, V), threads=1, impl=impl, beam=beam, per=per, lm=lm,
                                cpu_model=cpu_model())


def _bench_narvl(benchmark, impl, lm, labels, path, beta, lp, beam):
    """narvl's CTCBeamDecoder with the LM (impl "narvl") or without it ("narvl-nolm")."""
    B, T, V = lp.shape
    dec = narvl.CTCBeamDecoder(labels, model_path=path if impl == "narvl" else None, alpha=ALPHA, beta=beta,
                               beam_width=beam, cutoff_top_n=V, num_processes=1, blank_id=0,
                               log_probs_input=True)
    if impl == "narvl" and lm == "char":
        assert dec.character_based()
    _info(benchmark, impl, lm, lp, beam, B)
    benchmark.pedantic(lambda: dec.decode(lp), rounds=3, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("beam", BEAMS)
@pytest.mark.parametrize("impl", ["narvl", "narvl-nolm", "pyctcdecode"])
def test_word_lm(benchmark, files, impl, beam):
    lp = lm_emissions(WORD_LABELS, files["sentences"], B=16, T=200, seed=1)
    if impl.startswith("narvl"):
        _bench_narvl(benchmark, impl, "word", WORD_LABELS, files["word_arpa"], BETA, lp, beam)
    else:
        pyctc = pytest.importorskip("pyctcdecode")
        pytest.importorskip("kenlm")
        dec = pyctc.build_ctcdecoder([""] + WORD_LABELS[1:], kenlm_model_path=files["word_arpa"],
                                     alpha=ALPHA, beta=BETA)
        arr = lp[:4].numpy()
        _info(benchmark, impl, "word", lp, beam, 4)
        benchmark.pedantic(lambda: [dec.decode_beams(arr[b], beam_width=beam, beam_prune_logp=-1e9,
                                                     token_min_logp=-1e9) for b in range(4)],
                           rounds=1, warmup_rounds=1, iterations=1)


def _flashlight_char_lm(fl, kenlm, path, labels):
    """A flashlight LM over a kenlm.Model of single-character words (labels[i] is word i)."""

    class CharLM(fl.LM):
        def __init__(self):
            fl.LM.__init__(self)
            self.model = kenlm.Model(path)
            self.states = {}

        def start(self, start_with_nothing):
            st = fl.LMState()
            ks = kenlm.State()
            self.model.BeginSentenceWrite(ks) if not start_with_nothing else self.model.NullContextWrite(ks)
            self.states[st] = ks
            return st

        def _step(self, state, word, idx):
            out = state.child(idx)
            ks = kenlm.State()
            score = self.model.BaseScore(self.states[state], word, ks)
            if out not in self.states:
                self.states[out] = ks
            return out, score * 2.302585092994046

        def score(self, state, token_index):
            return self._step(state, labels[token_index], token_index)

        def finish(self, state):
            return self._step(state, "</s>", len(labels))

    return CharLM()


@pytest.mark.parametrize("beam", BEAMS)
@pytest.mark.parametrize("impl", ["narvl", "narvl-nolm", "flashlight"])
def test_char_lm(benchmark, files, impl, beam):
    lp = lm_emissions(CHAR_LABELS, files["sentences"], B=16, T=200, seed=2)
    B, T, V = lp.shape
    if impl.startswith("narvl"):
        _bench_narvl(benchmark, impl, "char", CHAR_LABELS, files["char_arpa"], 0.0, lp, beam)
    else:
        fl = pytest.importorskip("flashlight.lib.text.decoder")
        kenlm = pytest.importorskip("kenlm")
        lm = _flashlight_char_lm(fl, kenlm, files["char_arpa"], CHAR_LABELS)
        opts = fl.LexiconFreeDecoderOptions(beam_size=beam, beam_size_token=V, beam_threshold=1e30,
                                            lm_weight=ALPHA, sil_score=0.0, log_add=True,
                                            criterion_type=fl.CriterionType.CTC)
        dec = fl.LexiconFreeDecoder(opts, lm, 1, 0, [])
        x = lp.contiguous()
        step = 4 * T * V

        def run():
            out = []
            for b in range(B):
                lm.states.clear()
                out.append(dec.decode(x.data_ptr() + b * step, T, V)[0].tokens)
            return out

        _info(benchmark, impl, "char", lp, beam, B)
        benchmark.pedantic(run, rounds=3, warmup_rounds=1, iterations=1)
