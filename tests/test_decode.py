"""CTC decoding kernels against the Python references and brute-force enumeration."""
import math

import pytest
import torch

import narvl
from narvl.checks import NaNScoresError
from narvl.reference import (beam_search_reference, greedy_decode_reference,
                             labeling_logprobs_bruteforce)


def case(B, T, V, scale=1.0, lengths=None):
    lp = (torch.randn(B, T, V) * scale).log_softmax(-1)
    L = torch.randint(0, T + 1, (B,)) if lengths is None else torch.as_tensor(lengths)
    return lp, L


@pytest.mark.parametrize("shape", [(3, 7, 5), (4, 20, 37), (2, 1, 3), (5, 13, 2)])
@pytest.mark.parametrize("blank", ["first", "last"])
def test_greedy_matches_reference(backend, shape, blank):
    B, T, V = shape
    blank = 0 if blank == "first" else V - 1
    lp, L = case(B, T, V)
    tok, n = narvl.ctc_greedy_decode(lp, L, blank=blank)
    rt, rn = greedy_decode_reference(lp, L, blank)
    assert torch.equal(tok, rt) and torch.equal(n, rn)
    # logits and bf16 give the same argmax
    tok2, n2 = narvl.ctc_greedy_decode((lp * 3 + 1).bfloat16().float(), L, blank=blank)
    rt2, rn2 = greedy_decode_reference((lp * 3 + 1).bfloat16().float(), L, blank)
    assert torch.equal(tok2, rt2) and torch.equal(n2, rn2)
    # one label per frame: repeats kept, blanks dropped
    tok3, n3 = narvl.ctc_greedy_decode(lp, L, blank=blank, merge_repeats=False)
    rt3, rn3 = greedy_decode_reference(lp, L, blank, merge_repeats=False)
    assert torch.equal(tok3, rt3) and torch.equal(n3, rn3)
    with pytest.raises(TypeError, match="merge_repeats"):
        narvl.ctc_greedy_decode(lp, L, blank=blank, merge_repeats=1)


def test_greedy_without_merging_keeps_repeats(backend):
    """merge_repeats=False on a case with repeats: each non-blank frame's label, in order."""
    lp = torch.full((1, 6, 4), -5.0)
    for t, c in enumerate([2, 2, 0, 3, 3, 2]):
        lp[0, t, c] = 0.0
    tok, n = narvl.ctc_greedy_decode(lp, blank=0, merge_repeats=False)
    assert n.tolist() == [5] and tok[0, :5].tolist() == [2, 2, 3, 3, 2] and tok[0, 5] == -1
    tok, n = narvl.ctc_greedy_decode(lp, blank=0)
    assert n.tolist() == [3] and tok[0, :3].tolist() == [2, 3, 2]


def check_timesteps(res, lengths):
    """Each token's frame lies in [0, length) (ctcdecode's frames need not increase: see
    test_decode_lm.py); padding is -1."""
    for b in range(res.tokens.shape[0]):
        for k in range(res.tokens.shape[1]):
            n = int(res.lengths[b, k])
            ts = res.timesteps[b, k, :n]
            assert torch.all(ts >= 0) and torch.all(ts < int(lengths[b]))
            assert torch.all(res.timesteps[b, k, n:] == -1) and torch.all(res.tokens[b, k, n:] == -1)


@pytest.mark.parametrize("shape, beam, top_n, cutoff", [
    ((3, 7, 5, 0), 8, 5, 1.0),
    ((2, 12, 11, 10), 4, 6, 1.0),
    ((3, 9, 9, 0), 3, 9, 0.7),
    ((2, 6, 3, 1), 1, 3, 1.0),
    ((2, 10, 6, 0), 24, 6, 1.0),  # beams over 16
    ((2, 10, 3, 0), 40, 3, 1.0),  # two tokens, a wide beam: many prefixes one token apart
])
def test_beam_matches_reference(backend, shape, beam, top_n, cutoff):
    B, T, V, blank = shape
    lp, L = case(B, T, V, scale=2.0)
    nbest = min(beam, 3)
    res = narvl.ctc_prefix_beam_search(lp, L, beam_width=beam, blank=blank, cutoff_top_n=top_n,
                                       cutoff_prob=cutoff, nbest=nbest)
    rt, rl, rs, rts = beam_search_reference(lp, L, beam, blank, top_n, cutoff, nbest)
    assert torch.equal(res.tokens, rt) and torch.equal(res.lengths, rl)
    torch.testing.assert_close(res.scores, rs, rtol=1e-5, atol=1e-5)
    check_timesteps(res, L)
    assert torch.equal(res.timesteps, rts)  # ctcdecode's frames, on every backend


