"""CTC / Q-CTC kernels against the float64 reference and torch, on odd shapes."""
import pytest
import torch
import torch.nn.functional as F

import narvl
from narvl.reference import ctc_loss_reference, qctc_loss_reference

TOL = {torch.float64: (1e-9, 1e-9), torch.float32: (2e-5, 2e-5),
       torch.bfloat16: (3e-2, 2e-2), torch.float16: (5e-3, 5e-3)}


def make_case(B, N, V, S, blank, lengths=None, query_lengths=None, dtype=torch.float32, scale=2.0):
    logits = (torch.randn(B, N, V, dtype=torch.float64) * scale).to(dtype)
    labels = [v for v in range(V) if v != blank]
    targets = torch.tensor(labels)[torch.randint(0, len(labels), (B, S))]
    if lengths is None:
        lengths = torch.randint(0, S + 1, (B,))
    tl = torch.as_tensor(lengths)
    ql = None if query_lengths is None else torch.as_tensor(query_lengths)
    return logits, targets, tl, ql


def grads(fn, x):
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x)
    (g,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), g


SHAPES = [  # B, N, V, S, blank
    (3, 7, 11, 4, 10),
    (5, 20, 37, 9, 0),
    (2, 6, 2, 3, 1),  # V = 2
    (4, 1, 5, 1, 4),  # N = 1
    (1, 13, 97, 6, 96),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_qctc_matches_reference(backend, shape, dtype, reduction):
    B, N, V, S, blank = shape
    logits, targets, tl, _ = make_case(B, N, V, S, blank, dtype=dtype)
    ql = torch.randint(max(1, N // 2), N + 1, (B,))
    w = torch.rand(B) + 0.5
    kw = dict(query_lengths=ql, blank=blank, reduction=reduction, label_smoothing=0.1, weights=w)
    got, g = grads(lambda x: narvl.qctc_loss(x, targets, tl, **kw), logits)
    want, gw = grads(lambda x: qctc_loss_reference(x, targets, tl, **kw), logits)
    rtol, atol = TOL[dtype]
    assert g.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)
    torch.testing.assert_close(g.double(), gw.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_qctc_low_precision(backend, dtype):
    logits, targets, tl, _ = make_case(4, 9, 53, 5, 52, dtype=dtype)
    kw = dict(blank=52, label_smoothing=0.1)
    got, g = grads(lambda x: narvl.qctc_loss(x, targets, tl, **kw), logits)
    want, gw = grads(lambda x: qctc_loss_reference(x, targets, tl, **kw), logits)
    assert got.dtype == torch.float32 and g.dtype == dtype
    # the loss is computed from the low-precision logits exactly (fp32 accumulation)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(g.double(), gw.double(), rtol=rtol, atol=atol)


def test_qctc_equals_fairseq_style_torch_composition(backend):
    """NARVL's training loss as the authors compute it: log_softmax + F.ctc_loss + smoothing."""
    B, N, V = 6, 20, 41
    blank = V - 1
    logits, targets, tl, _ = make_case(B, N, V, 8, blank, lengths=torch.randint(1, 9, (B,)))
    eps = 0.1

    def peer(x):
        lp = torch.log_softmax(x.float(), -1)
        ctc = F.ctc_loss(lp.transpose(0, 1), targets, torch.full((B,), N), tl, blank=blank,
                         reduction="mean", zero_infinity=True)
        return (1 - eps) * ctc - eps * lp.mean()

    got, g = grads(lambda x: narvl.qctc_loss(x, targets, tl, blank=blank, label_smoothing=eps), logits)
    want, gw = grads(peer, logits)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, gw, rtol=1e-5, atol=1e-6)


def test_edge_cases(backend):
    V, blank, N = 6, 5, 4
    logits = torch.randn(5, N, V, dtype=torch.float64)
    targets = torch.tensor([[1, 1, 0, 0],   # repeat: needs a blank between, 3 frames
                            [0, 0, 0, 0],   # empty target
                            [1, 2, 1, 2],   # L = N, no room for blank: feasible
                            [3, 3, 3, 0],   # 3 repeats need 5 frames > N: infeasible
                            [2, 2, 0, 0]])
    tl = torch.tensor([2, 0, 4, 3, 2])
    ql = torch.tensor([4, 4, 4, 4, 2])     # the last: 2 repeats in 2 frames: infeasible
    nll = narvl.qctc_loss(logits, targets, tl, query_lengths=ql, blank=blank, reduction="none",
                          zero_infinity=False)
    ref = qctc_loss_reference(logits, targets, tl, ql, blank, "none", False)
    assert torch.isinf(nll[3]) and torch.isinf(nll[4])
    torch.testing.assert_close(nll[:3], ref[:3])
    # zero_infinity: infeasible samples give 0 and no gradient
    x = logits.clone().requires_grad_(True)
    loss = narvl.qctc_loss(x, targets, tl, query_lengths=ql, blank=blank, reduction="none")
    assert loss[3] == 0 and loss[4] == 0
    loss.sum().backward()
    assert torch.all(x.grad[3:] == 0)
    assert torch.all(x.grad[:3].isfinite()) and x.grad[:3].abs().sum() > 0
    # query slots beyond N_b get no gradient
    x1 = logits[:1].clone().requires_grad_(True)
    narvl.qctc_loss(x1, targets[:1], tl[:1], query_lengths=torch.tensor([3]), blank=blank).backward()
    assert torch.all(x1.grad[0, 3] == 0) and x1.grad[0, :3].abs().sum() > 0


def test_duplicate_labels_share_their_column(backend):
    """The backward sums the posteriors of repeated labels (a a, a b a) into one column."""
    B, N, V = 4, 9, 7
    logits = torch.randn(B, N, V, dtype=torch.float64)
    targets = torch.tensor([[2, 3, 2, 2], [1, 1, 1, 0], [4, 5, 6, 4], [3, 0, 0, 0]])
    tl = torch.tensor([4, 3, 4, 1])
    ql = torch.tensor([9, 7, 8, 9])
    kw = dict(query_lengths=ql, blank=0, reduction="sum")
    got, g = grads(lambda x: narvl.qctc_loss(x, targets, tl, **kw), logits)
    want, gw = grads(lambda x: qctc_loss_reference(x, targets, tl, **kw), logits)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g, gw)


@pytest.mark.parametrize("blank", [0, 8])
def test_gradcheck_float64(backend, blank):
    logits, targets, tl, _ = make_case(3, 6, 9, 3, blank, lengths=torch.tensor([3, 1, 2]))
    ql = torch.tensor([6, 4, 5])
    w = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    x = logits.double().requires_grad_(True)

    def f(x):
        return narvl.qctc_loss(x, targets, tl, query_lengths=ql, blank=blank, reduction="none",
                               label_smoothing=0.2, weights=w)

    # the interpreted Triton kernels are slow: random-projection (fast mode) gradcheck there
    fast = backend == "triton"
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6, fast_mode=fast)
    lp = torch.log_softmax(logits.double(), -1).transpose(0, 1).contiguous().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda y: narvl.ctc_loss(y, targets, ql, tl, blank=blank, reduction="sum"), (lp,),
        eps=1e-6, atol=1e-6, fast_mode=fast)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("zero_infinity", [False, True])
