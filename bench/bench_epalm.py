"""eP-ALM (``narvl.models.EPALM``): a training step and batch-1 generation against the same
model run naively, taking turns in one process on the same inputs.

    python -m pytest bench/bench_epalm.py --benchmark-json bench/results/epalm_cpu.json

The models are random-weight OPT and ViT of the sizes ``train.py --arch epalm`` pretrains
(``narvl.models.epalm_pretrain.LM_SIZE`` / ``VIT_SIZE``, 64-px images, a 1,000-entry vocabulary)
and, with ``NARVL_EPALM_LARGE=1``, an OPT of 12 layers, d 768 (OPT-125m's shape) with a ViT of 12
layers, d 384. Speed does not depend on the weights' values.

* Generation (batch 1, 20 new tokens, greedy): ``EPALM.generate`` of the AR head (the visual
  tokens and prompt computed once, then one cached step per token) against the naive loop that
  runs the whole sequence through ``text_logits`` for every new token (the ViT included, as a
  loop over a model's forward does); both must give the same tokens. The NAR head's one pass is timed beside them.
* Training step (batch 32, forward + backward + AdamW on the adapter): the model as built
  (frozen weights without gradients, the ViT under ``no_grad``) against the naive step in which
  the LM's frozen weights still require gradients (computed by backward, then left unused: the
  optimizer holds the adapter only), as in a training loop that forgets to freeze them.
* bfloat16 frozen models (``frozen_dtype=torch.bfloat16``) join both where the CPU has bfloat16
  instructions (AVX512-BF16, AMX-BF16); elsewhere bfloat16 is emulated and is skipped.

extra_info: per variant the median ms over the rounds and the rounds themselves, the threads and
the CPU model.
"""
import os
import statistics
import time

import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM, ViTConfig, ViTModel

from narvl.models import EPALM
from narvl.models.epalm_pretrain import LM_SIZE, VIT_SIZE
from narvl.models.inference import cpu_has_bf16
from setups import cpu_model

VOCAB, IMAGE, PROMPT, NEW_TOKENS, BATCH, ROUNDS = 1000, 64, 8, 20, 32, 7
LARGE = os.environ.get("NARVL_EPALM_LARGE") == "1"


def frozen_models(seed=0):
    torch.manual_seed(seed)
    lm_size = (dict(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12,
                    max_position_embeddings=128) if LARGE else LM_SIZE)
    vit_size = (dict(patch_size=8, hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                     intermediate_size=1536) if LARGE else VIT_SIZE)
    lm = OPTForCausalLM(OPTConfig(vocab_size=VOCAB, bos_token_id=0, pad_token_id=1, eos_token_id=2,
                                  word_embed_proj_dim=lm_size["hidden_size"], **lm_size))
    vit = ViTModel(ViTConfig(image_size=IMAGE, num_channels=3, **vit_size), add_pooling_layer=False)
    return lm.eval(), vit.eval()


def build(head, frozen_dtype=None):
    lm, vit = frozen_models()
    return EPALM(lm, vit, head=head, frozen_dtype=frozen_dtype)


def inputs(batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, IMAGE, IMAGE, generator=g)
    ids = torch.randint(3, VOCAB, (batch, PROMPT), generator=g)
    ids[:, 0] = 0
    return images, ids, torch.ones(batch, PROMPT, dtype=torch.long)


@torch.no_grad()
def naive_greedy(model, images, ids, mask, new_tokens):
    """Greedy decoding without a cache: the whole sequence through ``text_logits`` per token."""
    out = []
    for _ in range(new_tokens):
        nxt = int(model.text_logits(images, ids, mask)[0, -1].argmax())
        if nxt == model.eos_token_id:
            break
        out.append(nxt)
        ids = torch.cat([ids, ids.new_tensor([[nxt]])], 1)
        mask = torch.cat([mask, mask.new_ones(1, 1)], 1)
    return out