@pytest.mark.parametrize("backend, beam, V, T, B", [
    (be, *case) for be in ("cpp", "triton") for case in ((64, 3, 11, 2), (100, 4, 7, 1), (128, 3, 9, 1))
    # beam 100 runs the same compiled GPU kernel as 128 (beams round up to a power of two):
    # the interpreted Triton kernel takes over two minutes per case, so it runs 64 and 128
    if not (be == "triton" and case[0] == 100)], indirect=["backend"])
def test_gpu_merge_is_exact_on_near_identical_prefixes(backend, beam, V, T, B):
    """Prefixes are compared token by token, never by a hash: over two or three tokens, a full
    beam (up to the GPU's widest, 128, and ctcdecode's default 100) holds prefixes that differ in
    one position only, and every backend matches the reference's n-best, scores and frames."""
    g = torch.Generator().manual_seed(3)
    lp = (torch.randn(B, T, V, generator=g) * 0.3).log_softmax(-1)
    L = torch.tensor([T, T - 2][:B])
    res = narvl.ctc_prefix_beam_search(lp, L, beam_width=beam, cutoff_top_n=V, nbest=beam)
    rt, rl, rs, rts = beam_search_reference(lp, L, beam, 0, V, 1.0, beam)
    assert torch.equal(res.tokens, rt) and torch.equal(res.lengths, rl)
    torch.testing.assert_close(res.scores, rs, rtol=1e-5, atol=1e-5)
    assert torch.equal(res.timesteps, rts)
    full = (res.scores > float("-inf")).sum(1)
    assert int(full.max()) == beam  # the beam is full: every slot takes part in the merges
    for b in range(B):  # no labeling twice in the n-best
        labs = [tuple(res.tokens[b, k, : res.lengths[b, k]].tolist()) for k in range(beam)
                if res.scores[b, k] > float("-inf")]
        assert len(labs) == len(set(labs))


def test_search_state_between_calls():
    """The CPU search reuses its per-thread trie and tables across calls: a wide beam over long
    sequences grows them (thousands of prefixes), and the narrow, short searches after it (which
    reset only the entries in use, or shrink the tables) still match the reference, and the wide
    search gives the same result again."""
    g = torch.Generator().manual_seed(7)
    big = (torch.randn(2, 60, 40, generator=g) * 3).log_softmax(-1)
    wide = narvl.ctc_prefix_beam_search(big, beam_width=64, blank=0, cutoff_top_n=40, nbest=2)
    for trial in range(3):
        lp = (torch.randn(3, 5 + trial, 7, generator=g) * 2).log_softmax(-1)
        L = torch.full((3,), 5 + trial)
        res = narvl.ctc_prefix_beam_search(lp, L, beam_width=4, blank=0, cutoff_top_n=7, nbest=2)
        rt, rl, rs, rts = beam_search_reference(lp, L, 4, 0, 7, 1.0, 2)
        assert torch.equal(res.tokens, rt) and torch.equal(res.lengths, rl) and torch.equal(res.timesteps, rts)
        torch.testing.assert_close(res.scores, rs, rtol=1e-5, atol=1e-5)
    again = narvl.ctc_prefix_beam_search(big, beam_width=64, blank=0, cutoff_top_n=40, nbest=2)
    for a, b in zip(wide, again):
        assert torch.equal(a, b)


def test_wide_beam_is_exact(backend):
    """A beam that keeps every prefix scores each labeling with its exact probability
    (T = 4 frames over 2 tokens + blank: 31 labelings, within the GPU's widest beam)."""
    T, V = 4, 3
    lp, _ = case(2, T, V, scale=1.5)
    res = narvl.ctc_prefix_beam_search(lp, beam_width=32, cutoff_top_n=V, nbest=6)
    for b in range(2):
        exact = sorted(labeling_logprobs_bruteforce(lp[b], 0).items(), key=lambda kv: -kv[1])[:6]
        got = [(tuple(res.tokens[b, k, : res.lengths[b, k]].tolist()), float(res.scores[b, k]))
               for k in range(6)]
        for (lab, s), (glab, gs) in zip(exact, got):
            assert lab == glab
            assert abs(s - gs) < 1e-5


