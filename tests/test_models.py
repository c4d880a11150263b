"""NARVL and ARBaseline: shapes, the loss against narvl.qctc_loss and the reference backends,
decoding against a direct argmax/collapse, KV-cache decoding against the teacher-forced pass,
PEFT, and bad input."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import narvl
import narvl.models.inference
import narvl.models.layers
import narvl.models.narvl
from narvl.nn import Linear
from narvl.ops import linear as lin
from narvl.reference import qctc_loss_reference, query_attention_reference
from narvl.models import (ARBaseline, NARVL, NARVLConfig, PRESETS, enable_peft, prepare_for_inference,
                          trainable_fraction)
from narvl.models.inference import (FusedAttention, PackedLinear, fold_batchnorm_, mkldnn_fusion_available,
                                    pack_for_cpu_)
from narvl.models.layers import TiedOutput
from narvl.models.resnet import ResNetStages


def small_cfg(**kw):
    base = dict(d_model=32, enc_layers=2, dec_layers=2, heads=2, resnet_layers=(1, 1, 1), image_size=48,
                num_queries=7, vocab_size=41, num_bins=8, max_text_len=12, max_target_len=9, dropout=0.0,
                label_smoothing=0.1)
    base.update(kw)
    return NARVLConfig(**base)


def rel_tables(model):
    """Every relative-position table (encoder text and image, decoder text) of a model."""
    return (list(model.encoder.token_rel_pos_table_list) + list(model.encoder.image_rel_pos_table_list)
            + list(model.decoder.token_rel_pos_table_list))


def inputs(cfg, B=3, Lt=5, S=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g)
    text = torch.randint(4, cfg.vocab_size - 1, (B, Lt), generator=g)
    text[0, Lt - 2:] = cfg.pad_id  # right padding on one sample
    targets = torch.randint(4, cfg.vocab_size - 1, (B, S), generator=g)
    lengths = torch.tensor([S, 2, 1][:B])
    targets[:, -1] = torch.where(lengths == S, torch.full_like(lengths, cfg.eos_id), targets[:, -1])
    return images, text, targets, lengths


def test_presets_match_paper_table():
    expect = {"tiny": (256, 4, 4, 4, (3, 4, 6)), "medium": (512, 4, 4, 8, (3, 4, 23)),
              "base": (768, 6, 6, 12, (3, 4, 23)), "large": (1024, 12, 12, 16, (3, 8, 36)),
              "huge": (1280, 24, 12, 16, (3, 8, 36))}
    for name, (d, e, dl, h, r) in expect.items():
        c = NARVLConfig.from_preset(name)
        assert (c.d_model, c.enc_layers, c.dec_layers, c.heads, c.resnet_layers) == (d, e, dl, h, r)
        assert c.ffn_dim == 4 * d and c.vocab_size == 59458 and c.blank_id == 59457
    assert set(PRESETS) == set(expect)
    assert NARVLConfig.from_preset("tiny", task="vqa").num_queries == 6
    assert NARVLConfig.from_preset("tiny", task="grounding").num_queries == 5
    assert NARVLConfig.from_preset("tiny", task="grounding").image_size == 512
    assert NARVLConfig.from_preset("tiny", task="entailment").label_smoothing == 0.0
    assert NARVLConfig.from_preset("tiny", task="caption").num_queries == 20
    c = small_cfg()
    assert NARVLConfig.from_json(c.to_json()) == c


@pytest.mark.parametrize("kw, match", [
    (dict(d_model=30, heads=4), "multiple of heads"), (dict(image_size=40), "multiple of 16"),
    (dict(vocab_size=10, num_bins=8), "vocab_size"), (dict(dropout=1.0), "dropout"),
    (dict(resnet_layers=(1, 1)), "resnet_layers"), (dict(num_queries=0), "num_queries"),
    (dict(eos_id=40), "eos_id")])
def test_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        small_cfg(**kw)
    with pytest.raises(ValueError, match="preset"):
        NARVLConfig.from_preset("giant")


def randomise_bn(net):
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return net.eval()


def test_resnet_stride16_and_bn_folding():
    net = randomise_bn(ResNetStages((1, 2, 1)))
    x = torch.randn(2, 3, 80, 80)
    y = net(x)
    assert y.shape == (2, 1024, 5, 5)
    folded = fold_batchnorm_(copy.deepcopy(net))
    torch.testing.assert_close(folded(x), y, rtol=1e-4, atol=1e-4 * y.abs().max().item())
    with pytest.raises(ValueError, match="images"):
        net(torch.randn(2, 1, 32, 32))


@pytest.mark.skipif(not mkldnn_fusion_available(), reason="this torch build lacks the oneDNN fused-conv ops")
def test_packed_backbone_matches_eval_backbone():
    torch.manual_seed(0)
    net = randomise_bn(ResNetStages((2, 1, 2)))
    with pytest.raises(ValueError, match="fold_batchnorm_"):
        pack_for_cpu_(copy.deepcopy(net))
    packed = fold_batchnorm_(copy.deepcopy(net))
    assert pack_for_cpu_(packed, image_size=64)
    assert not pack_for_cpu_(fold_batchnorm_(copy.deepcopy(net)).double())  # float32 only
    for shape in [(1, 3, 64, 64), (3, 3, 48, 48), (2, 3, 37, 53)]:  # other sizes than packed for
        x = torch.randn(shape)
        want = net(x)
        with torch.no_grad():
            got = packed(x)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    # grad-enabled and autocast calls take the folded modules, not the packed snapshot
    packed._packed = ((torch.zeros(1),) * 4, [])  # a broken plan: used only if routed there
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(packed(x), net(x), rtol=1e-4, atol=1e-4 * net(x).abs().max().item())
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        assert packed(x).dtype == torch.bfloat16


@pytest.mark.parametrize("arch", [NARVL, ARBaseline])
def test_bf16_serving_copy(arch, monkeypatch):
    """prepare_for_inference(dtype=torch.bfloat16): bfloat16 parameters, float32 images accepted,
    NARVL's logits within twice the error (against float64) of the plain model cast to bfloat16;
    on a CPU without bfloat16 instructions the copy stays float32 with a warning."""
    cfg = small_cfg()
    model = _perturbed_model(cfg, seed=2, arch=arch)
    images, text, _, _ = inputs(cfg)
    infer = prepare_for_inference(model, dtype=torch.bfloat16, fallback=False)
    assert {p.dtype for p in infer.parameters()} == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the model is unchanged
    with torch.no_grad():
        memory, lengths = infer.encoder(images, text)  # float32 images
        assert memory.dtype == torch.bfloat16 and torch.equal(lengths, model.encoder(images, text)[1])
        if arch is NARVL:
            oracle = copy.deepcopy(model).double().logits(images.double(), text)
            plain = copy.deepcopy(model).to(torch.bfloat16).logits(images.bfloat16(), text)
            got = infer.logits(images, text)
            assert got.dtype == torch.bfloat16
            err, err_plain = (got.double() - oracle).abs().max(), (plain.double() - oracle).abs().max()
            assert err <= 2 * err_plain + 1e-3, (err, err_plain)
    out = infer.generate(images, text)
    assert len(out) == images.shape[0] and all(0 <= t < cfg.vocab_size - 1 for s in out for t in s)
    monkeypatch.setattr(narvl.models.inference, "cpu_has_bf16", lambda: False)
    with pytest.warns(RuntimeWarning, match="no bfloat16 instructions"):
        kept = prepare_for_inference(model, dtype=torch.bfloat16)
    assert {p.dtype for p in kept.parameters()} == {torch.float32}
    assert kept.generate(images, text) == prepare_for_inference(model).generate(images, text)
    monkeypatch.setattr(narvl.models.inference, "cpu_has_bf16", lambda: True)
    assert {p.dtype for p in prepare_for_inference(model, dtype=torch.bfloat16).parameters()} == {torch.bfloat16}
    with pytest.raises(TypeError, match="dtype"):
        prepare_for_inference(model, dtype=torch.float16)
    with pytest.raises(TypeError, match="fallback"):
        prepare_for_inference(model, dtype=torch.bfloat16, fallback="no")


@pytest.mark.parametrize("entangle", [False, True], ids=["biases", "entangled"])
@pytest.mark.parametrize("arch", [NARVL, ARBaseline])
def test_prepare_for_inference_keeps_the_function(arch, entangle):
    """Also with OFA's entangled positions (encoder content and decoder input), which the
    inference copy's cached first block and bias caches must keep."""
    torch.manual_seed(1)
    cfg = small_cfg(entangle_position_embedding=entangle, decoder_entangle=entangle)
    model = arch(cfg)
    randomise_bn(model.encoder.backbone)
    with torch.no_grad():  # non-zero relative biases, so a mix-up of cached layers would show
        for t in rel_tables(model):
            t.weight.normal_()
        perturb_c_attn(model)  # the copy folds c_attn into out_proj: non-trivial values
    model.eval()
    images, text, _, _ = inputs(cfg)
    infer = prepare_for_inference(model)
    assert infer is not model and not isinstance(model.encoder.backbone.bn1, torch.nn.Identity)
    assert not any(p.requires_grad for p in infer.parameters())
    with torch.no_grad():
        m0, l0 = model.encoder(images, text)
        m1, l1 = infer.encoder(images, text)
        torch.testing.assert_close(m1, m0, rtol=1e-4, atol=1e-4)
        assert torch.equal(l0, l1)
        if arch is NARVL:
            torch.testing.assert_close(infer.logits(images, text), model.logits(images, text),
                                       rtol=1e-4, atol=1e-4)
    assert infer.generate(images, text) == model.generate(images, text)
    attns = [m for m in infer.modules() if hasattr(m, "c_attn")]
    assert attns and all(isinstance(m, FusedAttention) and len(m._fused) == 1 for m in attns)  # all ran fused
    if lin.onednn_linear_available():  # every fused and Linear weight has its packed copy
        layers = [m for m in infer.modules() if isinstance(m, Linear)]
        with torch.no_grad():
            assert all(m.fused_weights().packed and all(p is not None for p in m.fused_weights().packed.values())
                       for m in attns)
            assert layers and all(isinstance(m, PackedLinear) and m.packed_weight() is not None for m in layers)
            assert infer.output.packed_weight() is not None
        plain = prepare_for_inference(model, pack_linear=False)  # the same function, nothing packed
        with torch.no_grad():
            assert not any(isinstance(m, PackedLinear) for m in plain.modules())
            assert type(plain.output) is TiedOutput
            torch.testing.assert_close(plain.encoder(images, text)[0], infer.encoder(images, text)[0],
                                       rtol=1e-4, atol=1e-4)
        assert plain.generate(images, text) == infer.generate(images, text)
        with torch.no_grad():  # every attention ran, on unpacked weights
            assert all(m.fused_weights().packed and all(p is None for p in m.fused_weights().packed.values())
                       for m in plain.modules() if hasattr(m, "c_attn"))
    with torch.no_grad():  # a copy of the copy computes the same (it packs again, lazily)
        twin = copy.deepcopy(infer)
        torch.testing.assert_close(twin.encoder(images, text)[0], infer.encoder(images, text)[0])
        assert getattr(twin.encoder.backbone, "_packed", None) is not None or getattr(infer.encoder.backbone, "_packed", None) is None
    # the model itself is untouched: plain modules only
    assert not any(isinstance(m, (FusedAttention, PackedLinear)) for m in model.modules())
    assert type(model.output) is TiedOutput and type(model.encoder.backbone) is ResNetStages
    with torch.no_grad():  # the cached biases are per text length: a second length, then the first
        for t in (text[:, :3], text):
            torch.testing.assert_close(infer.encoder(images, t)[0], model.encoder(images, t)[0],
                                       rtol=1e-4, atol=1e-4)
    with pytest.raises(TypeError, match="NARVL or ARBaseline"):
        prepare_for_inference(torch.nn.Linear(2, 2))