def test_ctc_loss_matches_torch(backend, reduction, zero_infinity):
    T, B, C = 12, 5, 13
    logits = torch.randn(T, B, C, dtype=torch.float64)
    targets = torch.randint(1, C, (B, 6))
    tl = torch.tensor([6, 0, 3, 5, 6])
    il = torch.tensor([12, 10, 4, 12, 5])  # the last is infeasible
    got, g = grads(lambda x: narvl.ctc_loss(x.log_softmax(-1), targets, il, tl, 0, reduction,
                                            zero_infinity), logits)
    want, gw = grads(lambda x: F.ctc_loss(x.log_softmax(-1), targets, il, tl, 0, reduction,
                                          zero_infinity), logits)
    torch.testing.assert_close(got, want)
    if zero_infinity or reduction == "none":
        finite = slice(None) if zero_infinity else slice(0, 4)
        torch.testing.assert_close(g[:, finite], gw[:, finite])
    ref = ctc_loss_reference(logits.log_softmax(-1), targets, il, tl, 0, reduction, zero_infinity)
    torch.testing.assert_close(got, ref)


def test_ctc_loss_input_forms(backend):
    T, B, C = 10, 3, 7
    lp = torch.randn(T, B, C).log_softmax(-1)
    tl = (3, 1, 2)
    padded = torch.tensor([[1, 2, 3], [4, 0, 0], [5, 5, 0]])
    concat = torch.tensor([1, 2, 3, 4, 5, 5])
    il = (10, 8, 9)
    want = F.ctc_loss(lp, padded, il, tl, reduction="none")
    torch.testing.assert_close(narvl.ctc_loss(lp, padded, il, tl, reduction="none"), want)
    torch.testing.assert_close(narvl.ctc_loss(lp, concat, list(il), list(tl), reduction="none"), want)
    one = narvl.ctc_loss(lp[:, 0], padded[0], 10, 3, reduction="none")
    torch.testing.assert_close(one, F.ctc_loss(lp[:, 0], padded[0], (10,), (3,), reduction="none"))
    assert one.dim() == 0
    m = narvl.nn.CTCLoss(blank=0, zero_infinity=True)
    torch.testing.assert_close(m(lp, padded, il, tl), torch.nn.CTCLoss(zero_infinity=True)(lp, padded, il, tl))


