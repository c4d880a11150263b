"""narvl.ops.linear (oneDNN fused matmul + GELU on CPU inference) against F.linear / F.gelu."""
import pytest
import torch
import torch.nn.functional as F

from narvl.models.inference import PackedLinear
from narvl.nn import FeedForward, Linear
from narvl.ops import linear as lin

needs_onednn = pytest.mark.skipif(not lin.onednn_linear_available(),
                                  reason="this torch build lacks torch.ops.mkldnn._linear_pointwise")


@pytest.fixture(autouse=True)
def pinned_onednn(monkeypatch):
    """The route tests below exercise the oneDNN route itself: pin it (``auto`` picks ATen on CPUs
    without AVX-512). The ``auto`` tests unset it."""
    monkeypatch.setenv("NARVL_LINEAR_ROUTE", "onednn")


def graph_has(fn, name, depth=4):
    """Whether the autograd graph below ``fn`` (``depth`` nodes deep) holds a node called ``name``."""
    if fn is None or depth < 0:
        return False
    return name in type(fn).__name__ or any(graph_has(f, name, depth - 1) for f, _ in fn.next_functions)


def make(shape, N, bias):
    """x (*shape), weight (N, K), bias (N,) or None, seeded by the shape."""
    g = torch.Generator().manual_seed(sum(shape))
    K = shape[-1]
    x = torch.randn(*shape, generator=g)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    return x, w, (torch.randn(N, generator=g) if bias else None), g


def ref(x, w, b, act):
    y = F.linear(x.double(), w.double(), None if b is None else b.double())
    return F.gelu(y) if act == "gelu" else y


@pytest.mark.parametrize("shape", [(1, 256), (7, 33), (8, 33), (1, 29, 37), (3, 5, 64), (2, 9, 7, 24)])
@pytest.mark.parametrize("act", [None, "gelu"])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_f_linear_in_inference(shape, act, bias):
    N = 3 * shape[-1] + 1
    x, w, b, _ = make(shape, N, bias)
    with torch.inference_mode():
        got = lin.linear(x, w, b, act)
    assert got.shape == (*shape[:-1], N) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref(x, w, b, act), rtol=1e-4, atol=1e-4)


@needs_onednn
def test_route_rules():
    w, b = torch.randn(16, 8), torch.randn(16)
    with torch.no_grad():
        assert lin._onednn_route(torch.randn(8, 8), w, b) == "infer"
        assert lin._onednn_route(torch.randn(2, 4, 8), w, b) == "infer"     # 8 rows over two dims
        assert lin._onednn_route(torch.randn(7, 8), w, b) is None           # one AR step: addmm is faster
        assert lin._onednn_route(torch.randn(8, 8).double(), w.double(), b.double()) is None
        assert lin._onednn_route(torch.randn(8, 8).bfloat16(), w.bfloat16(), b.bfloat16()) is None
        with torch.autocast("cpu", torch.bfloat16):
            assert lin._onednn_route(torch.randn(8, 8), w, b) is None
    wg = w.clone().requires_grad_(True)
    assert lin._onednn_route(torch.randn(8, 8), wg, b) == "train"
    assert lin._onednn_route(torch.randn(7, 8), wg, b) is None
    with torch.no_grad():
        assert lin._onednn_route(torch.randn(8, 8), wg, b) == "infer"


@needs_onednn
def test_fastpath_switch_uses_aten(monkeypatch):
    monkeypatch.setenv("NARVL_CPU_FASTPATH", "0")
    with torch.no_grad():
        assert lin._onednn_route(torch.randn(8, 8), torch.randn(4, 8), None) is None


@needs_onednn
@pytest.mark.parametrize("shape", [(8, 33), (3, 7, 20), (2, 5, 3, 16)])
@pytest.mark.parametrize("act", [None, "gelu"])
@pytest.mark.parametrize("bias", [True, False])
def test_training_route_gradients(shape, act, bias):
    """The training route (oneDNN forward and dx) gives F.linear's values and gradients."""
    N = 2 * shape[-1] + 3
    x, w, b, g = make(shape, N, bias)
    gy = torch.randn(*shape[:-1], N, generator=g)
    leaves = [t.clone().requires_grad_(True) for t in (x, w) + ((b,) if bias else ())]
    y = lin.linear(leaves[0], leaves[1], leaves[2] if bias else None, act)
    assert graph_has(y.grad_fn, "_OneDNNLinear")
    got = [y] + list(torch.autograd.grad(y, leaves, gy))
    dl = [t.double().requires_grad_(True) for t in (x, w) + ((b,) if bias else ())]
    yr = ref(dl[0], dl[1], dl[2] if bias else None, act)
    want = [yr] + list(torch.autograd.grad(yr, dl, gy.double()))
    for a, r in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-4)
    # only x needs a gradient (a frozen layer): no dW / db work, still the right dx
    xg = x.clone().requires_grad_(True)
    (dx,) = torch.autograd.grad(lin.linear(xg, w, b, act), xg, gy)
    torch.testing.assert_close(dx.double(), want[1], rtol=1e-4, atol=1e-4)


