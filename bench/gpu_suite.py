"""The GPU suite in one command: correctness of every op on the GPU, then the GPU benchmarks.

    python bench/gpu_suite.py --out DIR            # on a CUDA machine
    python bench/gpu_suite.py --out DIR --dry-run  # CPU, Triton interpreter, tiny shapes

Writes ``DIR/gpu_checks.json`` (one row per check: op, config, error, bound, ok) and
``DIR/gpu_bench.json`` (one row per timing), both with the device, torch, Triton and CPU model,
and prints a short table of each. Exit status 1 when any check fails.

Checks (kernel on the device vs a float64 reference on the CPU, fresh random inputs):
  * ``qctc_loss`` (fwd + grad, label smoothing, query lengths) and ``ctc_loss`` in fp32/bf16/fp16;
  * ``query_attention`` fwd + grads (q, k, v, bias) for D in 16/64/80/128, with and without bias,
    key lengths; low-precision error at most twice PyTorch's own error in that dtype (SDPA's math
    on the same rounded inputs) plus a small absolute floor (the flash-attention rule);
  * ``ctc_greedy_decode`` and ``ctc_prefix_beam_search`` (exact tokens and ctcdecode timesteps,
    scores to 1e-4).
Benchmarks (GPU time is the median of ``triton.testing.do_bench``, CUDA events):
  * Q-CTC fwd and fwd+bwd vs torch (log_softmax + F.ctc_loss), with the achieved fraction of the
    device-to-device copy bandwidth measured in the same run (floor: read logits once forward,
    read them and write the gradient once backward);
  * attention fwd and fwd+bwd vs SDPA (each backend that accepts a float mask) and FlexAttention
    (bias as score_mod, key lengths as block mask);
  * beam search at B=256 on the GPU vs the CPU search (native build, all cores) and GPU greedy.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback

ARGS = None


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_checks.json and gpu_bench.json")
    p.add_argument("--dry-run", action="store_true",
                   help="run the whole control flow on CPU tensors in the Triton interpreter")
    p.add_argument("--only", choices=("checks", "bench", "profile"), default=None)
    p.add_argument("--ops", default="qctc,ctc,attention,decode",
                   help="comma-separated subset of qctc, ctc, attention, decode")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


if __name__ == "__main__":
    ARGS = _parse()
    if ARGS.dry_run:  # before Triton or narvl are imported
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["NARVL_BACKEND"] = "triton"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import narvl  # noqa: E402

try:  # an uninstalled checkout: narvl.kernels is the repo's kernels/ (setup.py's package_dir)
    import narvl.kernels  # noqa: F401
except ImportError:
    narvl.__path__.append(ROOT)
from narvl.reference.attention import query_attention_reference  # noqa: E402
from narvl.reference.ctc import ctc_loss_reference, qctc_loss_reference  # noqa: E402
from narvl.reference.decode import beam_search_reference, greedy_decode_reference  # noqa: E402
from setups import cpu_model  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
V_OFA = 59458


def env_info(dev):
    import triton
    return {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (Triton interpreter)",
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "cpu": cpu_model(), "cpu_threads": torch.get_num_threads(), "native_build": narvl.native_available(),
            "dry_run": dev.type != "cuda"}


def rel(a, b):
    """||a - b|| / ||b|| in float64 (NaN anywhere fails)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not torch.isfinite(a).all():
        return float("inf")
    den = b.norm().item()
    return (a - b).norm().item() / (den if den > 0 else 1.0)


# ------------------------------------------------------------------------------------- checks

class Rows:
    """Rows saved to ``path`` (with ``header``) after every addition: a run cut off by a time
    limit keeps what it measured."""

    def __init__(self, path, header):
        self.path, self.header, self.rows = path, header, []
        self.t0 = time.time()

    def save(self, **extra):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({**self.header, **extra, "seconds": time.time() - self.t0, "rows": self.rows}, f, indent=1)
        os.replace(tmp, self.path)


