"""GPU calls without host stalls, checked without a GPU.

* No synchronisation: each op's eager Python path, forward and backward, with value checks on
  (the default), runs on meta tensors (the CUDA route, with the ops' fake kernels) with
  ``.item()``, ``.tolist()``, ``bool()``, ``int()`` and ``float()`` of a tensor made to raise:
  on CUDA, every value check is asserted on the device.
* Launch counts: the same paths on CPU tensors routed to the Triton kernels (interpreter), with
  the checks taking their device route, count Triton launches plus ATen ops that compute or fill
  (each one launch on a GPU; ``bench/launches.py``).
* The device route of the checks still catches every fault (the interpreter reads what a GPU
  asserts).
"""
import os
import sys

import pytest
import torch

import narvl
import narvl.checks

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from launches import LaunchCounter  # noqa: E402

pytest.importorskip("triton")

B, N, V, S = 3, 7, 11, 4


def _no_host_reads(monkeypatch):
    def refuse(self, *a, **k):
        raise AssertionError("a host read of a tensor's value (a synchronisation on CUDA)")
    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


def _calls(dev, grad=True):
    """name -> a call of each op's public path (forward, and backward where it has one and
    ``grad``). The inputs, and the gradients that start each backward, are made here, outside
    the calls."""
    def t(*shape):
        return torch.randn(*shape, device=dev)

    def lengths(*v):
        return torch.tensor(v, device=dev)

    tg = torch.randint(1, V - 1, (B, S), device=dev)
    tl = lengths(4, 2, 3)
    x = t(B, N, V).requires_grad_(grad)
    w = torch.rand(B, device=dev)
    one, ones = torch.ones((), device=dev), torch.ones(B, device=dev)

    def qctc(seed=one, **kw):
        x.grad = None
        loss = narvl.qctc_loss(x, tg, tl, blank=V - 1, **kw)
        if grad:
            loss.backward(seed)

    lp = t(N, B, V).log_softmax(-1).detach().requires_grad_(grad)
    il = lengths(7, 6, 5)

    def ctc():
        lp.grad = None
        loss = narvl.ctc_loss(lp, tg, il, tl, blank=V - 1)
        if grad:
            loss.backward(one)

    q, k, v = t(2, 2, 5, 16).requires_grad_(grad), t(2, 2, 9, 16), t(2, 2, 9, 16)
    kl, gout = lengths(9, 4), t(2, 2, 5, 16)

    def attn(lens=True, bwd=False):
        q.grad = None
        with torch.set_grad_enabled(bwd):
            out = narvl.query_attention(q, k, v, key_lengths=kl if lens else None)
        if bwd and grad:
            out.backward(gout)

    sc = t(B, N, V).log_softmax(-1)
    fl = lengths(7, 5, 6)
    ql = lengths(7, 5, 6)
    return {
        "qctc": qctc,
        "qctc smoothing+weights": lambda: qctc(label_smoothing=0.1, weights=w),
        "qctc none + query_lengths": lambda: qctc(ones, reduction="none", query_lengths=ql),
        "ctc": ctc,
        "attention": lambda: attn(lens=False),
        "attention key_lengths": attn,
        "attention fwd+bwd": lambda: attn(bwd=True),
        "greedy": lambda: narvl.ctc_greedy_decode(sc, blank=0),
        "greedy lengths": lambda: narvl.ctc_greedy_decode(sc, fl, blank=0),
        "beam": lambda: narvl.ctc_prefix_beam_search(sc, beam_width=4, blank=0),
    }


@pytest.mark.parametrize("name", list(_calls("cpu")))
def test_no_host_sync_on_device_tensors(name, monkeypatch):
    """Forward and backward on meta tensors, which take the CUDA route (their kernels are the
    ops' fake ones); fake CUDA tensors cannot run autograd on this CPU build of torch."""
    monkeypatch.setenv("NARVL_CHECK", "1")
    monkeypatch.delenv("NARVL_BACKEND", raising=False)
    call = _calls("meta")[name]
    _no_host_reads(monkeypatch)
    call()


def test_the_no_sync_test_can_fail(monkeypatch):
    """The same harness catches a host read: NARVL_CHECK=strict reads the values on purpose."""
    monkeypatch.setenv("NARVL_CHECK", "strict")
    call = _calls("meta")["greedy lengths"]
    _no_host_reads(monkeypatch)
    with pytest.raises(AssertionError, match="host read"):
        call()


# Launches per call on a GPU (checks on, their device route; the test's shapes need no key
# split). Q-CTC: rows, lattice, reduction (+ checks), then lattice with posteriors and gradient
# rows. Attention: the key_lengths check, forward, then dO/delta, dK/dV, dQ.
LIMITS = {
    "qctc": 5, "qctc smoothing+weights": 5, "qctc none + query_lengths": 5, "ctc": 5,
    "attention": 1, "attention key_lengths": 2, "attention fwd+bwd": 5, "greedy": 2,
    "greedy lengths": 3, "beam": 4,
}


@pytest.fixture
def device_route(monkeypatch):
    """CPU tensors on the Triton kernels (interpreter), value checks on their device route."""
    monkeypatch.setenv("NARVL_BACKEND", "triton")
    monkeypatch.setenv("NARVL_CHECK", "1")
    monkeypatch.setattr(narvl.checks, "on_host", lambda device: False)


def _count(call):
    call()  # warm-up
    with LaunchCounter() as c:
        call()
    return c


