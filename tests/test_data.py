"""The embedded shapes data, the tokenizer, batching, the file loaders and the metrics."""
import json

import pytest
import torch

from narvl.data import (TaskData, Tokenizer, load_coco_captions, load_image, load_refcoco, load_snli_ve, load_spec, load_vqa_v2,
                        sample_texts,
                        metrics, shapes, shapes_task)
from narvl.data.tokenizer import BOS, EOS, PAD


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(shapes.corpus(image_size=32, n=150), vocab_size=600, num_bins=16)


def test_generation_is_deterministic_and_seeded():
    a_img, a = shapes.generate("vqa", 20, 32, seed=3)
    b_img, b = shapes.generate("vqa", 20, 32, seed=3)
    c_img, c = shapes.generate("vqa", 20, 32, seed=4)
    assert torch.equal(a_img, b_img) and a == b
    assert not torch.equal(a_img, c_img)
    assert a_img.dtype == torch.uint8 and a_img.shape == (20, 3, 32, 32)


@pytest.mark.parametrize("task", shapes.TASKS)
def test_every_task_has_its_fields(task):
    _, ss = shapes.generate(task, 60, 48, seed=0)
    for s in ss:
        assert s["text"] and "target" in s and 0 < s["weight"] <= 1
        if task == "caption":
            assert s["refs"][0] == s["target"] and len(s["refs"]) == 3
        elif task == "vqa":
            assert len(s["answers"]) == 10 and s["target"] in s["answers"]
            assert s["weight"] == pytest.approx(metrics.vqa_accuracy(s["target"], s["answers"]))
        elif task == "grounding":
            x0, y0, x1, y1 = s["box"]
            assert 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 48
        else:
            assert s["label"] in ("yes", "no", "maybe")
    if task == "entailment":
        assert {s["label"] for s in ss} == {"yes", "no", "maybe"}


def test_caption_targets_fit_twenty_queries(tok):
    """CTC needs N >= L + (number of adjacent repeats); the caption task has N = 20."""
    data = shapes_task("caption", 300, 32)
    for s in data.samples:
        ids = data.target_ids(s, tok)
        repeats = sum(a == b for a, b in zip(ids, ids[1:]))
        assert len(ids) + repeats <= 20


def test_tokenizer_layout_round_trip(tok):
    ids = tok.encode(" red circle top left")
    assert tok.decode(ids) == "red circle top left"
    assert all(4 <= i < tok.n_bpe for i in ids)
    assert tok.blank_id == tok.vocab_size - 1 == tok.n_bpe + 16
    box = [3.0, 5.0, 20.0, 31.0]
    b = tok.box_to_ids(box, 32)
    assert all(tok.bin_offset <= i < tok.blank_id for i in b)
    back = tok.ids_to_box(b, 32)
    assert max(abs(x - y) for x, y in zip(back, box)) <= 32 / 15 / 2 + 1e-6
    assert tok.ids_to_box(ids, 32) is None
    tok2 = Tokenizer.from_json(tok.to_json())
    assert tok2.encode(" blue square center") == tok.encode(" blue square center")
    assert tok2.vocab_size == tok.vocab_size
    with pytest.raises(ValueError, match="bin"):
        tok.bin_id(16)
    with pytest.raises(TypeError, match="text"):
        tok.encode(5)


