"""eP-ALM on tiny random Hugging Face OPT and ViT models (narvl.models.epalm).

The oracle for the injection is a plain loop over ``lm.model.decoder.layers`` written here: it
prepends the first visual token, overwrites it at the later injected layers and builds its own
causal mask, in float64."""
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import OPTConfig, OPTForCausalLM, ViTConfig, ViTModel  # noqa: E402

import narvl  # noqa: E402
from narvl.models.epalm import (EPALM, default_layer_range, injection_schedule,  # noqa: E402
                                trained_fraction_for_configs)

# initialisations wider than the defaults, so that outputs depend visibly on the image and the text
VIT = dict(image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=3, num_attention_heads=4,
           intermediate_size=48, initializer_range=0.2)
LMS = {
    # pre-LayerNorm layers with a final LayerNorm, embedding width = hidden width
    "pre_ln": dict(vocab_size=64, hidden_size=32, num_hidden_layers=4, ffn_dim=64, num_attention_heads=4,
                   max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0, init_std=0.3),
    # OPT-350m's layout: post-LayerNorm, no final LayerNorm, project_in / project_out
    "post_ln": dict(vocab_size=64, hidden_size=32, num_hidden_layers=4, ffn_dim=64, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=16, dropout=0.0,
                    do_layer_norm_before=False, init_std=0.3),
}
EOS = 2  # OPTConfig's default eos_token_id
# layers [1, 3) take the two tokens, layer 3 runs after the injection: the cached path must hold it
SPLIT = dict(start_layer_idx=1, end_layer_idx=3, injected_hidden_states=2)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("epalm")
    torch.manual_seed(0)
    for name, kw in LMS.items():
        OPTForCausalLM(OPTConfig(**kw)).save_pretrained(root / name)
    ViTModel(ViTConfig(**VIT)).save_pretrained(root / "vit")
    return root


def build(saved, lm="pre_ln", head="ar", num_queries=None, **options):
    torch.manual_seed(1)
    return EPALM.from_pretrained(saved / lm, saved / "vit", head, num_queries, **options)


def make_batch(seed=0, prompt_lengths=(4, 2, 3), target_lengths=(3, 1, 2)):
    """Images, right-padded prompts (BOS first, pad id 1) and answers."""
    g = torch.Generator().manual_seed(seed)
    b = len(prompt_lengths)
    images = torch.randn(b, 3, 32, 32, generator=g)

    def padded(lengths, width):
        ids = torch.randint(3, 64, (b, width), generator=g)
        mask = torch.arange(width)[None] < torch.tensor(lengths)[:, None]
        return ids.masked_fill(~mask, 1), mask.long()

    prompt_ids, prompt_mask = padded(prompt_lengths, max(prompt_lengths) + 1)
    prompt_ids[:, 0] = EOS  # OPT's tokenizer starts every text with </s>
    target_ids, target_mask = padded(target_lengths, max(target_lengths) + 1)
    return images, prompt_ids, prompt_mask, target_ids, target_mask


