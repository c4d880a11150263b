"""Language models (ARPA, KenLM, user models), hotwords, streaming, ctcdecode timesteps and
logits input of the CTC beam search, against the Python references of narvl.reference.decode."""
import gzip
import math
import sys

import pytest
import torch

import narvl
from narvl.reference import (ArpaReference, beam_search_lm_reference, beam_search_reference,
                             hotword_boost)

LN10 = math.log(10)

# A bigram model over single characters (character-based) with hand-checkable numbers.
CHAR_ARPA = """\\data\\
ngram 1=5
ngram 2=3

\\1-grams:
-1.0\t<unk>\t0
-99\t<s>\t-0.5
-0.5\t</s>
-0.7\ta\t-0.3
-0.9\tb\t-0.2

\\2-grams:
-0.2\t<s>\ta
-0.4\ta\tb
-0.6\tb\t</s>

\\end\\
"""

# A trigram word model (word-based: "ab", "ba", "cab" have several characters).
WORD_ARPA = """\\data\\
ngram 1=8
ngram 2=6
ngram 3=2

\\1-grams:
-2.0 <unk> 0
-99 <s> -0.4
-0.8 </s> 0
-0.9 a -0.3
-0.7 ab -0.25
-1.1 ba -0.1
-1.3 cab -0.2
-1.2 c -0.15

\\2-grams:
-0.3 <s> ab -0.1
-0.5 ab ba -0.2
-0.6 ba a 0
-0.4 a </s> 0
-0.9 <s> c 0
-0.2 c ab 0

\\3-grams:
-0.1 <s> ab ba
-0.05 ab ba a

\\end\\
"""

LABELS = ["_", " ", "a", "b", "c"]


@pytest.fixture
def char_lm(tmp_path):
    p = tmp_path / "char.arpa"
    p.write_text(CHAR_ARPA)
    return p


@pytest.fixture
def word_lm(tmp_path):
    p = tmp_path / "word.arpa"
    p.write_text(WORD_ARPA)
    return p


def test_arpa_hand_computed(char_lm):
    lm = narvl.ArpaLanguageModel(char_lm)
    assert lm.order == 2 and lm.num_ngrams(1) == 5 and lm.num_ngrams(2) == 3
    expect = {
        (("<s>",), "a"): -0.2,              # a bigram
        (("<s>",), "b"): -0.5 - 0.9,        # back-off(<s>) + P(b)
        (("a",), "b"): -0.4,
        (("b",), "a"): -0.2 - 0.7,
        (("a",), "a"): -0.3 - 0.7,
        (("b",), "</s>"): -0.6,
        (("a",), "</s>"): -0.3 - 0.5,
    }
    ref = ArpaReference(CHAR_ARPA)
    for (ctx, w), log10 in expect.items():
        assert lm.log_prob(ctx, w) == pytest.approx(log10 * LN10, abs=1e-6), (ctx, w)
        assert ref.cond(list(ctx), w) == pytest.approx(log10 * LN10, abs=1e-9), (ctx, w)


def test_arpa_trigram_backoff(word_lm):
    lm = narvl.ArpaLanguageModel(word_lm)
    ref = ArpaReference(WORD_ARPA)
    cases = {
        (("<s>", "ab"), "ba"): -0.1,                  # trigram
        (("ab", "ba"), "a"): -0.05,
        (("ba", "a"), "</s>"): -0.4,                  # no 'ba a' context: its back-off is 0
        (("<s>", "<s>"), "ab"): -0.3,                 # '<s> <s>' is no n-gram: back-off 0
        (("c", "ab"), "ba"): 0.0 - 0.5,               # bo(c ab) = 0, then the bigram "ab ba"
        (("a", "c"), "cab"): -0.15 - 1.3,             # bo(c) + P(cab)
        (("<s>", "ab"), "c"): -0.1 - 0.25 - 1.2,      # bo(<s> ab) + bo(ab) + P(c)
    }
    for (ctx, w), log10 in cases.items():
        assert lm.log_prob(ctx, w) == pytest.approx(log10 * LN10, abs=1e-6), (ctx, w)
        assert ref.cond(list(ctx), w) == pytest.approx(log10 * LN10, abs=1e-9), (ctx, w)


