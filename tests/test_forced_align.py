"""narvl.ctc_forced_align against a brute-force enumeration of every CTC alignment, the float64
reference, torchaudio's own test data and its tie-breaking rule."""
import functools
import itertools

import pytest
import torch

import narvl
from narvl.reference import forced_align_reference

# ----------------------------------------------------------------------------- brute force


def collapse(path, blank):
    out, prev = [], None
    for c in path:
        if c != blank and c != prev:
            out.append(c)
        prev = c
    return out


@functools.lru_cache(maxsize=None)
def all_alignments(T, target, blank):
    """Every frame-label sequence of length T that collapses to ``target`` (labels drawn from
    blank and the target's labels: no other label can appear), with its lattice states
    (blank before label k: 2k; label k: 2k + 1). -> (paths (P, T), states (P, T))."""
    alphabet = sorted({blank, *target})
    paths, states = [], []
    for p in itertools.product(alphabet, repeat=T):
        if collapse(p, blank) != list(target):
            continue
        st, k, prev = [], 0, None
        for c in p:
            if c == blank:
                st.append(2 * k)
            elif c == prev:
                st.append(2 * k - 1)
            else:
                k += 1
                st.append(2 * k - 1)
            prev = c
        paths.append(p)
        states.append(st)
    return torch.tensor(paths, dtype=torch.long).reshape(-1, T), torch.tensor(states).reshape(-1, T)


def brute_force(lp, target, blank):
    """The best alignment of one sample by enumeration: lp (T, C) float64, target a list.
    Among equal best scores, torchaudio's choice: ending in the last label before ending in
    the final blank, then the highest lattice state at each frame going back from the end
    (the largest reversed state sequence). -> (path (T,), score) or None when none exists."""
    T = lp.shape[0]
    paths, states = all_alignments(T, tuple(target), blank)
    if paths.shape[0] == 0:
        return None
    total = lp.gather(1, paths.t()).sum(0)  # (P,)
    best = total.max()
    cand = [i for i in range(paths.shape[0]) if total[i] == best]
    W = 2 * len(target) + 1

    def key(i):
        st = states[i].tolist()
        return (st[-1] != W - 1, st[::-1])
    i = max(cand, key=key)
    return paths[i], float(best)


def random_case(B, T, C, S, blank, gen, dyadic=False):
    """Log-probs (B, T, C) float64 (``dyadic``: multiples of 1/2 in [-3, 0], so sums are exact
    and ties frequent), targets (B, S) without blank and with repeats likely, ragged lengths
    that fit (target length + repeats <= input length)."""
    if dyadic:
        lp = -torch.randint(0, 7, (B, T, C), generator=gen).double() / 2
    else:
        lp = torch.randn(B, T, C, generator=gen, dtype=torch.float64).log_softmax(-1)
    labels = torch.tensor([c for c in range(C) if c != blank])
    targets = labels[torch.randint(0, len(labels), (B, S), generator=gen)]
    il = torch.randint(1, T + 1, (B,), generator=gen)
    tl = torch.zeros(B, dtype=torch.long)
    for b in range(B):
        for L in range(S, -1, -1):
            if int(narvl.ctc_min_frames(targets[b:b + 1], torch.tensor([L]))[0]) <= il[b]:
                tl[b] = int(torch.randint(0, L + 1, (1,), generator=gen))
                break
    return lp, targets, il, tl