def reference_logits(model, images, ids, mask, with_queries=False):
    """Logits of the text (and of the NAR queries, blank column appended) by a hand-written loop."""
    lm, vit = model.lm, model.vision
    dec = lm.model.decoder
    k, start, end = model.injected_hidden_states, model.start_layer_idx, model.end_layer_idx
    mask = mask.bool()
    hidden_states = vit(pixel_values=images, output_hidden_states=True).hidden_states[-k:]
    visual = [model.connector[0 if model.shared_connector else j](vit.layernorm(h[:, 0]))
              for j, h in enumerate(hidden_states)]
    n = end - start
    step = n // k if n > k else 1
    b, t = ids.shape
    x = dec.embed_tokens(ids.masked_fill(~mask, 0))
    positions = torch.arange(t).expand(b, t)
    valid = mask
    if with_queries:
        nq = model.num_queries
        x = torch.cat([x, model.queries.expand(b, -1, -1)], 1)
        positions = torch.cat([positions, mask.sum(1, keepdim=True) + torch.arange(nq)], 1)
        valid = torch.cat([valid, torch.ones(b, nq, dtype=torch.bool)], 1)
    p = 0
    if model.prompt is not None:
        prompt = model.prompt()
        p = prompt.shape[0]
        x = torch.cat([prompt.expand(b, -1, -1), x], 1)
        valid = torch.cat([torch.ones(b, p, dtype=torch.bool), valid], 1)
    if dec.project_in is not None:
        x = dec.project_in(x)
    h = torch.cat([x[:, :p], x[:, p:] + dec.embed_positions.weight[positions + 2]], 1)
    added = False
    for idx, layer in enumerate(dec.layers):
        if start <= idx < end and idx % model.text_step == 0:
            v = visual[min((idx - start) // step, k - 1)][:, None]
            if added:
                h = torch.cat([v, h[:, 1:]], 1)
            else:
                h = torch.cat([v, h], 1)
                valid = torch.cat([torch.ones(b, 1, dtype=torch.bool), valid], 1)
                added = True
        s = h.shape[1]
        allowed = torch.ones(s, s, dtype=torch.bool).tril()[None] & valid[:, None, :]
        additive = torch.zeros(b, 1, s, s, dtype=h.dtype)
        additive = additive.masked_fill(~allowed[:, None], torch.finfo(h.dtype).min)
        h = layer(h, attention_mask=additive)[0]
    h = h[:, int(added) + p:]
    if dec.final_layer_norm is not None:
        h = dec.final_layer_norm(h)
    if dec.project_out is not None:
        h = dec.project_out(h)
    if not with_queries:
        return lm.lm_head(h)
    hq = h[:, t:]
    return torch.cat([lm.lm_head(hq), (hq @ model.blank_weight + model.blank_bias)[..., None]], -1)


def test_authors_schedule_and_defaults(saved):
    assert default_layer_range(32) == (19, 31)  # configs/image/ePALM_*.yaml on OPT-2.7B
    assert default_layer_range(24) == (14, 23)  # OPT-350m
    assert injection_schedule(32, 6, 19, 31, 1) == [(19 + i, i // 2) for i in range(12)]
    assert injection_schedule(8, 2, 1, 8, 2) == [(2, 0), (4, 1), (6, 1)]
    model = build(saved)
    assert (model.start_layer_idx, model.end_layer_idx, model.injected_hidden_states) == (2, 3, 1)
    assert model.prompt_len == 10 and model.prompt.mlp is not None and len(model.connector) == 1
    assert build(saved, **SPLIT).schedule == [(1, 0), (2, 1)]
    assert build(saved, head="nar").num_queries == 20
    assert narvl.models.EPALM is EPALM


@pytest.mark.parametrize("lm, options", [
    ("post_ln", {}),
    ("pre_ln", dict(SPLIT, shared_connector=False)),
    ("pre_ln", dict(start_layer_idx=0, end_layer_idx=4, text_step=2, injected_hidden_states=2,
                    prompt_mlp=False)),
    ("post_ln", dict(start_layer_idx=1, end_layer_idx=4, injected_hidden_states=3, prompt_len=0)),
])
def test_injection_matches_hand_loop(saved, lm, options):
    model = build(saved, lm, **options).double()
    images, ids, mask, _, _ = make_batch()
    images = images.double()
    got = model.text_logits(images, ids, mask)
    assert got.dtype == torch.float64 and got.shape == (3, ids.shape[1], 64)
    torch.testing.assert_close(got, reference_logits(model, images, ids, mask), rtol=0, atol=1e-10)


@pytest.mark.parametrize("lm", ["pre_ln", "post_ln"])
def test_nar_logits_loss_and_decode_match_reference(saved, lm):
    model = build(saved, lm, head="nar", num_queries=8, **SPLIT).double()
    with torch.no_grad():
        model.blank_weight.normal_()  # a blank column that is not constant
    images, ids, mask, tids, tmask = make_batch()
    images = images.double()
    ref = reference_logits(model, images, ids, mask, with_queries=True)
    torch.testing.assert_close(model.query_logits(images, ids, mask), ref, rtol=0, atol=1e-10)
    lt = tmask.sum(1)
    targets = torch.cat([tids, torch.zeros(3, 1, dtype=torch.long)], 1).scatter(1, lt[:, None], EOS)
    expected = narvl.qctc_loss(ref, targets, lt + 1, blank=64, zero_infinity=True)
    torch.testing.assert_close(model.loss(images, ids, mask, tids, tmask), expected, rtol=1e-12, atol=1e-12)
    tokens, lens = narvl.ctc_greedy_decode(ref.float(), blank=64)
    decoded = [tokens[b, : lens[b]].tolist() for b in range(3)]
    decoded = [s[: s.index(EOS)] if EOS in s else s for s in decoded]
    assert model.generate(images, ids, mask) == decoded


@pytest.mark.parametrize("head", ["ar", "nar"])
def test_frozen_weights_unchanged_trainable_changed(saved, head):
    model = build(saved, "post_ln", head, 8 if head == "nar" else None, **SPLIT)
    grad_in_vit = []
    model.vision.register_forward_pre_hook(lambda *_: grad_in_vit.append(torch.is_grad_enabled()))
    adapter = model.adapter_parameters()
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in adapter.values()}
    assert all(p.dtype == torch.float32 for p in adapter.values())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = make_batch()
    # every parameter handed to the optimizer: the frozen ones get no gradient, so no update and
    # no weight decay; then the usual filtered optimizer
    for params in (list(model.parameters()), model.trainable_parameters()):
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
        opt.zero_grad()
        model.loss(*batch).backward()
        for n, p in model.named_parameters():
            assert (p.grad is None) == (n not in adapter), n
        opt.step()
    assert grad_in_vit == [False, False]
    for n, p in model.named_parameters():
        if n in adapter:
            assert not torch.equal(p, before[n]), n
        else:
            assert not p.requires_grad and torch.equal(p, before[n]), n


@pytest.mark.parametrize("head", ["ar", "nar"])
def test_image_changes_output(saved, head):
    model = build(saved, "post_ln", head, 8 if head == "nar" else None)
    images, ids, mask, _, _ = make_batch()
    with torch.no_grad():
        a = model(images, ids, mask)
        b = model(torch.randn_like(images), ids, mask)
    assert (a - b).abs().max() > 1e-3 * a.abs().max()


@pytest.mark.parametrize("head", ["ar", "nar"])
def test_training_lowers_the_loss_then_generates(saved, head):
    model = build(saved, "post_ln", head, 8 if head == "nar" else None, **SPLIT)
    batch = make_batch()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=3e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = model.loss(*batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    images, ids, mask, _, _ = batch
    for beam_width in (1, 3):
        out = model.generate(images, ids, mask, max_new_tokens=6, beam_width=beam_width)
        assert len(out) == 3 and all(len(s) <= 6 and all(0 <= t < 64 and t != EOS for t in s) for s in out)


def greedy_without_cache(model, images, ids, mask, max_new_tokens):
    """Greedy decoding that recomputes the whole sequence at every step (``text_logits``)."""
    seqs = [ids[b, : mask[b].sum()].tolist() for b in range(ids.shape[0])]
    out = [[] for _ in seqs]
    alive = [True] * len(seqs)
    for _ in range(max_new_tokens):
        width = max(len(s) for s in seqs)
        cur = torch.tensor([s + [1] * (width - len(s)) for s in seqs])
        cur_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        with torch.no_grad():
            logits = model.text_logits(images, cur, cur_mask)
        for b, s in enumerate(seqs):
            if alive[b]:
                tok = int(logits[b, len(s) - 1].argmax())
                if tok == EOS:
                    alive[b] = False
                else:
                    out[b].append(tok)
                    s.append(tok)
    return out


@pytest.mark.parametrize("lm", ["pre_ln", "post_ln"])
def test_cached_greedy_equals_full_recompute(saved, lm):
    model = build(saved, lm, **SPLIT)
    images, ids, mask, _, _ = make_batch(seed=3)
    expected = greedy_without_cache(model, images, ids, mask, 8)
    assert max(len(s) for s in expected) > 2
    assert model.generate(images, ids, mask, max_new_tokens=8) == expected
    assert model.generate(images, ids, mask, max_new_tokens=8, beam_width=1) == expected


@pytest.mark.parametrize("head, beam_width", [("ar", 1), ("ar", 3), ("nar", 1), ("nar", 4)])
def test_batch_equals_per_sample(saved, head, beam_width):
    model = build(saved, "post_ln", head, 8 if head == "nar" else None, **SPLIT)
    images, ids, mask, _, _ = make_batch(seed=5)
    batched = model.generate(images, ids, mask, max_new_tokens=6, beam_width=beam_width)
    for b in range(3):
        n = int(mask[b].sum())
        alone = model.generate(images[b: b + 1], ids[b: b + 1, :n], mask[b: b + 1, :n], max_new_tokens=6,
                               beam_width=beam_width)
        assert alone == [batched[b]]
    with torch.no_grad():
        logits = model(images, ids, mask)
        for b in range(3):
            n = int(mask[b].sum())
            alone = model(images[b: b + 1], ids[b: b + 1, :n], mask[b: b + 1, :n])[0]
            got = logits[b, :n] if head == "ar" else logits[b]
            torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)


def beam_without_cache(model, images, ids, mask, max_new_tokens, width):
    """The beam search of the module docstring, one sample and one hypothesis at a time, every
    hypothesis scored by recomputing its whole sequence (``text_logits``)."""
    out = []
    for b in range(ids.shape[0]):
        prompt = ids[b, : mask[b].sum()].tolist()
        live, finished, done = [(0.0, [])], [], False
        for t in range(max_new_tokens):
            candidates = []
            for score, tokens in live:
                seq = prompt + tokens
                with torch.no_grad():
                    logits = model.text_logits(images[b: b + 1], torch.tensor([seq]),
                                               torch.ones(1, len(seq), dtype=torch.long))
                logp = logits[0, -1].log_softmax(-1).tolist()
                candidates += [(score + lp, tokens, v) for v, lp in enumerate(logp)]
            candidates.sort(key=lambda c: -c[0])
            live = []
            for rank, (score, tokens, v) in enumerate(candidates[: 2 * width]):
                if len(live) == width:
                    break
                if v == EOS:
                    if rank < width:
                        finished.append((score / (t + 1), tokens))
                else:
                    live.append((score, tokens + [v]))
            finished = sorted(finished, key=lambda h: -h[0])[:width]
            done = not live or (len(finished) == width and live[0][0] / (t + 1) <= finished[-1][0])
            if done:
                break
        if not done:
            finished += [(score / len(tokens), tokens) for score, tokens in live]
        out.append(max(finished, key=lambda h: h[0])[1])
    return out


@pytest.mark.parametrize("seed, width", [(2, 3), (4, 2)])
def test_cached_beam_search_equals_full_recompute(saved, seed, width):
    model = build(saved, "post_ln", **SPLIT)
    images, ids, mask, _, _ = make_batch(seed=seed)
    got = model.generate(images, ids, mask, max_new_tokens=6, beam_width=width)
    assert got == beam_without_cache(model, images, ids, mask, 6, width)


@pytest.mark.parametrize("head", ["ar", "nar"])
def test_adapter_round_trip(saved, tmp_path, head):
    nq = 8 if head == "nar" else None
    model = build(saved, "post_ln", head, nq, **SPLIT)
    batch = make_batch()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model.loss(*batch).backward()
        opt.step()
    path = tmp_path / "adapter.safetensors"
    model.save_adapter(path)
    assert os.listdir(tmp_path) == ["adapter.safetensors"]  # no temporary file left behind
    with safe_open(path, framework="pt") as f:
        assert set(f.keys()) == set(model.adapter_parameters())
        assert f.metadata()["format"] == "narvl.epalm.adapter/1"
    fresh = build(saved, "post_ln", head, nq, **SPLIT)
    assert not torch.equal(fresh.connector[0].weight, model.connector[0].weight)
    fresh.load_adapter(path)
    for n, p in fresh.adapter_parameters().items():
        assert torch.equal(p, model.adapter_parameters()[n]), n
    images, ids, mask, _, _ = batch
    with torch.no_grad():
        assert torch.equal(fresh(images, ids, mask), model(images, ids, mask))
    assert (fresh.generate(images, ids, mask, max_new_tokens=5)
            == model.generate(images, ids, mask, max_new_tokens=5))
    # the same frozen modules wrapped again
    again = EPALM(model.lm, model.vision, head, nq, **SPLIT)
    again.load_adapter(path)
    with torch.no_grad():
        assert torch.equal(again(images, ids, mask), model(images, ids, mask))


def test_malformed_adapter_files(saved, tmp_path):
    model = build(saved, "post_ln", **SPLIT)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a safetensors file" * 4)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        model.load_adapter(garbage)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not an eP-ALM adapter"):
        model.load_adapter(foreign)
    nar_file = tmp_path / "nar.safetensors"
    build(saved, "post_ln", "nar", 8, **SPLIT).save_adapter(nar_file)
    with pytest.raises(ValueError, match="other settings.*head"):
        model.load_adapter(nar_file)
    good = tmp_path / "good.safetensors"
    model.save_adapter(good)
    with safe_open(good, framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["connector.0.weight"] = tensors["connector.0.weight"][:, :-1].contiguous()
    bad_shape = tmp_path / "bad_shape.safetensors"
    save_file(tensors, str(bad_shape), metadata=metadata)
    with pytest.raises(ValueError, match="connector.0.weight"):
        model.load_adapter(bad_shape)
    del tensors["connector.0.weight"]
    missing = tmp_path / "missing.safetensors"
    save_file(tensors, str(missing), metadata=metadata)
    with pytest.raises(ValueError, match="do not match"):
        model.load_adapter(missing)
    with pytest.raises(ValueError, match="does not exist"):
        model.load_adapter(tmp_path / "absent.safetensors")


def test_construction_errors(saved, tmp_path):
    lm = OPTForCausalLM(OPTConfig(**LMS["pre_ln"]))
    vit = ViTModel(ViTConfig(**VIT))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="lm_path"):
        EPALM.from_pretrained(tmp_path / "empty", saved / "vit")
    with pytest.raises(ValueError, match="vision_path"):
        EPALM.from_pretrained(saved / "pre_ln", tmp_path / "empty")
    with pytest.raises(ValueError, match="lm_path"):
        EPALM.from_pretrained(saved / "vit", saved / "vit")
    with pytest.raises(TypeError, match="lm"):
        EPALM(torch.nn.Linear(2, 2), vit)
    with pytest.raises(TypeError, match="lm"):
        EPALM(lm.model, vit)  # no lm_head, no .model.decoder
    with pytest.raises(TypeError, match="vision"):
        EPALM(lm, torch.nn.Linear(2, 2))
    cases = [
        (dict(head="ctc"), "head"),
        (dict(head="nar", num_queries=0), "num_queries"),
        (dict(head="ar", num_queries=4), "num_queries"),
        (dict(start_layer_idx=4), "start_layer_idx"),
        (dict(start_layer_idx=2, end_layer_idx=2), "end_layer_idx"),
        (dict(injected_hidden_states=4), "injected_hidden_states"),
        (dict(start_layer_idx=1, end_layer_idx=2, injected_hidden_states=2), "injected_hidden_states"),
        (dict(start_layer_idx=1, end_layer_idx=2, text_step=2), "text_step"),
        (dict(prompt_len=-1), "prompt_len"),
    ]
    for kwargs, name in cases:
        with pytest.raises(ValueError, match=name):
            EPALM(lm, vit, **kwargs)
    with pytest.raises(TypeError, match="frozen_dtype"):
        EPALM(lm, vit, frozen_dtype=torch.int8)
    with pytest.raises(TypeError, match="num_queries"):
        EPALM(lm, vit, "nar", 2.5)


def test_input_errors(saved):
    model = build(saved, "post_ln", **SPLIT)
    nar = build(saved, "post_ln", "nar", 8, **SPLIT)
    images, ids, mask, tids, tmask = make_batch()
    left_padded = mask.flip(1)
    cases = [
        (lambda: model.loss(images[:, :1], ids, mask, tids, tmask), ValueError, "images"),
        (lambda: model.loss(images[..., :16, :16], ids, mask, tids, tmask), ValueError, "images"),
        (lambda: model.loss(images.long(), ids, mask, tids, tmask), TypeError, "images"),
        (lambda: model.loss(images[:0], ids[:0], mask[:0], tids[:0], tmask[:0]), ValueError, "empty batch"),
        (lambda: model.loss(images, ids, mask[:, :-1], tids, tmask), ValueError, "prompt_mask"),
        (lambda: model.loss(images, ids, mask.float(), tids, tmask), TypeError, "prompt_mask"),
        (lambda: model.loss(images, ids, left_padded, tids, tmask), ValueError, "prompt_mask"),
        (lambda: model.loss(images, ids, mask * 2, tids, tmask), ValueError, "prompt_mask"),
        (lambda: model.loss(images, ids, torch.zeros_like(mask), tids, tmask), ValueError, "prompt_mask"),
        (lambda: model.loss(images, ids + 64, mask, tids, tmask), ValueError, "prompt_ids"),
        (lambda: model.loss(images, ids.float(), mask, tids, tmask), TypeError, "prompt_ids"),
        (lambda: model.loss(images, ids[:2], mask[:2], tids, tmask), ValueError, "prompt_ids"),
        (lambda: model.loss(images, ids, mask, tids - 70, tmask), ValueError, "target_ids"),
        (lambda: model.loss(images, ids, mask, tids, tmask[:, :2]), ValueError, "target_mask"),
        (lambda: model.generate(images, ids, mask, max_new_tokens=0), ValueError, "max_new_tokens"),
        (lambda: model.generate(images, ids, mask, max_new_tokens=80), ValueError, "max_new_tokens"),
        (lambda: model.generate(images, ids, mask, beam_width=0), ValueError, "beam_width"),
        (lambda: model.generate(images, ids, mask, beam_width=2.0), TypeError, "beam_width"),
        (lambda: model(images, ids, mask.float()), TypeError, "prompt_mask"),
        (lambda: model.text_logits(images, ids - 10, mask), ValueError, "ids"),
        (lambda: model.query_logits(images, ids, mask), ValueError, "head='nar'"),
        (lambda: nar.generate(images, ids, mask[:, 1:]), ValueError, "prompt_mask"),
    ]
    for call, error, name in cases:
        with pytest.raises(error, match=name):
            call()
    # padding ids are not checked: only the real tokens must be in the vocabulary
    padded_ids = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        torch.testing.assert_close(model(images, padded_ids, mask), model(images, ids, mask))


def test_bfloat16_frozen_modules(saved, tmp_path):
    ref = build(saved, "post_ln", **SPLIT)
    model = build(saved, "post_ln", frozen_dtype=torch.bfloat16, **SPLIT)
    ref.save_adapter(tmp_path / "a.safetensors")
    model.load_adapter(tmp_path / "a.safetensors")
    assert all(p.dtype == torch.bfloat16 for p in model.lm.parameters())
    assert all(p.dtype == torch.bfloat16 for p in model.vision.parameters())
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters())
    images, ids, mask, tids, tmask = make_batch()
    with torch.no_grad():
        want, got = ref(images, ids, mask), model(images, ids, mask)
    assert got.dtype == torch.float32
    assert (got - want).abs().max() <= 0.05 * want.abs().max() + 0.02
    loss = model.loss(images, ids, mask, tids, tmask)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.loss(images, ids, mask, tids, tmask).item()) < 0.05
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.trainable_parameters())
    assert all(p.grad is None for p in model.lm.parameters())
    assert len(model.generate(images, ids, mask, max_new_tokens=4, beam_width=2)) == 3
    nar = build(saved, "post_ln", "nar", 8, frozen_dtype=torch.bfloat16, **SPLIT)
    nar.loss(images, ids, mask, tids, tmask).backward()
    assert nar.blank_weight.grad.dtype == torch.float32 and nar.queries.grad.dtype == torch.float32


def test_trained_fraction_opt350m_vit_b16():
    opt_350m = OPTConfig(vocab_size=50272, hidden_size=1024, num_hidden_layers=24, ffn_dim=4096,
                         num_attention_heads=16, word_embed_proj_dim=512, max_position_embeddings=2048,
                         do_layer_norm_before=False)
    vit_b16 = ViTConfig()  # ViT-B/16 at 224
    trained, total, fraction = trained_fraction_for_configs(opt_350m, vit_b16)
    # shared Linear(768, 1024) + 10 prompt vectors (512) + the prompt MLP (2 x Linear(512, 512))
    assert trained == 768 * 1024 + 1024 + 10 * 512 + 2 * (512 * 512 + 512) == 1_317_888
    assert fraction == trained / total and fraction < 0.01
    nar_trained, nar_total, nar_fraction = trained_fraction_for_configs(opt_350m, vit_b16, "nar")
    assert nar_trained == trained + 20 * 512 + 512 + 1 and nar_fraction < 0.01
