"""train.py: a short training smoke run per architecture, checkpoint (safetensors, atomic),
--resume, --eval-only, --freeze-backbone, DDP with 2 gloo processes, argument errors."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402

SMALL = ["--image-size", "32", "--train-size", "64", "--eval-size", "12", "--latency-samples", "3",
         "--batch-size", "8", "--no-progress", "--warmup", "2"]


def run(tmp_path, *args):
    out = str(tmp_path)
    assert train.main([*SMALL, "--out", out, *args]) == 0
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("task,arch", [("caption", "narvl"), ("caption", "ar"), ("grounding", "narvl"),
                                       ("vqa", "ar"), ("entailment", "narvl")])
def test_smoke_metrics_json(tmp_path, task, arch, capsys):
    m = run(tmp_path, "--task", task, "--arch", arch, "--steps", "3")
    for key in ("task", "arch", "metric_name", "metric", "latency_ms", "params", "train_seconds"):
        assert key in m
    assert m["task"] == task and m["arch"] == arch and m["latency_ms"] > 0 and m["params"] > 1e6
    assert 0.0 <= m["metric"] <= (1000.0 if task == "caption" else 100.0)
    printed = capsys.readouterr().out
    assert "[narvl] task=" in printed
    ex = m["examples"][0]  # the first evaluation outputs are printed against their references
    assert f"-> {ex['pred']!r} (reference {ex['target']!r})" in printed
    with open(tmp_path / "curve.png", "rb") as f:  # the loss curve beside metrics.json
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert f"[narvl] loss curve -> {tmp_path / 'curve.png'}" in printed
    assert os.path.isfile(tmp_path / "last.safetensors")
    with open(tmp_path / "last.safetensors", "rb") as f:  # safetensors, not a pickle
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    assert header["__metadata__"]["arch"] == arch and header["__metadata__"]["step"] == "3"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_bf16_autocast_smoke(tmp_path):
    m = run(tmp_path, "--task", "caption", "--arch", "narvl", "--steps", "2", "--bf16")
    assert m["latency_ms"] > 0


def test_entangle_position_embedding_flag(tmp_path):
    """--entangle-position-embedding reaches the model's config and travels in the checkpoint,
    so --eval-only rebuilds the same function."""
    m = run(tmp_path, "--task", "caption", "--arch", "narvl", "--steps", "2", "--entangle-position-embedding")
    from narvl.checkpoint import read_checkpoint
    from narvl.models import NARVLConfig
    _, meta = read_checkpoint(str(tmp_path / "last.safetensors"))
    cfg = NARVLConfig.from_json(meta["config"])
    assert cfg.entangle_position_embedding and not cfg.decoder_entangle
    ev = tmp_path / "ev"
    assert train.main([*SMALL, "--eval-only", str(tmp_path / "last.safetensors"), "--out", str(ev)]) == 0
    with open(ev / "metrics.json") as f:
        assert json.load(f)["metric"] == m["metric"]


def test_queries_and_glance_flags(tmp_path):
    """--queries, --glance and --layer-ctc-weight reach NARVL's config, the checkpoint and
    metrics.json; glancing with deep supervision trains."""
    m = run(tmp_path, "--task", "caption", "--arch", "narvl", "--steps", "2", "--queries", "24", "--glance", "0.5",
            "--layer-ctc-weight", "0.3")
    from narvl.checkpoint import read_checkpoint
    from narvl.models import NARVLConfig
    _, meta = read_checkpoint(str(tmp_path / "last.safetensors"))
    cfg = NARVLConfig.from_json(meta["config"])
    assert cfg.num_queries == 24 and cfg.glance_ratio == 0.5 and m["num_queries"] == 24
    assert cfg.layer_ctc_weight == 0.3 and m["layer_ctc_weight"] == 0.3
    assert cfg.max_target_len == 20  # targets are still cut at the task's length
    assert all(math.isfinite(x) for x in m["losses"])
    assert m["glance_ratio"] == 0.5 and m["refine_steps"] == train.TASK_RECIPE["caption"].get("refine", 0)
    ev = tmp_path / "ev"  # --refine overrides the checkpoint's refinement passes at evaluation
    assert train.main([*SMALL, "--eval-only", str(tmp_path / "last.safetensors"), "--refine", "1", "--out", str(ev)]) == 0
    with open(ev / "metrics.json") as f:
        assert json.load(f)["refine_steps"] == 1


def test_aux_ar_weight_flag(tmp_path):
    """--aux-ar-weight reaches NARVL's config, the checkpoint and metrics.json; params counts the
    served model (without the aux decoder); it applies to a new NARVL trained in full only."""
    m = run(tmp_path / "a", "--task", "caption", "--arch", "narvl", "--steps", "2", "--aux-ar-weight", "0.5")
    cfg = _cfg_of(tmp_path / "a")
    assert cfg.aux_ar_weight == 0.5 and m["aux_ar_weight"] == 0.5 and m["aux_decoder_params"] > 0
    assert all(math.isfinite(x) for x in m["losses"])
    from narvl.models import NARVL
    assert m["params"] == sum(p.numel() for p in NARVL(cfg).parameters()) - m["aux_decoder_params"]
    ev = tmp_path / "ev"  # the checkpoint (aux decoder included) loads for evaluation
    assert train.main([*SMALL, "--eval-only", str(tmp_path / "a" / "last.safetensors"), "--out", str(ev)]) == 0
    with open(ev / "metrics.json") as f:
        assert json.load(f)["metric"] == m["metric"]
    for bad in (["--aux-ar-weight", "-1"], ["--aux-ar-weight", "0.5", "--arch", "ar"], ["--layer-ctc-weight", "-1"],
                ["--layer-ctc-weight", "inf"], ["--arch", "epalm", "--layer-ctc-weight", "0.5"],
                ["--arch", "ar", "--layer-ctc-weight", "0.5"], ["--resume", "--layer-ctc-weight", "0.5"],
                ["--aux-ar-weight", "0.5", "--freeze-backbone"]):
        with pytest.raises(SystemExit):
            train.parse_args(bad)


def test_dec_layers_and_serve_dtype(tmp_path, monkeypatch):
    """--dec-layers sets a new model's decoder depth (config, checkpoint); --serve-dtype picks the
    dtype of the copy evaluated and timed, recorded in metrics.json (bf16 falls back to fp32 on a
    CPU without bfloat16 instructions; bf16-emulated does not)."""
    m = run(tmp_path / "a", "--task", "caption", "--arch", "narvl", "--steps", "2", "--dec-layers", "3")
    cfg = _cfg_of(tmp_path / "a")
    assert cfg.dec_layers == 3 and m["serve_dtype"] == "float32"
    from narvl.models import NARVL
    assert m["params"] == sum(p.numel() for p in NARVL(cfg).parameters())
    ckpt = str(tmp_path / "a" / "last.safetensors")
    ev = tmp_path / "ev"
    assert train.main([*SMALL, "--eval-only", ckpt, "--serve-dtype", "bf16-emulated", "--out", str(ev)]) == 0
    with open(ev / "metrics.json") as f:
        assert json.load(f)["serve_dtype"] == "bfloat16"
    import narvl.models.inference as inference
    for has, want in ((False, "float32"), (True, "bfloat16")):
        monkeypatch.setattr(inference, "cpu_has_bf16", lambda has=has: has)
        assert train.main([*SMALL, "--eval-only", ckpt, "--serve-dtype", "bf16", "--out", str(ev)]) == 0
        with open(ev / "metrics.json") as f:
            assert json.load(f)["serve_dtype"] == want
    for bad in (["--dec-layers", "0"], ["--dec-layers", "2", "--eval-only", ckpt], ["--serve-dtype", "fp16"],
                ["--arch", "epalm", "--serve-dtype", "bf16"]):
        with pytest.raises(SystemExit):
            train.parse_args(bad)


def test_every_option_has_help_in_its_group(capsys):
    """--help: each option has its own text, under one of the groups."""
    p = train.make_parser()
    assert all(a.help for a in p._actions)
    titles = [g.title for g in p._action_groups[2:]]
    assert len(titles) == 7 and all(g._group_actions for g in p._action_groups[2:])
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    out = capsys.readouterr().out
    assert all(f"{t}:" in out for t in titles) and "--layer-ctc-weight" in out


def _cfg_of(out):
    from narvl.checkpoint import read_checkpoint
    from narvl.models import NARVLConfig
    return NARVLConfig.from_json(read_checkpoint(str(out / "last.safetensors"))[1]["config"])


def test_task_recipe_defaults_and_overrides(tmp_path):
    """A new caption model takes train.TASK_RECIPE (entangled positions, the arch's learning rate,
    NARVL's glancing and refinement); the flags override it; a task without a recipe keeps OFA's
    released setup and 5e-4."""
    rec = train.TASK_RECIPE["caption"]
    m = run(tmp_path / "a", "--task", "caption", "--arch", "narvl", "--steps", "1")
    cfg = _cfg_of(tmp_path / "a")
    assert (cfg.entangle_position_embedding, cfg.glance_ratio, cfg.glance_plain_weight, cfg.refine_steps) == (
        rec.get("entangle_position_embedding", False), rec.get("glance", 0.0), rec.get("glance_plain_weight", 0.0),
        rec.get("refine", 0))
    assert m["lr"] == rec.get("narvl_lr", 5e-4) and m["glance_plain_weight"] == rec.get("glance_plain_weight", 0.0)
    assert cfg.dropout == m["dropout"] == rec.get("narvl_dropout", 0.1)
    run(tmp_path / "b", "--task", "caption", "--arch", "narvl", "--steps", "1", "--no-entangle-position-embedding",
        "--glance", "0", "--glance-plain-weight", "0", "--refine", "0", "--dropout", "0.2")
    cfg = _cfg_of(tmp_path / "b")
    assert (cfg.entangle_position_embedding, cfg.glance_ratio, cfg.glance_plain_weight, cfg.refine_steps,
            cfg.dropout) == (False, 0.0, 0.0, 0, 0.2)
    m = run(tmp_path / "b2", "--task", "caption", "--arch", "ar", "--steps", "1", "--lr", "3e-4")
    assert m["lr"] == 3e-4 and _cfg_of(tmp_path / "b2").entangle_position_embedding == rec.get(
        "entangle_position_embedding", False)
    assert m["dropout"] == rec.get("ar_dropout", 0.1)
    assert "vqa" not in train.TASK_RECIPE
    run(tmp_path / "c", "--task", "vqa", "--arch", "narvl", "--steps", "1")
    cfg = _cfg_of(tmp_path / "c")
    assert (cfg.entangle_position_embedding, cfg.glance_ratio, cfg.refine_steps) == (False, 0.0, 0)
    assert json.load(open(tmp_path / "c" / "metrics.json"))["lr"] == 5e-4 and cfg.dropout == 0.1
    for bad in (["--dropout", "1.0"], ["--dropout", "-0.1"]):
        with pytest.raises(SystemExit):
            train.parse_args(bad)


@pytest.mark.parametrize("steps,warmup", [(20, 50), (600, 50), (7, 1)])
def test_lr_schedule_reaches_the_peak(steps, warmup):
    """The warm-up reaches --lr even when the run is shorter than it; the cosine then falls to ~0."""
    f = train.lr_schedule(steps, warmup)
    vals = [f(s) for s in range(steps)]
    assert max(vals) == 1.0 and vals[min(warmup, steps) - 1] == 1.0
    assert vals[0] == 1.0 / min(warmup, steps)
    assert all(a <= b for a, b in zip(vals[:min(warmup, steps)], vals[1:min(warmup, steps)]))
    assert all(a >= b for a, b in zip(vals[min(warmup, steps) - 1:], vals[min(warmup, steps):]))
    if steps - warmup > 100:
        assert vals[-1] < 1e-4


def test_resume_continues_and_eval_only(tmp_path):
    run(tmp_path, "--task", "vqa", "--steps", "2")
    m = run(tmp_path, "--task", "vqa", "--steps", "4", "--resume")
    from narvl.checkpoint import read_checkpoint
    tensors, meta = read_checkpoint(str(tmp_path / "last.safetensors"))
    assert meta["step"] == "4" and any(k.startswith("optim.") for k in tensors)
    ev = tmp_path / "ev"
    m2 = train.main([*SMALL, "--eval-only", str(tmp_path / "last.safetensors"), "--out", str(ev)])
    assert m2 == 0
    with open(ev / "metrics.json") as f:
        e = json.load(f)
    assert e["task"] == "vqa" and e["metric"] == m["metric"] and e["train_seconds"] == 0.0


def test_resume_is_bit_exact(tmp_path):
    """A 5-step run stopped after 2 steps (--stop-after) and resumed ends with the same weights,
    optimizer state, RNG state and losses, bit for bit, as 5 uninterrupted steps (dropout on, so
    the RNG state matters)."""
    from narvl.checkpoint import read_checkpoint
    common = ["--task", "caption", "--dropout", "0.1", "--ckpt-every", "100"]
    full = run(tmp_path / "full", *common, "--steps", "5")
    part = run(tmp_path / "cut", *common, "--steps", "5", "--stop-after", "2")
    assert len(part["losses"]) == 2
    cut = run(tmp_path / "cut", *common, "--steps", "5", "--resume")
    a, _ = read_checkpoint(str(tmp_path / "full" / "last.safetensors"))
    b, _ = read_checkpoint(str(tmp_path / "cut" / "last.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("optim.") for k in a) and "rng.torch" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert cut["losses"] == full["losses"] and len(full["losses"]) == 5


def test_bf16_run_lowers_the_loss(tmp_path):
    m = run(tmp_path, "--task", "caption", "--bf16", "--steps", "14", "--lr", "1e-3")
    first, last = sum(m["losses"][:3]) / 3, sum(m["losses"][-3:]) / 3
    assert m["precision"] == "bf16" and last < 0.8 * first, m["losses"]


def test_fp16_gradscaler_run(tmp_path):
    m = run(tmp_path, "--task", "vqa", "--fp16", "--steps", "2", "--batch-size", "2")
    assert m["precision"] == "fp16" and m["skipped_steps"] >= 0 and len(m["losses"]) == 2


def test_counts_what_training_cannot_use(tmp_path):
    """Grounding (4 bins + EOS on 5 queries): boxes with a repeated adjacent bin need 6 CTC
    frames; train.py counts them per epoch instead of letting zero_infinity hide them."""
    m = run(tmp_path, "--task", "grounding", "--steps", "9", "--batch-size", "16")
    assert m["max_target_len"] == 5 and m["targets_cut"] == 0
    assert sum(m["trained_samples_per_epoch"].values()) == 9 * 16
    assert set(m["infeasible_per_epoch"]) == {"0", "1", "2"} and m["infeasible"] == sum(m["infeasible_per_epoch"].values())
    assert 0 < m["infeasible"] < 9 * 16
    c = run(tmp_path / "c", "--task", "caption", "--steps", "2", "--max-target-len", "6")
    assert c["targets_cut"] > 0 and c["train_set"]["cut"] > 0 and c["max_target_len"] == 6
    a = run(tmp_path / "a", "--task", "caption", "--arch", "ar", "--steps", "1")
    assert a["infeasible"] is None and a["max_target_len"] == 20


def test_distillation_trains_on_cached_teacher_outputs(tmp_path, capsys):
    run(tmp_path / "ar", "--task", "caption", "--arch", "ar", "--steps", "2")
    teacher = str(tmp_path / "ar" / "last.safetensors")
    m = run(tmp_path / "kd", "--task", "caption", "--steps", "2", "--distill-from", teacher)
    info = m["distillation"]
    assert info["samples"] == 64 and not info["cache_reused"] and os.path.isfile(info["cache"])
    with open(info["cache"]) as f:
        cached = json.load(f)["targets"]
    assert len(cached) == 64 and all(isinstance(t, list) for t in cached)
    m2 = run(tmp_path / "kd", "--task", "caption", "--steps", "3", "--distill-from", teacher)
    assert m2["distillation"]["cache_reused"] and "reusing 64 teacher outputs" in capsys.readouterr().out
    with pytest.raises(ValueError, match="task 'caption'"):
        run(tmp_path / "kd2", "--task", "vqa", "--steps", "1", "--distill-from", teacher)
    with pytest.raises(ValueError, match="another vocabulary"):
        run(tmp_path / "kd3", "--task", "caption", "--steps", "1", "--distill-from", teacher, "--num-bins", "32")
    with pytest.raises(ValueError, match="must be an AR"):
        run(tmp_path / "kd4", "--task", "caption", "--steps", "1",
            "--distill-from", str(tmp_path / "kd" / "last.safetensors"))
    with pytest.raises(SystemExit):
        run(tmp_path / "kd5", "--task", "caption", "--arch", "ar", "--steps", "1", "--distill-from", teacher)


def test_resume_requires_matching_task(tmp_path):
    run(tmp_path, "--task", "entailment", "--steps", "1")
    with pytest.raises(SystemExit, match="entailment"):
        train.main([*SMALL, "--out", str(tmp_path), "--task", "vqa", "--resume", "--steps", "2"])


def test_freeze_backbone_reports_fraction(tmp_path):
    m = run(tmp_path, "--task", "vqa", "--steps", "2", "--freeze-backbone")
    assert 0 < m["trainable_fraction"] < 0.01
    m2 = run(tmp_path / "r", "--task", "vqa", "--steps", "3", "--freeze-backbone")
    assert m2["trainable_params"] == m["trainable_params"]


def test_bad_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match="safetensors"):
        train.main([*SMALL, "--eval-only", str(bad), "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="does not exist"):
        train.main([*SMALL, "--eval-only", str(tmp_path / "none"), "--out", str(tmp_path)])


@pytest.mark.parametrize("args", [["--steps", "-1"], ["--batch-size", "0"], ["--image-size", "40"],
                                  ["--task", "ocr"], ["--lr", "0"], ["--queries", "0"],
                                  ["--glance", "1.5"]])
def test_bad_arguments(args, tmp_path):
    with pytest.raises(SystemExit):
        train.main([*SMALL, "--out", str(tmp_path), *args])


def test_ddp_two_ranks_equal_one_rank(tmp_path):
    """2 gloo ranks (torchrun) and 1 rank on the same global batch give the same losses and the
    same weights after k steps, within fp32 tolerance (dropout off, BatchNorm frozen: then each
    sample's computation is independent of its rank's shard)."""
    from narvl.checkpoint import read_checkpoint
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [*SMALL, "--task", "entailment", "--steps", "3", "--dropout", "0", "--freeze-bn"]
    outs = {}
    for n in (1, 2):
        out = tmp_path / f"w{n}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
               os.path.join(ROOT, "train.py"), *args, "--out", str(out)]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        with open(out / "metrics.json") as f:
            outs[n] = json.load(f), read_checkpoint(str(out / "last.safetensors"))[0]
    (m1, w1), (m2, w2) = outs[1], outs[2]
    assert m2["world_size"] == 2 and m1["world_size"] == 1
    assert m1["losses"] == pytest.approx(m2["losses"], rel=1e-4, abs=1e-5)
    assert sum(m2["trained_samples_per_epoch"].values()) == 3 * 8  # counts summed over the ranks
    keys = [k for k in w1 if k.startswith("model.")]
    assert keys and set(keys) == {k for k in w2 if k.startswith("model.")}
    for k in keys:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=2e-5, msg=k)
    assert m1["losses"][0] != m1["losses"][-1]  # the weights did move between the steps


def _data_files(tmp_path, task):
    """Tiny files in the format users bring, and a --data spec naming them."""
    from PIL import Image

    img = tmp_path / "img"
    img.mkdir()
    colors = [(200, 10, 10), (10, 200, 10), (10, 10, 200)]
    if task == "vqa":
        for i, c in enumerate(colors):
            Image.new("RGB", (40, 30), c).save(img / f"COCO_val2014_{i:012d}.jpg")
        names = ["red", "green", "blue"]
        q = {"data_subtype": "val2014", "questions": [{"image_id": i, "question": "what color is it?",
                                                       "question_id": i} for i in range(3)]}
        a = {"annotations": [{"question_id": i, "image_id": i,
                              "answers": [{"answer": names[i], "answer_id": j} for j in range(10)]}
                             for i in range(3)]}
        (tmp_path / "q.json").write_text(json.dumps(q))
        (tmp_path / "a.json").write_text(json.dumps(a))
        entry = {"questions": "q.json", "annotations": "a.json", "images": "img"}
    elif task == "caption":
        for i, c in enumerate(colors):
            Image.new("RGB", (40, 30), c).save(img / f"{i}.jpg")
        d = {"images": [{"id": i, "file_name": f"{i}.jpg"} for i in range(3)],
             "annotations": [{"image_id": i, "caption": f"a {n} picture"} for i, n in enumerate(["red", "green", "blue"])]}
        (tmp_path / "c.json").write_text(json.dumps(d))
        entry = {"captions": "c.json", "images": "img"}
    elif task == "grounding":
        Image.new("RGB", (40, 20), colors[0]).save(img / "r.jpg")
        refs = [{"file_name": "r.jpg", "bbox": [10, 5, 20, 10], "sentences": ["the middle", "centre"]},
                {"file_name": "r.jpg", "bbox": [0, 0, 8, 8], "sentences": ["top left"]}]
        (tmp_path / "refs.json").write_text(json.dumps(refs))
        entry = {"refs": "refs.json", "images": "img"}
    else:
        for i, c in enumerate(colors):
            Image.new("RGB", (40, 30), c).save(img / f"{i}.jpg")
        lines = [{"Flickr30k_ID": str(i), "sentence2": "It is red.", "gold_label": g}
                 for i, g in enumerate(["entailment", "contradiction", "neutral"])]
        (tmp_path / "ve.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
        entry = {"jsonl": "ve.jsonl", "images": "img"}
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"train": entry, "eval": entry}))
    return str(spec)


@pytest.mark.parametrize("task,arch", [("vqa", "narvl"), ("caption", "ar"), ("grounding", "narvl"),
                                       ("entailment", "ar")])
def test_trains_on_user_files(tmp_path, task, arch):
    spec = _data_files(tmp_path, task)
    m = run(tmp_path / "out", "--task", task, "--arch", arch, "--steps", "2", "--data", spec,
            "--bpe-vocab", "300", "--num-bins", "16")
    assert m["task"] == task and m["latency_ms"] > 0
    assert m["eval_samples"] == 3
    # the tokenizer was trained on these files and travels in the checkpoint: eval-only reloads it
    e = run(tmp_path / "eval", "--eval-only", str(tmp_path / "out" / "last.safetensors"), "--data", spec)
    assert e["metric"] == m["metric"]


def test_bad_data_spec_is_a_clear_error(tmp_path):
    spec = _data_files(tmp_path, "caption")
    with pytest.raises(SystemExit, match="needs keys"):
        train.main([*SMALL, "--out", str(tmp_path / "o"), "--task", "vqa", "--steps", "1", "--data", spec])
    (tmp_path / "only_train.json").write_text(json.dumps({"train": {"captions": "c.json", "images": "img"}}))
    with pytest.raises(SystemExit, match="'eval' entry"):
        train.main([*SMALL, "--out", str(tmp_path / "o"), "--task", "caption", "--steps", "1",
                    "--data", str(tmp_path / "only_train.json")])
    with pytest.raises(SystemExit, match="--data"):
        train.main([*SMALL, "--out", str(tmp_path / "o"), "--task", "caption", "--data", str(tmp_path / "none.json")])


def test_init_ofa_fine_tunes_from_an_ofa_checkpoint(tmp_path, capsys):
    """train.py --init-ofa --ofa-bpe-dir on a synthetic tiny OFA checkpoint and tiny BPE files:
    NARVL starts from OFA's weights, trains, decodes with OFA's tokenizer, and its checkpoint
    reloads with that tokenizer."""
    from narvl.data import shapes
    from narvl.data.ofa import OFATokenizer
    from narvl.models import NARVLConfig
    from narvl.checkpoint import read_checkpoint
    from ofa_files import write_bpe_files, write_ofa_checkpoint
    bpe = tmp_path / "bpe"
    bpe.mkdir()
    write_bpe_files(bpe, None, shapes.corpus(image_size=64, seed=0, n=200), vocab_size=300)
    tok = OFATokenizer.from_files(bpe)
    cfg = NARVLConfig(d_model=32, enc_layers=1, dec_layers=1, heads=2, resnet_layers=(1, 1, 1), image_size=32,
                      vocab_size=tok.vocab_size, num_bins=1000)
    ckpt = tmp_path / "ofa_tiny.pt"
    write_ofa_checkpoint(ckpt, cfg)
    out = tmp_path / "run"
    m = run(out, "--task", "caption", "--arch", "narvl", "--steps", "1", "--lr", "1e-30", "--init-ofa", str(ckpt),
            "--ofa-bpe-dir", str(bpe))
    assert m["arch"] == "narvl" and m["latency_ms"] > 0
    m2 = run(tmp_path / "run2", "--task", "caption", "--arch", "ar", "--steps", "2", "--init-ofa", str(ckpt),
             "--ofa-bpe-dir", str(bpe))
    assert m2["arch"] == "ar" and all(map(math.isfinite, m2["losses"]))
    tensors, meta = read_checkpoint(str(out / "last.safetensors"))
    assert json.loads(meta["tokenizer"])["kind"] == "ofa"
    assert train.Tokenizer.from_json(meta["tokenizer"]).encode(" a red circle") == tok.encode(" a red circle")
    assert NARVLConfig.from_json(meta["config"]).vocab_size == tok.vocab_size
    # one step at lr 1e-30 leaves OFA's weights bit for bit (plus the new queries and blank row)
    src = torch.load(ckpt, weights_only=False)["model"]
    for k in ("encoder.layers.0.fc1.weight", "encoder.embed_images.layer1.0.conv2.weight",
              "decoder.layers.0.encoder_attn.k_proj.weight", "decoder.cross_pos_q_linear.bias"):
        assert torch.equal(tensors["model." + k], src[k]), k
    emb = tensors.get("model.embed_tokens.weight", tensors.get("model.encoder.embed_tokens.weight"))
    assert torch.equal(emb[:-1], src["encoder.embed_tokens.weight"])
    assert tensors["model.decoder.query_embed.weight"].shape == (20, 32)
    with pytest.raises(SystemExit):
        train.main([*SMALL, "--out", str(tmp_path / "x"), "--init-ofa", str(ckpt)])  # no --ofa-bpe-dir
    with pytest.raises(SystemExit, match="vocabulary"):
        other = tmp_path / "bpe2"
        other.mkdir()
        write_bpe_files(other, None, ["tiny corpus"], vocab_size=270)
        train.main([*SMALL, "--out", str(tmp_path / "y"), "--task", "caption", "--steps", "1",
                    "--init-ofa", str(ckpt), "--ofa-bpe-dir", str(other)])