def test_batch_layout(tok):
    data = shapes_task("grounding", 10, 32)
    images, text, targets, lengths, weights = data.batch([0, 3, 7], tok)
    assert images.shape == (3, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    assert (text[:, 0] == BOS).all()
    for i in range(3):
        n = int((text[i] != PAD).sum())
        assert text[i, n - 1] == EOS and (text[i, n:] == PAD).all()
    assert (lengths == 5).all() and (targets[:, 4] == EOS).all()
    assert ((targets[:, :4] >= tok.bin_offset) & (targets[:, :4] < tok.blank_id)).all()
    assert weights.tolist() == [1.0, 1.0, 1.0]


def _jpg(path, color=(200, 10, 10), size=(40, 30)):
    from PIL import Image

    Image.new("RGB", size, color).save(path)


def test_load_vqa_v2(tmp_path, tok):
    _jpg(tmp_path / "COCO_val2014_000000000042.jpg")
    q = {"data_subtype": "val2014", "questions": [{"image_id": 42, "question": "what color?", "question_id": 7}]}
    answers = [{"answer": "Red", "answer_confidence": "yes", "answer_id": i} for i in range(8)]
    answers += [{"answer": "orange", "answer_confidence": "maybe", "answer_id": 9 + i} for i in range(2)]
    a = {"annotations": [{"question_id": 7, "image_id": 42, "answers": answers,
                          "multiple_choice_answer": "red"}]}
    (tmp_path / "q.json").write_text(json.dumps(q))
    (tmp_path / "a.json").write_text(json.dumps(a))
    d = load_vqa_v2(tmp_path / "q.json", tmp_path / "a.json", str(tmp_path), image_size=32)
    assert len(d) == 1 and d.samples[0]["target"] == "red" and d.samples[0]["weight"] == 1.0
    assert d.samples[0]["answers"].count("orange") == 2
    images, text, *_ = d.batch([0], tok)
    assert images.shape == (1, 3, 32, 32) and images[0, 0].mean() > 0.5  # red channel bright
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_vqa_v2(tmp_path / "bad.json", tmp_path / "a.json", str(tmp_path))
    with pytest.raises(ValueError, match="no such file"):
        load_vqa_v2(tmp_path / "missing.json", tmp_path / "a.json", str(tmp_path))


def test_load_coco_captions(tmp_path):
    _jpg(tmp_path / "x.jpg")
    d = {"images": [{"id": 1, "file_name": "x.jpg"}, {"id": 2, "file_name": "none.jpg"}],
         "annotations": [{"image_id": 1, "caption": "A red box. "}, {"image_id": 1, "caption": "red square"}]}
    (tmp_path / "c.json").write_text(json.dumps(d))
    data = load_coco_captions(tmp_path / "c.json", str(tmp_path), image_size=16)
    assert len(data) == 1 and data.samples[0]["refs"] == ["A red box.", "red square"]
    (tmp_path / "c2.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="annotations"):
        load_coco_captions(tmp_path / "c2.json", str(tmp_path))


def test_load_refcoco_rescales_boxes(tmp_path):
    _jpg(tmp_path / "r.jpg", size=(40, 20))
    refs = [{"file_name": "r.jpg", "bbox": [10, 5, 20, 10], "sentences": [{"sent": "red thing"}, "left"],
             "split": "val"},
            {"file_name": "r.jpg", "bbox": [0, 0, 4, 4], "sentences": ["x"], "split": "train"}]
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    d = load_refcoco(tmp_path / "refs.json", str(tmp_path), image_size=32, split="val")
    assert len(d) == 2
    assert d.samples[0]["box"] == pytest.approx([8.0, 8.0, 24.0, 24.0])
    refs[0]["bbox"] = [1, 1, 0, 5]
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    with pytest.raises(ValueError, match="bbox"):
        load_refcoco(tmp_path / "refs.json", str(tmp_path), image_size=32)


def test_load_snli_ve(tmp_path):
    _jpg(tmp_path / "123.jpg")
    lines = [{"Flickr30k_ID": "123", "sentence2": "A dog runs.", "gold_label": "contradiction"},
             {"Flickr30k_ID": "123", "sentence2": "Something.", "gold_label": "neutral"}]
    (tmp_path / "ve.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    d = load_snli_ve(tmp_path / "ve.jsonl", str(tmp_path), image_size=16)
    assert [s["label"] for s in d.samples] == ["no", "maybe"]
    assert '" A dog runs "' in d.samples[0]["text"]
    (tmp_path / "bad.jsonl").write_text(json.dumps(dict(lines[0], gold_label="yes")) + "\n")
    with pytest.raises(ValueError, match="gold_label"):
        load_snli_ve(tmp_path / "bad.jsonl", str(tmp_path))


def test_vqa_accuracy_values():
    assert metrics.vqa_accuracy("red", ["red"] * 10) == 1.0
    # 3 matches: the 3 leave-one-out subsets that drop a match see 2 (2/3), the other 7 see 3 (1)
    assert metrics.vqa_accuracy("Red.", ["red"] * 3 + ["blue"] * 7) == pytest.approx(0.9)
    assert metrics.vqa_accuracy("red", ["red"] + ["blue"] * 9) == pytest.approx(0.3)
    assert metrics.vqa_accuracy("green", ["blue"] * 10) == 0.0
    assert metrics.vqa_accuracy("the cat", ["cat"] * 10) == 1.0


def test_bleu4_values():
    refs = [["the red circle is at the top left"]]
    assert metrics.bleu4(["the red circle is at the top left"], refs) == pytest.approx(1.0)
    assert metrics.bleu4(["blue"], refs) == 0.0
    # hand-computed: hyp "the red circle is at the top" (7 words) vs the 8-word ref: precisions 1,
    # brevity penalty exp(1 - 8/7)
    import math
    assert metrics.bleu4(["the red circle is at the top"], refs) == pytest.approx(math.exp(1 - 8 / 7))


def test_cider_values():
    refs = [["red circle top left", "a red circle"], ["blue square center", "a blue square"],
            ["green triangle bottom", "a green triangle"]]
    perfect = metrics.cider([r[0] for r in refs], refs)
    partial = metrics.cider(["red circle", "blue square", "green triangle"], refs)
    wrong = metrics.cider(["blue square center", "green triangle bottom", "red circle top left"], refs)
    assert perfect > partial > wrong >= 0.0
    # one image: every n-gram has document frequency 1 = N, so idf = log(1) - log(1) = 0
    assert metrics.cider(["a b"], [["a b"]]) == 0.0
    # two images, disjoint vocabularies, exact match of a 1-word reference: only n = 1 has
    # n-grams; cosine 1, no length penalty -> (1 + 0 + 0 + 0) / 4 * 10 = 2.5
    assert metrics.cider(["x", "y"], [["x"], ["y"]]) == pytest.approx(2.5)


def test_box_metrics():
    assert metrics.box_iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
    assert metrics.box_iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
    assert metrics.grounding_accuracy([[0, 0, 2, 2], None], [[0, 0, 2, 2.2], [0, 0, 1, 1]]) == 0.5
    assert metrics.accuracy(["yes", "No"], ["yes", "no"]) == 1.0
    with pytest.raises(ValueError):
        metrics.accuracy([], [])


def test_taskdata_rejects_empty():
    with pytest.raises(ValueError, match="at least one sample"):
        TaskData("vqa", [], 32)
    with pytest.raises(ValueError, match="task"):
        shapes.generate("ocr", 3)


def test_load_spec(tmp_path):
    _jpg(tmp_path / "x.jpg")
    d = {"images": [{"id": 1, "file_name": "x.jpg"}], "annotations": [{"image_id": 1, "caption": "a box"}]}
    (tmp_path / "c.json").write_text(json.dumps(d))
    data = load_spec("caption", {"captions": "c.json", "images": "."}, 16, base_dir=str(tmp_path))
    assert len(data) == 1 and data.samples[0]["target"] == "a box"
    assert sample_texts(data.samples) == [data.samples[0]["text"], " a box", " a box"]
    with pytest.raises(ValueError, match="missing \\['images'\\]"):
        load_spec("caption", {"captions": "c.json"}, 16, base_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown \\['split'\\]"):
        load_spec("caption", {"captions": "c.json", "images": ".", "split": "val"}, 16, str(tmp_path))
    with pytest.raises(ValueError, match="task must be one of"):
        load_spec("ocr", {}, 16)
    with pytest.raises(ValueError, match="no such file"):
        load_spec("entailment", {"jsonl": "none.jsonl", "images": "."}, 16, str(tmp_path))


# ---- the official VQA accuracy: each normalisation rule, and leave-one-annotator-out ----------

@pytest.mark.parametrize("pred,gts,expected", [
    # number words become digits (the prediction is always normalised)
    ("two", ["2"] * 10, 1.0),
    ("None", ["0"] * 10, 1.0),
    # articles go, case goes
    ("A Dog", ["dog"] * 10, 1.0),
    # contractions are restored
    ("dont know", ["don't know"] * 10, 1.0),
    ("isnt", ["isn't"] * 10, 1.0),
    ("lets go", ["let's go"] * 10, 0.0),  # "lets" is not in the official table
    # punctuation: a mark touching a space is deleted, otherwise replaced by a space
    ("yes , sir", ["yes sir"] * 10, 1.0),
    ("black/white", ["black white"] * 10, 1.0),
    # a number with a comma deletes every mark: "1,000" -> "1000"
    ("1,000", ["1000"] * 10, 1.0),
    # a period not before a digit goes; a decimal point stays
    ("yes.", ["yes"] * 10, 1.0),
    ("3.5", ["3.5"] * 10, 1.0),
    ("3.5", ["35"] * 10, 0.0),
    # apostrophes are kept
    ("dog's", ["dogs"] * 10, 0.0),
])
def test_vqa_normalisation_rules(pred, gts, expected):
    assert metrics.vqa_accuracy(pred, gts) == pytest.approx(expected)


def test_vqa_annotator_answers_normalised_only_when_they_disagree():
    # unanimous annotators are compared as written (only stripped)
    assert metrics.vqa_accuracy("two", ["two"] * 10) == 0.0  # the prediction became "2"
    assert metrics.vqa_accuracy("two", [" two\n"] * 10) == 0.0
    # disagreeing annotators are normalised like the prediction
    assert metrics.vqa_accuracy("two", ["two"] * 9 + ["3"]) == pytest.approx(1.0)
    assert metrics.vqa_accuracy("2", ["Two!"] * 4 + ["three"] * 6) == pytest.approx(1.0)


@pytest.mark.parametrize("k", range(0, 11))
def test_vqa_leave_one_annotator_out_average(k):
    """k of 10 annotators agree with the prediction: the mean over the 10 subsets of 9 of
    min(1, matches / 3) (the official formula), against a brute-force count."""
    gts = ["cat"] * k + ["dog"] * (10 - k)
    brute = sum(min(1.0, sum(a == "cat" for j, a in enumerate(gts) if j != i) / 3) for i in range(10)) / 10
    assert metrics.vqa_accuracy("cat", gts) == pytest.approx(brute)
    expected = {0: 0.0, 1: 0.3, 2: 0.6, 3: 0.9}.get(k, 1.0)
    assert metrics.vqa_accuracy("cat", gts) == pytest.approx(expected)


def test_vqa_accuracy_rejects_empty_answers():
    with pytest.raises(ValueError, match="answers"):
        metrics.vqa_accuracy("x", [])
    with pytest.raises(ValueError, match="answers"):
        metrics.vqa_accuracy("x", "cat")


def test_coco_training_split_yields_every_caption(tmp_path):
    _jpg(tmp_path / "x.jpg")
    _jpg(tmp_path / "y.jpg")
    caps = ["a red box", "red square", "one box", "the box", "a square"]
    d = {"images": [{"id": 1, "file_name": "x.jpg"}, {"id": 2, "file_name": "y.jpg"},
                    {"id": 3, "file_name": "z.jpg"}],
         "annotations": [{"image_id": 1, "caption": c} for c in caps] + [{"image_id": 2, "caption": "blue"}]}
    (tmp_path / "c.json").write_text(json.dumps(d))
    train = load_coco_captions(tmp_path / "c.json", str(tmp_path), image_size=16, per_caption=True)
    assert [s["target"] for s in train.samples] == caps + ["blue"]
    assert all(s["refs"] == caps for s in train.samples[:5])
    ev = load_coco_captions(tmp_path / "c.json", str(tmp_path), image_size=16)
    assert len(ev) == 2 and ev.samples[0]["refs"] == caps  # one per image, all references
    assert train.skipped == ev.skipped == {"images without captions": 1}  # counted, not silent
    spec = {"captions": "c.json", "images": "."}
    assert len(load_spec("caption", spec, 16, str(tmp_path), split="train")) == 6
    assert len(load_spec("caption", spec, 16, str(tmp_path), split="eval")) == 2


def test_cut_targets_are_counted(tok):
    d = TaskData("caption", [dict(image=0, text="x", target="a red box and a blue circle"),
                             dict(image=0, text="x", target="red")], 16,
                 images=torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    n0 = len(d.target_ids(d.samples[0], tok))
    stats = {}
    _, _, targets, lengths, _ = d.batch([0, 1, 0], tok, max_target_len=4, stats=stats)
    assert n0 > 4 and stats["cut"] == 2 and d.count_cut(tok, 4) == 1
    assert lengths.tolist() == [4, len(d.target_ids(d.samples[1], tok)), 4]
    assert targets[0, 3] == 2  # EOS kept
    stats = {}
    d.batch([0, 1], tok, max_target_len=n0, stats=stats)
    assert stats["cut"] == 0


def test_unreadable_image_names_the_file(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="bad.jpg.*cannot be decoded"):
        load_image(str(tmp_path / "bad.jpg"), 16)
    with pytest.raises(ValueError, match="none.jpg.*does not exist"):
        load_image(str(tmp_path / "none.jpg"), 16)
    good = tmp_path / "t.jpg"
    _jpg(good)
    good.write_bytes(good.read_bytes()[:40])  # truncated
    with pytest.raises(ValueError, match="t.jpg"):
        load_image(str(good), 16)