def test_qctc_module_and_weights(backend):
    logits, targets, tl, _ = make_case(4, 6, 9, 3, 8, lengths=torch.tensor([3, 2, 1, 0]))
    w = torch.tensor([1.0, 0.9, 0.6, 0.3])
    m = narvl.nn.QCTCLoss(blank=8, label_smoothing=0.1)
    got = m(logits, targets, tl, weights=w)
    want = qctc_loss_reference(logits, targets, tl, blank=8, label_smoothing=0.1, weights=w)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    per = narvl.qctc_loss(logits, targets, tl, blank=8, reduction="none", weights=w)
    unw = narvl.qctc_loss(logits, targets, tl, blank=8, reduction="none")
    torch.testing.assert_close(per, unw * w)


def test_noncontiguous_inputs(backend):
    logits, targets, tl, _ = make_case(3, 8, 21, 4, 20)
    xt = logits.transpose(0, 1).contiguous().transpose(0, 1)  # (B, N, V) view with odd strides
    assert not xt.is_contiguous()
    torch.testing.assert_close(narvl.qctc_loss(xt, targets, tl, blank=20),
                               narvl.qctc_loss(logits, targets, tl, blank=20))


def test_cpp_deterministic_across_threads(monkeypatch):
    monkeypatch.setenv("NARVL_BACKEND", "cpp")
    logits, targets, tl, _ = make_case(6, 10, 3001, 5, 3000)
    threads = torch.get_num_threads()
    out = []
    try:
        for n in (1, 2, 2, 1):
            torch.set_num_threads(n)
            out.append(grads(lambda x: narvl.qctc_loss(x, targets, tl, blank=3000, label_smoothing=0.1),
                             logits))
    finally:
        torch.set_num_threads(threads)
    for loss, g in out[1:]:
        assert torch.equal(loss, out[0][0]) and torch.equal(g, out[0][1])