def test_arpa_gzip_and_errors(tmp_path):
    gz = tmp_path / "lm.arpa.gz"
    with gzip.open(gz, "wt") as f:
        f.write(CHAR_ARPA)
    assert narvl.ArpaLanguageModel(gz).log_prob(("a",), "b") == pytest.approx(-0.4 * LN10, abs=1e-6)
    with pytest.raises(FileNotFoundError):
        narvl.ArpaLanguageModel(tmp_path / "missing.arpa")
    bad = {
        CHAR_ARPA.replace("-0.4\ta\tb", "-0.4x\ta\tb"): "line 14",
        CHAR_ARPA.replace("\\end\\", ""): "end",
        CHAR_ARPA.replace("ngram 2=3", "ngram 2=4"): "announces 4",
        CHAR_ARPA.replace("-0.6\tb\t</s>", "-0.6\tb\tzz"): "line 15",
    }
    for i, (text, msg) in enumerate(bad.items()):
        p = tmp_path / f"bad{i}.arpa"
        p.write_text(text)
        with pytest.raises(ValueError, match=msg):
            narvl.ArpaLanguageModel(p)
    with pytest.raises(ValueError, match="line"):
        p = tmp_path / "empty.arpa"
        p.write_text("\\data\\\n\\end\\\n")
        narvl.ArpaLanguageModel(p)


@pytest.mark.parametrize("text, line", [
    ("", "line 1"),                                               # empty file
    ("\n  \n", "line 1"),                                         # blank lines only
    ("a plain text file\nwithout a data section\n", "line 1"),   # no data section
    (CHAR_ARPA.replace("-0.9\tb\t-0.2", "-0.9\tb\tnot-a-number"), "line 10"),
])
def test_load_non_arpa_text_raises_value_error_with_line(tmp_path, monkeypatch, text, line):
    # taken as ARPA text (not a KenLM binary): the ARPA parser's ValueError, even without kenlm
    monkeypatch.setitem(sys.modules, "kenlm", None)
    p = tmp_path / "lm.arpa"
    p.write_text(text)
    assert not narvl.lm.is_kenlm_binary(p)
    with pytest.raises(ValueError, match=line):
        narvl.load_language_model(p)
    with pytest.raises(ValueError, match=line):
        narvl.CTCBeamDecoder(LABELS, model_path=str(p))


def test_load_binary_garbage_is_not_taken_for_kenlm(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "kenlm", None)
    p = tmp_path / "lm.bin"
    p.write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match="UTF-8"):
        narvl.load_language_model(p)


def test_load_directory_and_missing_path(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        narvl.load_language_model(tmp_path)
    with pytest.raises(ValueError, match="is a directory"):
        narvl.CTCBeamDecoder(LABELS, model_path=str(tmp_path))
    missing = tmp_path / "missing.arpa"
    for exc in (ValueError, FileNotFoundError):  # LanguageModelNotFoundError is both
        with pytest.raises(exc, match="not found"):
            narvl.load_language_model(missing)


def test_kenlm_magic_bytes_take_the_kenlm_path(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "kenlm", None)  # as when the optional package is absent
    p = tmp_path / "lm.binary"
    p.write_bytes(narvl.lm.KENLM_MAGIC + b" 5\n\0" + bytes(64))
    assert narvl.lm.is_kenlm_binary(p) and not narvl.lm.is_arpa(p)
    with pytest.raises(ImportError, match="KenLM binary.*kenlm"):
        narvl.load_language_model(p)
    with pytest.raises(ImportError, match="kenlm"):
        narvl.CTCBeamDecoder(LABELS, model_path=str(p), unigrams=["ab", "ba"])
    p.write_bytes(narvl.lm.KENLM_MAGIC_INCOMPLETE + b"\n" + bytes(64))
    with pytest.raises(ValueError, match="incomplete KenLM binary"):
        narvl.load_language_model(p)


def _random_lp(T, V, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, T, V, generator=g) * scale).log_softmax(-1)


