"""OFATokenizer from both file layouts (tiny files in the real formats), against
transformers' BartTokenizer (the Hugging Face OFA tokenizer's base) where installed; OFA's
prompts, image preprocessing and box quantisation; malformed files."""
import pytest
import torch

from ofa_files import write_bpe_files
from narvl.data.ofa import (BOS, EOS, UNK, OFATokenizer, dequantize_box, ofa_prompt, preprocess_image,
                            quantize_box)

TEXTS = ["what color is the dog?", "a man riding a horse on the beach", "two cats sleep on a red sofa",
         "which region does the text describe", "is there a bus? yes no maybe"]


@pytest.fixture(scope="module")
def bpe_files(tmp_path_factory):
    """GPT-2-format encoder.json / vocab.bpe + an OFA dict.txt in a shuffled (frequency) order,
    and the equivalent Hugging Face vocab.json / merges.txt holding OFA's ids."""
    gpt, hf = tmp_path_factory.mktemp("gpt2"), tmp_path_factory.mktemp("hf")
    vocab, order = write_bpe_files(gpt, hf, TEXTS)
    return gpt, hf, vocab, order


def test_fairseq_files_map_bpe_ids_through_dict_txt(bpe_files):
    gpt, _, vocab, order = bpe_files
    tok = OFATokenizer.from_files(gpt, num_bins=10, num_codes=6)
    import tokenizers as tk
    raw = tk.Tokenizer.from_str(tok.bpe.to_str()).encode(" a man riding", add_special_tokens=False).ids
    pos = {g: n for n, g in enumerate(order)}
    assert tok.encode(" a man riding") == [4 + pos[i] for i in raw]
    n = len(order)
    assert tok.mask_id == 4 + n and tok.code_offset == 5 + n and tok.bin_offset == 5 + n + 6
    assert tok.vocab_size == 5 + n + 6 + 10 + 1 and tok.blank_id == tok.vocab_size - 1
    ids = tok.encode(" box<bin_3><bin_9>")
    assert ids[-2:] == [tok.bin_offset + 3, tok.bin_offset + 9]
    assert tok.encode("<code_2>") == [tok.code_offset + 2]
    assert tok.decode(tok.encode(" two cats sleep") + [tok.blank_id, EOS]) == "two cats sleep"
    assert tok.decode([tok.bin_id(4), tok.bin_id(7)]) == "<bin_4><bin_7>"
    assert tok.source(" hi") == [BOS] + tok.encode(" hi") + [EOS]
    assert tok.target("yes") == tok.encode(" yes") + [EOS]
    with pytest.raises(ValueError, match="bin 10"):
        tok.encode("<bin_10>")
    with pytest.raises(TypeError):
        tok.encode(3)


def test_hugging_face_files_give_the_same_ids(bpe_files):
    gpt, hf, _, _ = bpe_files
    a = OFATokenizer.from_files(gpt, num_bins=10, num_codes=6)
    b = OFATokenizer.from_files(hf, num_bins=10, num_codes=6)
    for t in TEXTS + [" zebra qq!"]:
        assert a.encode(" " + t) == b.encode(" " + t), t
    assert a.vocab_size == b.vocab_size and a.bin_offset == b.bin_offset
    try:
        from transformers import BartTokenizer
    except ImportError:
        return
    bart = BartTokenizer(str(hf / "vocab.json"), str(hf / "merges.txt"))
    for t in TEXTS:
        assert b.encode(" " + t) == bart.encode(" " + t, add_special_tokens=False), t


def test_unknown_bpe_ids_become_unk(bpe_files, tmp_path):
    gpt, _, vocab, order = bpe_files
    for name in ("encoder.json", "vocab.bpe"):
        (tmp_path / name).write_bytes((gpt / name).read_bytes())
    (tmp_path / "dict.txt").write_text("".join(f"{i} 1\n" for i in order[: len(order) // 2]))
    tok = OFATokenizer.from_files(tmp_path)
    ids = tok.encode(" " + " ".join(TEXTS))
    assert UNK in ids and max(ids) < 4 + len(order) // 2


def test_malformed_files(tmp_path, bpe_files):
    gpt, _, _, _ = bpe_files
    with pytest.raises(FileNotFoundError):
        OFATokenizer.from_files(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="encoder.json"):
        OFATokenizer.from_files(tmp_path)
    for name in ("encoder.json", "vocab.bpe", "dict.txt"):
        (tmp_path / name).write_bytes((gpt / name).read_bytes())
    (tmp_path / "dict.txt").write_text("13 5\nbroken-line\n")
    with pytest.raises(ValueError, match=r"dict.txt:2"):
        OFATokenizer.from_files(tmp_path)
    (tmp_path / "dict.txt").write_bytes((gpt / "dict.txt").read_bytes())
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\na b c\n")
    with pytest.raises(ValueError, match=r"vocab.bpe:2"):
        OFATokenizer.from_files(tmp_path)
    (tmp_path / "vocab.bpe").write_bytes((gpt / "vocab.bpe").read_bytes())
    (tmp_path / "encoder.json").write_text("{not json")
    with pytest.raises(ValueError, match="malformed encoder.json"):
        OFATokenizer.from_files(tmp_path)


def test_prompts_follow_ofa():
    assert ofa_prompt("caption") == " what does the image describe?"
    assert ofa_prompt("vqa", "What  color is the Dog") == " what color is the dog?"
    assert ofa_prompt("vqa", "is it red?") == " is it red?"
    assert ofa_prompt("grounding", "Man-in red") == ' which region does the text " man in red " describe?'
    assert ofa_prompt("entailment", "", "A dog") == ' does the image describe " a dog "?'
    assert ofa_prompt("entailment", "a cat", "an animal") == \
        ' can image and text1 " a cat " imply text2 " an animal "?'
    with pytest.raises(ValueError):
        ofa_prompt("ocr")
    with pytest.raises(ValueError, match="hypothesis"):
        ofa_prompt("entailment", "x")


def test_image_preprocessing_and_boxes():
    from PIL import Image
    img = torch.zeros(40, 60, 3, dtype=torch.uint8)
    img[:, :30] = 255
    x = preprocess_image(img, 32)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert x[:, :, :10].min() > 0.99 and x[:, :, -10:].max() < -0.99  # mean 0.5, std 0.5
    pil = Image.fromarray(img.numpy())
    torch.testing.assert_close(preprocess_image(pil, 32), x)
    torch.testing.assert_close(preprocess_image(img.permute(2, 0, 1), 32), x)
    with pytest.raises(TypeError):
        preprocess_image(img.float(), 32)
    with pytest.raises(TypeError):
        preprocess_image("cat.jpg", 32)
    # OFA: box scaled into the 512 x 512 frame, / 512, * 999, rounded
    assert quantize_box([0, 0, 640, 480], 640, 480, 512) == [0, 0, 999, 999]
    assert quantize_box([320, 120, 480, 240], 640, 480, 512) == [500, 250, 749, 500]
    back = dequantize_box([500, 250, 749, 500], 640, 480)
    assert abs(back[0] - 320.3) < 0.5 and abs(back[3] - 240.2) < 0.5
    with pytest.raises(ValueError):
        quantize_box([1, 2, 3], 10, 10, 512)
    with pytest.raises(ValueError):
        quantize_box([1, 2, 3, 4], 0, 10, 512)
