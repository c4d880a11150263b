"""NaN/inf in the data flow into the loss and the gradient exactly as in PyTorch
(log_softmax + F.ctc_loss), on every kernel backend; and a real fp16 GradScaler step survives an
overflow (the step is skipped, the scale drops, training goes on)."""
import pytest
import torch
import torch.nn.functional as F

import narvl

B, N, V = 3, 6, 11
BLANK = V - 1
TARGETS = torch.tensor([[1, 2, 3], [4, 4, 0], [5, 6, 0]])
TL = torch.tensor([3, 2, 2])

# (value, position): NaN / +inf anywhere poison their sample; -inf poisons its row when the CTC
# gradient of the sample is non-zero (F.ctc_loss computes exp(-inf + inf) there).
PLANTS = [(float("nan"), (0, 2, 5)), (float("inf"), (1, 0, 9)), (float("-inf"), (0, 2, 7)),
          (float("-inf"), (0, 3, 1)), (float("-inf"), (2, 4, BLANK)), (float("-inf"), (1, 5, 4))]


def _torch_qctc(x, eps, weights, zero_infinity=True):
    lp = F.log_softmax(x.float(), -1)
    c = F.ctc_loss(lp.transpose(0, 1), TARGETS, torch.full((B,), N), TL, blank=BLANK,
                   reduction="none", zero_infinity=zero_infinity)
    c = c / TL.clamp_min(1)
    per = c if eps == 0 else (1 - eps) * c - eps * lp.mean((1, 2))
    return (weights * per).mean()


def _same_nonfinite(a, b):
    assert torch.equal(torch.isnan(a), torch.isnan(b)), (torch.isnan(a).nonzero(), torch.isnan(b).nonzero())
    assert torch.equal(torch.isinf(a), torch.isinf(b))
    fin = torch.isfinite(a)
    torch.testing.assert_close(a[fin].double(), b[fin].double(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("value,pos", PLANTS)
@pytest.mark.parametrize("eps,w0", [(0.1, 1.0), (0.0, 1.0), (0.1, 0.0)])
def test_qctc_nonfinite_as_pytorch(backend, value, pos, eps, w0):
    x = torch.randn(B, N, V)
    x[pos] = value
    w = torch.tensor([w0, 1.0, 1.0])
    a = x.clone().requires_grad_()
    ref = _torch_qctc(a, eps, w)
    ref.backward()
    b = x.clone().requires_grad_()
    got = narvl.qctc_loss(b, TARGETS, TL, blank=BLANK, label_smoothing=eps, weights=w)
    got.backward()
    _same_nonfinite(got.detach().reshape(1), ref.detach().reshape(1))
    _same_nonfinite(b.grad, a.grad)  # a zero weight does not clean a NaN (NaN * 0), as in PyTorch


def test_qctc_infeasible_without_zero_infinity_is_nan_like_pytorch(backend):
    x = torch.randn(B, 2, V)  # 2 queries cannot hold 3 labels
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    lp = F.log_softmax(a, -1)
    ref = F.ctc_loss(lp.transpose(0, 1), TARGETS, torch.full((B,), 2), TL, blank=BLANK,
                     reduction="sum", zero_infinity=False)
    ref.backward()
    got = narvl.qctc_loss(b, TARGETS, TL, blank=BLANK, reduction="sum", zero_infinity=False)
    got.backward()
    assert torch.isinf(got) and torch.isinf(ref)
    _same_nonfinite(b.grad, a.grad)


@pytest.mark.parametrize("value,pos", [(float("nan"), (2, 0, 5)), (float("nan"), (2, 0, 2)),
                                       (float("-inf"), (3, 1, 4)), (float("-inf"), (3, 1, 9)),
                                       (float("inf"), (0, 2, 1)), (float("inf"), (1, 2, 6)),
                                       (float("nan"), (7, 2, 5))])
def test_ctc_nonfinite_as_pytorch(backend, value, pos):
    T = 8
    lp = torch.randn(T, B, V).log_softmax(-1)
    lp[pos] = value
    il = torch.tensor([8, 7, 6])
    a, b = lp.clone().requires_grad_(), lp.clone().requires_grad_()
    ref = F.ctc_loss(a, TARGETS, il, TL, blank=BLANK, reduction="sum", zero_infinity=True)
    ref.backward()
    got = narvl.ctc_loss(b, TARGETS, il, TL, blank=BLANK, reduction="sum", zero_infinity=True)
    got.backward()
    _same_nonfinite(got.detach().reshape(1), ref.detach().reshape(1))
    # narvl's gradient w.r.t. log_probs is -posterior (F.ctc_loss: exp(lp) - posterior; the
    # same through a log_softmax); the non-finite pattern is F.ctc_loss's
    assert torch.equal(torch.isnan(b.grad), torch.isnan(a.grad))
    assert torch.equal(torch.isinf(b.grad), torch.isinf(a.grad))
    assert torch.equal(b.grad[torch.isinf(b.grad)], a.grad[torch.isinf(a.grad)])


def test_fp16_gradscaler_skips_an_overflowing_step():
    """A real fp16 autocast + GradScaler loop on a tiny NARVL-style head: a planted overflow
    makes the loss non-finite; the scaler skips that step, halves the scale, and the next
    steps train."""
    torch.manual_seed(0)
    d = 16
    model = torch.nn.Sequential(torch.nn.Linear(d, 32), torch.nn.GELU(), torch.nn.Linear(32, V))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    feats = torch.randn(B, N, d)
    losses, scales, skipped = [], [], []
    for step in range(8):
        x = feats.clone()
        if step == 3:
            x[1, 2, 0] = 1e6  # fp16 overflow in the first matmul -> inf logits
        with torch.autocast("cpu", dtype=torch.float16):
            logits = model(x)
            assert logits.dtype == torch.float16
            loss = narvl.qctc_loss(logits, TARGETS, TL, blank=BLANK, label_smoothing=0.1)
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        changed = any(not torch.equal(p0, p1) for p0, p1 in zip(before, model.parameters()))
        losses.append(loss.item())
        scales.append(scaler.get_scale())
        skipped.append(not changed)
    assert not torch.isfinite(torch.tensor(losses[3])), losses
    assert skipped[3] and not any(skipped[:3]) and not any(skipped[4:]), skipped
    assert scales[3] == scales[2] / 2, scales
    assert all(torch.isfinite(torch.tensor(losses[4:])))
    assert losses[-1] < losses[0], losses


class _CountHostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the tensor -> Python scalar reads (.item(), bool(), int()): each is a host
    synchronisation on CUDA."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("check,expected", [("1", 1), ("0", 0)])
def test_host_syncs_per_call(check, expected, monkeypatch):
    """The README's count: qctc_loss and ctc_loss (padded targets) read one scalar back per
    call with the value checks on, none with NARVL_CHECK=0; NaN/inf checks cost none."""
    monkeypatch.setenv("NARVL_CHECK", check)
    monkeypatch.setenv("NARVL_BACKEND", "cpp")
    x = torch.randn(B, N, V, requires_grad=True)
    lp = torch.randn(8, B, V).log_softmax(-1)
    for fn in (lambda: narvl.qctc_loss(x, TARGETS, TL, blank=BLANK, label_smoothing=0.1),
               lambda: narvl.ctc_loss(lp, TARGETS, torch.full((B,), 8), TL, blank=BLANK)):
        with _CountHostReads() as c:
            fn()
        assert c.n == expected