@needs_onednn
def test_onednn_route_is_taken(monkeypatch):
    calls = []
    real = torch.ops.mkldnn._linear_pointwise

    class Spy:
        def __call__(self, *a):
            calls.append(a[3])
            return real(*a)
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", Spy())
    x, w = torch.randn(9, 5), torch.randn(6, 5)
    with torch.no_grad():
        lin.linear(x, w, None, "gelu")
        lin.linear(x[:3], w)
    assert calls == ["gelu"]


def test_non_contiguous_input():
    x = torch.randn(12, 40)[:, ::2]  # (12, 20), stride 2
    w, b = torch.randn(7, 20), torch.randn(7)
    with torch.no_grad():
        torch.testing.assert_close(lin.linear(x, w, b, "gelu").double(), ref(x, w, b, "gelu"),
                                   rtol=1e-4, atol=1e-4)


def test_gradcheck_float64():
    x = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: lin.linear(*t, activation="gelu"), (x, w, b))
    x32 = torch.randn(10, 6, requires_grad=True)
    y = lin.linear(x32, w.detach().float(), b.detach().float(), "gelu")
    assert y.requires_grad and y.grad_fn is not None


def test_bad_input():
    with pytest.raises(ValueError, match="activation"):
        lin.linear(torch.randn(8, 4), torch.randn(3, 4), activation="relu6")
    with torch.no_grad(), pytest.raises((ValueError, RuntimeError), match="in-features|shape|size"):
        lin.linear(torch.randn(8, 4), torch.randn(3, 5))