def test_greedy_equals_beam_on_peaked_scores(backend):
    lp, L = case(4, 15, 9, scale=25.0, lengths=[15, 12, 9, 1])
    tok, n = narvl.ctc_greedy_decode(lp, L, blank=8)
    res = narvl.ctc_prefix_beam_search(lp, L, beam_width=5, blank=8, nbest=1)
    assert torch.equal(res.lengths[:, 0], n)
    assert torch.equal(res.tokens[:, 0], tok)


def test_probability_input(backend):
    lp, L = case(2, 8, 6)
    a = narvl.ctc_prefix_beam_search(lp, L, beam_width=4, log_probs_input=True)
    b = narvl.ctc_prefix_beam_search(lp.exp(), L, beam_width=4, log_probs_input=False)
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-5, atol=1e-5)


def test_ctc_beam_decoder_contract(backend):
    V, T, B = 6, 10, 3
    labels = ["_"] + list("abcde")
    lp, _ = case(B, T, V, scale=2.0)
    seq = torch.tensor([10, 7, 3])
    dec = narvl.CTCBeamDecoder(labels, beam_width=4, cutoff_top_n=V, blank_id=0)
    out, scores, steps, lens = dec.decode(lp.exp(), seq)
    assert out.dtype == steps.dtype == lens.dtype == torch.int32 and scores.dtype == torch.float32
    assert out.shape == (B, 4, T) and scores.shape == (B, 4) and lens.shape == (B, 4)
    ref = narvl.ctc_prefix_beam_search(lp, seq, beam_width=4, cutoff_top_n=V)
    torch.testing.assert_close(scores, -ref.scores)
    for b in range(B):
        for k in range(4):
            n = int(lens[b, k])
            assert out[b, k, :n].tolist() == ref.tokens[b, k, :n].tolist()
    assert torch.all(scores[:, 1:] >= scores[:, :-1])  # best (lowest) first
    dec_log = narvl.CTCBeamDecoder(labels, beam_width=4, cutoff_top_n=V, log_probs_input=True)
    assert torch.equal(dec_log.decode(lp, seq)[0], out)
    # a sample with no frames: one empty hypothesis scoring +0.0 (not -0.0), the rest inf
    out, scores, steps, lens = dec.decode(lp.exp(), torch.tensor([0, 7, 3]))
    assert lens[0].tolist() == [0] * 4 and scores[0, 0].item() == 0.0
    assert math.copysign(1.0, scores[0, 0].item()) == 1.0 and torch.isinf(scores[0, 1:]).all()


def _ctcdecode_kept(row, cutoff_prob, top_n):
    """How many labels ctcdecode keeps in a frame: a transcription of the loop in its
    decoder_utils.cpp get_pruned_log_probs (cum starts at 0.0, grows by log-sum-exp with each
    label's log-probability, most probable first, and is compared with cutoff_prob itself)."""
    ps = sorted(row, reverse=True)
    if not (math.log(cutoff_prob) < 0.0 if cutoff_prob > 0 else True):
        return min(top_n, len(ps))
    cum, n = 0.0, 0
    for p in ps:
        lp = math.log(p)
        m = max(cum, lp)
        cum = math.log(math.exp(cum - m) + math.exp(lp - m)) + m
        n += 1
        if cum >= cutoff_prob or n >= top_n:
            break
    return n


