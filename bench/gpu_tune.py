"""Launch-configuration sweep of the two kernels that carry the GPU's bytes: the Q-CTC row pass
(``_row_kernel``: log-sum-exp, row sum, label gather) and the frame top-k of the beam search
(``_topk_kernel``). Every variant's outputs are compared with the shipped configuration's
before it is timed. Prints a table and writes ``OUT/gpu_tune.json``.

    python bench/gpu_tune.py --out DIR   (CUDA only)
"""
import argparse
import json
import os
import sys

import torch
import triton
import triton.testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import narvl  # noqa: E402

try:
    import narvl.kernels  # noqa: F401
except ImportError:
    narvl.__path__.append(ROOT)
from narvl.kernels import ctc as kc  # noqa: E402
from narvl.kernels import decode as kd  # noqa: E402
sys.path.insert(0, os.path.join(ROOT, "bench"))
from setups import cpu_model  # noqa: E402


def bench(fn):
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def row_pass(x, targets, tl_, ql, blank, block_v, warps, stages):
    B, N, V = x.shape
    K = targets.shape[1] + 1
    lse = torch.zeros(B, N, device=x.device)
    rowsum = torch.zeros(B, N, device=x.device)
    em = torch.full((B, N, K), float("-inf"), device=x.device)
    kc._row_kernel[(B * N,)](x, x.stride(0), x.stride(1), N, V, targets, targets.stride(0), tl_, ql,
                             lse, rowsum, em, K, blank, NORMALIZED=False, BLOCK_V=block_v,
                             BLOCK_K=triton.next_power_of_2(K), ACC=triton.language.float32,
                             num_warps=warps, num_stages=stages)
    return lse, rowsum, em


def topk_pass(x, K, block_v, warps, stages):
    B, T, V = x.shape
    topv = torch.empty(B, T, K, device=x.device)
    topi = torch.empty(B, T, K, dtype=torch.int32, device=x.device)
    nanf = torch.empty(B * T, dtype=torch.int32, device=x.device)
    cap = triton.next_power_of_2(K * triton.cdiv(V, block_v))
    scr = torch.empty(B * T, cap, dtype=torch.int64, device=x.device)
    kd._topk_kernel[(B * T,)](x, x.stride(0), x.stride(1), T, V, topv, topi, nanf, scr, INPUT=1, K=K,
                              BLOCK_V=block_v, CAP=cap, SMALL=min(cap, 4 * K), num_warps=warps,
                              num_stages=stages)
    return topv, topi


def save(out, rows):
    with open(os.path.join(out, "gpu_tune.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "cpu": cpu_model(), "torch": torch.__version__,
                   "triton": triton.__version__, "cpu_threads": torch.get_num_threads(), "rows": rows}, f, indent=1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = torch.device("cuda")
    rows = []
    g = torch.Generator().manual_seed(0)
    B, N, V = 256, 20, 59458
    tg = torch.randint(0, V - 1, (B, 16), generator=g).to(dev)
    tl_ = torch.randint(4, 17, (B,), generator=g).to(dev)
    ql = torch.full((B,), N, device=dev, dtype=torch.long)
    for dname, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x = (torch.randn(B, N, V, generator=g) * 3).to(device=dev, dtype=dt)
        base = row_pass(x, tg, tl_, ql, V - 1, 4096, 8, 3)
        nbytes = x.numel() * x.element_size()
        for block_v in (2048, 4096, 8192):
            for warps in (4, 8, 16):
                for stages in (1, 3):
                    try:
                        out = row_pass(x, tg, tl_, ql, V - 1, block_v, warps, stages)
                        same = all(torch.allclose(a, b, rtol=1e-5, atol=1e-4) for a, b in zip(out, base))
                        ms = bench(lambda: row_pass(x, tg, tl_, ql, V - 1, block_v, warps, stages))
                    except Exception as exc:  # out of resources etc.
                        rows.append({"kernel": "row", "dtype": dname, "block_v": block_v, "warps": warps,
                                     "stages": stages, "error": str(exc)[:300]})
                        continue
                    rows.append({"kernel": "row", "dtype": dname, "block_v": block_v, "warps": warps,
                                 "stages": stages, "ms": ms, "TBps": nbytes / ms / 1e9, "same": same})
                    save(args.out, rows)
                    print(f"row {dname} BLOCK_V {block_v:5d} warps {warps:2d} stages {stages} "
                          f"{ms:7.4f} ms {nbytes / ms / 1e9:5.2f} TB/s {'ok' if same else 'DIFFERENT'}", flush=True)
    lp = (torch.randn(B, N, V, generator=g) * 4).log_softmax(-1).to(dev)
    base = topk_pass(lp, 64, 2048, 4, 3)
    for block_v in (1024, 2048, 4096):
        for warps in (4, 8):
            for stages in (3,):
                try:
                    out = topk_pass(lp, 64, block_v, warps, stages)
                    same = torch.equal(out[1], base[1]) and torch.equal(out[0], base[0])
                    ms = bench(lambda: topk_pass(lp, 64, block_v, warps, stages))
                except Exception as exc:
                    rows.append({"kernel": "topk", "block_v": block_v, "warps": warps, "stages": stages,
                                 "error": str(exc)[:300]})
                    continue
                rows.append({"kernel": "topk", "block_v": block_v, "warps": warps, "stages": stages,
                             "ms": ms, "same": same})
                print(f"topk BLOCK_V {block_v:5d} warps {warps} stages {stages} {ms:7.4f} ms "
                      f"{'ok' if same else 'DIFFERENT'}", flush=True)
                save(args.out, rows)


if __name__ == "__main__":
    main()