def test_narvl_loss_is_qctc_of_its_logits_and_backprops():
    cfg = small_cfg()
    m = NARVL(cfg)
    images, text, targets, lengths = inputs(cfg)
    w = torch.tensor([1.0, 0.6, 0.3])
    loss = m(images, text, targets, lengths, weights=w)
    logits = m.logits(images, text)
    assert logits.shape == (3, cfg.num_queries, cfg.vocab_size)
    expect = qctc_loss_reference(logits.double(), targets, lengths, blank=cfg.blank_id,
                                 label_smoothing=0.1, weights=w.double())
    torch.testing.assert_close(loss.double(), expect, rtol=1e-5, atol=1e-5)
    loss.backward()
    for name in ("decoder.query_embed.weight", "embed_tokens.weight", "encoder.image_proj.weight",
                 "encoder.embed_images.conv1.weight", "decoder.token_rel_pos_table_list.0.weight",
                 "encoder.token_rel_pos_table_list.1.weight", "encoder.image_rel_pos_table_list.1.weight",
                 "encoder.pos_q_linear.weight", "decoder.cross_pos_k_linear.weight",
                 "encoder.layers.0.self_attn.c_attn", "decoder.layers.1.cross_attn_ln.weight"):
        grad = dict(m.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


@pytest.mark.parametrize("arch", [NARVL, ARBaseline])
def test_kernel_backend_matches_the_reference_oracles(arch, monkeypatch, backend):
    """The whole model (loss and every parameter's gradient) on the kernels against the same model
    with the attention and the loss swapped for the float64 oracles of narvl.reference."""
    cfg = small_cfg()
    torch.manual_seed(0)
    m = arch(cfg).double()
    images, text, targets, lengths = inputs(cfg)
    images = images.double()

    def run():
        m.zero_grad()
        loss = m(images, text, targets, lengths)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]

    got = run()
    calls = []

    def counted(fn):
        def call(*args, **kw):
            calls.append(fn.__name__)
            return fn(*args, **kw)
        return call
    monkeypatch.setattr(narvl.models.layers, "query_attention", counted(query_attention_reference))
    monkeypatch.setattr(narvl.models.narvl, "qctc_loss", counted(qctc_loss_reference))
    want = run()
    assert "query_attention_reference" in calls  # the oracles did replace the kernels
    assert ("qctc_loss_reference" in calls) == (arch is NARVL)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-8)
    assert len(got[1]) == len(want[1])
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", [NARVL, ARBaseline])
def test_float32_training_linear_route_matches_aten(arch, monkeypatch):
    """The whole model in float32: loss and every gradient with narvl's oneDNN linear training
    route equal those with ATen's F.linear (the route off)."""
    import narvl.ops.linear as lin
    monkeypatch.setenv("NARVL_LINEAR_ROUTE", "onednn")  # auto takes ATen on CPUs without AVX-512
    cfg = small_cfg()
    torch.manual_seed(0)
    m = arch(cfg)
    images, text, targets, lengths = inputs(cfg)
    real = lin._onednn_route
    out, used = {}, []
    for mode in ("route", "aten"):
        def route(x, w, b, _real=real, _mode=mode):
            r = _real(x, w, b)
            used.append((_mode, r))
            return None if (_mode == "aten" and r == "train") else r
        monkeypatch.setattr(lin, "_onednn_route", route)
        m.zero_grad()
        loss = m(images, text, targets, lengths)
        loss.backward()
        out[mode] = (loss.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None])
    if lin.onednn_linear_available():
        assert ("route", "train") in used  # the route under test was taken
    torch.testing.assert_close(out["route"][0], out["aten"][0], rtol=1e-5, atol=1e-6)
    assert len(out["route"][1]) == len(out["aten"][1])
    for a, b in zip(out["route"][1], out["aten"][1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_narvl_generate_is_collapsed_argmax():
    cfg = small_cfg()
    torch.manual_seed(3)
    m = NARVL(cfg).eval()
    images, text, _, _ = inputs(cfg)
    logits = m.logits(images, text)
    got = m.generate(images, text)
    for b, row in enumerate(logits.argmax(-1).tolist()):
        seq, prev = [], None
        for t in row:
            if t != prev and t != cfg.blank_id:
                seq.append(t)
            prev = t
        if cfg.eos_id in seq:
            seq = seq[: seq.index(cfg.eos_id)]
        assert got[b] == seq
    beam = m.generate(images, text, beam_width=8)
    assert len(beam) == 3 and all(isinstance(s, list) for s in beam)
    assert all(cfg.blank_id not in s and cfg.eos_id not in s for s in beam)
    # no merging (grounding / entailment): one label per slot
    m.cfg.merge_repeats = False
    got = m.generate(images, text)
    for b, row in enumerate(logits.argmax(-1).tolist()):
        seq = [t for t in row if t != cfg.blank_id]
        assert got[b] == (seq[: seq.index(cfg.eos_id)] if cfg.eos_id in seq else seq)


def test_narvl_beam_search_finds_the_peaked_sequence():
    """With a huge bias toward one labeling, greedy and beam agree on it."""
    cfg = small_cfg()
    m = NARVL(cfg).eval()
    images, text, _, _ = inputs(cfg)
    with torch.no_grad():
        m.decoder.layer_norm.weight.zero_()
        m.decoder.layer_norm.bias.copy_(m.embed_tokens.weight[5] * 50)
    assert m.generate(images, text) == [[5]] * 3
    assert m.generate(images, text, beam_width=4) == [[5]] * 3


def _ar_step_logits(m, images, text, tokens):
    cross, lengths = m._start(images, text, tokens.shape[1])
    caches = [dict() for _ in m.decoder.layers]
    return torch.stack([m._step(tokens[:, t], t, cross, lengths, caches) for t in range(tokens.shape[1])], 1)


def test_ar_kv_cache_matches_teacher_forcing():
    cfg = small_cfg()
    torch.manual_seed(1)
    m = ARBaseline(cfg).double().eval()
    images, text, targets, lengths = inputs(cfg)
    images = images.double()
    y_in = torch.cat([torch.full_like(targets[:, :1], cfg.bos_id), targets[:, :-1]], 1)
    with torch.no_grad():
        for t in rel_tables(m):
            t.weight.normal_()
    full = F.log_softmax(m.forward_logits(images, text, y_in), -1)
    step = _ar_step_logits(m, images, text, y_in)
    torch.testing.assert_close(step.double(), full, rtol=1e-5, atol=1e-5)


def test_ar_loss_is_label_smoothed_cross_entropy():
    cfg = small_cfg(label_smoothing=0.0)
    m = ARBaseline(cfg).eval()
    images, text, targets, lengths = inputs(cfg)
    loss = m(images, text, targets, lengths)
    y_in = torch.cat([torch.full_like(targets[:, :1], cfg.bos_id), targets[:, :-1]], 1)
    lp = _ar_step_logits(m, images, text, y_in)
    nll = [-lp[b, t, targets[b, t]] for b in range(3) for t in range(int(lengths[b]))]
    torch.testing.assert_close(loss, torch.stack(nll).mean(), rtol=1e-5, atol=1e-5)
    loss.backward()
    assert m.decoder.embed_positions.weight.grad.abs().sum() > 0


def test_ar_greedy_and_beam():
    cfg = small_cfg()
    torch.manual_seed(2)
    m = ARBaseline(cfg).eval()
    images, text, _, _ = inputs(cfg)
    greedy = m.generate(images, text)
    # greedy equals argmax of the step log-probs fed back
    for b in range(3):
        seq = greedy[b]
        toks = torch.tensor([[cfg.bos_id] + seq[:-1]])
        lp = _ar_step_logits(m, images[b:b + 1], text[b:b + 1], toks)[0]
        lp[:, cfg.blank_id] = float("-inf")
        assert lp.argmax(-1).tolist()[: len(seq)] == seq
    fixed = m.generate(images, text, max_len=6, stop_at_eos=False)
    assert [len(s) for s in fixed] == [6, 6, 6]
    assert m.generate(images, text, beam_width=1) == greedy
    beams = m.generate(images, text, beam_width=3, max_len=5)
    assert len(beams) == 3 and all(len(s) <= 5 and cfg.eos_id not in s for s in beams)
    with pytest.raises(ValueError, match="max_len"):
        m.generate(images, text, max_len=cfg.max_target_len + 1)


def test_peft_trains_under_one_percent():
    cfg = NARVLConfig.from_preset("tiny", task="vqa", image_size=64, vocab_size=600, num_bins=64)
    m = enable_peft(NARVL(cfg), soft_prompt=True)
    n_train, n_all, frac = trainable_fraction(m)
    assert 0 < frac < 0.01
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert names == {"decoder.query_embed.weight", "out_adapter.weight", "out_adapter.bias",
                     "encoder.soft_prompt"}
    images = torch.randn(2, 3, 64, 64)
    text = torch.randint(4, 500, (2, 6))
    m(images, text, torch.tensor([[7, 2], [9, 2]]), torch.tensor([2, 2])).backward()
    assert m.encoder.soft_prompt.grad.abs().sum() > 0 and m.queries.grad.abs().sum() > 0
    ar = enable_peft(ARBaseline(cfg), soft_prompt=False)
    assert 0 < trainable_fraction(ar)[2] < 0.01
    # the constructor option builds the same model as enable_peft on a built one
    for arch, sp in ((NARVL, True), (ARBaseline, False)):
        torch.manual_seed(5)
        a = enable_peft(arch(cfg), soft_prompt=sp)
        torch.manual_seed(5)
        b = arch(cfg, peft=True, soft_prompt=sp)
        assert [(n, p.requires_grad) for n, p in a.named_parameters()] == \
            [(n, p.requires_grad) for n, p in b.named_parameters()]
        for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(x, y), n
    with pytest.raises(TypeError, match="NARVL or ARBaseline"):
        enable_peft(torch.nn.Linear(2, 2))


MODEL_MODULES = ("layers", "encoder", "decoder", "narvl", "ar", "resnet", "config", "peft")


@pytest.mark.parametrize("name", MODEL_MODULES)
def test_model_modules_compute_only(name):
    """The plain model modules import nothing from the serving layer (narvl.models.inference,
    narvl.models.cache), never branch on the grad mode, and keep no caches: prepare_for_inference
    swaps in the serving modules instead."""
    import ast
    import importlib
    import inspect
    mod = importlib.import_module(f"narvl.models.{name}")
    tree = ast.parse(inspect.getsource(mod))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.module not in ("inference", "cache", "narvl.models.inference", "narvl.models.cache"), \
                (name, node.module)
        if isinstance(node, ast.Attribute):
            assert node.attr not in ("is_grad_enabled", "_cache", "_bias_cache", "_fused", "_packed"), \
                (name, node.attr)


def test_serving_copy_is_safe_to_share_between_threads():
    """One serving copy, four threads decoding different inputs (two text lengths, so the bias
    caches fill and hit concurrently): every thread gets what a serial run gives."""
    import threading
    torch.manual_seed(2)
    cfg = small_cfg()
    infer = prepare_for_inference(_perturbed_model(cfg))
    jobs = []
    for seed in range(8):
        images, text, _, _ = inputs(cfg, B=2, Lt=5 - seed % 2, seed=seed)
        jobs.append((images, text))
    want = [infer.generate(i, t) for i, t in jobs]
    with torch.no_grad():
        want_logits = [infer.logits(i, t) for i, t in jobs]
    fresh = prepare_for_inference(_perturbed_model(cfg))  # empty caches: filled by the threads
    got, errors = {}, []

    def work(k):
        try:
            for r in range(3):
                for j in range(k, len(jobs), 4):
                    with torch.no_grad():
                        got[(j, r)] = (fresh.generate(*jobs[j]), fresh.logits(*jobs[j]))
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)
    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (j, _), (seqs, logits) in got.items():
        assert seqs == want[j]
        torch.testing.assert_close(logits, want_logits[j], rtol=1e-5, atol=1e-5)
    assert len(got) == 3 * len(jobs)


@pytest.mark.parametrize("arch", [NARVL, ARBaseline])
def test_bad_inputs(arch):
    cfg = small_cfg()
    m = arch(cfg)
    images, text, targets, lengths = inputs(cfg)
    with pytest.raises(ValueError, match="images"):
        m(images[:, :, :32, :32], text, targets, lengths)
    with pytest.raises(TypeError, match="images"):
        m(images.long(), text, targets, lengths)
    with pytest.raises(TypeError, match="text"):
        m(images, text.float(), targets, lengths)
    with pytest.raises(ValueError, match="text token ids"):
        m(images, text + 100, targets, lengths)
    bad = text.clone()
    bad[1, 1] = cfg.pad_id
    with pytest.raises(ValueError, match="right-padded"):
        m(images, bad, targets, lengths)
    with pytest.raises(ValueError, match="target_lengths"):
        m(images, text, targets, torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="targets"):
        m(images, text, targets[:2], lengths)
    with pytest.raises(ValueError, match="empty batch"):
        m(images[:0], text[:0], targets[:0], lengths[:0])
    with pytest.raises(ValueError, match="max_text_len"):
        m(images, torch.randint(4, 30, (3, 13)), targets, lengths)
    with pytest.raises(ValueError, match="beam_width"):
        m.generate(images, text, beam_width=0)
    with pytest.raises(TypeError, match="NARVLConfig"):
        arch({"d_model": 8})


def test_blank_in_targets_is_rejected():
    cfg = small_cfg()
    m = NARVL(cfg)
    images, text, targets, lengths = inputs(cfg)
    targets[0, 0] = cfg.blank_id
    with pytest.raises(ValueError, match="blank"):
        m(images, text, targets, lengths)


def test_time_generate_takes_turns_and_keeps_each_samples_best():
    from narvl.models import time_generate

    calls = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def generate(self, images, text, beam_width=1):
            calls.append((self.name, int(images)))

    inputs = [(torch.tensor(i), None) for i in range(4)]
    t = time_generate({"a": Fake("a"), "b": Fake("b")}, inputs, rounds=3, warmup=2)
    assert calls[:4] == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]           # warm-up
    rounds = calls[4:]
    assert [n for n, _ in rounds] == (["a"] * 4 + ["b"] * 4) * 3            # turns, all samples each
    for name in ("a", "b"):
        assert len(t[name].round_ms) == 3 and t[name].best_ms <= min(t[name].round_ms) + 1e-9