class Checks(Rows):

    def add(self, op, config, err, bound):
        ok = bool(err <= bound)
        self.rows.append({"op": op, "config": config, "err": err, "bound": bound, "ok": ok})
        self.save()
        print(f"  {'ok  ' if ok else 'FAIL'} {op:<22} {config:<48} err {err:.2e} <= {bound:.1e}", flush=True)

    def run(self, op, config, fn):
        try:
            fn()
        except Exception as exc:  # a crash is a failed check, recorded, and the suite goes on
            traceback.print_exc()
            self.rows.append({"op": op, "config": config, "err": None, "bound": None, "ok": False,
                              "error": f"{type(exc).__name__}: {exc}"[:2000]})
            self.save()
            print(f"  FAIL {op:<22} {config:<48} raised {type(exc).__name__}: {str(exc)[:200]}", flush=True)


# The flash-attention rule for every op: the kernel's error against the float64 oracle is at most
# twice PyTorch's own error in the same dtype (its usual route on the same rounded inputs), plus
# the error of merely storing the exact result in the output's dtype (as tests/test_attention.py),
# plus a floor (relative norm) for tiny tensors where one element's rounding dominates.
FLOOR = {"fp32": 1e-6, "bf16": 1e-3, "fp16": 2e-4}


def bound(dname, theirs, ref, ours):
    return FLOOR[dname] + 2 * rel(theirs, ref) + rel(ref.detach().to(ours.dtype), ref)


def _torch_qctc(x, tg, tl, ql, blank, eps, w):
    """PyTorch's route for Q-CTC: log_softmax in fp32 + F.ctc_loss + the smoothing term."""
    lp = torch.log_softmax(x.float(), -1)
    B, N, V = lp.shape
    ctc = F.ctc_loss(lp.transpose(0, 1), tg, ql, tl, blank=blank, reduction="none", zero_infinity=True)
    rows = (torch.arange(N, device=x.device)[None, :] < ql[:, None]).float()
    smooth = (lp.sum(-1) * rows).sum(1) / (ql.clamp_min(1).float() * V)
    return w * ((1 - eps) * ctc - eps * smooth)


