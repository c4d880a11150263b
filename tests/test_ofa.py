"""OFA-exactness and checkpoint import: narvl's encoder, AR decoder and NARVL decoder against the
OFA team's own port of OFA (tests/ofa_oracle.py, perturbed non-trivial weights), and
``from_ofa`` on fairseq, Hugging Face and plain checkpoints, with a restricted unpickler."""
import argparse
import os
import pickle
import sys
import types
import warnings

import pytest
import torch

import ofa_oracle
from narvl.checkpoint import read_checkpoint
from narvl.models import from_ofa, safe_load
from narvl.models.layers import image_rel_buckets, token_rel_buckets
from narvl.models.ofa_import import Opaque, _main, hf_to_fairseq, read_ofa_state

MOD, WHY = ofa_oracle.load()
needs_oracle = pytest.mark.skipif(MOD is None, reason=str(WHY))
S = 64  # image size: a 4 x 4 patch grid


@pytest.fixture(scope="module")
def ofa():
    if MOD is None:
        pytest.skip(str(WHY))
    return ofa_oracle.tiny_ofa(MOD)


@pytest.fixture(scope="module")
def ofa_entangled():
    """OFA with its --entangle-position-embedding and without --disable-entangle: positions
    also added to the encoder's text and image content and to the decoder's input."""
    if MOD is None:
        pytest.skip(str(WHY))
    return ofa_oracle.tiny_ofa(MOD, seed=7, entangle_position_embedding=True, disable_entangle=False)


def _load(source, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return from_ofa(source, **kw)


def _inputs(B=3, Lt=9, seed=3):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, S, S, generator=g)
    text = torch.randint(4, 100, (B, Lt), generator=g)
    text[:, 0] = 0
    text[1, 6:] = 1  # right padding
    text[2, 3:] = 1
    return images, text


def _ofa_forward(ofa, images, text, prev):
    masks = torch.ones(images.shape[0], dtype=torch.bool)
    with torch.no_grad():
        enc = ofa.encoder(input_ids=text, patch_images=images, patch_masks=masks)
        logits = ofa(input_ids=text, patch_images=images, patch_masks=masks, decoder_input_ids=prev).logits
    return enc.last_hidden_state, logits


def test_bucket_functions_match_ofa():
    if MOD is None:
        pytest.skip(str(WHY))
    ref = MOD.make_token_bucket_position(256)
    for n in (1, 7, 130, 300, 1024):
        assert torch.equal(token_rel_buckets(n), ref[:n, :n]), n
    img_ref = MOD.make_image_bucket_position(42, 83 * 83 + 3)
    for h, w in ((4, 4), (30, 30), (3, 5)):
        ids = (torch.arange(h)[:, None] * 42 + torch.arange(w)[None, :] + 1).reshape(-1)
        assert torch.equal(image_rel_buckets(h, w), img_ref[ids][:, ids]), (h, w)


@needs_oracle
def test_encoder_and_ar_logits_match_ofa(ofa):
    """Largest fp32 difference on perturbed weights, padded text: encoder and teacher-forced
    logits within 1e-4 (measured about 2e-6 and 3e-7)."""
    model = _load(dict(ofa.state_dict()), arch="ar", image_size=S, num_bins=20).eval()
    images, text = _inputs()
    g = torch.Generator().manual_seed(5)
    prev = torch.randint(4, 100, (3, 6), generator=g)
    prev[:, 0] = 0
    ref_mem, ref_logits = _ofa_forward(ofa, images, text, prev)
    with torch.no_grad():
        mem, lengths = model.encoder(images, text)
        logits = model.forward_logits(images, text, prev)
    assert mem.shape == ref_mem.shape and lengths.tolist() == [16 + 9, 16 + 6, 16 + 3]
    scale = ref_mem.abs().max()
    assert (mem - ref_mem).abs().max() <= 1e-4 * scale
    V = ref_logits.shape[-1]
    assert logits.shape == (3, 6, V + 1)  # + NARVL's blank
    assert (logits[..., :V] - ref_logits).abs().max() <= 1e-4 * ref_logits.abs().max()
    # a model with the tables at zero (OFA's init) must not match: the check has teeth
    broken = _load(dict(ofa.state_dict()), arch="ar", image_size=S, num_bins=20).eval()
    with torch.no_grad():
        broken.encoder.image_rel_pos_table_list[0].weight.zero_()
        assert (broken.encoder(images, text)[0] - ref_mem).abs().max() > 1e-3 * scale