def test_cpp_large_rows_match_reference(monkeypatch):
    """Rows longer than the vector tail logic, odd V, extreme logits (exp underflow).

    The lattice runs in the input precision (fp32 here, as torch's CTC does), so the bound on
    the gradient error is twice the error of torch's own fp32 log_softmax + F.ctc_loss."""
    monkeypatch.setenv("NARVL_BACKEND", "cpp")
    B, N, V = 2, 5, 4999
    logits, targets, tl, _ = make_case(B, N, V, 3, V - 1, scale=30.0)
    kw = dict(blank=V - 1, reduction="sum")
    got, g = grads(lambda x: narvl.qctc_loss(x, targets, tl, **kw), logits)
    want, gw = grads(lambda x: qctc_loss_reference(x.double(), targets, tl, **kw), logits.double())

    def peer(x):
        lp = torch.log_softmax(x, -1).transpose(0, 1)
        return F.ctc_loss(lp, targets, torch.full((B,), N), tl, blank=V - 1, reduction="sum",
                          zero_infinity=True)

    _, gt = grads(peer, logits)
    torch_err = (gt.double() - gw).abs().max().item()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    assert (g.double() - gw).abs().max().item() <= max(2 * torch_err, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_ops(backend, dtype):
    """The registered ops on every backend (Triton too: NARVL_BACKEND=triton reaches the Triton
    kernels through the same ops), against their fake kernels, autograd and schemas."""
    logits, targets, tl, _ = make_case(3, 5, 7, 2, 6, lengths=torch.tensor([2, 1, 0]))
    logits = logits.to(dtype)
    ql = torch.tensor([5, 4, 3])
    x = logits.clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.narvl.qctc_fwd.default, (x, targets, tl, ql, 6))
    nll, sm, lse, post = torch.ops.narvl.qctc_fwd(logits, targets, tl, ql, 6)
    g = torch.rand(3, dtype=nll.dtype)
    torch.library.opcheck(torch.ops.narvl.qctc_bwd.default,
                          (g, g, logits, lse, post, targets, tl, ql, 6))
    lp = torch.randn(5, 3, 7, dtype=dtype).log_softmax(-1)
    torch.library.opcheck(torch.ops.narvl.ctc_fwd.default,
                          (lp.clone().requires_grad_(True), targets, ql, tl, 6))
    nll, post = torch.ops.narvl.ctc_fwd(lp, targets, ql, tl, 6)
    torch.library.opcheck(torch.ops.narvl.ctc_bwd.default, (g, lp, post, targets, ql, tl, 6))
    # the whole loss as one op (qctc_loss's route), with and without query lengths and weights
    w = torch.tensor([1.0, 0.5, 2.0], dtype=dtype)
    for q_, w_, red, eps in ((ql, w, "none", 0.1), (None, None, "mean", 0.0), (None, w, "sum", 0.2)):
        args = (x, targets, tl, q_, w_, 6, red, True, eps, False)
        torch.library.opcheck(torch.ops.narvl.qctc_loss_fwd.default, args)
        loss, nll, lse, em = torch.ops.narvl.qctc_loss_fwd(logits, *args[1:])
        gl = torch.rand(loss.shape, dtype=loss.dtype)
        torch.library.opcheck(torch.ops.narvl.qctc_loss_bwd.default,
                              (gl, logits, nll, lse, em, targets, tl, q_, w_, 6, red, True, eps))
    # ctc_loss's route: the whole loss as one op, each reduction, zero_infinity on and off
    for red, zi in (("none", False), ("mean", True), ("sum", False)):
        args = (lp.clone().requires_grad_(True), targets, ql, tl, 6, red, zi, False)
        torch.library.opcheck(torch.ops.narvl.ctc_loss_fwd.default, args)
        loss, nll, em = torch.ops.narvl.ctc_loss_fwd(lp, *args[1:])
        gl = torch.rand(loss.shape, dtype=loss.dtype)
        torch.library.opcheck(torch.ops.narvl.ctc_loss_bwd.default,
                              (gl, lp, nll, em, targets, ql, tl, 6, red, zi))
    torch.library.opcheck(torch.ops.narvl.assert_in_range.default, (ql, 0, 5, "query_lengths"))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradcheck_float64_reductions(backend, reduction):
    """The fused op's reductions, with default query lengths and an infeasible sample (zeroed)."""
    logits, targets, tl, _ = make_case(3, 4, 7, 3, 0, lengths=torch.tensor([3, 1, 2]))
    targets[0] = torch.tensor([2, 2, 2])  # needs 5 frames: infeasible in 4
    x = logits.double().requires_grad_(True)
    w = torch.tensor([0.5, 1.5, 1.0], dtype=torch.float64)

    def f(x):
        return narvl.qctc_loss(x, targets, tl, blank=0, reduction=reduction, label_smoothing=0.1,
                               weights=w, zero_infinity=True)

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6, fast_mode=backend == "triton")
    want = qctc_loss_reference(x.detach(), targets, tl, blank=0, reduction=reduction,
                               label_smoothing=0.1, weights=w, zero_infinity=True)
    torch.testing.assert_close(f(x).detach(), want)
    # ctc_loss's fused op, the same reduction and infeasible sample
    lp = torch.log_softmax(logits.double(), -1).transpose(0, 1).contiguous().requires_grad_(True)
    il = torch.tensor([4, 4, 3])
    assert torch.autograd.gradcheck(
        lambda y: narvl.ctc_loss(y, targets, il, tl, blank=0, reduction=reduction, zero_infinity=True),
        (lp,), eps=1e-6, atol=1e-6, fast_mode=backend == "triton")