def check_qctc(ch, dev, shapes, g):
    for (B, N, V) in shapes:
        for dname, dt in DTYPES.items():
            def one(B=B, N=N, V=V, dname=dname, dt=dt):
                blank = V - 1
                S = max(1, N // 2)
                x = (torch.randn(B, N, V, generator=g) * 3).to(dt)
                tl = torch.randint(0, S + 1, (B,), generator=g)
                tg = torch.randint(0, V - 1, (B, S), generator=g)
                ql = torch.randint(max(1, N - 2), N + 1, (B,), generator=g)
                w = torch.rand(B, generator=g)
                gout = torch.randn(B, generator=g)
                d = [t.to(dev) for t in (tg, tl, ql, w, gout)]
                xd = x.to(dev).requires_grad_(True)
                loss = narvl.qctc_loss(xd, d[0], d[1], query_lengths=d[2], blank=blank, reduction="none",
                                       label_smoothing=0.1, weights=d[3])
                (gx,) = torch.autograd.grad(loss, xd, d[4])
                xt = x.to(dev).requires_grad_(True)
                tloss = _torch_qctc(xt, d[0], d[1], d[2], blank, 0.1, d[3])
                (gt,) = torch.autograd.grad(tloss, xt, d[4])
                xr = x.double().requires_grad_(True)
                ref = qctc_loss_reference(xr, tg, tl, query_lengths=ql, blank=blank, reduction="none",
                                          label_smoothing=0.1, weights=w.double())
                (gr,) = torch.autograd.grad(ref, xr, gout.double())
                cfg = f"B{B} N{N} V{V} {dname}"
                ch.add("qctc_loss", cfg, rel(loss, ref), bound(dname, tloss, ref, loss))
                ch.add("qctc_loss.grad", cfg, rel(gx, gr), bound(dname, gt, gr, gx))
                if gx.dtype != dt:
                    raise TypeError(f"gradient dtype {gx.dtype} != logits dtype {dt}")
            ch.run("qctc_loss", f"B{B} N{N} V{V} {dname}", one)


def check_ctc(ch, dev, shapes, g):
    for (T, B, C) in shapes:
        for dname, dt in DTYPES.items():
            def one(T=T, B=B, C=C, dname=dname, dt=dt):
                lp = torch.randn(T, B, C, generator=g).log_softmax(-1).to(dt)
                S = max(1, T // 3)
                tl = torch.randint(1, S + 1, (B,), generator=g)
                tg = torch.randint(1, C, (B, S), generator=g)
                il = torch.randint(max(1, T - 3), T + 1, (B,), generator=g)
                gout = torch.randn(B, generator=g)
                d = [t.to(dev) for t in (tg, il, tl, gout)]
                xd = lp.to(dev).requires_grad_(True)
                loss = narvl.ctc_loss(xd, d[0], d[1], d[2], reduction="none", zero_infinity=True)
                (gx,) = torch.autograd.grad(loss, xd, d[3])
                xt = lp.to(dev).requires_grad_(True)  # torch: fp32 arithmetic, result in the input dtype
                tloss = F.ctc_loss(xt.float(), d[0], d[1], d[2], reduction="none", zero_infinity=True).to(dt)
                (gt,) = torch.autograd.grad(tloss, xt, d[3].to(dt))
                xr = lp.double().requires_grad_(True)
                ref = ctc_loss_reference(xr, tg, il, tl, reduction="none", zero_infinity=True)
                (gr,) = torch.autograd.grad(ref, xr, gout.double())
                cfg = f"T{T} B{B} C{C} {dname}"
                ch.add("ctc_loss", cfg, rel(loss, ref), bound(dname, tloss, ref, loss))
                ch.add("ctc_loss.grad", cfg, rel(gx, gr), bound(dname, gt, gr, gx))
            ch.run("ctc_loss", f"T{T} B{B} C{C} {dname}", one)


def _sdpa_same_dtype(q, k, v, lens, bias, scale):
    """PyTorch's own attention in q's dtype (math route): the error yardstick."""
    keep = torch.arange(k.shape[2], device=q.device)[None, :] < lens[:, None]
    mask = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill(~keep, float("-inf"))
    mask = mask[:, None, None, :]
    if bias is not None:
        mask = mask + bias
    s = (q @ k.transpose(-1, -2)) * scale + mask
    return torch.softmax(s.float(), -1).to(q.dtype) @ v


def check_attention(ch, dev, shapes, g):
    for (B, H, Lq, Lk, D) in shapes:
        for dname, dt in DTYPES.items():
            for bias_kind in ("none", "shared", "batch"):
                def one(B=B, H=H, Lq=Lq, Lk=Lk, D=D, dname=dname, dt=dt, bias_kind=bias_kind):
                    q, k, v = (torch.randn(B, H, L, D, generator=g).to(dt) for L in (Lq, Lk, Lk))
                    lens = torch.randint(1, Lk + 1, (B,), generator=g)
                    lens[0] = Lk
                    bias = None
                    if bias_kind != "none":
                        shape = (H, Lq, Lk) if bias_kind == "shared" else (B, H, Lq, Lk)
                        bias = torch.randn(*shape, generator=g).to(dt)
                    go = torch.randn(B, H, Lq, D, generator=g).to(dt)
                    scale = D ** -0.5
                    ins = [t for t in (q, k, v, bias) if t is not None]
                    # device run
                    dins = [t.to(dev).requires_grad_(True) for t in ins]
                    dq, dk, dv = dins[:3]
                    db = dins[3] if bias is not None else None
                    out = narvl.query_attention(dq, dk, dv, lens.to(dev), db)
                    grads = torch.autograd.grad(out, dins, go.to(dev))
                    # float64 oracle
                    rins = [t.double().requires_grad_(True) for t in ins]
                    ref = query_attention_reference(*rins[:3], lens, rins[3] if bias is not None else None, scale)
                    rgrads = torch.autograd.grad(ref, rins, go.double())
                    # PyTorch in the same dtype (on the device), for the low-precision bound
                    tins = [t.to(dev).requires_grad_(True) for t in ins]
                    tout = _sdpa_same_dtype(*tins[:3], lens.to(dev), tins[3] if bias is not None else None, scale)
                    tgrads = torch.autograd.grad(tout, tins, go.to(dev))
                    names = ["out", "dq", "dk", "dv", "dbias"][:1 + len(ins)]
                    mine = [out, *grads]
                    refs = [ref, *rgrads]
                    theirs = [tout, *tgrads]
                    cfg = f"B{B} H{H} Lq{Lq} Lk{Lk} D{D} {dname} bias={bias_kind}"
                    for name, a, r, t in zip(names, mine, refs, theirs):
                        ch.add(f"attention.{name}", cfg, rel(a, r), bound(dname, t, r, a))
                ch.run("attention", f"B{B} H{H} Lq{Lq} Lk{Lk} D{D} {dname} bias={bias_kind}", one)


def check_decode(ch, dev, shapes, beams, g):
    for (B, T, V) in shapes:
        def one_greedy(B=B, T=T, V=V):
            lp = (torch.randn(B, T, V, generator=g) * 4).log_softmax(-1)
            lens = torch.randint(1, T + 1, (B,), generator=g)
            tok, n = narvl.ctc_greedy_decode(lp.to(dev), lens.to(dev), blank=V - 1)
            rt, rn = greedy_decode_reference(lp, lens, V - 1)
            ok = torch.equal(tok.cpu(), rt) and torch.equal(n.cpu(), rn)
            ch.add("ctc_greedy_decode", f"B{B} T{T} V{V}", 0.0 if ok else 1.0, 0.0)
        ch.run("ctc_greedy_decode", f"B{B} T{T} V{V}", one_greedy)
        for beam in beams:
            for kind in ("log_probs", "logits"):
                def one_beam(B=B, T=T, V=V, beam=beam, kind=kind):
                    x = torch.randn(B, T, V, generator=g) * 4
                    if kind == "log_probs":
                        x = x.log_softmax(-1)
                    lens = torch.randint(1, T + 1, (B,), generator=g)
                    r = narvl.ctc_prefix_beam_search(x.to(dev), lens.to(dev), beam_width=beam, blank=V - 1,
                                                     cutoff_top_n=40, input=kind)
                    rt, rn, rs, rts = beam_search_reference(x, lens, beam, V - 1, 40, 1.0, beam,
                                                            1 if kind == "log_probs" else 2)
                    cfg = f"B{B} T{T} V{V} beam{beam} {kind}"
                    same = torch.equal(r.tokens.cpu(), rt) and torch.equal(r.lengths.cpu(), rn)
                    ch.add("beam_search.tokens", cfg, 0.0 if same else 1.0, 0.0)
                    ch.add("beam_search.timesteps", cfg, 0.0 if torch.equal(r.timesteps.cpu(), rts) else 1.0, 0.0)
                    fin = torch.isfinite(rs)
                    err = (r.scores.cpu()[fin] - rs[fin].float()).abs().max().item() if fin.any() else 0.0
                    ch.add("beam_search.scores", cfg, err, 1e-3)
                ch.run("beam_search", f"B{B} T{T} V{V} beam{beam} {kind}", one_beam)


# ---------------------------------------------------------------------------------- benchmarks

class Bench(Rows):
    def __init__(self, dev, dry, path=None, header=None):
        super().__init__(path, header or {})
        self.dev, self.dry = dev, dry

    def save(self, **extra):
        if self.path:
            super().save(**extra)

    def time_ms(self, fn):
        if self.dev.type == "cuda":
            import triton.testing
            return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
        fn()
        ts = []
        for _ in range(1 if self.dry else 5):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)

    def add(self, group, impl, fn, **info):
        try:
            ms = self.time_ms(fn)
        except Exception as exc:
            if "No viable backend" not in str(exc):
                traceback.print_exc()
            self.rows.append({"group": group, "impl": impl, "ms": None,
                              "error": f"{type(exc).__name__}: {exc}"[:2000], **info})
            msg = "not accepted" if "No viable backend" in str(exc) else f"raised {type(exc).__name__}: {str(exc)[:160]}"
            print(f"  {group:<44} {impl:<22} {msg}", flush=True)
            self.save()
            return None
        self.rows.append({"group": group, "impl": impl, "ms": ms, **info})
        self.save()
        extra = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in info.items() if k in ("GBps", "hbm_frac"))
        print(f"  {group:<44} {impl:<22} {ms:9.4f} ms {extra}", flush=True)
        return ms