@needs_oracle
def test_ar_kv_cache_decoding_matches_ofa_teacher_forcing(ofa):
    model = _load(dict(ofa.state_dict()), arch="ar", image_size=S, num_bins=20).eval()
    images, text = _inputs()
    prev = torch.tensor([[0, 17, 44, 9, 81]] * 3)
    _, ref = _ofa_forward(ofa, images, text, prev)
    state, lengths = model._start(images, text, prev.shape[1])
    caches = [dict() for _ in model.decoder.layers]
    with torch.no_grad():
        steps = torch.stack([model._step(prev[:, t], t, state, lengths, caches) for t in range(5)], 1)
    V = ref.shape[-1]  # OFA's vocabulary: compare the log-probs renormalised without the blank
    torch.testing.assert_close(steps[..., :V].log_softmax(-1), ref.log_softmax(-1), rtol=1e-4, atol=1e-4)


@needs_oracle
@pytest.mark.parametrize("which", ["ofa", "ofa_entangled"])
def test_narvl_decoder_is_ofas_decoder_on_queries_without_causal_mask(which, request, monkeypatch):
    """NARVL's decoder = OFA's decoder fed the query embeddings, bidirectional. The oracle gets
    the queries as the embeddings of tokens 0..N-1 and its causal mask removed. Entangled: the
    query slots' positions 0..N-1 join the queries, as in the authors' decoder."""
    ofa = request.getfixturevalue(which)
    flags = dict(entangle_position_embedding=True, decoder_entangle=True) if which == "ofa_entangled" else {}
    model = _load(dict(ofa.state_dict()), arch="narvl", task="vqa", image_size=S, num_bins=20, **flags).eval()
    N = model.cfg.num_queries
    with torch.no_grad():
        model.decoder.query_embed.weight.normal_()
        ofa.decoder.embed_tokens.weight[:N] = model.decoder.query_embed.weight
        model.embed_tokens.weight[:N] = model.decoder.query_embed.weight
    monkeypatch.setattr(type(ofa.decoder), "_prepare_decoder_attention_mask",
                        lambda self, mask, shape, dtype, past: None)
    images, text = _inputs()
    _, ref = _ofa_forward(ofa, images, text, torch.arange(N).expand(3, N))
    with torch.no_grad():
        got = model.logits(images, text)
    V = ref.shape[-1]
    assert (got[..., :V] - ref).abs().max() <= 1e-4 * ref.abs().max()


def _fairseq_state(ofa):
    return {hf_to_fairseq(k): v for k, v in ofa.state_dict().items()}


class _NotImportable:
    """Stands for any class a checkpoint may name (omegaconf's DictConfig, numpy scalars...)."""

    def __init__(self):
        self.payload = {"lr": [1e-4]}


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/narvl-pwned",))


@needs_oracle
def test_fairseq_checkpoint_loads_without_running_pickled_code(ofa, tmp_path):
    state = _fairseq_state(ofa)
    state["encoder.version"] = torch.tensor([3.0])
    args = argparse.Namespace(patch_image_size=S, arch="ofa_tiny")
    ck = {"model": state, "args": args, "cfg": _NotImportable(), "extra_state": {"evil": _Evil()},
          "optimizer_history": [{"criterion_name": "x", "num_updates": 10}]}
    path = tmp_path / "ofa_tiny.pt"
    torch.save(ck, path)
    if os.path.exists("/tmp/narvl-pwned"):
        os.unlink("/tmp/narvl-pwned")
    raw = safe_load(path)
    assert not os.path.exists("/tmp/narvl-pwned")
    assert isinstance(raw["cfg"], Opaque) and isinstance(raw["extra_state"]["evil"], Opaque)
    assert raw["cfg"].state == {"payload": {"lr": [1e-4]}}
    assert raw["args"].patch_image_size == S
    with pytest.warns(UserWarning, match="unused"):
        model = from_ofa(path, arch="ar", num_bins=20)
    assert model.cfg.image_size == S and model.ofa_report["format"] == "fairseq"
    assert "encoder.version" in model.ofa_report["unused"]
    assert model.ofa_report["new"] == ["embed_tokens.weight[blank row]"]
    images, text = _inputs()
    prev = torch.tensor([[0, 5, 6]] * 3)
    _, ref = _ofa_forward(ofa, images, text, prev)
    with torch.no_grad():
        got = model.eval().forward_logits(images, text, prev)[..., :ref.shape[-1]]
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