@pytest.mark.parametrize("name", list(_calls("cpu")))
def test_launches_per_call(name, device_route):
    c = _count(_calls("cpu")[name])
    assert c.syncs(outside_kernels=True) == [], c.events
    if name in LIMITS:
        assert len(c.launches()) <= LIMITS[name], c.launches()


def test_qctc_launch_sequence(device_route):
    x = torch.randn(B, N, V, requires_grad=True)
    tg = torch.randint(1, V - 1, (B, S))
    tl = torch.tensor([4, 2, 3])
    narvl.qctc_loss(x, tg, tl, blank=V - 1).backward()
    x.grad = None
    with LaunchCounter() as c:
        loss = narvl.qctc_loss(x, tg, tl, blank=V - 1)
        seed = torch.ones_like(loss)
        loss.backward(seed)
    assert [n for _, n in c.launches()] == [
        "_row_kernel", "_lattice_kernel", "_qctc_reduce_kernel", "ones_like", "_lattice_kernel",
        "_qctc_grad_kernel"]


def test_ctc_loss_launch_sequence(device_route):
    """narvl.ctc_loss as Q-CTC: label columns, lattice, reduction (+ checks), then lattice with
    posteriors and gradient rows."""
    lp = torch.randn(N, B, V).log_softmax(-1).requires_grad_(True)
    tg = torch.randint(1, V - 1, (B, S))
    il, tl = torch.tensor([7, 6, 5]), torch.tensor([4, 2, 3])
    narvl.ctc_loss(lp, tg, il, tl, blank=V - 1).backward()
    lp.grad = None
    with LaunchCounter() as c:
        loss = narvl.ctc_loss(lp, tg, il, tl, blank=V - 1)
        seed = torch.ones_like(loss)
        loss.backward(seed)
    assert [n for _, n in c.launches()] == [
        "_row_kernel", "_lattice_kernel", "_qctc_reduce_kernel", "ones_like", "_lattice_kernel",
        "_ctc_grad_kernel"]


@pytest.mark.parametrize("fault,match", [
    ("target_lengths", "target_lengths"), ("query_lengths", "query_lengths"),
    ("label", "targets.*outside"), ("blank", "targets.*blank")])
def test_device_route_of_qctc_checks_catches_faults(fault, match, device_route):
    x = torch.randn(B, N, V)
    tg = torch.randint(1, V - 1, (B, S))
    tl = torch.tensor([4, 2, 3])
    ql = None
    if fault == "target_lengths":
        tl = torch.tensor([4, 5, 3])
    elif fault == "query_lengths":
        ql = torch.tensor([7, 8, 7])
    elif fault == "label":
        tg[1, 0] = V + 3
    else:
        tg[2, 2] = V - 1
    with pytest.raises(ValueError, match=match):
        narvl.qctc_loss(x, tg, tl, blank=V - 1, query_lengths=ql)


def test_device_route_of_range_checks_catches_faults(device_route):
    q, k = torch.randn(2, 2, 5, 16), torch.randn(2, 2, 9, 16)
    with pytest.raises(ValueError, match="key_lengths"):
        narvl.query_attention(q, k, k, key_lengths=torch.tensor([9, 10]))
    with pytest.raises(ValueError, match="lengths"):
        narvl.ctc_greedy_decode(torch.randn(B, N, V), torch.tensor([7, 8, 1]))
    sc = torch.randn(B, N, V)
    sc[1, 3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        narvl.ctc_greedy_decode(sc)
    lp = torch.randn(N, B, V).log_softmax(-1)
    ok = dict(targets=torch.ones(B, S, dtype=torch.long), input_lengths=torch.tensor([7, 6, 7]),
              target_lengths=torch.tensor([2, 2, 2]))
    for name, bad, match in (("input_lengths", torch.tensor([7, 9, 7]), "input_lengths"),
                             ("target_lengths", torch.tensor([2, 5, 2]), "target_lengths"),
                             ("targets", torch.tensor([[1, 1, 1, 1], [1, V, 1, 1], [1, 1, 1, 1]]), "targets.*outside"),
                             ("targets", torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]]), "targets.*blank")):
        with pytest.raises(ValueError, match=match):  # ctc_loss's lattice flags them, the reduction asserts
            narvl.ctc_loss(lp, **{**ok, name: bad}, blank=0)


def test_out_of_range_values_read_nothing_outside_the_tensors(monkeypatch):
    """With checks off, the Triton kernels clamp lengths and skip bad labels (a GPU would read
    outside the tensors otherwise): the loss of the bad samples is inf (0 under zero_infinity),
    and the good ones keep their value."""
    monkeypatch.setenv("NARVL_BACKEND", "triton")
    monkeypatch.setenv("NARVL_CHECK", "0")
    x = torch.randn(B, N, V)
    tg = torch.randint(1, V - 1, (B, S))
    tl = torch.tensor([4, 2, 3])
    good = narvl.qctc_loss(x, tg, tl, blank=V - 1, reduction="none", zero_infinity=False)
    tg_bad = tg.clone()
    tg_bad[1, 0] = 10 ** 6
    bad = narvl.qctc_loss(x, tg_bad, torch.tensor([4, 2, 3]), blank=V - 1, reduction="none",
                          zero_infinity=False, query_lengths=torch.tensor([7, 7, 7]))
    assert torch.isinf(bad[1]) and torch.allclose(bad[[0, 2]], good[[0, 2]])
    far = narvl.qctc_loss(x, tg, torch.tensor([4, 2, 3]), blank=V - 1, reduction="none",
                          query_lengths=torch.tensor([7, 10 ** 6, 7]), zero_infinity=False)
    assert torch.isfinite(far).all()
