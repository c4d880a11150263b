"""Tiny files in OFA's real formats, for tests (nothing can be downloaded here): GPT-2 BPE
files + OFA's dict.txt, the Hugging Face vocab.json + merges.txt, and a fairseq checkpoint."""
from __future__ import annotations

import argparse
import json
import random

import torch


def write_bpe_files(gpt_dir, hf_dir, texts, vocab_size=400, seed=0):
    """A byte-level BPE trained on ``texts``, written GPT-2 style (encoder.json, vocab.bpe) with
    an OFA dict.txt in a shuffled (frequency-like) order into ``gpt_dir``, and as a Hugging Face
    OFA directory (vocab.json in OFA's ids, merges.txt) into ``hf_dir``. Returns (GPT-2 vocab,
    dict order)."""
    import tokenizers as tk
    bpe = tk.Tokenizer(tk.models.BPE())
    bpe.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
                                     show_progress=False)
    bpe.train_from_iterator([" " + t for t in texts] * 3, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab = model["vocab"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    order = sorted(vocab.values())
    random.Random(seed).shuffle(order)
    (gpt_dir / "encoder.json").write_text(json.dumps(vocab))
    (gpt_dir / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (gpt_dir / "dict.txt").write_text("".join(f"{i} {1000 - n}\n" for n, i in enumerate(order)))
    if hf_dir is not None:
        inv = {i: t for t, i in vocab.items()}
        hf_vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
        for n, i in enumerate(order):
            hf_vocab[inv[i]] = 4 + n
        hf_vocab["<mask>"] = 4 + len(order)
        (hf_dir / "vocab.json").write_text(json.dumps(hf_vocab))
        (hf_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab, order


def write_ofa_checkpoint(path, cfg, image_size=None, seed=0):
    """A fairseq-format OFA checkpoint (``model`` state in OFA's names, ``args`` Namespace,
    optimizer history) of an ARBaseline built from ``cfg``, without the blank row."""
    from narvl.models import ARBaseline
    torch.manual_seed(seed)
    state = ARBaseline(cfg).state_dict()
    emb = state.pop("embed_tokens.weight")[:-1].clone()
    state = {k: v for k, v in state.items() if not k.startswith("encoder.embed_tokens")}
    for k in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "decoder.output_projection.weight"):
        state[k] = emb
    state["encoder.version"] = torch.tensor([3.0])
    args = argparse.Namespace(patch_image_size=image_size or cfg.image_size, arch="ofa_tiny")
    torch.save({"model": state, "args": args, "optimizer_history": [{"num_updates": 1}]}, path)