def test_modules_keep_nn_layout_and_function():
    torch.manual_seed(0)
    ff = FeedForward(24, 56, dropout=0.0)
    assert list(ff.state_dict()) == ["0.weight", "0.bias", "3.weight", "3.bias"]
    x = torch.randn(2, 11, 24)
    ff.train()
    want = ff(x).detach()
    ff.eval()
    with torch.no_grad():
        got = ff(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    layer = Linear(24, 10)
    assert isinstance(layer, torch.nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_training_route_is_twice_differentiable(bias):
    """A gradient penalty (double backward) through the oneDNN training route equals ATen's."""
    x, w, b, _ = make((9, 12), 7, bias)

    def penalty(fn):
        leaves = [t.clone().double().float().requires_grad_(True) for t in (x, w) + ((b,) if bias else ())]
        y = fn(leaves[0], leaves[1], leaves[2] if bias else None)
        (gx,) = torch.autograd.grad(y.pow(2).sum(), leaves[0], create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), leaves)

    got = penalty(lambda a, c, d: lin.linear(a, c, d, "gelu"))
    want = penalty(lambda a, c, d: F.gelu(F.linear(a, c, d)))
    for a, r in zip(got, want):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


@needs_onednn
def test_failing_private_op_falls_back_to_aten_once(monkeypatch):
    """A oneDNN op that raises: the call still returns F.linear's result, the failure is logged
    once, and later calls do not try the op again."""
    from narvl import _backend
    monkeypatch.setattr(_backend, "_failed_fastpaths", {})
    tries = []

    def broken(*a):
        tries.append(1)
        raise RuntimeError("oneDNN primitive creation failed")
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", broken)
    x, w, b, _ = make((9, 5), 6, True)
    with pytest.warns(RuntimeWarning, match="onednn_linear"):
        with torch.no_grad():
            y = lin.linear(x, w, b, "gelu")
    torch.testing.assert_close(y, F.gelu(F.linear(x, w, b)))
    xg = x.clone().requires_grad_(True)
    y2 = lin.linear(xg, w, b)  # the training route: ATen now, and differentiable
    y2.sum().backward()
    torch.testing.assert_close(xg.grad, torch.ones(9, 6) @ w)
    assert len(tries) == 1 and "onednn_linear" in _backend.failed_fastpaths()


@needs_onednn
def test_fastpath_env_switch_forces_aten(monkeypatch):
    monkeypatch.setenv("NARVL_CPU_FASTPATH", "0")
    with torch.no_grad():
        assert lin._onednn_route(torch.randn(8, 8), torch.randn(4, 8), None) is None


@needs_onednn
@pytest.mark.parametrize("capability,want", [("AVX512", True), ("AVX2", False), ("DEFAULT", False)])
def test_auto_route_follows_the_cpu(monkeypatch, capability, want):
    """``auto``: oneDNN for unpacked calls (inference and training, forward and dx) on CPUs with
    AVX-512, ATen elsewhere; no timing, so every call of a process and every run routes alike."""
    monkeypatch.setenv("NARVL_LINEAR_ROUTE", "auto")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    calls = spy_linear_pointwise(monkeypatch)
    x, w, b, _ = make((11, 6), 5, True)
    with torch.no_grad():
        y = lin.linear(x, w, b, "gelu")
    assert calls == ([False] if want else [])
    torch.testing.assert_close(y.double(), ref(x, w, b, "gelu"), rtol=1e-4, atol=1e-4)
    calls.clear()
    xg = x.clone().requires_grad_(True)
    lin.linear(xg, w, b).sum().backward()  # forward and dx
    assert calls == ([False, False] if want else [])
    torch.testing.assert_close(xg.grad, torch.ones(11, 5) @ w, rtol=1e-5, atol=1e-5)


def test_route_env_is_checked_and_pins(monkeypatch):
    monkeypatch.setenv("NARVL_LINEAR_ROUTE", "fastest")
    x, w, b, _ = make((9, 5), 6, True)
    if lin.onednn_linear_available():
        with pytest.raises(ValueError, match="NARVL_LINEAR_ROUTE"):
            with torch.no_grad():
                lin.linear(x, w, b)
    monkeypatch.setenv("NARVL_LINEAR_ROUTE", "aten")
    calls = spy_linear_pointwise(monkeypatch)
    with torch.no_grad():
        y = lin.linear(x, w, b, "gelu")
    assert calls == []
    torch.testing.assert_close(y, F.gelu(F.linear(x, w, b)))


def spy_linear_pointwise(monkeypatch):
    """Records, for each call of oneDNN's matmul op, whether its weight was a packed one."""
    calls = []
    real = torch.ops.mkldnn._linear_pointwise

    def spy(*a):
        calls.append(a[1].is_mkldnn)
        return real(*a)
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", spy)
    return calls


@needs_onednn
@pytest.mark.parametrize("shape", [(8, 33), (1, 29, 37), (3, 5, 64), (2, 9, 7, 24)])
@pytest.mark.parametrize("act", [None, "gelu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("route", ["onednn", "auto"])
def test_packed_weight_matches_f_linear(monkeypatch, shape, act, bias, route):
    """A packed weight serves inference calls of 8 or more rows (also under ``auto``, on every
    CPU) and computes F.linear's result."""
    monkeypatch.setenv("NARVL_LINEAR_ROUTE", route)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    N = 2 * shape[-1] + 3
    x, w, b, _ = make(shape, N, bias)
    p = lin.pack_weight(w)
    assert p is not None and p.shape == w.shape
    calls = spy_linear_pointwise(monkeypatch)
    with torch.inference_mode():
        got = lin.linear(x, w, b, act, packed=p)
    assert calls == [True]
    assert got.shape == (*shape[:-1], N) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref(x, w, b, act), rtol=1e-4, atol=1e-4)


@needs_onednn
def test_packed_weight_rules(monkeypatch):
    x, w, b, _ = make((9, 12), 7, True)
    p = lin.pack_weight(w)
    assert lin.pack_weight(w.double()) is None and lin.pack_weight(w[0]) is None
    with torch.no_grad(), pytest.raises(ValueError, match="packed"):
        lin.linear(x, w, b, packed=lin.pack_weight(torch.randn(7, 11)))
    calls = spy_linear_pointwise(monkeypatch)
    with torch.no_grad():  # fewer than 8 rows: ATen, the packed weight is not used
        torch.testing.assert_close(lin.linear(x[:5], w, b, packed=p), F.linear(x[:5], w, b))
    assert calls == []
    # a gradient is needed: the training route, which never uses a packed weight
    xg = x.clone().requires_grad_(True)
    y = lin.linear(xg, w, b, "gelu", packed=p)
    y.sum().backward()
    xr = x.clone().requires_grad_(True)
    F.gelu(F.linear(xr, w, b)).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-4, atol=1e-5)
    assert not any(calls)
    calls.clear()
    monkeypatch.setenv("NARVL_LINEAR_ROUTE", "aten")  # pinned to ATen: the packed weight is not used
    with torch.no_grad():
        torch.testing.assert_close(lin.linear(x, w, b, packed=p), F.linear(x, w, b))
    assert calls == []
    monkeypatch.setenv("NARVL_LINEAR_ROUTE", "onednn")
    monkeypatch.setenv("NARVL_CPU_FASTPATH", "0")  # the fast path off: nothing is packed
    assert lin.pack_weight(w) is None


@needs_onednn
def test_linear_module_packs_and_follows_its_weight(monkeypatch):
    torch.manual_seed(3)
    layer = PackedLinear.from_linear(Linear(20, 13))
    x = torch.randn(2, 9, 20)
    calls = spy_linear_pointwise(monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        first = layer.packed_weight()
        assert first is not None and layer.packed_weight() is first  # kept, not packed per call
        layer.weight.mul_(-3.0)  # an in-place change: packed again
        assert layer.packed_weight() is not first
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    assert calls == [True, True]
    assert layer.packed_weight() is None  # gradients on: the plain layer
    y = layer(x)
    assert y.requires_grad


@needs_onednn
def test_feedforward_uses_its_packed_weights(monkeypatch):
    torch.manual_seed(4)
    ff = FeedForward(24, 40).eval()
    for m in list(ff.modules()):
        if isinstance(m, Linear):
            PackedLinear.from_linear(m)
    x = torch.randn(11, 24)
    calls = spy_linear_pointwise(monkeypatch)
    with torch.no_grad():
        got = ff(x)
    assert calls == [True, True]
    torch.testing.assert_close(got, ff[3](F.gelu(ff[0](x))), rtol=1e-5, atol=1e-5)