def check_against_brute_force(paths, scores, lp, targets, il, tl, blank, exact_path=True):
    B, T, _ = lp.shape
    for b in range(B):
        Tb, L = int(il[b]), int(tl[b])
        want = brute_force(lp[b, :Tb], targets[b, :L].tolist(), blank)
        assert want is not None
        wpath, wscore = want
        got = paths[b, :Tb]
        assert collapse(got.tolist(), blank) == targets[b, :L].tolist()
        assert torch.equal(paths[b, Tb:], torch.full((T - Tb,), blank))
        assert torch.equal(scores[b, Tb:], torch.zeros(T - Tb, dtype=scores.dtype))
        torch.testing.assert_close(scores[b, :Tb].double(), lp[b, :Tb].gather(1, got[:, None])[:, 0])
        tol = 1e-9 if exact_path else 1e-5
        assert abs(float(scores[b, :Tb].double().sum()) - wscore) <= tol * max(1.0, abs(wscore))
        if exact_path:
            assert got.tolist() == wpath.tolist(), (b, got.tolist(), wpath.tolist())


CASES = [  # B, T, C, S, blank
    (6, 7, 4, 3, 0),
    (5, 6, 3, 3, 2),
    (4, 5, 2, 2, 1),  # one label: every target is all repeats
    (3, 7, 4, 2, 3),
    (4, 1, 3, 1, 0),
]


@pytest.mark.parametrize("dyadic", [False, True], ids=["continuous", "ties"])
@pytest.mark.parametrize("case", CASES)
def test_cpp_matches_brute_force(monkeypatch, case, dyadic):
    monkeypatch.setenv("NARVL_BACKEND", "cpp")
    B, T, C, S, blank = case
    gen = torch.Generator().manual_seed(hash((case, dyadic)) % 2**31)
    for dtype in (torch.float64, torch.float32):
        lp, targets, il, tl = random_case(B, T, C, S, blank, gen, dyadic)
        paths, scores = narvl.ctc_forced_align(lp.to(dtype), targets, il, tl, blank=blank)
        assert paths.dtype == torch.long and paths.shape == (B, T)
        assert scores.dtype == dtype and scores.shape == (B, T)
        # float32 may round two continuous near-ties differently from the float64 enumeration
        check_against_brute_force(paths, scores, lp.to(dtype).double(), targets, il, tl, blank,
                                  exact_path=dyadic or dtype == torch.float64)


def test_reference_matches_brute_force():
    for i, (B, T, C, S, blank) in enumerate(CASES):
        gen = torch.Generator().manual_seed(100 + i)
        for dyadic in (False, True):
            lp, targets, il, tl = random_case(B, T, C, S, blank, gen, dyadic)
            paths, scores = forced_align_reference(lp, targets, il, tl, blank)
            check_against_brute_force(paths, scores, lp, targets, il, tl, blank)


TRITON_CASES = [  # small: the interpreter runs every lane op in numpy
    (4, 6, 4, 3, 0),
    (3, 5, 3, 2, 2),
    (2, 4, 2, 2, 1),
]


@pytest.mark.parametrize("dyadic", [False, True], ids=["continuous", "ties"])
@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_matches_brute_force(monkeypatch, case, dyadic):
    monkeypatch.setenv("NARVL_BACKEND", "triton")
    B, T, C, S, blank = case
    gen = torch.Generator().manual_seed(1000 + TRITON_CASES.index(case) * 2 + dyadic)
    lp, targets, il, tl = random_case(B, T, C, S, blank, gen, dyadic)
    paths, scores = narvl.ctc_forced_align(lp, targets, il, tl, blank=blank)
    assert paths.dtype == torch.long and scores.dtype == torch.float64
    check_against_brute_force(paths, scores, lp, targets, il, tl, blank)
    p32, s32 = narvl.ctc_forced_align(lp.float(), targets.int(), il, tl, blank=blank)
    assert s32.dtype == torch.float32
    check_against_brute_force(p32, s32, lp.float().double(), targets, il, tl, blank, exact_path=dyadic)


# ------------------------------------------------------------- torchaudio's data and ties