def _decoded(dec, lp):
    out, scores, steps, lens = dec.decode(lp)
    n = int((lens[0] > 0).sum()) if lens.numel() else 0
    return [(tuple(out[0, k, : lens[0, k]].tolist()), float(scores[0, k])) for k in range(lens.shape[1])
            if k < n or lens[0, k] > 0]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("alpha, beta", [(0.8, 1.5), (1.5, 0.0), (0.3, -0.5)])
def test_word_lm_matches_reference(word_lm, seed, alpha, beta):
    T, beam = 14, 6
    lp = _random_lp(T, len(LABELS), seed)
    dec = narvl.CTCBeamDecoder(LABELS, model_path=str(word_lm), alpha=alpha, beta=beta,
                               beam_width=beam, cutoff_top_n=5, log_probs_input=True)
    assert dec.character_based() is False and dec.max_order() == 3 and dec.dict_size() == 5
    ref = beam_search_lm_reference(lp[0], LABELS, 0, beam, 5, ArpaReference(WORD_ARPA), alpha, beta)
    got = _decoded(dec, lp)
    assert len(got) >= len(ref)
    for (rp, rs), (gp, gs) in zip(ref, got):
        assert rp == gp
        assert gs == pytest.approx(-rs, rel=1e-4, abs=1e-3)
    # every hypothesis is made of the model's words
    words = {"a", "ab", "ba", "cab", "c"}
    for p, _ in got:
        text = "".join(LABELS[c] for c in p)
        assert all(w in words for w in text.split(" ")[:-1])
        assert not text.startswith(" ") and "  " not in text


@pytest.mark.parametrize("seed", range(4))
def test_char_lm_matches_reference(char_lm, seed):
    labels = ["_", "a", "b", "c"]  # 'c' is out of the model's vocabulary
    lp = _random_lp(10, 4, seed)
    dec = narvl.CTCBeamDecoder(labels, model_path=str(char_lm), alpha=0.5, beta=0.7,
                               beam_width=5, cutoff_top_n=4, log_probs_input=True)
    assert dec.character_based() is True
    ref = beam_search_lm_reference(lp[0], labels, 0, 5, 4, ArpaReference(CHAR_ARPA), 0.5, 0.7)
    got = _decoded(dec, lp)
    for (rp, rs), (gp, gs) in zip(ref, got):
        assert rp == gp
        assert gs == pytest.approx(-rs, rel=1e-4, abs=1e-3)


def test_lm_changes_the_result(word_lm):
    """Frames that spell 'ab' weakly against 'cb' (not a word): the lexicon and the LM pick 'ab'."""
    V = len(LABELS)
    frames = []
    for probs in ({2: 0.4, 4: 0.45}, {3: 0.9}, {0: 0.9}):
        row = torch.full((V,), 0.02)
        for k, v in probs.items():
            row[k] = v
        frames.append(row / row.sum())
    p = torch.stack(frames)[None]
    plain = narvl.CTCBeamDecoder(LABELS, beam_width=8, cutoff_top_n=V)
    fused = narvl.CTCBeamDecoder(LABELS, model_path=str(word_lm), alpha=1.0, beta=0.5,
                                 beam_width=8, cutoff_top_n=V)
    assert plain.decode(p)[0][0, 0, :2].tolist() == [4, 3]
    out, _, _, lens = fused.decode(p)
    assert out[0, 0, : lens[0, 0]].tolist() == [2, 3]


def test_user_language_model(word_lm):
    """A Python LanguageModel gives the same result as the native ARPA model it wraps."""
    arpa = narvl.ArpaLanguageModel(word_lm)
    calls = []

    class Mine(narvl.LanguageModel):
        order = arpa.order
        vocabulary = arpa.vocabulary
        max_log_prob = arpa.max_log_prob

        def log_prob(self, context, word):
            calls.append((context, word))
            return arpa.log_prob(context, word)

    lp = _random_lp(12, len(LABELS), 3).exp()
    kw = dict(alpha=0.9, beta=1.0, beam_width=6, cutoff_top_n=5)
    a = narvl.CTCBeamDecoder(LABELS, model_path=str(word_lm), **kw).decode(lp)
    b = narvl.CTCBeamDecoder(LABELS, language_model=Mine(), **kw).decode(lp)
    assert calls and all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(TypeError, match="LanguageModel"):
        narvl.CTCBeamDecoder(LABELS, language_model=object())