def copy_bandwidth(dev, dry):
    """Device-to-device copy bandwidth, bytes read + written per second (GB/s)."""
    n = (1 << 16) if dry else (1 << 28)  # 1 GiB of fp32 on the GPU
    x = torch.empty(n, dtype=torch.float32, device=dev).uniform_()
    y = torch.empty_like(x)
    b = Bench(dev, dry)
    ms = b.time_ms(lambda: y.copy_(x))
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def bench_qctc(bn, dev, shapes, bw):
    g = torch.Generator().manual_seed(1)
    for name, (B, N, V) in shapes.items():
        for dname in ("fp32", "bf16"):
            dt = DTYPES[dname]
            x = (torch.randn(B, N, V, generator=g) * 3).to(device=dev, dtype=dt)
            S = max(1, min(16, N - 2))
            tl = torch.randint(1, S + 1, (B,), generator=g).to(dev)
            tg = torch.randint(0, V - 1, (B, S), generator=g).to(dev)
            blank = V - 1
            nq = torch.full((B,), N, dtype=torch.long, device=dev)
            nbytes = x.numel() * x.element_size()

            def mine(x=x, tl=tl, tg=tg, blank=blank):
                return narvl.qctc_loss(x, tg, tl, blank=blank)

            def theirs(x=x, tl=tl, tg=tg, blank=blank, nq=nq):
                lp = torch.log_softmax(x.float(), -1).transpose(0, 1)
                return F.ctc_loss(lp, tg, nq, tl, blank=blank, zero_infinity=True)

            for mode in ("fwd", "fwdbwd"):
                floor_bytes = nbytes if mode == "fwd" else 3 * nbytes
                group = f"qctc {name} B{B} N{N} V{V} {dname} {mode}"
                impls = [("narvl", mine), ("narvl NARVL_CHECK=0", mine), ("torch", theirs)]
                if name == "caption" and dev.type == "cuda":
                    # launch overhead out of the way: torch.compile with CUDA graphs
                    impls += [("narvl compiled", _compiled(mine)), ("torch compiled", _compiled(theirs))]
                for impl, fn in impls:
                    if mode == "fwd":
                        def run(fn=fn):
                            with torch.no_grad():
                                fn()
                    else:
                        xr = x.detach().requires_grad_(True)

                        def run(fn=fn, xr=xr):
                            torch.autograd.grad(fn(xr), xr)
                    if "CHECK=0" in impl:
                        run = _no_checks(run)
                    ms = bn.add(group, impl, run, shape=[B, N, V], dtype=dname, mode=mode,
                                floor_bytes=floor_bytes)
                    if ms:
                        gbps = floor_bytes / (ms * 1e-3) / 1e9
                        bn.rows[-1].update(GBps=gbps, hbm_frac=gbps / bw)
                        bn.save()
            del x


