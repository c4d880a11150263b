"""query_attention: Triton kernels (interpreted) and the CPU path against the float64 reference."""
import pytest
import torch

import narvl
from narvl.reference import query_attention_reference


def make(B, H, Lq, Lk, D, dtype=torch.float32, bias="shared", lengths=True):
    q, k, v = (torch.randn(B, H, L, D, dtype=torch.float64).to(dtype) for L in (Lq, Lk, Lk))
    kl = torch.randint(1, Lk + 1, (B,)) if lengths else None
    if kl is not None:
        kl[0] = Lk
    b = None
    if bias == "shared":
        b = torch.randn(H, Lq, Lk, dtype=torch.float64).to(dtype)
    elif bias == "batch":
        b = torch.randn(B, H, Lq, Lk, dtype=torch.float64).to(dtype)
    return q, k, v, kl, b


def dbl(*xs):
    return [None if x is None else x.double() for x in xs]


def run(fn, q, k, v, kl, b, g):
    ins = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    bb = None if b is None else b.detach().clone().requires_grad_(True)
    out = fn(*ins, kl, bb)
    grads = torch.autograd.grad(out, ins + ([bb] if bb is not None else []), g)
    return [out.detach()] + list(grads)


SHAPES = [  # B, H, Lq, Lk, D
    (2, 2, 1, 9, 16),
    (2, 3, 5, 37, 80),
    (3, 2, 6, 97, 64),
    (2, 2, 20, 930, 16),
    (1, 2, 20, 1025, 128),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", ["shared", "batch", None])
def test_matches_reference_fp32(backend, shape, bias):
    q, k, v, kl, b = make(*shape, bias=bias)
    g = torch.randn(q.shape)
    got = run(narvl.query_attention, q, k, v, kl, b, g)
    want = run(query_attention_reference, *dbl(q, k, v), kl, *dbl(b), g.double())
    for x, y in zip(got, want):
        assert x.dtype == torch.float32
        torch.testing.assert_close(x.double(), y, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("shape", [(1, 4, 6, 28, 64), (2, 3, 5, 37, 80), (2, 2, 20, 930, 16)])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_inference_path_matches_reference(backend, shape, mode):
    """Calls that need no gradient take their own CPU route (SDPA): same values."""
    q, k, v, kl, b = make(*shape)
    with getattr(torch, mode)():
        got = narvl.query_attention(q, k, v, kl, b)
    want = query_attention_reference(*dbl(q, k, v), kl, *dbl(b))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("shape", [(2, 3, 7, 7, 16), (1, 2, 1, 9, 32), (2, 2, 5, 12, 8)])
@pytest.mark.parametrize("bias", ["shared", "batch", None])
def test_causal_matches_reference(backend, shape, bias):
    """causal=True (the AR baseline's teacher-forced decoder; Lq <= Lk, query i sees keys
    j <= i + Lk - Lq): values and gradients, also for the bias, against the float64 oracle."""
    q, k, v, _, b = make(*shape, bias=bias, lengths=False)
    g = torch.randn(q.shape)
    got = run(lambda *a: narvl.query_attention(*a, causal=True), q, k, v, None, b, g)
    want = run(lambda *a: query_attention_reference(*a, causal=True), *dbl(q, k, v), None, *dbl(b), g.double())
    for x, y in zip(got, want):
        torch.testing.assert_close(x.double(), y, rtol=2e-4, atol=2e-4)
    # the mask matters: without it the output differs (Lq > 1)
    if shape[2] > 1:
        assert not torch.allclose(narvl.query_attention(q, k, v, attn_bias=b), got[0], atol=1e-3)
    with pytest.raises(ValueError, match="causal"):  # more queries than keys
        narvl.query_attention(torch.randn(1, 1, 3, 4), torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4),
                              causal=True)


@pytest.mark.parametrize("grad", [False, True])
def test_full_key_lengths_equal_no_lengths(backend, grad):
    """All keys valid (the mask-free shortcut) gives what key_lengths=None and the reference give."""
    q, k, v, _, b = make(2, 3, 5, 13, 16)
    full = torch.full((2,), 13)
    with torch.set_grad_enabled(grad):
        got = narvl.query_attention(q, k, v, full, b)
        none = narvl.query_attention(q, k, v, None, b)
    want = query_attention_reference(*dbl(q, k, v), full, *dbl(b))
    torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(got, none, rtol=1e-5, atol=1e-5)
    short = torch.tensor([13, 4])
    with torch.set_grad_enabled(grad):
        masked = narvl.query_attention(q, k, v, short, b)
    torch.testing.assert_close(masked.double(), query_attention_reference(*dbl(q, k, v), short, *dbl(b)),
                               rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("shape", [(2, 2, 20, 97, 64), (2, 2, 6, 28, 80), (1, 2, 5, 130, 128), (2, 3, 3, 33, 16)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_within_twice_torch(backend, dtype, shape):
    """flash-attention's rule against the float64 oracle: the error of each output (out, dq, dk,
    dv, dbias) is at most twice PyTorch's own error in that dtype, plus the error of merely
    storing the exact result in that dtype. On the Triton backend this is the GPU's arithmetic:
    the interpreter runs the same fp16/bf16 dots (kernels/_interpreter.py)."""
    q, k, v, kl, b = make(*shape, dtype=dtype)
    g = torch.randn(q.shape).to(dtype)
    got = run(narvl.query_attention, q, k, v, kl, b, g)
    want = run(query_attention_reference, *dbl(q, k, v), kl, *dbl(b), g.double())

    def torch_lowp(q, k, v, kl, b):  # the same math in the low-precision dtype
        s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + b
        keep = torch.arange(k.shape[2])[None, :] < kl[:, None]
        return torch.softmax(s.masked_fill(~keep[:, None, None, :], float("-inf")), -1) @ v

    base = run(torch_lowp, q, k, v, kl, b, g)
    for name, x, y, z in zip(("out", "dq", "dk", "dv", "dbias"), got, want, base):
        assert x.dtype == dtype
        err = (x.double() - y).abs().max().item()
        torch_err = (z.double() - y).abs().max().item()
        store_err = (y.to(dtype).double() - y).abs().max().item()
        assert err <= 2 * torch_err + store_err, (name, err, torch_err, store_err)


def test_interpreter_dots_are_the_gpu_dots():
    """Under the interpreter, tl.dot on bf16 operands multiplies the bf16 values (Triton's own
    interpreter multiplies their bit patterns), a tf32 dot of fp32 operands drops the low 13
    mantissa bits, as the tensor cores do, and tf32x3 (the fp32 kernels' mode) adds the three
    head/tail products, close to fp32; fp32 'ieee' dots stay exact."""
    import triton
    import triton.language as tl

    @triton.jit
    def mm(A, B, C, PREC: tl.constexpr):
        r = tl.arange(0, 16)
        a = tl.load(A + r[:, None] * 16 + r[None, :])
        b = tl.load(B + r[:, None] * 16 + r[None, :])
        tl.store(C + r[:, None] * 16 + r[None, :], tl.dot(a, b, input_precision=PREC))

    def tf32(x):
        return (x.view(torch.int32) & ~0x1FFF).view(torch.float32)

    narvl._backend.triton_kernels()  # installs the interpreter's dot
    for dtype, prec, widen in ((torch.bfloat16, "ieee", lambda x: x.double()),
                               (torch.float16, "ieee", lambda x: x.double()),
                               (torch.float32, "tf32", lambda x: tf32(x).double()),
                               (torch.float32, "tf32x3", lambda x: x.double()),
                               (torch.float32, "ieee", lambda x: x.double())):
        a, b = torch.randn(16, 16).to(dtype), torch.randn(16, 16).to(dtype)
        c = torch.empty(16, 16)
        mm[(1,)](a, b, c, PREC=prec)
        torch.testing.assert_close(c.double(), widen(a) @ widen(b), rtol=1e-6, atol=1e-5)
    assert (c.double() - tf32(a).double() @ tf32(b).double()).abs().max() > 1e-4  # ieee is not tf32


def test_split_keys_combine():
    """The flash-decoding path: the key axis split across programs, then combined."""
    kern = narvl._backend.triton_kernels().attention
    q, k, v, kl, b = make(2, 2, 6, 300, 32)
    kl = torch.tensor([300, 77])
    want = query_attention_reference(q, k, v, kl, b)
    for splits in (1, 3, 5):
        out, lse = kern.attention_fwd(q, k, v, kl, b, 32 ** -0.5, num_splits=splits)
        torch.testing.assert_close(out.double(), want, rtol=2e-4, atol=2e-4)
        s = (q.double() @ k.double().transpose(-1, -2)) * 32 ** -0.5 + b.double()
        s = s.masked_fill(~(torch.arange(300)[None, :] < kl[:, None])[:, None, None, :], float("-inf"))
        torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), rtol=1e-5, atol=1e-5)


def test_padding_keys_do_not_matter(backend):
    q, k, v, kl, b = make(2, 2, 5, 40, 16)
    kl = torch.tensor([40, 13])
    out = narvl.query_attention(q, k, v, kl, b)
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 13:] = 100.0
    v2[1, :, 13:] = -50.0
    torch.testing.assert_close(narvl.query_attention(q, k2, v2, kl, b), out)


def test_gradcheck_float64():
    q, k, v, kl, b = make(2, 2, 3, 7, 5, dtype=torch.float64)
    ins = [x.requires_grad_(True) for x in (q, k, v, b)]
    assert torch.autograd.gradcheck(
        lambda q, k, v, b: torch.ops.narvl.query_attention_fwd(q, k, v, kl, b, 0.3)[0], ins)
    assert torch.autograd.gradcheck(lambda q, k, v, b: narvl.query_attention(q, k, v, kl, b), ins)


def test_torch_compile_fullgraph_matches_eager(backend):
    q, k, v, kl, b = make(2, 2, 3, 7, 8)

    def step(q, b):
        return narvl.query_attention(q, k, v, kl, b).square().sum()

    q1, b1 = q.clone().requires_grad_(True), b.clone().requires_grad_(True)
    q2, b2 = q.clone().requires_grad_(True), b.clone().requires_grad_(True)
    eager = step(q1, b1)
    eager.backward()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(q2, b2)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(q2.grad, q1.grad)
    torch.testing.assert_close(b2.grad, b1.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(backend, dtype):
    q, k, v, kl, b = make(2, 2, 3, 7, 8, dtype=dtype)
    ins = [x.clone().requires_grad_(True) for x in (q, k, v)]
    torch.library.opcheck(torch.ops.narvl.query_attention_fwd.default,
                          (*ins, kl, b.clone().requires_grad_(True), 0.35))
    torch.library.opcheck(torch.ops.narvl.query_attention_fwd.default, (*ins, kl, None, 0.35))
    out, lse = torch.ops.narvl.query_attention_fwd(q, k, v, kl, b, 0.35)
    torch.library.opcheck(torch.ops.narvl.query_attention_bwd.default,
                          (torch.randn(q.shape, dtype=dtype), q, k, v, out, lse, kl, b, 0.35, True))
    # the route every query_attention call takes (narvl::query_attention), each of its branches
    for args in ((*ins, kl, b.clone().requires_grad_(True), 0.35, False), (q, k, v, kl, b, 0.35, False),
                 (*ins, None, None, 0.35, False), (*ins, None, b.clone().requires_grad_(True), 0.35, True)):
        torch.library.opcheck(torch.ops.narvl.query_attention.default, args)


def test_functional_api_calls_its_op(backend, monkeypatch):
    """narvl.query_attention takes one route, its registered op, in training, inference and
    causal calls alike (the routing lives in that op's kernel)."""
    q, k, v, kl, b = make(2, 2, 3, 7, 8)
    calls = []
    real = torch.ops.narvl.query_attention
    import narvl.ops.attention as attention
    class Spy:
        def __getattr__(self, name):
            if name == "query_attention":
                return lambda *a: calls.append(a) or real(*a)
            return getattr(torch.ops.narvl, name)
    monkeypatch.setattr(attention, "_OPS", Spy())
    narvl.query_attention(q.clone().requires_grad_(True), k, v, kl, b)  # training
    with torch.no_grad():
        narvl.query_attention(q, k, v, kl, b)  # inference
    narvl.query_attention(q, k, v, None, b, causal=True)
    assert [c[-1] for c in calls] == [False, False, True]


@pytest.mark.parametrize("kw, exc, word", [
    (dict(q=torch.randn(2, 5, 16)), ValueError, "q"),
    (dict(k=torch.randn(3, 2, 9, 16)), ValueError, "batch"),
    (dict(k=torch.randn(2, 3, 9, 16)), ValueError, "head"),
    (dict(v=torch.randn(2, 2, 9, 8)), ValueError, "head-dim"),
    (dict(key_lengths=torch.tensor([0, 9])), ValueError, "key_lengths"),
    (dict(key_lengths=torch.tensor([10, 9])), ValueError, "key_lengths"),
    (dict(key_lengths=torch.tensor([9])), ValueError, "key_lengths"),
    (dict(attn_bias=torch.randn(2, 5, 8)), ValueError, "attn_bias"),
    (dict(attn_bias=torch.randn(3, 2, 5, 9)), ValueError, "attn_bias"),
    (dict(q=torch.randint(0, 2, (2, 2, 5, 16))), TypeError, "q"),
])
def test_bad_input(backend, kw, exc, word):
    a = dict(q=torch.randn(2, 2, 5, 16), k=torch.randn(2, 2, 9, 16), v=torch.randn(2, 2, 9, 16),
             key_lengths=None, attn_bias=None)
    a.update(kw)
    with pytest.raises(exc, match=word):
        narvl.query_attention(**a)


def test_query_decoder_layer(backend):
    layer = narvl.nn.QueryDecoderLayer(32, 4)
    x = torch.randn(3, 6, 32)
    mem = torch.randn(3, 50, 32)
    lens = torch.tensor([50, 20, 7])
    cross = torch.zeros(4, 6, 50, requires_grad=True)
    y = layer(x, mem, lens, cross_bias=cross)
    assert y.shape == x.shape
    y.sum().backward()
    assert cross.grad.abs().sum() > 0 and layer.q_cross.weight.grad.abs().sum() > 0
    mem2 = mem.clone()
    mem2[2, 7:] = 1e3  # beyond the sample's memory length
    torch.testing.assert_close(layer(x, mem2, lens, cross_bias=cross), y)
    with pytest.raises(ValueError, match="multiple"):
        narvl.nn.QueryDecoderLayer(30, 4)


def test_gpu_kernel_limits(backend):
    """The Triton route refuses head dims its kernels are not built for, with the limit named
    (float64, refused on CUDA tensors, is checked in the interpreter); the CPU route takes both."""
    big = [torch.randn(1, 1, 3, 144) for _ in range(3)]
    dbl = [torch.randn(1, 1, 3, 16, dtype=torch.float64) for _ in range(3)]
    if backend == "triton":
        with pytest.raises(ValueError, match="maximum of 128"):
            narvl.query_attention(*big)
    else:
        assert narvl.query_attention(*big).shape == (1, 1, 3, 144)
    assert narvl.query_attention(*dbl).dtype == torch.float64


def test_float64_is_refused_on_cuda_tensors():
    """fp64 does not fit the GPU kernels' shared memory on sm_80: a fake CUDA tensor (no GPU
    needed) reaches the check before any kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        q = torch.empty(1, 1, 3, 16, dtype=torch.float64, device="cuda")
        with pytest.raises(ValueError, match="float64 attention"):
            narvl.query_attention(q, q, q)