def test_decoder_cutoff_prob_as_ctcdecode(backend):
    # one frame: every label the frame keeps becomes one hypothesis (the blank the empty one),
    # so the count of finite-score hypotheses is the count of kept labels. The Triton
    # interpreter runs one program per sample, slowly on a CPU: fewer values and samples there.
    V, B = 7, (40 if backend == "cpp" else 10)
    values = ([0.0, 0.05, 0.2, 0.4, 0.5, 0.6, 0.69, 0.9, 0.99, 1.0, 3.0] if backend == "cpp"
              else [0.0, 0.5, 0.69, 0.99])
    labels = list("_abcdef")
    for cutoff_prob in values:
        g = torch.Generator().manual_seed(int(cutoff_prob * 100))
        probs = torch.softmax(torch.randn(B, 1, V, generator=g) * 1.5, -1)
        for top_n in (V, 3):
            dec = narvl.CTCBeamDecoder(labels, beam_width=V, cutoff_top_n=top_n, cutoff_prob=cutoff_prob)
            _, scores, _, _ = dec.decode(probs)
            got = torch.isfinite(scores).sum(1).tolist()
            want = [_ctcdecode_kept(probs[b, 0].tolist(), cutoff_prob, top_n) for b in range(B)]
            assert got == want, (cutoff_prob, top_n, got, want)
        if cutoff_prob >= math.log(2):  # the same as no cut at all, over several frames too
            probs = torch.softmax(torch.randn(4 if backend == "cpp" else 2, 6, V, generator=g), -1)
            cut = narvl.CTCBeamDecoder(labels, beam_width=5, cutoff_prob=cutoff_prob).decode(probs)
            ref = narvl.CTCBeamDecoder(labels, beam_width=5).decode(probs)
            for a, b in zip(cut, ref):
                assert torch.equal(a, b)


def test_decoder_zero_probability_is_flt_min(backend):
    # ctcdecode reads probabilities as log(p + FLT_MIN): a zero-probability label still ranks,
    # with -log(FLT_MIN) = 87.34 added to the score
    probs = torch.tensor([[[0.6, 0.4, 0.0, 0.0]]])
    dec = narvl.CTCBeamDecoder(list("_abc"), beam_width=4, cutoff_top_n=4)
    out, scores, _, lens = dec.decode(probs)
    flt = -math.log(torch.finfo(torch.float32).tiny)
    if backend == "cpp":
        torch.testing.assert_close(scores[0], torch.tensor([-math.log(0.6), -math.log(0.4), flt, flt]),
                                   rtol=1e-4, atol=1e-4)
        assert lens[0].tolist() == [0, 1, 1, 1] and sorted(out[0, 2:, 0].tolist()) == [2, 3]
    else:  # the GPU search's float32 probabilities cannot hold FLT_MIN relative to the best
        from narvl.kernels import decode as kd  # but its top-k reads the zeros as log(FLT_MIN)
        vals, ids, _ = kd.frame_topk(probs, 4, 0)
        assert sorted(ids[0, 0, 2:].tolist()) == [2, 3]
        torch.testing.assert_close(vals[0, 0, 2:], torch.full((2,), -flt), rtol=1e-6, atol=1e-4)
        torch.testing.assert_close(scores[0, :2], torch.tensor([-math.log(0.6), -math.log(0.4)]))
        assert lens[0].tolist() == [0, 1, 0, 0] and torch.isinf(scores[0, 2:]).all()
    # the same with log-probabilities: -inf stays impossible (ctcdecode takes them as given)
    _, scores, _, lens = narvl.CTCBeamDecoder(list("_abc"), beam_width=4, cutoff_top_n=4,
                                              log_probs_input=True).decode(probs.log())
    assert torch.isinf(scores[0, 2:]).all() and lens[0, 2:].tolist() == [0, 0]


@pytest.mark.parametrize("probs, seq, exc, word", [
    (torch.rand(3, 6), None, ValueError, "probs"),
    (torch.rand(2, 5, 4), None, ValueError, "labels"),
    (torch.rand(2, 5, 6), torch.tensor([6, 2]), ValueError, "seq_lens"),
    (torch.rand(2, 5, 6), torch.tensor([-1, 2]), ValueError, "seq_lens"),
    (torch.rand(2, 5, 6), torch.tensor([5, 2, 1]), ValueError, "seq_lens"),
    (torch.rand(2, 5, 6), torch.tensor([5.0, 2.0]), TypeError, "seq_lens"),
    (torch.full((2, 5, 6), float("nan")), None, ValueError, "probs contains NaN"),
    (torch.rand(2, 5, 6).index_put_((torch.tensor([1]), torch.tensor([3]), torch.tensor([4])),
                                    torch.tensor(float("nan"))), None, ValueError, "probs contains NaN"),
    (torch.randint(0, 3, (2, 5, 6)), None, TypeError, "floating"),
])
def test_decoder_bad_input(backend, probs, seq, exc, word):
    dec = narvl.CTCBeamDecoder(list("_abcde"), beam_width=3)
    with pytest.raises(exc, match=word) as err:
        dec.decode(probs, seq)
    assert isinstance(err.value, NaNScoresError) == ("NaN" in word)


