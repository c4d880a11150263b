"""OFA's tokenizer, prompts and image preprocessing, built from the files a user has.

Vocabulary (fairseq ``Dictionary`` of OFA, 59,457 entries; NARVL's blank is appended at 59,457):

    0 <s>, 1 <pad>, 2 </s>, 3 <unk>
    4 .. 4 + n - 1          the n lines of OFA's ``dict.txt`` in file order (GPT-2 BPE ids)
    4 + n                   <mask>                        (50,264 with OFA's dict.txt)
    then <code_0> .. <code_8191>, <bin_0> .. <bin_999>     (<bin_0> = 58,457)

``OFATokenizer.from_files(dir)`` reads either GPT-2's ``encoder.json`` + ``vocab.bpe`` with
OFA's ``dict.txt`` (OFA's ``utils/BPE``), or a Hugging Face OFA directory's ``vocab.json`` +
``merges.txt`` (whose ids are already OFA's). Text goes through GPT-2's byte-level BPE as OFA
does (``' ' + text``, no extra prefix space), ``<bin_k>``/``<code_k>`` written in the text map to
their own ids. Where to get the files: OFA's repository ``utils/BPE/`` (``encoder.json``,
``vocab.bpe``, ``dict.txt``) or any Hugging Face OFA checkpoint directory (``vocab.json``,
``merges.txt``); nothing is downloaded here.

Preprocessing as OFA's datasets: ``ofa_prompt`` (per-task prompts, ``pre_question`` /
``pre_caption`` normalisation), ``preprocess_image`` (bicubic resize to S x S, then mean 0.5 /
std 0.5), ``quantize_box`` / ``dequantize_box`` (coordinates scaled into the S x S frame and
divided by S, times num_bins - 1, rounded).
"""
from __future__ import annotations

import json
import os
import re

import torch

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]
BOS, PAD, EOS, UNK = 0, 1, 2, 3
NUM_CODES, NUM_BINS = 8192, 1000
_SPECIAL_RE = re.compile(r"(<bin_\d+>|<code_\d+>)")


def _tokenizers():
    import tokenizers
    return tokenizers