# torchaudio's own test of forced_align (test/torchaudio_unittest/functional/functional_impl.py,
# test_forced_align): these emission probabilities, blank 5, and these (target, path) pairs.
TA_EMISSION = [
    [0.633766, 0.221185, 0.0917319, 0.0129757, 0.0142857, 0.0260553],
    [0.111121, 0.588392, 0.278779, 0.0055756, 0.00569609, 0.010436],
    [0.0357786, 0.633813, 0.321418, 0.00249248, 0.00272882, 0.0037688],
    [0.0663296, 0.643849, 0.280111, 0.00283995, 0.0035545, 0.00331533],
    [0.458235, 0.396634, 0.123377, 0.00648837, 0.00903441, 0.00623107],
]
TA_CASES = [
    ([0, 1, 1, 0], [0, 1, 5, 1, 0]),
    ([0, 1, 2, 3, 4], [0, 1, 2, 3, 4]),
    ([3, 3, 3], [3, 5, 3, 5, 3]),
    ([0, 1, 2], [0, 1, 1, 1, 2]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tdtype", [torch.int32, torch.int64])
def test_torchaudio_test_data(backend, dtype, tdtype):
    log_probs = torch.tensor(TA_EMISSION, dtype=dtype).log()
    for target, want in TA_CASES:  # one sample at a time, as torchaudio takes them
        paths, scores = narvl.ctc_forced_align(log_probs[None], torch.tensor([target], dtype=tdtype),
                                               blank=5)
        assert paths.tolist() == [want]
        assert torch.equal(scores[0], log_probs[torch.arange(5), torch.tensor(want)])
    # the four as one padded batch, with explicit lengths
    S = max(len(t) for t, _ in TA_CASES)
    targets = torch.tensor([t + [1] * (S - len(t)) for t, _ in TA_CASES], dtype=tdtype)
    paths, _ = narvl.ctc_forced_align(log_probs[None].expand(4, -1, -1), targets,
                                      torch.tensor([5] * 4), torch.tensor([len(t) for t, _ in TA_CASES]),
                                      blank=5)
    assert paths.tolist() == [w for _, w in TA_CASES]


def test_torchaudio_tutorial_shapes(backend):
    """The tutorial's shapes: a (1, 169, 29) emission and the characters of "i had that
    curiosity beside me at this moment" (blank 0, '|' between words)."""
    chars = "-|etaonihsrdlumwcfgypbvk'xjqz"
    transcript = "|".join("i had that curiosity beside me at this moment".split())
    tokens = torch.tensor([[chars.index(c) for c in transcript]])
    lp = torch.randn(1, 169, len(chars)).log_softmax(-1)
    paths, scores = narvl.ctc_forced_align(lp, tokens)
    assert paths.shape == (1, 169) and scores.shape == (1, 169)
    assert collapse(paths[0].tolist(), 0) == tokens[0].tolist()
    want, _ = forced_align_reference(lp, tokens)
    assert torch.equal(paths, want)


# (log_probs (T, C) as lists, target, blank, expected path): equal-score paths, where the rule
# decides. Every entry is a small integer, so all path sums are exact.
TIE_CASES = [
    # all paths equal: end in the last label, then the highest state going back: labels as
    # early as possible, the last one held to the end
    ([[0, 0, 0]] * 5, [1, 2], 0, [1, 2, 2, 2, 2]),
    # ending in the label or in the final blank score the same: the label
    ([[0, 0]] * 2, [1], 0, [1, 1]),
    # the final blank strictly better: it ends in blank, which it also holds on the tied frame
    # before (the blank state is above the label's)
    ([[0, 0], [0, 0], [1, 0]], [1], 0, [1, 0, 0]),
    # at the last frame, label 2 is reached from the blank (s-1) or by the skip from label 1
    # (s-2) with the same score, and staying (s) is worse: s-1, the blank, is kept
    ([[-5, 0, -5], [0, 0, -9], [-5, -5, 0]], [1, 2], 0, [1, 0, 2]),
    # the same with the skip strictly better: the skip
    ([[-5, 0, -5], [-1, 0, -9], [-5, -5, 0]], [1, 2], 0, [1, 1, 2]),
    # a repeat: the blank between the two 1s is forced, the tie is where it goes
    ([[0, 0]] * 4, [1, 1], 0, [1, 0, 1, 1]),
    # blank in the middle of the vocabulary
    ([[0, 0, 0]] * 4, [2], 1, [2, 2, 2, 2]),
]


@pytest.mark.parametrize("case", TIE_CASES)
def test_tie_breaking(backend, case):
    rows, target, blank, want = case
    lp = torch.tensor(rows, dtype=torch.float64)
    paths, _ = narvl.ctc_forced_align(lp[None], torch.tensor([target]), blank=blank)
    assert paths[0].tolist() == want
    assert brute_force(lp, target, blank)[0].tolist() == want
    ref, _ = forced_align_reference(lp[None], torch.tensor([target]), blank=blank)
    assert ref[0].tolist() == want


# ------------------------------------------------------------------- dtypes, batch, no grad


def test_dtypes_and_target_types(backend):
    gen = torch.Generator().manual_seed(5)
    lp, targets, il, tl = random_case(3, 6, 4, 3, 0, gen)
    ref, _ = forced_align_reference(lp, targets, il, tl, 0)
    for tdtype in (torch.int32, torch.int64):
        p64, s64 = narvl.ctc_forced_align(lp, targets.to(tdtype), il.int(), tl.int())
        assert torch.equal(p64, ref) and s64.dtype == torch.float64
    for dtype in (torch.bfloat16, torch.float16):
        low = lp.to(dtype)
        paths, scores = narvl.ctc_forced_align(low, targets, il, tl)
        assert scores.dtype == torch.float32
        want_p, want_s = narvl.ctc_forced_align(low.float(), targets, il, tl)  # exact widening
        assert torch.equal(paths, want_p) and torch.equal(scores, want_s)


def test_batch_equals_one_at_a_time(backend):
    gen = torch.Generator().manual_seed(9)
    lp, targets, il, tl = random_case(5, 7, 4, 3, 2, gen)
    paths, scores = narvl.ctc_forced_align(lp, targets, il, tl, blank=2)
    for b in range(5):
        Tb, L = int(il[b]), int(tl[b])
        p1, s1 = narvl.ctc_forced_align(lp[b:b + 1, :Tb], targets[b:b + 1, :L], blank=2)
        assert torch.equal(paths[b, :Tb], p1[0]) and torch.equal(scores[b, :Tb], s1[0])


def test_lengths_defaults_and_forms(backend):
    lp = torch.randn(2, 5, 4, dtype=torch.float64).log_softmax(-1)
    targets = torch.tensor([[1, 2], [3, 3]])
    a = narvl.ctc_forced_align(lp, targets)
    b = narvl.ctc_forced_align(lp, targets, [5, 5], (2, 2))
    c = narvl.ctc_forced_align(lp, targets, torch.tensor([5, 5], dtype=torch.int32), torch.tensor([2, 2]))
    for x in (b, c):
        assert torch.equal(a[0], x[0]) and torch.equal(a[1], x[1])


def test_empty_batch_and_empty_targets(backend):
    paths, scores = narvl.ctc_forced_align(torch.zeros(0, 4, 3), torch.zeros(0, 2, dtype=torch.long))
    assert paths.shape == (0, 4) and paths.dtype == torch.long
    assert scores.shape == (0, 4) and scores.dtype == torch.float32
    lp = torch.randn(2, 4, 3, dtype=torch.float64).log_softmax(-1)
    # an empty target is all blank; zero frames with an empty target is empty
    paths, scores = narvl.ctc_forced_align(lp, torch.zeros(2, 0, dtype=torch.long), [4, 0], blank=1)
    assert paths.tolist() == [[1] * 4] * 2
    assert torch.equal(scores[0], lp[0, :, 1]) and torch.equal(scores[1], torch.zeros(4, dtype=torch.float64))


def test_outputs_carry_no_gradient(backend):
    lp = torch.randn(2, 5, 4).log_softmax(-1).requires_grad_(True)
    paths, scores = narvl.ctc_forced_align(lp, torch.tensor([[1, 2], [3, 1]]))
    assert not paths.requires_grad and not scores.requires_grad and scores.grad_fn is None


def test_opcheck(backend):
    gen = torch.Generator().manual_seed(3)
    lp, targets, il, tl = random_case(3, 6, 4, 2, 0, gen)
    for x in (lp, lp.float()):
        torch.library.opcheck(torch.ops.narvl.ctc_forced_align.default, (x, targets, il, tl, 0))


def test_torch_compile_fullgraph_matches_eager(backend):
    lp = torch.randn(2, 6, 4).log_softmax(-1)
    targets, il = torch.tensor([[1, 2], [3, 3]]), torch.tensor([6, 5])
    eager = narvl.ctc_forced_align(lp, targets, il)
    compiled = torch.compile(narvl.ctc_forced_align, fullgraph=True, backend="aot_eager")(lp, targets, il)
    assert torch.equal(compiled[0], eager[0]) and torch.equal(compiled[1], eager[1])


# ------------------------------------------------------------------------------ non-finite


def test_nan_and_inf_flow_through(backend):
    gen = torch.Generator().manual_seed(11)
    lp, targets, il, tl = random_case(4, 7, 4, 3, 0, gen)
    lp[0, 2, :] = float("nan")
    lp[1, :, 0] = float("-inf")  # no blank anywhere: only blank-free paths remain
    lp[2] = float("-inf")  # every path -inf
    lp[3, 1, 1] = float("nan")
    paths, scores = narvl.ctc_forced_align(lp, targets, il, tl)
    ref_p, ref_s = forced_align_reference(lp, targets, il, tl)
    assert torch.equal(paths, ref_p)
    torch.testing.assert_close(scores, ref_s, equal_nan=True)
    for b in range(4):  # always a path that collapses to the target
        assert collapse(paths[b, :int(il[b])].tolist(), 0) == targets[b, :int(tl[b])].tolist()
    assert torch.isnan(scores[0, 2]) or int(il[0]) <= 2


def test_every_path_minus_inf_or_nan_is_still_a_path(backend):
    """States that cannot be reached are -inf as well: when every candidate is -inf (or NaN)
    the back-pointers stay on the lattice."""
    for fill in (float("-inf"), float("nan")):
        lp = torch.full((2, 6, 4), fill, dtype=torch.float64)
        targets = torch.tensor([[1, 2, 2], [3, 1, 3]])
        paths, scores = narvl.ctc_forced_align(lp, targets, [6, 4], [3, 3])
        ref_p, _ = forced_align_reference(lp, targets, [6, 4], [3, 3])
        assert torch.equal(paths, ref_p)
        assert collapse(paths[0].tolist(), 0) == [1, 2, 2]
        assert collapse(paths[1, :4].tolist(), 0) == [3, 1, 3]
        assert torch.isnan(scores[:, :4]).all() or torch.isinf(scores[:, :4]).all()


# ----------------------------------------------------------------------------------- errors

LP = torch.randn(2, 5, 4).log_softmax(-1)
TG = torch.tensor([[1, 2], [3, 3]])

BAD = [  # (kwargs overriding the good call, exception, words the message must contain)
    (dict(log_probs=[[0.0]]), TypeError, "log_probs"),
    (dict(log_probs=torch.zeros(2, 5, 4, dtype=torch.long)), TypeError, "log_probs"),
    (dict(log_probs=LP[0]), ValueError, "log_probs"),
    (dict(targets=[[1, 2]]), TypeError, "targets"),
    (dict(targets=TG.float()), TypeError, "targets"),
    (dict(targets=TG.to(torch.int16)), TypeError, "targets"),
    (dict(targets=TG[0]), ValueError, "targets"),
    (dict(targets=TG[:1]), ValueError, "targets"),
    (dict(targets=TG.to("meta")), ValueError, "targets"),
    (dict(blank=4), ValueError, "blank"),
    (dict(blank=-1), ValueError, "blank"),
    (dict(blank=1.0), TypeError, "blank"),
    (dict(input_lengths=torch.tensor([5.0, 5.0])), TypeError, "input_lengths"),
    (dict(input_lengths=torch.tensor([5, 5, 5])), ValueError, "input_lengths"),
    (dict(input_lengths=[6, 5]), ValueError, "input_lengths[0] = 6"),
    (dict(input_lengths=[5, -1]), ValueError, "input_lengths[1] = -1"),
    (dict(target_lengths=[2, 3]), ValueError, "target_lengths[1] = 3"),
    (dict(target_lengths="2"), TypeError, "target_lengths"),
    (dict(targets=torch.tensor([[1, 0], [3, 3]])), ValueError, "targets[0, 1] equals the blank"),
    (dict(targets=torch.tensor([[1, 2], [4, 3]])), ValueError, "targets[1, 0] = 4 is outside"),
    (dict(targets=torch.tensor([[1, 2], [3, -2]])), ValueError, "targets[1, 1] = -2 is outside"),
    # sample 1: [3, 3] needs 3 frames
    (dict(input_lengths=[5, 2]), ValueError, "sample 1"),
    (dict(targets=torch.tensor([[1, 1, 1], [2, 2, 2]]), input_lengths=[5, 4]), ValueError, "sample 1"),
]


@pytest.mark.parametrize("bad", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input(backend, bad):
    over, exc, words = bad
    kw = dict(log_probs=LP, targets=TG, input_lengths=None, target_lengths=None, blank=0)
    kw.update(over)
    with pytest.raises(exc, match=words.replace("[", r"\[").replace("]", r"\]")):
        narvl.ctc_forced_align(**kw)


def test_padding_is_not_checked(backend):
    # labels past target_lengths may be anything, blank and out of range included
    targets = torch.tensor([[1, 2, 0], [3, 9, -1]])
    paths, _ = narvl.ctc_forced_align(LP, targets, target_lengths=[2, 1])
    assert collapse(paths[0].tolist(), 0) == [1, 2] and collapse(paths[1].tolist(), 0) == [3]


def test_unchecked_infeasible_sample_has_no_path(backend, monkeypatch):
    """NARVL_CHECK=0 skips the value checks: a target that cannot fit comes back all blank with
    -inf scores on its frames, and the other samples are unaffected."""
    monkeypatch.setenv("NARVL_CHECK", "0")
    paths, scores = narvl.ctc_forced_align(LP, TG, input_lengths=[5, 2])
    assert paths[1].tolist() == [0] * 5
    assert scores[1, :2].tolist() == [float("-inf")] * 2 and scores[1, 2:].tolist() == [0.0] * 3
    ref, _ = forced_align_reference(LP[:1], TG[:1])
    assert torch.equal(paths[0], ref[0])


def test_nan_on_a_state_not_yet_reachable_stays_out():
    """Label 3 cannot be reached at frame 1 (labels 1 and 2 come first); a NaN there must not
    reach the path through that state's later frames (an unwindowed max would keep it: every
    comparison with NaN is false)."""
    lp = torch.zeros(1, 4, 4, dtype=torch.float64)
    lp[0, 1, 3] = float("nan")
    lp[0, 2, 3] = -1.0  # the blank before label 3 is better at frame 2
    lp[0, 3, 0] = -5.0  # and the path ends in label 3
    targets = torch.tensor([[1, 2, 3]])
    want = [1, 2, 0, 3]
    assert forced_align_reference(lp, targets)[0][0].tolist() == want
    for name in ("cpp", "triton"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("NARVL_BACKEND", name)
            paths, scores = narvl.ctc_forced_align(lp, targets)
        assert paths[0].tolist() == want, name
        assert not torch.isnan(scores).any()