def test_decoder_bad_config():
    with pytest.raises(ValueError, match="beam_width"):
        narvl.CTCBeamDecoder(list("_ab"), beam_width=0)
    with pytest.raises(ValueError, match="blank_id"):
        narvl.CTCBeamDecoder(list("_ab"), blank_id=3)
    with pytest.raises(FileNotFoundError, match="lm.arpa"):
        narvl.CTCBeamDecoder(list("_ab"), model_path="lm.arpa")
    with pytest.raises(ValueError, match="blank"):
        narvl.ctc_greedy_decode(torch.randn(2, 3, 4), blank=4)
    with pytest.raises(ValueError, match="nbest"):
        narvl.ctc_prefix_beam_search(torch.randn(2, 3, 4), beam_width=2, nbest=3)
    with pytest.raises(ValueError, match="empty batch"):
        narvl.ctc_greedy_decode(torch.randn(0, 3, 4))


def test_torch_compile_fullgraph_matches_eager(backend):
    lp, L = case(3, 6, 5, lengths=[6, 3, 0])

    def decode(lp):
        res = narvl.ctc_prefix_beam_search(lp, L, beam_width=4, cutoff_top_n=5)
        return narvl.ctc_greedy_decode(lp, L), res.tokens, res.scores

    eager = decode(lp)
    compiled = torch.compile(decode, fullgraph=True, backend="aot_eager")(lp)
    torch.testing.assert_close(compiled, eager)


def test_decode_opcheck(backend):
    lp, L = case(3, 6, 5, lengths=[6, 3, 0])
    torch.library.opcheck(torch.ops.narvl.ctc_greedy_decode.default, (lp, L, 0))
    torch.library.opcheck(torch.ops.narvl.ctc_greedy_decode.default, (lp, L, 0, False))
    torch.library.opcheck(torch.ops.narvl.ctc_beam_search.default,
                          (lp, L, 4, 0, 5, 1.0, 2, 1, 0))
    torch.library.opcheck(torch.ops.narvl.ctc_beam_search.default,
                          (lp * 2 + 3, L, 4, 0, 5, 1.0, 2, 2, 0))