@needs_oracle
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_hugging_face_directory(ofa, tmp_path, fmt):
    sd = {k: v.contiguous().clone() for k, v in ofa.state_dict().items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(tmp_path / "model.safetensors"))
    else:
        torch.save(sd, tmp_path / "pytorch_model.bin")
    model = _load(tmp_path, arch="narvl", task="caption", image_size=S, num_bins=20)
    assert model.ofa_report["format"] in ("hugging face", "safetensors")
    assert model.cfg.num_queries == 20 and model.cfg.d_model == 64 and model.cfg.enc_layers == 2
    assert set(model.ofa_report["new"]) == {"embed_tokens.weight[blank row]", "decoder.query_embed.weight"}
    torch.testing.assert_close(model.encoder.layers[1].attn_ln.weight,
                               ofa.encoder.layers[1].self_attn_mid_layer_norm.weight)
    torch.testing.assert_close(model.decoder.layers[0].encoder_attn.q_proj.weight,
                               ofa.decoder.layers[0].cross_attn.q_proj.weight)


@needs_oracle
def test_narvl_checkpoint_round_trip_and_cli(ofa, tmp_path):
    """A NARVL state (queries and blank included, narvl's names) loads back exactly, and the
    converter writes a narvl safetensors checkpoint."""
    model = _load(dict(ofa.state_dict()), arch="narvl", task="vqa", image_size=S, num_bins=20).eval()
    state = {("encoder." + k if k == "embed_tokens.weight" else k): v for k, v in model.state_dict().items()}
    again = _load(state, arch="narvl", image_size=S, num_bins=20).eval()
    assert again.cfg.num_queries == model.cfg.num_queries and again.ofa_report["new"] == []
    images, text = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(again.logits(images, text), model.logits(images, text))
    src = tmp_path / "ofa.pt"
    torch.save({"model": _fairseq_state(ofa), "args": argparse.Namespace(patch_image_size=S)}, src)
    out = tmp_path / "narvl.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _main([str(src), str(out), "--arch", "narvl", "--task", "grounding", "--num-bins", "20"])
    tensors, meta = read_checkpoint(str(out))
    assert meta["arch"] == "narvl" and "model.decoder.query_embed.weight" in tensors
    assert tensors["model.decoder.query_embed.weight"].shape == (5, 64)


def test_from_ofa_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError):
        from_ofa(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        from_ofa(tmp_path)
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"\x80\x04not a pickle at all")
    with pytest.raises(ValueError, match="not a readable"):
        from_ofa(bad)
    with pytest.raises(ValueError, match="not an OFA checkpoint"):
        from_ofa({"encoder.embed_tokens.weight": torch.zeros(10, 8)})
    with pytest.raises(ValueError, match="no state dict"):
        read_ofa_state({"model": {"a": 1}})
    with pytest.raises(ValueError, match="arch"):
        from_ofa({"x": torch.zeros(1)}, arch="bert")
    with pytest.raises(ValueError, match="task"):
        from_ofa({"x": torch.zeros(1)}, task="ocr")
    with pytest.raises(TypeError, match="path or a state dict"):
        from_ofa(42)
    p = tmp_path / "list.pt"
    with open(p, "wb") as f:
        pickle.dump([1, 2, 3], f)
    with pytest.raises(ValueError):
        from_ofa(p)


