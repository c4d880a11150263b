"""Minimal Q-CTC training + evaluation on embedded, generated data.

A small non-autoregressive model reads a token sequence with a transformer encoder; N learnable
queries attend to it (no causal mask) and emit all output tokens in one pass; Q-CTC (narvl's
fused kernel) trains it and greedy CTC decoding reads the answer. The task (reverse the input and
drop one token class) is generated deterministically from --seed, so it runs offline anywhere.
The full NARVL vision-language network arrives with the model layer (narvl.models).

    python train.py --out runs/demo            # ~1 minute on 2 CPU cores
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn as nn

import narvl


def make_batch(g, batch, vocab, max_len):
    lengths = torch.randint(1, max_len + 1, (batch,), generator=g)
    src = torch.randint(1, vocab, (batch, max_len), generator=g)
    src = torch.where(torch.arange(max_len)[None] < lengths[:, None], src, 0)  # 0 = pad
    tgts, tl = [], []
    for b in range(batch):
        seq = [t for t in reversed(src[b, : lengths[b]].tolist()) if t % 5 != 0]  # reverse, drop 5k
        tgts.append(seq + [0] * (max_len - len(seq)))
        tl.append(len(seq))
    return src, torch.tensor(tgts), torch.tensor(tl)


class QueryModel(nn.Module):
    def __init__(self, vocab, d=128, layers=2, heads=4, queries=16, max_len=32):
        super().__init__()
        self.vocab = vocab + 1  # + blank (last index), as in NARVL
        self.embed = nn.Embedding(self.vocab, d)
        self.pos = nn.Parameter(torch.randn(max_len, d) * 0.02)
        self.queries = nn.Parameter(torch.randn(queries, d) * 0.02)
        enc = nn.TransformerEncoderLayer(d, heads, 4 * d, 0.0, batch_first=True, norm_first=True)
        dec = nn.TransformerDecoderLayer(d, heads, 4 * d, 0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(enc, layers)
        self.decoder = nn.TransformerDecoder(dec, layers)
        self.norm = nn.LayerNorm(d)

    def forward(self, src):
        pad = src == 0
        mem = self.encoder(self.embed(src) + self.pos[: src.shape[1]], src_key_padding_mask=pad)
        q = self.queries.expand(src.shape[0], -1, -1)
        h = self.norm(self.decoder(q, mem, memory_key_padding_mask=pad))
        return h @ self.embed.weight.t()  # (B, N, V+1), tied output projection


def greedy(logits, blank):
    out = []
    for row in logits.argmax(-1).tolist():
        seq, prev = [], None
        for t in row:
            if t != prev and t != blank:
                seq.append(t)
            prev = t
        out.append(seq)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    vocab, max_len = 30, 10
    model = QueryModel(vocab, queries=2 * max_len, max_len=max_len)
    blank = model.vocab - 1
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    g = torch.Generator().manual_seed(a.seed)
    t0 = time.time()
    for step in range(a.steps):
        src, tgt, tl = make_batch(g, a.batch_size, vocab, max_len)
        loss = narvl.qctc_loss(model(src), tgt, tl, blank=blank, label_smoothing=a.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == a.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}", flush=True)
    train_s = time.time() - t0
    model.eval()
    ge = torch.Generator().manual_seed(a.seed + 1)
    src, tgt, tl = make_batch(ge, 512, vocab, max_len)
    with torch.no_grad():
        t1 = time.perf_counter()
        hyp = greedy(model(src), blank)
        dec_ms = (time.perf_counter() - t1) * 1e3 / len(hyp)
    ref = [tgt[b, : tl[b]].tolist() for b in range(len(hyp))]
    acc = sum(h == r for h, r in zip(hyp, ref)) / len(ref)
    os.makedirs(a.out, exist_ok=True)
    metrics = dict(task="reverse-filter", arch="query-ctc", metric_name="exact_match", metric=acc,
                   latency_ms=dec_ms, params=sum(p.numel() for p in model.parameters()),
                   train_seconds=train_s)
    with open(os.path.join(a.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print(f"exact_match {acc:.3f}  decode {dec_ms:.3f} ms/sample  train {train_s:.0f}s  -> {a.out}/metrics.json")
    return metrics


if __name__ == "__main__":
    main()