def test_language_model_errors_pass_through_unrenamed(word_lm):
    """Errors keep their kind in their type: a user model's ValueError, even one whose text reads
    like the kernels' NaN fault, reaches the caller unchanged and is not a NaNScoresError; NaN in
    the scores is one, naming probs."""
    from narvl.checks import NaNScoresError

    arpa = narvl.ArpaLanguageModel(word_lm)

    class Failing(narvl.LanguageModel):
        order, vocabulary, max_log_prob = arpa.order, arpa.vocabulary, arpa.max_log_prob

        def log_prob(self, context, word):
            raise ValueError("narvl: NaN in scores (from the user's model)")

    dec = narvl.CTCBeamDecoder(LABELS, language_model=Failing(), beam_width=6, cutoff_top_n=5)
    lp = _random_lp(12, len(LABELS), 3).exp()
    with pytest.raises(ValueError, match="from the user's model") as err:
        dec.decode(lp)
    assert not isinstance(err.value, NaNScoresError)
    lp[0, 2, 1] = float("nan")
    with pytest.raises(NaNScoresError, match="probs contains NaN"):
        narvl.CTCBeamDecoder(LABELS, model_path=str(word_lm), beam_width=4).decode(lp)


def test_kenlm_matches_native(word_lm, tmp_path):
    pytest.importorskip("kenlm", reason="the optional kenlm package (narvl[kenlm]) is not installed")
    tabbed = tmp_path / "tabs.arpa"  # KenLM wants tabs between fields
    tabbed.write_text("\n".join(
        "\t".join(line.split(" ")) if line and line[0] in "-0123456789" else line
        for line in WORD_ARPA.splitlines()) + "\n")
    k = narvl.KenLMLanguageModel(tabbed)
    a = narvl.ArpaLanguageModel(word_lm)
    for ctx, w in [(("<s>", "ab"), "ba"), (("c", "ab"), "ba"), (("a", "c"), "cab"), (("<s>", "<s>"), "c")]:
        assert k.log_prob(ctx, w) == pytest.approx(a.log_prob(ctx, w), abs=1e-5)


def test_reset_params_and_bad_config(word_lm, tmp_path):
    dec = narvl.CTCBeamDecoder(LABELS, model_path=str(word_lm), alpha=0.0, beta=0.0, beam_width=4,
                               log_probs_input=True)
    lp = _random_lp(10, len(LABELS), 1)
    r0 = dec.decode(lp)
    dec.reset_params(2.0, 3.0)
    r1 = dec.decode(lp)
    ref = beam_search_lm_reference(lp[0], LABELS, 0, 4, 40, ArpaReference(WORD_ARPA), 2.0, 3.0)
    assert tuple(r1[0][0, 0, : r1[3][0, 0]].tolist()) == ref[0][0]
    assert not torch.equal(r0[1], r1[1])
    with pytest.raises(ValueError, match="space"):
        narvl.CTCBeamDecoder(["_", "a", "b", "c"], model_path=str(word_lm))
    with pytest.raises(FileNotFoundError):
        narvl.CTCBeamDecoder(LABELS, model_path=str(tmp_path / "nope.arpa"))
    with pytest.raises(ValueError, match="alpha"):
        narvl.CTCBeamDecoder(LABELS, model_path=str(word_lm), alpha=float("nan"))
    with pytest.raises(ValueError, match="hotword"):
        narvl.CTCBeamDecoder(LABELS, hotwords=["xyz"])


# ----------------------------------------------------------------------------- hotwords


def test_hotword_boost_rules():
    hot = {"cab", "ab"}
    assert hotword_boost("cab ab", hot, 2.0) == pytest.approx(2.0 + 2.0 * 2 / 2)
    assert hotword_boost("cab a", hot, 2.0) == pytest.approx(2.0 + 2.0 * 1 / 2)
    assert hotword_boost("ca", hot, 2.0) == pytest.approx(2.0 * 2 / 3)
    assert hotword_boost("b ", hot, 2.0) == 0.0