def perturb_c_attn(model):
    """NormFormer's per-head scales away from their initial ones."""
    for m in model.modules():
        if isinstance(getattr(m, "c_attn", None), torch.nn.Parameter):
            m.c_attn.uniform_(0.3, 1.7)


def _perturbed_model(cfg, seed=3, arch=NARVL):
    """``arch(cfg)`` in eval mode with random BatchNorm statistics, relative position tables and
    NormFormer scales, so a mix-up in a serving copy shows."""
    torch.manual_seed(seed)
    model = arch(cfg)
    randomise_bn(model.encoder.backbone)
    with torch.no_grad():
        for t in rel_tables(model):
            t.weight.normal_()
        perturb_c_attn(model)
    return model.eval()


def test_inference_bias_cache_is_a_bounded_lru():
    cfg = small_cfg()
    model = _perturbed_model(cfg)
    images, text, _, _ = inputs(cfg)
    g = cfg.image_size // 16
    one = cfg.enc_layers * cfg.heads * (g * g + 5) ** 2 * 4  # bytes of one text length's biases
    infer = prepare_for_inference(model, cache_bytes=int(2.5 * one))
    cache = infer.encoder._bias_cache.lru
    with torch.no_grad():
        for n in (5, 4, 3, 2, 5):
            got = infer.encoder(images, text[:, :n])[0]
            torch.testing.assert_close(got, model.encoder(images, text[:, :n])[0], rtol=1e-4, atol=1e-4)
            assert cache.nbytes <= 2.5 * one and len(cache) <= 3
    assert cache.get((g, g, 5, torch.float32)) is not None  # most recent kept
    assert cache.get((g, g, 4, torch.float32)) is None      # least recent evicted
    tiny = prepare_for_inference(model, cache_bytes=one // 2)         # nothing fits: nothing kept
    with torch.no_grad():
        tiny.encoder(images, text)
    assert len(tiny.encoder._bias_cache) == 0


@pytest.mark.parametrize("change", ["load_state_dict", "queries", "rel_table", "backbone_conv", "layer0",
                                    "c_attn", "cross_v_proj", "fc1", "embed_tokens"])
def test_inference_snapshots_follow_weight_changes(change):
    """After prepare_for_inference, changing the copy's weights in place changes its outputs as
    it changes the uncached computation (grad mode skips every cache and the packed convs)."""
    cfg = small_cfg()
    infer = prepare_for_inference(_perturbed_model(cfg))
    images, text, _, _ = inputs(cfg)
    with torch.no_grad():
        before = infer.logits(images, text)
        if change == "load_state_dict":
            other = prepare_for_inference(_perturbed_model(cfg, seed=4))
            infer.load_state_dict(other.state_dict())
        elif change == "queries":
            infer.queries.add_(torch.randn_like(infer.queries))  # (a uniform shift is invisible after LN)
        elif change == "rel_table":
            infer.encoder.token_rel_pos_table_list[1].weight.mul_(-2.0)
        elif change == "backbone_conv":
            infer.encoder.backbone.layer2[0].conv2.weight.mul_(1.5)
        elif change == "c_attn":  # folded into out_proj's fused weight
            infer.encoder.layers[1].self_attn.c_attn.mul_(-1.5)
        elif change == "cross_v_proj":  # inside the fused k/v weight
            w = infer.decoder.layers[1].encoder_attn.v_proj.weight
            w.add_(torch.randn_like(w))
        elif change == "fc1":  # a packed Linear weight
            w = infer.encoder.layers[1].fc1.weight
            w.add_(torch.randn_like(w))
        elif change == "embed_tokens":  # the packed tied output projection
            w = infer.embed_tokens.weight
            w.add_(torch.randn_like(w))
        else:
            w = infer.decoder.layers[0].self_attn.out_proj.weight  # inside the cached first block
            w.add_(torch.randn_like(w))
        cached = infer.logits(images, text)
    with torch.enable_grad():
        fresh = infer.logits(images, text)
    assert not torch.allclose(before, fresh, atol=1e-3)
    torch.testing.assert_close(cached, fresh, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", [NARVL, ARBaseline])
def test_model_with_cpu_fast_paths_forced_off(arch, monkeypatch):
    """NARVL_CPU_FASTPATH=0: no private oneDNN op runs (a spy counts none), and the model
    computes the same loss, gradients and decodes as with the fast paths on."""
    torch.manual_seed(5)
    cfg = small_cfg()
    model = arch(cfg)
    randomise_bn(model.encoder.backbone)
    images, text, targets, lengths = inputs(cfg)

    def run():
        m = copy.deepcopy(model).train()
        loss = m(images, text, targets, lengths)
        grads = torch.autograd.grad(loss, [p for p in m.parameters() if p.requires_grad])
        infer = prepare_for_inference(m.eval())
        return loss, grads, infer.generate(images, text), infer

    loss_on, grads_on, gen_on, _ = run()
    monkeypatch.setenv("NARVL_CPU_FASTPATH", "0")
    calls = []
    for name in ("_linear_pointwise", "_convolution_pointwise"):
        real = getattr(torch.ops.mkldnn, name)
        monkeypatch.setattr(torch.ops.mkldnn, name,
                            lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    loss_off, grads_off, gen_off, infer_off = run()
    assert calls == [] and getattr(infer_off.encoder.backbone, "_packed", None) is None
    torch.testing.assert_close(loss_off, loss_on, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads_off, grads_on):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    assert gen_off == gen_on


def _best_path_brute_force(lp, target, blank):
    """The highest-scoring frame labelling of log_probs lp (T, C) that CTC-collapses to target,
    by enumerating every labelling (tiny T and C only)."""
    import itertools
    T, C = lp.shape
    best, best_score = None, -float("inf")
    for path in itertools.product(range(C), repeat=T):
        out, prev = [], None
        for p in path:
            if p != blank and p != prev:
                out.append(p)
            prev = p
        if out == list(target):
            score = float(sum(lp[t, p] for t, p in enumerate(path)))
            if score > best_score:
                best, best_score = list(path), score
    return best


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_glance_replaces_queries_with_the_viterbi_path(ratio):
    """NARVL.glance: the path is the best CTC alignment of the first pass (brute force), the
    glanced slots number round(ratio * errors) and hold exactly the path's label embeddings, the
    other slots the learnable queries; infeasible samples are not glanced."""
    cfg = small_cfg(num_queries=5, vocab_size=6, num_bins=0)  # labels 0..4, blank 5
    torch.manual_seed(0)
    model = NARVL(cfg).train()
    images, text, _, _ = inputs(cfg, B=3)
    targets = torch.tensor([[3, 2, 2, 0], [4, 2, 0, 0], [3, 3, 3, 3]])  # the third needs 4 + 3 = 7 frames > 5
    lengths = torch.tensor([3, 2, 4])
    memory, mlen = model.encoder(images, text)
    torch.manual_seed(1)
    g = model.glance(memory, mlen, targets, lengths, ratio)
    torch.manual_seed(1)  # the first pass again, with the same dropout draws (dropout is 0 here anyway)
    with torch.no_grad():
        first = model.decode_logits(memory, mlen).float().log_softmax(-1)
    assert g.infeasible == 1
    for b in range(2):
        expect = _best_path_brute_force(first[b].double(), targets[b, : lengths[b]].tolist(), cfg.blank_id)
        assert g.path[b].tolist() == expect
        errors = int((first[b].argmax(-1) != g.path[b]).sum())
        assert int(g.errors[b]) == errors
        assert int(g.mask[b].sum()) == math.floor(ratio * errors + 0.5)
    assert not g.mask[2].any() and int(g.errors[2]) == 0
    q = model.decoder.query_embed.weight
    for b in range(3):
        for n in range(cfg.num_queries):
            want = model.embed_tokens.weight[g.path[b, n]] if g.mask[b, n] else q[n]
            assert torch.equal(g.inputs[b, n], want)
    # the glanced pass is differentiable into the label embeddings and the queries
    loss = model.decode_logits(memory, mlen, g.inputs).sum()
    loss.backward()
    assert model.decoder.query_embed.weight.grad is not None and model.embed_tokens.weight.grad is not None


def test_glance_ratio_drives_training_loss_and_not_inference():
    """cfg.glance_ratio: the training loss is the glanced pass's; eval mode and generate ignore it."""
    cfg = small_cfg(glance_ratio=1.0)
    torch.manual_seed(0)
    model = NARVL(cfg)
    plain = NARVL(small_cfg())
    plain.load_state_dict(model.state_dict())
    images, text, targets, lengths = inputs(cfg)
    model.eval(), plain.eval()
    assert torch.equal(model(images, text, targets, lengths), plain(images, text, targets, lengths))
    assert model.generate(images, text) == plain.generate(images, text)
    model.train(), plain.train()
    torch.manual_seed(3)
    glanced = model(images, text, targets, lengths)
    assert not torch.equal(glanced, plain(images, text, targets, lengths))
    with pytest.raises(ValueError, match="glance_ratio"):
        small_cfg(glance_ratio=1.5)
    with pytest.raises(ValueError, match="ratio"):
        memory, mlen = model.encoder(images, text)
        model.glance(memory, mlen, targets, lengths, -0.1)


@pytest.mark.parametrize("steps", [1, 2])
def test_refine_keeps_confident_slots_and_repredicts_the_rest(steps):
    """NARVL.refine against a per-slot loop: in each pass the most probable slots keep their
    logits and feed their label's embedding; the others are the next pass's logits; generate
    with cfg.refine_steps decodes the refined logits."""
    cfg = small_cfg(refine_steps=steps)
    torch.manual_seed(0)
    model = NARVL(cfg).eval()
    images, text, _, _ = inputs(cfg)
    N = cfg.num_queries
    with torch.no_grad():
        memory, mlen = model.encoder(images, text)
        logits = model.decode_logits(memory, mlen)
        got = model.refine(memory, mlen, logits, steps)
        want = logits.clone()
        for k in range(steps):
            probs = want.softmax(-1)
            x = model.decoder.query_embed.weight[None].repeat(want.shape[0], 1, 1)
            keep = torch.zeros(want.shape[:2], dtype=torch.bool)
            n_keep = int(N * (steps - k) / (steps + 1) + 0.5)
            for b in range(want.shape[0]):
                conf = probs[b].max(-1).values.tolist()
                for n in sorted(range(N), key=lambda n: -conf[n])[:n_keep]:
                    keep[b, n] = True
                    x[b, n] = model.embed_tokens.weight[int(probs[b, n].argmax())]
            new = model.decode_logits(memory, mlen, x)
            want = torch.where(keep[..., None], want, new)
        torch.testing.assert_close(got, want)
        assert not torch.equal(got, logits)
        assert torch.equal(model.refine(memory, mlen, logits, 0), logits)
        tokens, lens = narvl.ctc_greedy_decode(got.float(), blank=cfg.blank_id)
        seqs = [tokens[b, : lens[b]].tolist() for b in range(tokens.shape[0])]
        seqs = [s[: s.index(cfg.eos_id)] if cfg.eos_id in s else s for s in seqs]
        assert model.generate(images, text) == seqs
        assert prepare_for_inference(model).generate(images, text) == seqs
    with pytest.raises(ValueError, match="refine_steps"):
        small_cfg(refine_steps=-1)


def test_aux_ar_weight_adds_the_aux_decoders_cross_entropy():
    """cfg.aux_ar_weight w (joint training): the training loss is Q-CTC + w * the teacher-forced,
    label-smoothed CE of an OFA decoder on the same encoder output and tied embeddings, i.e. what
    an ARBaseline with that encoder and decoder computes, and an explicit CE written here; eval
    mode, generate and the serving copy never use the aux decoder."""
    cfg = small_cfg(aux_ar_weight=0.5)
    torch.manual_seed(0)
    model = NARVL(cfg).train()
    images, text, targets, lengths = inputs(cfg)
    for p in model.aux_decoder.token_rel_pos_table_list.parameters():  # non-zero relative biases
        torch.nn.init.normal_(p, std=0.5)
    got = model(images, text, targets, lengths)
    qctc = narvl.qctc_loss(model.logits(images, text), targets, lengths, blank=cfg.blank_id,
                           label_smoothing=cfg.label_smoothing)
    ar = ARBaseline(small_cfg()).train()
    ar.embed_tokens, ar.encoder, ar.decoder = model.embed_tokens, model.encoder, model.aux_decoder
    ce_ar = ar(images, text, targets, lengths)
    # the same CE written out: BOS + shifted targets in, answer + EOS out, mean over valid tokens
    S = targets.shape[1]
    prev = torch.cat([torch.full_like(targets[:, :1], cfg.bos_id), targets[:, :-1]], 1)
    valid = torch.arange(S)[None] < lengths[:, None]
    prev = torch.where(valid, prev, torch.full_like(prev, cfg.pad_id))
    logits = ar.forward_logits(images, text, prev).double()
    ce = F.cross_entropy(logits[valid], targets[valid], label_smoothing=cfg.label_smoothing)
    torch.testing.assert_close(ce_ar.double(), ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, qctc + 0.5 * ce_ar)
    got.backward()
    assert model.aux_decoder.layers[0].fc1.weight.grad.abs().sum() > 0
    assert model.encoder.layers[0].fc1.weight.grad.abs().sum() > 0
    model.eval()  # evaluation loss: Q-CTC alone (BatchNorm now on its running statistics)
    torch.testing.assert_close(model(images, text, targets, lengths),
                               narvl.qctc_loss(model.logits(images, text), targets, lengths, blank=cfg.blank_id,
                                               label_smoothing=cfg.label_smoothing))
    plain = NARVL(small_cfg())
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("aux_decoder.")})
    plain.eval()
    served = prepare_for_inference(model)
    assert served.aux_decoder is None and model.aux_decoder is not None
    assert model.generate(images, text) == plain.generate(images, text) == served.generate(images, text)
    assert NARVL(small_cfg()).aux_decoder is None
    with pytest.raises(ValueError, match="aux_ar_weight"):
        small_cfg(aux_ar_weight=-0.5)
    with pytest.raises(ValueError, match="aux_ar_weight"):
        small_cfg(aux_ar_weight=float("nan"))
    with pytest.raises(ValueError, match="aux_decoder"):
        plain.aux_ar_loss(*model.encoder(images, text), targets, lengths)
    with pytest.raises(TypeError, match="targets"):
        model.aux_ar_loss(*model.encoder(images, text), targets.float(), lengths)
    with pytest.raises(ValueError, match="aux_ar_weight"):  # PEFT would train towards a frozen random decoder
        enable_peft(model)


def test_glance_plain_weight_mixes_the_two_passes():
    """cfg.glance_plain_weight w: the training loss is (1 - w) * glanced + w * plain, where the
    glance reads the plain pass's logits (same dropout draws: dropout is 0 here)."""
    cfg = small_cfg(glance_ratio=1.0, glance_plain_weight=0.5)
    torch.manual_seed(0)
    model = NARVL(cfg).train()
    images, text, targets, lengths = inputs(cfg)
    torch.manual_seed(5)
    got = model(images, text, targets, lengths)
    torch.manual_seed(5)
    memory, mlen = model.encoder(images, text)
    first = model.decode_logits(memory, mlen)
    g = model.glance(memory, mlen, targets, lengths, 1.0, first=first)

    def loss_of(logits):
        return narvl.qctc_loss(logits, targets, lengths, blank=cfg.blank_id, label_smoothing=cfg.label_smoothing)
    want = 0.5 * loss_of(model.decode_logits(memory, mlen, g.inputs)) + 0.5 * loss_of(first)
    torch.testing.assert_close(got, want)
    got.backward()
    assert model.decoder.query_embed.weight.grad is not None
    with pytest.raises(ValueError, match="glance_plain_weight"):
        small_cfg(glance_plain_weight=2.0)


@pytest.mark.parametrize("dec_layers", [1, 3])
def test_layer_ctc_weight_adds_the_inner_layers_qctc(dec_layers):
    """cfg.layer_ctc_weight w (deep supervision): the training loss is the last layer's Q-CTC +
    w * the mean Q-CTC of the inner layers' states, each through the final layer norm and the tied
    projection, computed here by a loop over the decoder's layers; with one layer there is no inner
    layer; eval mode and generate read the last layer alone."""
    cfg = small_cfg(layer_ctc_weight=0.5, dec_layers=dec_layers)
    torch.manual_seed(1)
    model = NARVL(cfg).train()
    images, text, targets, lengths = inputs(cfg)
    got = model(images, text, targets, lengths)
    memory, mlen = model.encoder(images, text)
    dec = model.decoder
    self_b, cross_b = dec.biases(cfg.num_queries, model.encoder, memory.shape[1] - cfg.grid ** 2, memory.dtype)

    def one_pass(query_input=None):
        """(last layer's logits, its Q-CTC + 0.5 * the inner layers' mean Q-CTC), by a loop here."""
        x = dec.embed(dec.query_embed.weight[None].expand(images.shape[0], -1, -1)
                      if query_input is None else query_input)
        losses = []
        for i, layer in enumerate(dec.layers):
            x = layer(x, memory, mlen, self_b[i], cross_b)
            logits = model.output(dec.layer_norm(x), model.embed_tokens.weight)
            losses.append(narvl.qctc_loss(logits, targets, lengths, blank=cfg.blank_id,
                                          label_smoothing=cfg.label_smoothing, zero_infinity=True))
        return logits, losses[-1] + (0.5 * sum(losses[:-1]) / (dec_layers - 1) if dec_layers > 1 else 0.0)

    want = one_pass()[1]
    torch.testing.assert_close(got, want)
    got.backward()
    assert model.decoder.layers[0].fc1.weight.grad.abs().sum() > 0
    model.eval()
    torch.testing.assert_close(model(images, text, targets, lengths),
                               narvl.qctc_loss(model.logits(images, text), targets, lengths, blank=cfg.blank_id,
                                               label_smoothing=cfg.label_smoothing))
    plain = NARVL(small_cfg(dec_layers=dec_layers))
    plain.load_state_dict(model.state_dict())
    assert model.generate(images, text) == plain.eval().generate(images, text) \
        == prepare_for_inference(model).generate(images, text)
    model.train()  # with glancing, each pass carries its own inner-layer losses
    model.cfg.glance_ratio, model.cfg.glance_plain_weight = 0.5, 0.25
    torch.manual_seed(7)  # the glanced slots are drawn at random: the same draws below
    got = model(images, text, targets, lengths)
    torch.manual_seed(7)
    memory, mlen = model.encoder(images, text)
    first, plain = one_pass()
    g = model.glance(memory, mlen, targets, lengths, 0.5, first=first)
    assert g.mask.any()  # some slots are glanced
    torch.testing.assert_close(got, 0.75 * one_pass(g.inputs)[1] + 0.25 * plain)
    model.zero_grad()
    got.backward()
    assert torch.isfinite(model.queries.grad).all() and model.queries.grad.abs().sum() > 0
    for bad in (-0.5, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="layer_ctc_weight"):
            small_cfg(layer_ctc_weight=bad)