def _read_json(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed {what} ({e})") from e
    if not isinstance(d, dict) or not all(isinstance(v, int) for v in d.values()):
        raise ValueError(f"{path}: {what} must map token strings to integer ids")
    return d


def _read_merges(path):
    merges = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line or (n == 1 and line.startswith("#version")):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise ValueError(f"{path}:{n}: a merge line must hold two symbols, got {line!r}")
            merges.append((parts[0], parts[1]))
    return merges


class OFATokenizer:
    """See the module docstring. ``bpe_to_ofa`` maps the BPE model's ids to OFA ids."""

    def __init__(self, vocab: dict, merges: list, bpe_to_ofa: dict, n_text: int,
                 num_codes: int = NUM_CODES, num_bins: int = NUM_BINS):
        tk = _tokenizers()
        self._files = (dict(vocab), [tuple(m) for m in merges], int(n_text))
        self.bpe = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=merges))
        self.bpe.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        self.bpe.decoder = tk.decoders.ByteLevel()
        self.bpe_to_ofa = dict(bpe_to_ofa)
        self.ofa_to_bpe = {o: b for b, o in self.bpe_to_ofa.items()}
        self.mask_id = n_text  # <mask> follows the text entries
        self.code_offset = n_text + 1
        self.num_codes, self.num_bins = int(num_codes), int(num_bins)
        self.bin_offset = self.code_offset + self.num_codes

    @classmethod
    def from_files(cls, path, num_bins: int = NUM_BINS, num_codes: int = NUM_CODES) -> "OFATokenizer":
        """From a directory holding ``encoder.json`` + ``vocab.bpe`` + ``dict.txt`` (OFA's
        utils/BPE) or ``vocab.json`` + ``merges.txt`` (a Hugging Face OFA directory)."""
        p = os.fspath(path)
        f = lambda name: os.path.join(p, name)  # noqa: E731
        if not os.path.isdir(p):
            raise FileNotFoundError(f"{p}: no such directory of BPE files")
        if all(os.path.isfile(f(n)) for n in ("encoder.json", "vocab.bpe", "dict.txt")):
            vocab = _read_json(f("encoder.json"), "encoder.json")
            merges = _read_merges(f("vocab.bpe"))
            bpe_to_ofa, n = {}, 0
            with open(f("dict.txt"), encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    parts = line.rstrip("\n").split(" ")
                    if len(parts) < 2 or not parts[1].isdigit():
                        raise ValueError(f"{f('dict.txt')}:{n}: expected '<symbol> <count>', got {line!r}")
                    if parts[0].isdigit():
                        bpe_to_ofa[int(parts[0])] = len(SPECIALS) + n - 1
            return cls(vocab, merges, bpe_to_ofa, len(SPECIALS) + n, num_codes, num_bins)
        if all(os.path.isfile(f(n)) for n in ("vocab.json", "merges.txt")):
            vocab = _read_json(f("vocab.json"), "vocab.json")
            merges = _read_merges(f("merges.txt"))
            for i, s in enumerate(SPECIALS):
                if vocab.get(s) != i:
                    raise ValueError(f"{f('vocab.json')}: {s} must have id {i} (OFA's order)")
            ids = {i: i for i in vocab.values()}
            n_text = vocab.get("<mask>", max(vocab.values()) + 1)
            return cls(vocab, merges, ids, n_text, num_codes, num_bins)
        raise FileNotFoundError(f"{p}: needs encoder.json + vocab.bpe + dict.txt, or vocab.json + merges.txt")

    @property
    def vocab_size(self) -> int:
        """OFA's entries (59,457 with OFA's files) + NARVL's blank."""
        return self.bin_offset + self.num_bins + 1

    @property
    def blank_id(self) -> int:
        return self.vocab_size - 1

    def encode(self, text: str) -> list[int]:
        """OFA ids of ``text`` (pass OFA's leading space yourself, as its datasets do)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        out = []
        for piece in _SPECIAL_RE.split(text):
            if not piece:
                continue
            m = re.fullmatch(r"<(bin|code)_(\d+)>", piece)
            if m:
                k = int(m.group(2))
                if m.group(1) == "bin":
                    out.append(self.bin_id(k))
                else:
                    if not 0 <= k < self.num_codes:
                        raise ValueError(f"code {k} out of range [0, {self.num_codes})")
                    out.append(self.code_offset + k)
                continue
            out += [self.bpe_to_ofa.get(i, UNK) for i in self.bpe.encode(piece, add_special_tokens=False).ids]
        return out

    def decode(self, ids) -> str:
        """Text of OFA ids: BPE pieces decoded, bins as ``<bin_k>``, specials and blank skipped."""
        parts, run = [], []

        def flush():
            if run:
                parts.append(self.bpe.decode(run))
                run.clear()
        for i in (int(t) for t in ids):
            if i in self.ofa_to_bpe and i >= len(SPECIALS):
                run.append(self.ofa_to_bpe[i])
            elif self.bin_offset <= i < self.bin_offset + self.num_bins:
                flush()
                parts.append(f"<bin_{i - self.bin_offset}>")
        flush()
        return "".join(parts).strip()

    def bin_id(self, k: int) -> int:
        if not 0 <= k < self.num_bins:
            raise ValueError(f"bin {k} out of range [0, {self.num_bins})")
        return self.bin_offset + k

    def source(self, prompt: str) -> list[int]:
        """OFA's encoder input: [<s>] + encode(prompt) + [</s>]; a prompt without OFA's leading
        space gets one."""
        return [BOS] + self.encode(prompt if prompt.startswith(" ") else " " + prompt) + [EOS]

    def box_to_ids(self, box, image_size: int) -> list[int]:
        """4 bin ids of a box given in the image_size x image_size (resized) frame."""
        return [self.bin_id(k) for k in quantize_box(box, image_size, image_size, image_size, self.num_bins)]

    def ids_to_box(self, ids, image_size: int):
        """First 4 ids as a box in the image_size x image_size frame, or None when they are not 4 bins."""
        ids = [int(i) for i in ids[:4]]
        if len(ids) < 4 or not all(self.bin_offset <= i < self.bin_offset + self.num_bins for i in ids):
            return None
        return dequantize_box([i - self.bin_offset for i in ids], image_size, image_size, self.num_bins)

    def to_json(self) -> str:
        vocab, merges, n_text = self._files
        return json.dumps({"kind": "ofa", "vocab": vocab, "merges": [" ".join(m) for m in merges],
                           "bpe_to_ofa": {str(k): v for k, v in self.bpe_to_ofa.items()}, "n_text": n_text,
                           "num_codes": self.num_codes, "num_bins": self.num_bins})

    @classmethod
    def from_json(cls, s) -> "OFATokenizer":
        d = json.loads(s) if isinstance(s, str) else s
        return cls(d["vocab"], [tuple(m.split(" ")) for m in d["merges"]],
                   {int(k): v for k, v in d["bpe_to_ofa"].items()}, d["n_text"], d["num_codes"], d["num_bins"])

    def target(self, answer: str) -> list[int]:
        """Q-CTC / AR target: encode(' ' + answer) + [</s>] (boxes: ``quantize_box`` ids + EOS)."""
        return self.encode(" " + answer) + [EOS]


def _normalise(text: str, max_words=None, caption=False) -> str:
    text = text.lower().lstrip(",.!?*#:;~").replace("-", " ").replace("/", " ")
    if caption:
        text = text.replace("<person>", "person")
    text = re.sub(r"\s{2,}", " ", text).rstrip("\n").strip(" ")
    words = text.split(" ")
    return " ".join(words[:max_words]) if max_words is not None and len(words) > max_words else text


def ofa_prompt(task: str, text: str = "", hypothesis: str | None = None, max_words: int = 80) -> str:
    """OFA's prompt of a task: caption " what does the image describe?"; vqa " {question}?";
    grounding ' which region does the text " {text} " describe?'; entailment
    ' can image and text1 " {text} " imply text2 " {hypothesis} "?' (or ' does the image
    describe " {hypothesis} "?' without a premise text)."""
    if task == "caption":
        return " what does the image describe?"
    if task == "vqa":
        q = _normalise(text, max_words)
        return " " + (q if q.endswith("?") else q + "?")
    if task == "grounding":
        return ' which region does the text " {} " describe?'.format(_normalise(text, max_words, True))
    if task == "entailment":
        if hypothesis is None:
            raise ValueError("entailment needs hypothesis=")
        h = _normalise(hypothesis, max_words, True)
        if text:
            return ' can image and text1 " {} " imply text2 " {} "?'.format(_normalise(text, max_words, True), h)
        return ' does the image describe " {} "?'.format(h)
    raise ValueError(f"task must be caption, vqa, grounding or entailment, got {task!r}")


def preprocess_image(image, size: int) -> torch.Tensor:
    """(3, size, size) float32 in [-1, 1] of a PIL image or a uint8 tensor (H, W, 3) / (3, H, W):
    bicubic resize to size x size (PIL, as OFA's transforms), /255, mean 0.5, std 0.5."""
    from PIL import Image
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.dim() != 3 or 3 not in (image.shape[0], image.shape[-1]):
            raise TypeError("image tensors must be uint8 (H, W, 3) or (3, H, W)")
        arr = image.permute(1, 2, 0) if image.shape[0] == 3 and image.shape[-1] != 3 else image
        image = Image.fromarray(arr.contiguous().numpy(), "RGB")
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image or a uint8 tensor, got {type(image).__name__}")
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive int, got {size!r}")
    img = image.convert("RGB").resize((size, size), Image.BICUBIC)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return (x.permute(2, 0, 1).float() / 255.0 - 0.5) / 0.5


def quantize_box(box, width: float, height: float, size: int, num_bins: int = NUM_BINS) -> list[int]:
    """Bins (k0..k3) of a pixel box (x0, y0, x1, y1) in a width x height image, as OFA: the box
    is scaled into the size x size resized frame, divided by size, times num_bins - 1, rounded."""
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be > 0, got {width} x {height}")
    if len(box) != 4:
        raise ValueError(f"box must hold 4 coordinates, got {box!r}")
    rw, rh = size / width, size / height
    b = torch.tensor([box[0] * rw, box[1] * rh, box[2] * rw, box[3] * rh]) / size
    return [min(max(int(v), 0), num_bins - 1) for v in (b * (num_bins - 1)).round().tolist()]


def dequantize_box(bins, width: float, height: float, num_bins: int = NUM_BINS) -> list[float]:
    """Pixel box of 4 bins in a width x height image (the inverse of ``quantize_box``)."""
    k = [float(v) / (num_bins - 1) for v in bins]
    return [k[0] * width, k[1] * height, k[2] * width, k[3] * height]