@pytest.mark.parametrize("seed", range(4))
def test_hotwords_match_reference(seed):
    lp = _random_lp(12, len(LABELS), seed)
    dec = narvl.CTCBeamDecoder(LABELS, beam_width=6, cutoff_top_n=5, log_probs_input=True,
                               hotwords=["cab", "ba c"], hotword_weight=1.5)
    ref = beam_search_lm_reference(lp[0], LABELS, 0, 6, 5, None, hotwords=("cab", "ba", "c"),
                                   hotword_weight=1.5)
    got = _decoded(dec, lp)
    for (rp, rs), (gp, gs) in zip(ref, got):
        assert rp == gp
        assert gs == pytest.approx(-rs, rel=1e-4, abs=1e-3)


def test_hotword_changes_result_only_when_it_should():
    V = len(LABELS)
    rows = []
    for probs in ({4: 0.5, 3: 0.4}, {2: 0.9}, {3: 0.9}):
        row = torch.full((V,), 0.01)
        for k, v in probs.items():
            row[k] = v
        rows.append(row / row.sum())
    p = torch.stack(rows)[None]  # 'cab' (best) against 'bab'
    base = narvl.CTCBeamDecoder(LABELS, beam_width=8, cutoff_top_n=V).decode(p)
    assert base[0][0, 0, :3].tolist() == [4, 2, 3]
    boosted = narvl.CTCBeamDecoder(LABELS, beam_width=8, cutoff_top_n=V, hotwords=["bab"],
                                   hotword_weight=3.0).decode(p)
    assert boosted[0][0, 0, :3].tolist() == [3, 2, 3]
    unrelated = narvl.CTCBeamDecoder(LABELS, beam_width=8, cutoff_top_n=V, hotwords=["ccc"],
                                     hotword_weight=0.2).decode(p)
    assert torch.equal(unrelated[0][0, 0], base[0][0, 0])


# ----------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("with_lm", [False, True])
def test_streaming_equals_one_shot(word_lm, with_lm):
    kw = dict(beam_width=6, cutoff_top_n=5, log_probs_input=True)
    if with_lm:
        kw.update(model_path=str(word_lm), alpha=0.7, beta=1.1)
    g = torch.Generator().manual_seed(7)
    B, T = 3, 17
    lp = (torch.randn(B, T, len(LABELS), generator=g) * 2).log_softmax(-1)
    lens = torch.tensor([17, 11, 5])
    one = narvl.CTCBeamDecoder(LABELS, **kw).decode(lp, lens)
    online = narvl.OnlineCTCBeamDecoder(LABELS, **kw)
    for chunking in ([17], [1] * 17, [4, 6, 7], [9, 8]):
        states = [narvl.DecoderState(online) for _ in range(B)]
        t0, res = 0, None
        for i, c in enumerate(chunking):
            chunk = lp[:, t0: t0 + c]
            clen = (lens - t0).clamp(0, c)
            eos = [i == len(chunking) - 1] * B
            res = online.decode(chunk, states, eos, clen)
            t0 += c
        assert [s.frames for s in states] == lens.tolist()
        for a, b in zip(one, res):
            assert torch.equal(a[..., : b.shape[-1]] if a.dim() == 3 else a, b if b.dim() < 3 else b[..., : a.shape[-1]])


def test_streams_at_their_own_positions():
    online = narvl.OnlineCTCBeamDecoder(LABELS, beam_width=4, cutoff_top_n=5, log_probs_input=True)
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 12, len(LABELS), generator=g) * 2).log_softmax(-1)
    s0, s1 = narvl.DecoderState(online), narvl.DecoderState(online)
    online.decode(x[:1, :5], [s0], [False])  # stream 0 runs ahead
    res = online.decode(torch.stack([x[0, 5:12], x[1, :7]]), [s0, s1], [True, False])
    one0 = narvl.CTCBeamDecoder(LABELS, beam_width=4, cutoff_top_n=5, log_probs_input=True).decode(x[:1])
    n = int(one0[3][0, 0])
    assert res[0][0, 0, :n].tolist() == one0[0][0, 0, :n].tolist()
    assert s0.frames == 12 and s1.frames == 7