def test_torch_compile_fullgraph_matches_eager(backend):
    logits, targets, tl, _ = make_case(3, 6, 17, 3, 16, lengths=torch.tensor([3, 2, 1]))

    def step(x):
        return narvl.qctc_loss(x, targets, tl, blank=16, label_smoothing=0.1)

    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    eager = step(x1)
    eager.backward()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x2)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(x2.grad, x1.grad)


def test_reference_is_not_a_backend(monkeypatch):
    """The float64 references are test oracles: NARVL_BACKEND=reference is refused by name."""
    monkeypatch.setenv("NARVL_BACKEND", "reference")
    logits, targets, tl, _ = make_case(2, 5, 7, 2, 6)
    with pytest.raises(ValueError, match="NARVL_BACKEND=reference.*narvl.reference"):
        narvl.qctc_loss(logits, targets, tl, blank=6)


def test_inductor_training_step_matches_eager():
    """torch.compile with inductor (generated C++ around the registered narvl ops) of a whole
    training step: a linear head, qctc_loss with weights, backward, an SGD update."""
    torch.manual_seed(3)
    B, N, d, V = 3, 6, 12, 17
    targets = torch.tensor([[1, 2, 3], [4, 4, 0], [5, 0, 0]])
    tl = torch.tensor([3, 2, 1])
    feats = torch.randn(B, N, d)
    w = torch.tensor([1.0, 0.5, 2.0])

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(d, 24), torch.nn.GELU(), torch.nn.Linear(24, V))

    def step(model, opt):
        opt.zero_grad()
        loss = narvl.qctc_loss(model(feats), targets, tl, blank=V - 1, label_smoothing=0.1, weights=w)
        loss.backward()
        opt.step()
        return loss

    eager_m, comp_m = make(), make()
    eager_opt = torch.optim.SGD(eager_m.parameters(), lr=0.1)
    comp_opt = torch.optim.SGD(comp_m.parameters(), lr=0.1)
    fwd = torch.compile(lambda x: narvl.qctc_loss(comp_m(x), targets, tl, blank=V - 1, label_smoothing=0.1,
                                                  weights=w), backend="inductor", fullgraph=True)
    for _ in range(3):
        le = step(eager_m, eager_opt)
        comp_opt.zero_grad()
        lc = fwd(feats)
        lc.backward()
        comp_opt.step()
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
    for pe, pc in zip(eager_m.parameters(), comp_m.parameters()):
        torch.testing.assert_close(pc, pe, rtol=1e-5, atol=1e-6)