def _compiled(fn):
    """fn under torch.compile(mode="reduce-overhead"): CUDA graphs replay the launches."""
    return torch.compile(fn, mode="reduce-overhead", dynamic=False)


def _flex(dev):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    if dev.type != "cuda":
        return None
    return torch.compile(flex_attention, dynamic=False), create_block_mask


def bench_attention(bn, dev, shapes):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    g = torch.Generator().manual_seed(2)
    flex = _flex(dev)
    for name, (B, H, Lq, Lk, D) in shapes.items():
        for dname in ("bf16", "fp32"):
            dt = DTYPES[dname]
            q, k, v = (torch.randn(B, H, L, D, generator=g).to(device=dev, dtype=dt) for L in (Lq, Lk, Lk))
            lens = torch.randint(Lk // 2, Lk + 1, (B,), generator=g).to(dev)
            bias = (torch.randn(H, Lq, Lk, generator=g) * 0.5).to(device=dev, dtype=dt)
            keep = torch.arange(Lk, device=dev)[None, :] < lens[:, None]
            maskf = torch.zeros(keep.shape, dtype=dt, device=dev).masked_fill(~keep, float("-inf"))[:, None, None, :]
            impls = {"narvl": lambda q, k, v, b: narvl.query_attention(q, k, v, lens, b)}
            if dev.type == "cuda" and name == "cross":
                impls["narvl compiled"] = _compiled(lambda q, k, v, b: narvl.query_attention(q, k, v, lens, b))
            for bname, be in (("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION),
                              ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-math", SDPBackend.MATH)):
                def sd(q, k, v, b, be=be):
                    with sdpa_kernel(be):
                        return F.scaled_dot_product_attention(q, k, v, attn_mask=b + maskf)
                impls[bname] = sd
            if flex is not None:
                flex_fn, create_block_mask = flex

                def mask_mod(b, h, qi, ki):
                    return ki < lens[b]
                bm = create_block_mask(mask_mod, B, None, Lq, Lk, device=dev)

                def flex_impl(q, k, v, b, bm=bm):
                    def score_mod(score, bb, hh, qi, ki):
                        return score + b[hh, qi, ki]
                    return flex_fn(q, k, v, score_mod=score_mod, block_mask=bm)
                impls["flex"] = flex_impl
            for mode in ("fwd", "fwdbwd"):
                group = f"attn {name} B{B} H{H} Lq{Lq} Lk{Lk} D{D} {dname} {mode}"
                for impl, fn in impls.items():
                    if mode == "fwd":
                        def run(fn=fn):
                            with torch.no_grad():
                                fn(q, k, v, bias)
                    else:
                        ins = [t.detach().requires_grad_(True) for t in (q, k, v, bias)]
                        go = torch.randn_like(q)

                        def run(fn=fn, ins=ins, go=go):
                            torch.autograd.grad(fn(*ins), ins, go)
                    bn.add(group, impl, run, shape=[B, H, Lq, Lk, D], dtype=dname, mode=mode)


def bench_decode(bn, dev, shapes, beams):
    g = torch.Generator().manual_seed(3)
    for name, (B, T, V) in shapes.items():
        lp = (torch.randn(B, T, V, generator=g) * 4).log_softmax(-1)
        lpd = lp.to(dev)
        group = f"decode {name} B{B} T{T} V{V}"
        bn.add(group, "narvl-gpu greedy", lambda: narvl.ctc_greedy_decode(lpd, blank=V - 1), shape=[B, T, V])
        for beam in beams:
            bn.add(group, f"narvl-gpu beam{beam}",
                   lambda beam=beam: narvl.ctc_prefix_beam_search(lpd, beam_width=beam, blank=V - 1),
                   shape=[B, T, V], beam=beam)
            if narvl.native_available() and dev.type == "cuda":
                def cpu(beam=beam):
                    return torch.ops.narvl.ctc_beam_search(lp, torch.full((B,), T, dtype=torch.long), beam, V - 1,
                                                           40, 1.0, beam, 1, 0)
                bn.rows.append({"group": group, "impl": f"narvl-cpu beam{beam}", "threads": torch.get_num_threads(),
                                "ms": Bench(torch.device("cpu"), False).time_ms(cpu), "shape": [B, T, V]})
                bn.save()
                print(f"  {group:<44} {'narvl-cpu beam%d' % beam:<22} {bn.rows[-1]['ms']:9.4f} ms "
                      f"({torch.get_num_threads()} threads)", flush=True)


def _no_checks(fn):
    """fn with NARVL_CHECK=0 (no value checks, so no host synchronisation) for the call."""
    def run():
        old = os.environ.get("NARVL_CHECK")
        os.environ["NARVL_CHECK"] = "0"
        try:
            return fn()
        finally:
            if old is None:
                del os.environ["NARVL_CHECK"]
            else:
                os.environ["NARVL_CHECK"] = old
    return run


def _host_profile(fn, sync, iters=20):
    """cProfile of the host side of fn: the 12 functions with the most own time, per call."""
    import cProfile
    import pstats
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(iters):
        fn()
    sync()
    pr.disable()
    st = pstats.Stats(pr)
    rows = []
    for (file, line, func), (cc, nc, tt, ct, _) in st.stats.items():
        rows.append({"func": f"{os.path.basename(file)}:{line}:{func}", "calls": nc // iters,
                     "own_us": tt * 1e6 / iters, "cum_us": ct * 1e6 / iters})
    rows.sort(key=lambda r: -r["own_us"])
    return rows[:12]


def profile_calls(dev, calls, path):
    """Per call: host wall time per iteration and the device time of each kernel it launched
    (torch.profiler), so launch overhead and host syncs show apart from kernel time."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    out = []
    for name, fn in calls:
        try:
            for _ in range(3 if dev.type == "cuda" else 1):
                fn()
            sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
            sync()
            iters = 10 if dev.type == "cuda" else 1
            t0 = time.perf_counter()
            with profile(activities=acts) as prof:
                for _ in range(iters):
                    fn()
                sync()
            wall = (time.perf_counter() - t0) * 1e3 / iters
            kernels = []
            for e in prof.key_averages():
                if dev.type == "cuda" and e.device_type == torch.autograd.DeviceType.CUDA:
                    kernels.append({"kernel": e.key[:120], "calls": e.count // iters,
                                    "device_ms": e.self_device_time_total / 1e3 / iters})
            kernels.sort(key=lambda r: -r["device_ms"])
            total = sum(k["device_ms"] for k in kernels)
            out.append({"call": name, "device": env_info(dev)["device"], "cpu": cpu_model(),
                        "threads": torch.get_num_threads(), "wall_ms_profiled": wall, "device_ms": total, "kernels": kernels[:12],
                        "host_top": _host_profile(fn, sync, 20 if dev.type == "cuda" else 2)})
            print(f"  {name:<52} wall {wall:8.3f} ms  kernels {total:8.3f} ms", flush=True)
            for k in kernels[:5]:
                print(f"      {k['device_ms']:8.3f} ms x{k['calls']:<3} {k['kernel'][:80]}", flush=True)
        except Exception as exc:
            traceback.print_exc()
            out.append({"call": name, "error": f"{type(exc).__name__}: {exc}"[:2000]})
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
    return out


def profile_suite(dev, dry, path, ops):
    g = torch.Generator().manual_seed(4)
    B, N, V = (2, 5, 19) if dry else (32, 20, V_OFA)
    x = (torch.randn(B, N, V, generator=g) * 3).to(dev)
    tg = torch.randint(0, V - 1, (B, min(16, N - 2)), generator=g).to(dev)
    tl = torch.full((B,), tg.shape[1], dtype=torch.long, device=dev)
    xr = x.detach().requires_grad_(True)
    Ba, H, Lq, Lk, D = (2, 2, 3, 21, 16) if dry else (32, 12, 20, 930, 64)
    dt = torch.bfloat16
    q, k, v = (torch.randn(Ba, H, L, D, generator=g).to(device=dev, dtype=dt).requires_grad_(True)
               for L in (Lq, Lk, Lk))
    bias = torch.randn(H, Lq, Lk, generator=g).to(device=dev, dtype=dt).requires_grad_(True)
    lens = torch.randint(Lk // 2, Lk + 1, (Ba,), generator=g).to(dev)
    go = torch.randn_like(q)
    Bd, T, Vd = (4, 5, 13) if dry else (256, 20, V_OFA)
    lp = (torch.randn(Bd, T, Vd, generator=g) * 4).log_softmax(-1).to(dev)
    calls = [
        ("qctc fwd+bwd", lambda: torch.autograd.grad(narvl.qctc_loss(xr, tg, tl, blank=V - 1), xr)),
        ("qctc fwd+bwd NARVL_CHECK=0", _no_checks(lambda: torch.autograd.grad(
            narvl.qctc_loss(xr, tg, tl, blank=V - 1), xr))),
        ("attention fwd+bwd bf16", lambda: torch.autograd.grad(
            narvl.query_attention(q, k, v, lens, bias), (q, k, v, bias), go)),
        ("attention fwd bf16 NARVL_CHECK=0", _no_checks(lambda: narvl.query_attention(
            q.detach(), k.detach(), v.detach(), lens, bias.detach()))),
        ("greedy B256 caption", lambda: narvl.ctc_greedy_decode(lp, blank=Vd - 1)),
        ("beam B256 caption", lambda: narvl.ctc_prefix_beam_search(lp, beam_width=3 if dry else 10,
                                                                   blank=Vd - 1)),
    ]
    want = {"qctc": "qctc", "attention": "attention", "greedy": "decode", "beam": "decode"}
    return profile_calls(dev, [c for c in calls if want[c[0].split()[0]] in ops], path)


# ----------------------------------------------------------------------------------------- main

def main(args):
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        raise SystemExit("gpu_suite: no CUDA device; use --dry-run to check the suite on CPU")
    dev = torch.device("cpu") if dry else torch.device("cuda")
    os.makedirs(args.out, exist_ok=True)
    info = env_info(dev)
    print(json.dumps(info), flush=True)
    g = torch.Generator().manual_seed(args.seed)
    ops = set(args.ops.split(","))
    if not ops <= {"qctc", "ctc", "attention", "decode"}:
        raise SystemExit(f"gpu_suite: --ops takes qctc, ctc, attention, decode; got {args.ops}")
    failed = 0
    if args.only in (None, "checks"):
        ch = Checks(os.path.join(args.out, "gpu_checks.json"), info)
        t0 = time.time()
        if "qctc" in ops:
            check_qctc(ch, dev, [(2, 5, 19)] if dry else [(3, 7, 33), (5, 20, 1000), (4, 6, V_OFA), (2, 200, 1001)], g)
        if "ctc" in ops:
            check_ctc(ch, dev, [(7, 2, 11)] if dry else [(7, 3, 11), (50, 4, 97)], g)
        if "attention" in ops:
            check_attention(ch, dev, [(2, 2, 3, 21, 16)] if dry else [
                (2, 3, 5, 37, 16), (2, 2, 20, 130, 64), (2, 2, 6, 93, 80), (1, 2, 7, 61, 128),
                (4, 12, 20, 930, 64)], g)
        if "decode" in ops:
            check_decode(ch, dev, [(2, 5, 13)] if dry else [(3, 7, 33), (4, 20, 1000), (3, 5, V_OFA)],
                         [1, 3] if dry else [1, 10, 32, 64, 100, 128], g)
        failed = sum(not r["ok"] for r in ch.rows)
        ch.save(failed=failed, complete=True)
        print(f"checks: {len(ch.rows) - failed} ok, {failed} failed ({time.time() - t0:.0f} s)", flush=True)
    if args.only in (None, "bench"):
        t0 = time.time()
        bw = copy_bandwidth(dev, dry)
        bn = Bench(dev, dry, os.path.join(args.out, "gpu_bench.json"), {**info, "copy_GBps": bw})
        print(f"  device-to-device copy: {bw:.0f} GB/s (read + write)", flush=True)
        if "qctc" in ops:
            bench_qctc(bn, dev, {"tiny": (2, 5, 19)} if dry else {
                "caption": (32, 20, V_OFA), "vqa": (64, 6, V_OFA), "asr": (16, 200, 1000),
                "caption-B256": (256, 20, V_OFA)}, bw)
        if "attention" in ops:
            bench_attention(bn, dev, {"tiny": (2, 2, 3, 21, 16)} if dry else {
                "cross": (32, 12, 20, 930, 64), "dec-b1": (1, 4, 6, 28, 64)})
        if "decode" in ops:
            bench_decode(bn, dev, {"tiny": (4, 5, 13)} if dry else {
                "caption": (256, 20, V_OFA), "vqa": (256, 6, V_OFA)}, [1, 3] if dry else [1, 10, 32, 100, 128])
        bn.save(complete=True)
        print(f"bench: {len(bn.rows)} rows ({time.time() - t0:.0f} s)", flush=True)
    if args.only in (None, "profile"):
        profile_suite(dev, dry, os.path.join(args.out, "gpu_profile.json"), ops)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