@needs_oracle
def test_from_ofa_rejects_mismatched_shapes(ofa):
    state = _fairseq_state(ofa)
    state["decoder.embed_tokens.weight"] = state["encoder.embed_tokens.weight"] + 1
    with pytest.raises(ValueError, match="ties them"):
        _load(state, image_size=S, num_bins=20)
    state = _fairseq_state(ofa)
    state["encoder.pos_q_linear.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="pos_q_linear"):
        _load(state, image_size=S, num_bins=20)


def _check_against(ofa, model, prev_len=6):
    """Encoder output, teacher-forced logits and KV-cache steps of ``model`` (an ARBaseline)
    against the oracle ``ofa`` on padded text; returns the oracle's encoder output."""
    images, text = _inputs()
    g = torch.Generator().manual_seed(11)
    prev = torch.randint(4, 100, (3, prev_len), generator=g)
    prev[:, 0] = 0
    ref_mem, ref_logits = _ofa_forward(ofa, images, text, prev)
    with torch.no_grad():
        mem, _ = model.encoder(images, text)
        logits = model.forward_logits(images, text, prev)
        state, lengths = model._start(images, text, prev_len)
        caches = [dict() for _ in model.decoder.layers]
        steps = torch.stack([model._step(prev[:, t], t, state, lengths, caches) for t in range(prev_len)], 1)
    V = ref_logits.shape[-1]
    assert (mem - ref_mem).abs().max() <= 1e-4 * ref_mem.abs().max()
    assert (logits[..., :V] - ref_logits).abs().max() <= 1e-4 * ref_logits.abs().max()
    torch.testing.assert_close(steps[..., :V].log_softmax(-1), ref_logits.log_softmax(-1), rtol=1e-4, atol=1e-4)
    return ref_mem


@needs_oracle
def test_entangled_positions_from_hugging_face_config_match_ofa(ofa_entangled, tmp_path):
    """A Hugging Face directory whose config.json sets entangle_position_embedding (and not
    disable_entangle): from_ofa reads the flags and computes what OFA computes; the same weights
    loaded as a plain state dict (no flags: the released setup) do not match, so the flags matter."""
    from safetensors.torch import save_file
    ofa = ofa_entangled
    save_file({k: v.contiguous().clone() for k, v in ofa.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(ofa.config.to_json_string())
    model = _load(tmp_path, arch="ar", image_size=S, num_bins=20).eval()
    assert model.cfg.entangle_position_embedding and model.cfg.decoder_entangle
    ref_mem = _check_against(ofa, model)
    plain = _load(dict(ofa.state_dict()), arch="ar", image_size=S, num_bins=20).eval()
    assert not plain.cfg.entangle_position_embedding and not plain.cfg.decoder_entangle
    images, text = _inputs()
    with torch.no_grad():
        assert (plain.encoder(images, text)[0] - ref_mem).abs().max() > 1e-2 * ref_mem.abs().max()


def _omegaconf_like(tree, monkeypatch):
    """``tree`` (nested dicts; leaves any picklable value, e.g. a Namespace) as a stand-in for
    omegaconf's DictConfig, pickled under omegaconf's class names with its state layout
    (DictConfig ``_content``, AnyNode ``_val``), as a fairseq ``cfg`` holds it (checked against
    omegaconf 2.4's own pickles when this was written). The stand-in modules exist only while
    the test saves; the loader never imports them."""
    dc_mod, node_mod = types.ModuleType("omegaconf.dictconfig"), types.ModuleType("omegaconf.nodes")

    class DictConfig:
        def __init__(self, content):
            self._metadata, self._parent, self._content = None, None, content

    class AnyNode:
        def __init__(self, val):
            self._metadata, self._parent, self._flags_cache, self._val = None, None, None, val

    for cls, mod in ((DictConfig, dc_mod), (AnyNode, node_mod)):
        cls.__module__, cls.__qualname__ = mod.__name__, cls.__name__
        setattr(mod, cls.__name__, cls)
    monkeypatch.setitem(sys.modules, "omegaconf", types.ModuleType("omegaconf"))
    monkeypatch.setitem(sys.modules, "omegaconf.dictconfig", dc_mod)
    monkeypatch.setitem(sys.modules, "omegaconf.nodes", node_mod)

    def wrap(v):
        return DictConfig({k: wrap(x) for k, x in v.items()}) if isinstance(v, dict) else AnyNode(v)
    return wrap(tree)


@needs_oracle
@pytest.mark.parametrize("where", ["args", "cfg"])
def test_fairseq_flags_from_args_or_cfg(ofa_entangled, tmp_path, monkeypatch, where):
    """A fairseq checkpoint records its flags in ``args`` (Namespace) or, in newer fairseq, in
    ``cfg`` (omegaconf; a legacy model's Namespace under cfg.model, the task's fields under
    cfg.task): image size and entangled positions are read from either, and the model matches
    OFA. fairseq's decoder entangles whenever disable_entangle is off."""
    ns = argparse.Namespace(arch="ofa_tiny", entangle_position_embedding=True, disable_entangle=False,
                            scale_attn=True, scale_fc=True, scale_heads=True, no_scale_embedding=True,
                            attn_scale_factor=2)
    if where == "args":
        ns.patch_image_size = S
        ck = {"model": _fairseq_state(ofa_entangled), "args": ns}
    else:
        cfg = _omegaconf_like({"task": {"_name": "caption", "patch_image_size": S}, "model": ns,
                               "common": {"fp16": True}}, monkeypatch)
        ck = {"model": _fairseq_state(ofa_entangled), "args": None, "cfg": cfg}
    path = tmp_path / "ofa.pt"
    torch.save(ck, path)
    monkeypatch.delitem(sys.modules, "omegaconf.dictconfig", raising=False)
    monkeypatch.delitem(sys.modules, "omegaconf.nodes", raising=False)
    model = _load(path, arch="ar", num_bins=20).eval()
    assert model.cfg.image_size == S and model.ofa_report["format"] == "fairseq"
    assert model.cfg.entangle_position_embedding and model.cfg.decoder_entangle
    _check_against(ofa_entangled, model)
    ns.entangle_position_embedding, ns.disable_entangle = False, True  # the released scripts' flags
    ns.patch_image_size = S
    torch.save({"model": _fairseq_state(ofa_entangled), "args": ns}, path)
    released = _load(path, arch="ar", num_bins=20)
    assert not released.cfg.entangle_position_embedding and not released.cfg.decoder_entangle


@pytest.mark.parametrize("flag, value", [("scale_attn", False), ("scale_heads", False),
                                         ("no_scale_embedding", False), ("encoder_normalize_before", False),
                                         ("layernorm_embedding", False), ("add_type_embedding", False),
                                         ("scale_resids", True), ("activation_fn", "relu"),
                                         ("interpolate_position", True),
                                         ("attn_scale_factor", "two"), ("patch_image_size", -3)])
def test_from_ofa_rejects_flags_it_does_not_compute(tmp_path, flag, value):
    """A checkpoint trained with a flag that changes OFA's computation in a way narvl does not
    implement fails with the flag's name before any weight is read into a model."""
    state = {"encoder.embed_tokens.weight": torch.zeros(10, 8)}
    path = tmp_path / "ofa.pt"
    torch.save({"model": state, "args": argparse.Namespace(**{flag: value})}, path)
    with pytest.raises(ValueError, match=flag):
        from_ofa(path)


@pytest.mark.parametrize("flag, value", [("normformer", False), ("scale_embedding", True),
                                         ("use_ofasys", True), ("interpolate_position", True),
                                         ("use_gamma_feature", True),
                                         ("decoder_normalize_before", False)])
def test_from_ofa_rejects_hugging_face_config_flags(tmp_path, flag, value):
    from safetensors.torch import save_file
    save_file({"encoder.layers.0.self_attn_mid_layer_norm.weight": torch.ones(8)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(f'{{"{flag}": {str(value).lower()}}}')
    with pytest.raises(ValueError, match=flag):
        from_ofa(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        from_ofa(tmp_path)
