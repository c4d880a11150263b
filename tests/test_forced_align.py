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
