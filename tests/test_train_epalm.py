"""train.py --arch epalm / epalm-nar on tiny unimodal models (``epalm_pretrain.LM_SIZE`` and
``VIT_SIZE`` patched): metrics.json, the adapter file reproducing the evaluated outputs, the frozen
models' files left as they were, reuse of OUT/pretrained, --lm / --vision and their errors."""
import hashlib
import json
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")
from transformers import OPTConfig, OPTForCausalLM, ViTConfig, ViTModel  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402
from narvl.data import shapes_task  # noqa: E402
from narvl.models import epalm_pretrain as ep  # noqa: E402
from narvl.models.epalm import EPALM  # noqa: E402

SIZE = 32
SMALL = ["--image-size", str(SIZE), "--train-size", "64", "--eval-size", "8", "--latency-samples", "2",
         "--batch-size", "8", "--no-progress", "--warmup", "2", "--steps", "3", "--lm-steps", "3",
         "--vision-steps", "3"]
TINY_LM = dict(hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2, max_position_embeddings=96)
TINY_VIT = dict(patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
FIELDS = ("task", "arch", "metric_name", "metric", "latency_ms", "params", "trainable_params", "trainable_fraction",
          "train_seconds", "head", "num_queries", "losses", "pretraining", "examples", "adapter")
_make_tokenizer = train.make_tokenizer
_tokenizers = {}


def _tokenizer(train_data=None, vocab_size=1000, num_bins=64):
    """train.make_tokenizer, trained once per setting for the whole file (it is deterministic)."""
    assert train_data is None
    if (vocab_size, num_bins) not in _tokenizers:
        _tokenizers[vocab_size, num_bins] = _make_tokenizer(None, vocab_size, num_bins)
    return _tokenizers[vocab_size, num_bins]


@pytest.fixture(autouse=True)
def tiny(monkeypatch):
    monkeypatch.setattr(ep, "LM_SIZE", TINY_LM)
    monkeypatch.setattr(ep, "VIT_SIZE", TINY_VIT)
    monkeypatch.setattr(train, "make_tokenizer", _tokenizer)


def run(out, *args):
    assert train.main([*SMALL, "--out", str(out), *args]) == 0
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


def digests(directory):
    """sha256 of every file under ``directory``."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture
def served(monkeypatch):
    """The models train.py evaluates (each ``epalm_pretrain.Served``'s), in order."""
    models = []
    init = ep.Served.__init__

    def capture(self, model, max_new_tokens):
        models.append(model)
        init(self, model, max_new_tokens)

    monkeypatch.setattr(ep.Served, "__init__", capture)
    return models


def check_reproduced(m, evaluated, lm_dir, vision_dir):
    """A model rebuilt from the frozen directories and the adapter file computes the evaluated
    model's logits on the eval split, and its first outputs are metrics.json's examples."""
    tok = train.make_tokenizer()
    torch.manual_seed(123)
    model = EPALM(ep.load_lm(lm_dir, tok), ep.load_vision(vision_dir, SIZE), m["head"], m["num_queries"]).eval()
    data = shapes_task(m["task"], m["eval_samples"], SIZE, seed=1000)  # the eval split of --seed 0
    images, text, *_ = data.batch(list(range(len(data))), tok, train.MAX_TEXT_LEN)
    ids, mask = ep.lm_prompt(text, ep.lm_bos(model))
    with torch.no_grad():
        assert not torch.equal(model(images, ids, mask), evaluated(images, ids, mask))
        model.load_adapter(m["adapter"])
        assert torch.equal(model(images, ids, mask), evaluated(images, ids, mask))
    out = ep.Served(model, m["max_target_len"]).generate(images, text)
    assert [e["pred"] for e in m["examples"]] == [train.decode_text(m["task"], tok, o, SIZE) for o in out][:5]


def check_metrics(m, task, arch):
    assert all(k in m for k in FIELDS), [k for k in FIELDS if k not in m]
    assert m["task"] == task and m["arch"] == arch and m["latency_ms"] > 0
    assert 0 < m["trainable_params"] < m["params"] and 0 < m["trainable_fraction"] < 0.5
    assert len(m["losses"]) == 3 and os.path.isfile(m["adapter"])


def test_epalm_pretrains_trains_reuses(tmp_path, served):
    m = run(tmp_path, "--arch", "epalm", "--task", "caption")
    check_metrics(m, "caption", "epalm")
    assert m["head"] == "ar" and m["num_queries"] is None and m["metric_name"] == "CIDEr"
    for kind in ("lm", "vision"):
        rec = m["pretraining"][kind]
        assert rec["source"] == "pretrained" and rec["steps"] == 3 and len(rec["losses"]) == 3
    lm_dir, vision_dir = tmp_path / "pretrained" / "lm", tmp_path / "pretrained" / "vision"
    check_reproduced(m, served[0], lm_dir, vision_dir)
    frozen = digests(tmp_path / "pretrained")
    again = run(tmp_path, "--arch", "epalm", "--task", "caption")
    assert digests(tmp_path / "pretrained") == frozen  # the adapter stage never writes the frozen models
    assert {again["pretraining"][k]["source"] for k in ("lm", "vision")} == {"reused"}
    assert again["pretraining"]["lm"]["losses"] == m["pretraining"]["lm"]["losses"]
    assert again["examples"] == m["examples"] and again["losses"] == m["losses"]


def test_epalm_nar_vqa(tmp_path, served):
    m = run(tmp_path, "--arch", "epalm-nar", "--task", "vqa")
    check_metrics(m, "vqa", "epalm-nar")
    assert m["head"] == "nar" and m["num_queries"] == 6 and m["metric_name"] == "VQA accuracy"
    check_reproduced(m, served[0], tmp_path / "pretrained" / "lm", tmp_path / "pretrained" / "vision")


def save_own(root, vocab_size):
    """A user's OPT (OPT's own special ids: BOS = EOS = </s>) and ViT directories."""
    OPTForCausalLM(OPTConfig(vocab_size=vocab_size, word_embed_proj_dim=32, **TINY_LM)).save_pretrained(root / "opt")
    ViTModel(ViTConfig(image_size=SIZE, **TINY_VIT), add_pooling_layer=False).save_pretrained(root / "vit")
    return root / "opt", root / "vit"


def test_own_lm_and_vision(tmp_path, served):
    lm_dir, vision_dir = save_own(tmp_path, train.make_tokenizer().vocab_size + 3)
    before = digests(tmp_path)
    out = tmp_path / "run"
    m = run(out, "--arch", "epalm-nar", "--task", "caption", "--lm", str(lm_dir), "--vision", str(vision_dir))
    check_metrics(m, "caption", "epalm-nar")
    assert m["num_queries"] == 20
    assert {m["pretraining"][k]["source"] for k in ("lm", "vision")} == {"given"}
    assert not os.path.exists(out / "pretrained")
    assert {k: v for k, v in digests(tmp_path).items() if not k.startswith("run")} == before
    check_reproduced(m, served[0], lm_dir, vision_dir)


def test_lm_and_vision_errors(tmp_path, capsys):
    lm_dir, vision_dir = save_own(tmp_path, 40)  # fewer tokens than the tokenizer's
    cases = [(["--lm", str(tmp_path / "missing")], "--lm", "no config.json"),
             (["--lm", str(vision_dir)], "--lm", "expected 'opt'"),
             (["--lm", str(lm_dir)], "--lm", "vocabulary has 40 tokens"),
             (["--vision", str(vision_dir), "--image-size", "64"], "--vision", "32 px")]
    for args, flag, what in cases:
        with pytest.raises(SystemExit) as e:
            train.main([*SMALL, "--arch", "epalm", "--out", str(tmp_path / "out"), *args])
        assert flag in str(e.value.code) and what in str(e.value.code), e.value.code
    for args, what in [(["--arch", "narvl", "--lm", str(lm_dir)], "--lm and --vision apply"),
                       (["--arch", "epalm", "--resume"], "--resume does not apply"),
                       (["--arch", "epalm", "--queries", "4"], "--queries applies")]:
        with pytest.raises(SystemExit) as e:
            train.parse_args(args)
        assert e.value.code == 2 and what in capsys.readouterr().err