def test_beam_threads_do_not_change_results(monkeypatch):
    monkeypatch.setenv("NARVL_BACKEND", "cpp")
    lp, L = case(9, 12, 30, scale=2.0)
    a = narvl.ctc_prefix_beam_search(lp, L, beam_width=6, num_threads=1)
    b = narvl.ctc_prefix_beam_search(lp, L, beam_width=6, num_threads=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ----------------------------------------------------- the Triton frame top-k (two-pass select)

def _topk_oracle(x, K):
    """Each frame's K largest entries, best first, ties to the lower id (float64 sort)."""
    B, T, V = x.shape
    xs = x.double().reshape(-1, V)
    ids = torch.arange(V, dtype=torch.float64).expand_as(xs)
    order = torch.stack([torch.tensor(sorted(range(V), key=lambda j: (-xs[r, j].item(), j)))
                         for r in range(xs.shape[0])])
    k = min(K, V)
    vals = torch.full((xs.shape[0], K), float("-inf"), dtype=torch.float64)
    idx = torch.full((xs.shape[0], K), -1, dtype=torch.int64)
    vals[:, :k] = xs.gather(1, order[:, :k])
    idx[:, :k] = ids.gather(1, order[:, :k]).long()
    return vals.reshape(B, T, K), idx.reshape(B, T, K)


# ------------------------------------- the C++ frame top-k (lane-maximum bound, then one gather)

def _cpu_topk(row, k, logits=False):
    C = pytest.importorskip("narvl._C", reason="the native build is needed for the C++ top-k")
    return C._row_topk(row, k, logits)


@pytest.mark.parametrize("kind", ["random", "ties", "few-values", "one-lane", "increasing", "decreasing",
                                  "peaked", "neg-inf"])
@pytest.mark.parametrize("V", [1, 5, 127, 128, 129, 1000, 3001, 20011])
@pytest.mark.parametrize("k", [1, 16, 40, 128, 129, 300])
def test_cpu_frame_topk_is_exact(kind, V, k):
    """Exactly the top min(k, V), ties to the lower index, for rows shorter and longer than one
    chunk (up to 20011, a third of OFA's vocabulary), k above and below the lane count (the
    bound's fallback) and layouts that defeat the bound (ties, one lane, monotone rows) or
    overflow the buffer (few values: cut after cut)."""
    g = torch.Generator().manual_seed(V * 1000 + k)
    if kind == "decreasing":
        x = torch.arange(V, 0, -1, dtype=torch.float32).reshape(1, 1, V)
    elif kind == "peaked":  # a trained model's row: a few high scores over a flat floor
        x = torch.randn(1, 1, V, generator=g) * 0.01
        x[0, 0, torch.randint(0, V, (3,), generator=g)] = 10.0
    elif kind == "neg-inf":  # fewer finite values than k: the lowest -inf indices complete it
        x = torch.full((1, 1, V), float("-inf"))
        x[0, 0, torch.randint(0, V, (min(V, 7),), generator=g)] = torch.randn(min(V, 7), generator=g)
    else:
        x = _frames(kind, 1, 1, V, g)
    vals, idx, nan, lse = _cpu_topk(x.reshape(-1), k)
    rv, ri = _topk_oracle(x, min(k, V))
    assert not nan and lse is None
    assert torch.equal(idx, ri.reshape(-1))
    assert torch.equal(vals.double(), rv.reshape(-1))


@pytest.mark.parametrize("k", [40, 129])
def test_cpu_frame_topk_long_rows(k):
    """Rows longer than the top-k's stack buffers (150,001 values: the chunk maxima and the list
    of chunks to reread move to thread-local vectors), exact and sorted, ties to the lower id."""
    g = torch.Generator().manual_seed(k)
    V = 150_001
    for x in (torch.randn(V, generator=g) * 3, torch.randint(0, 50, (V,), generator=g).float()):
        vals, idx, nan, lse = _cpu_topk(x, k, logits=True)
        want = torch.sort(-x.double(), stable=True).indices[:k]
        assert not nan and torch.equal(idx, want) and torch.equal(vals, x[want])
        assert abs(lse - torch.logsumexp(x.double(), 0).item()) <= 1e-5 * max(1.0, abs(lse))


@pytest.mark.parametrize("V", [7, 200, 59458])
def test_cpu_frame_topk_logits_lse_and_nan(V):
    g = torch.Generator().manual_seed(V)
    x = torch.randn(V, generator=g) * 5
    vals, idx, nan, lse = _cpu_topk(x, 40, logits=True)
    assert not nan
    assert abs(lse - torch.logsumexp(x.double(), 0).item()) <= 1e-5 * max(1.0, abs(lse))
    assert torch.equal(idx, torch.sort(-x.double(), stable=True).indices[:40])
    y = x.clone()
    y[V // 2] = float("nan")
    assert _cpu_topk(y, 40)[2] and _cpu_topk(y, 40, logits=True)[2]
    # +inf and -inf without a NaN: the row's sum is NaN, but no NaN is reported
    y = x.clone()
    y[0], y[V - 1] = float("inf"), float("-inf")
    vals, idx, nan, lse = _cpu_topk(y, 3, logits=True)
    assert not nan and idx[0].item() == 0 and lse == float("inf")
    assert _cpu_topk(torch.full((V,), float("-inf")), 3, logits=True)[3] == float("-inf")


def _frames(kind, B, T, V, g):
    if kind == "random":
        return torch.randn(B, T, V, generator=g) * 3
    if kind == "ties":  # every score equal: the K lowest ids
        return torch.zeros(B, T, V)
    if kind == "few-values":  # heavy ties between distinct values
        return torch.randint(0, 3, (B, T, V), generator=g).float()
    if kind == "one-lane":  # the largest scores all sit in a few lanes of every chunk
        v = torch.arange(V, dtype=torch.float32)
        lane = v.remainder(16)
        return (-(lane * 1000.0) + v / V).expand(B, T, V).contiguous()
    if kind == "increasing":
        return torch.arange(V, dtype=torch.float32).expand(B, T, V).contiguous()
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["random", "ties", "few-values", "one-lane", "increasing"])
@pytest.mark.parametrize("V, block", [(5, 16), (37, 16), (203, 16), (203, 32), (1000, 2048)])
def test_frame_topk_is_exact(monkeypatch, kind, V, block):
    """The kernel's two reads (lane maxima, then compaction of the candidates >= the K-th lane
    maximum) give exactly each frame's top K, for one chunk and for many (the adversarial
    layouts put more candidates than the small buffer holds)."""
    from narvl.kernels import decode as kd
    monkeypatch.setattr(kd, "_TOPK_BLOCK", block)
    g = torch.Generator().manual_seed(V + block)
    x = _frames(kind, 2, 3, V, g)
    K = 16
    vals, ids, nanf = kd.frame_topk(x, K, 1)
    rv, ri = _topk_oracle(x, K)
    assert torch.equal(ids.long(), ri)
    assert torch.equal(vals.double(), rv.float().double())
    assert nanf.tolist() == [0] * 6


@pytest.mark.parametrize("input_kind", [0, 2])
def test_frame_topk_probs_and_logits(monkeypatch, input_kind):
    from narvl.kernels import decode as kd
    monkeypatch.setattr(kd, "_TOPK_BLOCK", 16)
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 4, 77, generator=g) * 2
    x = logits.softmax(-1) if input_kind == 0 else logits
    vals, ids, _ = kd.frame_topk(x, 16, input_kind)
    rv, ri = _topk_oracle(logits.double().log_softmax(-1), 16)
    assert torch.equal(ids.long(), ri)
    torch.testing.assert_close(vals.double(), rv, atol=2e-5, rtol=0)