def test_streaming_bad_input():
    online = narvl.OnlineCTCBeamDecoder(LABELS, beam_width=4)
    other = narvl.OnlineCTCBeamDecoder(LABELS, beam_width=4)
    x = torch.rand(1, 3, len(LABELS))
    with pytest.raises(ValueError, match="another decoder"):
        online.decode(x, [narvl.DecoderState(other)], [True])
    with pytest.raises(ValueError, match="vocabulary"):
        online.decode(torch.rand(1, 3, 7), [narvl.DecoderState(online)], [True])
    with pytest.raises(ValueError, match="one entry per stream"):
        online.decode(x, [narvl.DecoderState(online)] * 2, [True])
    with pytest.raises(TypeError, match="DecoderState"):
        online.decode(x, ["state"], [True])


# ------------------------------------------------------------- timesteps and logits input


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("beam, V", [(3, 5), (8, 6), (16, 9)])
def test_timesteps_match_ctcdecode_definition(backend, seed, beam, V):
    """Each token's frame: where its probability peaked over the frames that extended the shorter
    prefix by it while that prefix was alive (ctcdecode's path_trie), from the reference; the
    C++ search and the Triton (GPU) search alike."""
    g = torch.Generator().manual_seed(seed)
    lp = (torch.randn(2, 15, V, generator=g) * 1.5).log_softmax(-1)
    L = torch.tensor([15, 9])
    res = narvl.ctc_prefix_beam_search(lp, L, beam_width=beam, cutoff_top_n=V, nbest=beam)
    rt, rl, rs, rts = beam_search_reference(lp, L, beam, 0, V, 1.0, beam)
    assert torch.equal(res.tokens, rt) and torch.equal(res.lengths, rl)
    assert torch.equal(res.timesteps, rts)
    # the streaming decoder reports the same frames
    online = narvl.OnlineCTCBeamDecoder([str(i) for i in range(V)], beam_width=beam, cutoff_top_n=V,
                                        log_probs_input=True)
    states = [narvl.DecoderState(online) for _ in range(2)]
    online.decode(lp[:, :6], states, [False, False], (L).clamp(max=6))
    out = online.decode(lp[:, 6:], states, [True, True], (L - 6).clamp(min=0))
    assert torch.equal(out[2][..., :15].long(), rts.clamp_min(0))


def test_timesteps_can_point_before_the_parent(backend):
    """ctcdecode's frame is the peak, not the first frame: 'a' peaks late here, 'ab' early."""
    V = 3
    rows = [{1: 0.5}, {2: 0.6}, {1: 0.9}]
    frames = []
    for probs in rows:
        row = torch.full((V,), 0.05)
        for k, v in probs.items():
            row[k] = v
        frames.append(row / row.sum())
    lp = torch.stack(frames).log()[None]
    res = narvl.ctc_prefix_beam_search(lp, beam_width=8, cutoff_top_n=V, nbest=8)
    ref = beam_search_reference(lp, torch.tensor([3]), 8, 0, V, 1.0, 8)

    def frames(tokens, lengths, steps):  # (some hypotheses tie: compare by labeling)
        return {tuple(tokens[0, k, : lengths[0, k]].tolist()): steps[0, k, : lengths[0, k]].tolist()
                for k in range(tokens.shape[1])}

    got, want = frames(res.tokens, res.lengths, res.timesteps), frames(ref[0], ref[1], ref[3])
    assert got == want
    assert got[(1, 2)] == [2, 1]  # 'a' peaks at frame 2, 'ab' was extended (and peaked) at 1


@pytest.mark.parametrize("shape", [(3, 7, 5), (2, 11, 37), (2, 4, 130)])
def test_logits_input(backend, shape):
    B, T, V = shape
    g = torch.Generator().manual_seed(V)
    logits = torch.randn(B, T, V, generator=g) * 3 + 7
    a = narvl.ctc_prefix_beam_search(logits, beam_width=5, cutoff_top_n=9, nbest=3, input="logits")
    b = narvl.ctc_prefix_beam_search(logits.log_softmax(-1), beam_width=5, cutoff_top_n=9, nbest=3)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="input"):
        narvl.ctc_prefix_beam_search(logits, input="softmax")
