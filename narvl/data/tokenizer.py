"""NARVL vocabulary: byte-level BPE (trained offline with ``tokenizers``, GPT-2 style as OFA) +
location bins + one blank.

    ids [0, 4)                       <s> (bos), <pad>, </s> (eos), <unk>
    ids [4, n_bpe)                   BPE tokens
    ids [n_bpe, n_bpe + num_bins)    <bin_0> .. <bin_{num_bins-1}>
    id  n_bpe + num_bins             <blank> (last; the CTC blank)

``to_json`` / ``from_json`` serialise everything (the BPE model included) as one JSON string,
stored in the checkpoint's metadata.
"""
from __future__ import annotations

import json

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]
BOS, PAD, EOS, UNK = 0, 1, 2, 3


def _tokenizers():
    try:
        import tokenizers
    except ImportError as e:  # pragma: no cover - declared dependency
        raise ImportError("narvl.data.Tokenizer needs the 'tokenizers' package "
                          "(pip install tokenizers)") from e
    return tokenizers


class Tokenizer:
    def __init__(self, bpe, num_bins: int):
        if num_bins < 0:
            raise ValueError(f"num_bins must be >= 0, got {num_bins}")
        self.bpe = bpe
        self.num_bins = int(num_bins)
        self.n_bpe = bpe.get_vocab_size()
        for i, s in enumerate(SPECIALS):
            if bpe.token_to_id(s) != i:
                raise ValueError(f"BPE model must have {s} at id {i}")

    @classmethod
    def train(cls, texts, vocab_size: int = 1000, num_bins: int = 1000) -> "Tokenizer":
        """Train a byte-level BPE on ``texts`` (deterministic for a given list)."""
        tk = _tokenizers()
        bpe = tk.Tokenizer(tk.models.BPE(unk_token="<unk>"))
        bpe.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=True)
        bpe.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                         initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
                                         show_progress=False)
        bpe.train_from_iterator(sorted(set(texts)), trainer=trainer)
        return cls(bpe, num_bins)

    @property
    def vocab_size(self) -> int:
        return self.n_bpe + self.num_bins + 1

    @property
    def blank_id(self) -> int:
        return self.vocab_size - 1

    @property
    def bin_offset(self) -> int:
        return self.n_bpe

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self.bpe.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        """Text of the BPE ids (specials, bins and the blank are skipped)."""
        keep = [int(i) for i in ids if len(SPECIALS) <= int(i) < self.n_bpe]
        return self.bpe.decode(keep).strip()

    def bin_id(self, k: int) -> int:
        if not 0 <= k < self.num_bins:
            raise ValueError(f"bin {k} out of range [0, {self.num_bins})")
        return self.n_bpe + k

    def box_to_ids(self, box, image_size: int) -> list[int]:
        """(x0, y0, x1, y1) in pixels -> 4 bin ids (bin = round(c / S * (num_bins - 1)))."""
        q = lambda c: min(max(round(c / image_size * (self.num_bins - 1)), 0), self.num_bins - 1)  # noqa: E731
        return [self.bin_id(q(c)) for c in box]

    def ids_to_box(self, ids, image_size: int):
        """First 4 ids as a pixel box, or None when they are not 4 bins."""
        ids = [int(i) for i in ids[:4]]
        if len(ids) < 4 or not all(self.n_bpe <= i < self.n_bpe + self.num_bins for i in ids):
            return None
        return [(i - self.n_bpe) / (self.num_bins - 1) * image_size for i in ids]

    def to_json(self) -> str:
        return json.dumps({"bpe": self.bpe.to_str(), "num_bins": self.num_bins})

    def source(self, prompt: str) -> list[int]:
        """The encoder input: [BOS] + encode(prompt) + [EOS]."""
        return [BOS] + self.encode(prompt) + [EOS]

    @classmethod
    def from_json(cls, s: str):
        """A tokenizer from ``to_json``: this class, or ``OFATokenizer`` (kind "ofa")."""
        tk = _tokenizers()
        d = json.loads(s)
        if d.get("kind") == "ofa":
            from .ofa import OFATokenizer
            return OFATokenizer.from_json(d)
        return cls(tk.Tokenizer.from_str(d["bpe"]), d["num_bins"])