def test_frame_topk_counts_nan(monkeypatch):
    from narvl.kernels import decode as kd
    monkeypatch.setattr(kd, "_TOPK_BLOCK", 16)
    x = torch.randn(2, 3, 50)
    x[0, 1, 7] = float("nan")
    x[1, 2, 40] = float("nan")
    x[1, 2, 3] = float("nan")
    _, _, nanf = kd.frame_topk(x, 16, 1)
    assert nanf.tolist() == [0, 1, 0, 0, 0, 2]


@pytest.mark.parametrize("fn", ["greedy", "beam"])
def test_nan_in_scores_is_reported_by_the_scans(backend, monkeypatch, fn):
    """A single NaN anywhere raises a ValueError naming log_probs (the kernels count NaN in the
    scans they already make); with NARVL_CHECK=0 the call returns without a check."""
    x = torch.randn(2, 4, 9).log_softmax(-1)
    x[1, 3, 5] = float("nan")
    call = ((lambda: narvl.ctc_greedy_decode(x)) if fn == "greedy"
            else (lambda: narvl.ctc_prefix_beam_search(x, beam_width=3)))
    with pytest.raises(NaNScoresError, match="log_probs contains NaN") as err:
        call()
    assert isinstance(err.value, ValueError)
    if backend != "cpp":  # the C++ scans always report NaN
        monkeypatch.setenv("NARVL_CHECK", "0")
        call()


def test_decoder_errors_other_than_nan_pass_through(monkeypatch):
    """Only the kernels' NaN fault becomes "log_probs contains NaN": a bad backend setting or a
    bad num_threads keeps its own error."""
    x = torch.randn(2, 4, 9).log_softmax(-1)
    with pytest.raises(TypeError, match="num_threads"):
        narvl.ctc_prefix_beam_search(x, beam_width=3, num_threads="2")
    with pytest.raises(ValueError, match="num_threads"):
        narvl.ctc_prefix_beam_search(x, beam_width=3, num_threads=-1)
    monkeypatch.setenv("NARVL_BACKEND", "bogus")
    for call in (lambda: narvl.ctc_greedy_decode(x), lambda: narvl.ctc_prefix_beam_search(x, beam_width=3)):
        with pytest.raises(ValueError, match="NARVL_BACKEND") as err:
            call()
        assert "NaN" not in str(err.value) and not isinstance(err.value, NaNScoresError)


def test_gpu_beam_limit(backend):
    """Beam widths above the GPU kernel's maximum get a ValueError naming the limit on the Triton
    route (they would not compile in reasonable time on a GPU); the C++ search takes any width."""
    from narvl.kernels import decode as kd
    from narvl.ops.decode import GPU_MAX_BEAM
    assert GPU_MAX_BEAM == kd.MAX_BEAM
    x = torch.randn(1, 3, 5).log_softmax(-1)
    if backend == "triton":
        with pytest.raises(ValueError, match=f"maximum of {GPU_MAX_BEAM}"):
            narvl.ctc_prefix_beam_search(x, beam_width=GPU_MAX_BEAM + 1)
    else:
        r = narvl.ctc_prefix_beam_search(x, beam_width=100, nbest=1)
        assert r.tokens.shape == (1, 1, 3)