def take_turns(calls: dict, rounds=ROUNDS):
    """{name: fn}: one warm-up call each, then ``rounds`` rounds calling each in turn -> {name:
    per-round ms}."""
    for fn in calls.values():
        fn()
    times = {k: [] for k in calls}
    for _ in range(rounds):
        for k, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def report(benchmark, group, times, **info):
    benchmark.group = group
    benchmark.extra_info.update(
        threads=torch.get_num_threads(), cpu_model=cpu_model(), large=LARGE, **info,
        **{f"{k}_median_ms": round(statistics.median(v), 3) for k, v in times.items()},
        **{f"{k}_rounds_ms": [round(x, 3) for x in v] for k, v in times.items()})


def test_generation_batch1(benchmark):
    """AR head: cached generate vs the uncached loop (same tokens); the NAR head's one pass."""
    images, ids, mask = inputs(1)
    ar, nar = build("ar"), build("nar")
    ar.eos_token_id = -1  # random weights: decode all NEW_TOKENS tokens, never stop early
    want = naive_greedy(ar, images, ids, mask, NEW_TOKENS)
    assert ar.generate(images, ids, mask, max_new_tokens=NEW_TOKENS) == [want]
    calls = {"ar_cached": lambda: ar.generate(images, ids, mask, max_new_tokens=NEW_TOKENS),
             "ar_naive": lambda: naive_greedy(ar, images, ids, mask, NEW_TOKENS),
             "nar": lambda: nar.generate(images, ids, mask, max_new_tokens=NEW_TOKENS)}
    if cpu_has_bf16():
        ar16 = build("ar", torch.bfloat16)
        ar16.eos_token_id = -1
        calls["ar_cached_bf16"] = lambda: ar16.generate(images, ids, mask, max_new_tokens=NEW_TOKENS)
    out = {}
    benchmark.pedantic(lambda: out.update(take_turns(calls)), rounds=1, iterations=1)
    report(benchmark, "epalm-generate-b1", out, new_tokens=NEW_TOKENS, prompt=PROMPT,
           bf16_included=cpu_has_bf16())


def _step(model, batch, opt):
    images, ids, mask = batch
    target = torch.randint(3, VOCAB, (ids.shape[0], 12), generator=torch.Generator().manual_seed(2))
    tmask = torch.ones_like(target)

    def step():
        opt.zero_grad(set_to_none=True)
        model.loss(images, ids, mask, target, tmask).backward()
        opt.step()
    return step


@pytest.mark.parametrize("head", ["ar", "nar"])
def test_training_step(benchmark, head):
    """One adapter step, batch 32: frozen weights without gradients vs still requiring them."""
    batch = inputs(BATCH)
    model, naive = build(head), build(head)
    adapter = list(naive.adapter_parameters().values())  # the optimizer's, before the LM requires grad
    naive.lm.requires_grad_(True)
    calls = {"epalm": _step(model, batch, torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)),
             "naive": _step(naive, batch, torch.optim.AdamW(adapter, lr=1e-4))}
    before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    naive_before = {k: v.clone() for k, v in naive.lm.state_dict().items()}
    if cpu_has_bf16():
        m16 = build(head, torch.bfloat16)
        calls["epalm_bf16"] = _step(m16, batch, torch.optim.AdamW(m16.trainable_parameters(), lr=1e-4))
    out = {}
    benchmark.pedantic(lambda: out.update(take_turns(calls, rounds=5)), rounds=1, iterations=1)
    assert all(torch.equal(before[k], v) for k, v in model.lm.state_dict().items())
    assert any(p.grad is not None for p in naive.lm.parameters())  # the naive step computed them
    assert all(torch.equal(naive_before[k], v) for k, v in naive.lm.state_dict().items())  # and left them
    trained, total, frac = model.trainable_fraction()
    report(benchmark, f"epalm-train-step-{head}", out, head=head, batch=BATCH, trained=trained, total=total,
           trainable_fraction=frac, bf16_included=cpu_has_bf16())
