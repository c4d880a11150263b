"""narvl.models.export_onnx: ONNX Runtime runs the exported NARVL and AR graphs as the eager
models compute them (float32 tolerance), at batch sizes and text lengths other than the traced
ones, with padded text; bad arguments raise."""
import os

import numpy as np
import pytest
import torch

from narvl.models import ARBaseline, NARVL, NARVLConfig, export_onnx, prepare_for_inference

for _name in ("onnx", "onnxscript"):
    pytest.importorskip(_name, reason="in the [test] and [serving] extras")
ort = pytest.importorskip("onnxruntime", reason="in the [test] and [serving] extras")


def small_cfg(**kw):
    base = dict(d_model=32, enc_layers=2, dec_layers=2, heads=2, resnet_layers=(1, 1, 1), image_size=32,
                num_queries=5, vocab_size=41, num_bins=8, max_text_len=12, max_target_len=9, dropout=0.0,
                entangle_position_embedding=True)
    base.update(kw)
    return NARVLConfig(**base)


def _inputs(cfg, B, Lt, seed):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g)
    text = torch.randint(4, cfg.vocab_size - 1, (B, Lt), generator=g)
    if B > 1 and Lt > 2:
        text[-1, Lt - 2:] = cfg.pad_id  # right padding on one sample
    return images, text


def _trained_like(model):
    """Non-zero relative-position tables and BatchNorm statistics, as a trained model has."""
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "rel_pos_table" in name:
            torch.nn.init.normal_(p, std=0.3)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("arch", ["narvl", "ar"])
def test_onnxruntime_matches_eager(arch, tmp_path):
    cfg = small_cfg()
    torch.manual_seed(0)
    model = _trained_like(NARVL(cfg) if arch == "narvl" else ARBaseline(cfg))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = export_onnx(model, str(tmp_path / "m.onnx"), batch_size=2, text_len=6)
    assert path == str(tmp_path / "m.onnx") and os.path.getsize(path) > 0
    assert [f for f in os.listdir(tmp_path) if f != "m.onnx"] == []  # no temporary left behind
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # model unchanged
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    assert names == (["images", "text"] if arch == "narvl" else ["images", "text", "prev_tokens"])
    for B, Lt, T in ((2, 6, 4), (1, 3, 1), (3, 9, 7)):  # other batch sizes and lengths than traced
        images, text = _inputs(cfg, B, Lt, seed=B * 10 + Lt)
        feeds = {"images": images.numpy(), "text": text.numpy()}
        with torch.no_grad():
            if arch == "narvl":
                want = model.logits(images, text)
                assert want.shape == (B, cfg.num_queries, cfg.vocab_size)
            else:
                prev = torch.randint(4, cfg.vocab_size - 1, (B, T), generator=torch.Generator().manual_seed(T))
                prev[:, 0] = cfg.bos_id
                feeds["prev_tokens"] = prev.numpy()
                want = model.forward_logits(images, text, prev)
        (got,) = sess.run(None, feeds)
        assert got.shape == tuple(want.shape)
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)


def test_export_onnx_bad_arguments(tmp_path):
    cfg = small_cfg()
    model = NARVL(cfg).eval()
    with pytest.raises(TypeError, match="model"):
        export_onnx(torch.nn.Linear(2, 2), str(tmp_path / "m.onnx"))
    with pytest.raises(TypeError, match="serving copy"):
        export_onnx(prepare_for_inference(model), str(tmp_path / "m.onnx"))
    with pytest.raises(ValueError, match="directory"):
        export_onnx(model, str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        export_onnx(model, str(tmp_path / "missing" / "m.onnx"))
    with pytest.raises(ValueError, match="text_len"):
        export_onnx(model, str(tmp_path / "m.onnx"), text_len=cfg.max_text_len + 1)
    with pytest.raises(ValueError, match="batch_size"):  # a traced size of 1 cannot stay dynamic
        export_onnx(model, str(tmp_path / "m.onnx"), batch_size=1)
    with pytest.raises(TypeError, match="batch_size"):
        export_onnx(model, str(tmp_path / "m.onnx"), batch_size=2.0)
    with pytest.raises(TypeError, match="path"):
        export_onnx(model, 3)
