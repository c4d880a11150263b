"""Generated data for the language-model benchmarks: a Zipf corpus over made-up words, a word
bigram and a character trigram ARPA estimated from it (absolute discounting, back-off to lower
orders), and CTC emissions that spell the corpus's sentences through noise."""
import math
import random
from collections import Counter

import torch

LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORD_LABELS = ["_", " "] + list(LETTERS) + ["'"]  # blank 0, space 1
CHAR_LABELS = ["_", "|"] + list(LETTERS)  # blank 0, '|' the word separator of the char LM


def _corpus(seed=0, n_words=400, n_sent=3000):
    rng = random.Random(seed)
    words = sorted({"".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 7))) for _ in range(n_words)})
    weights = [1.0 / (r + 1) for r in range(len(words))]
    sents = [rng.choices(words, weights, k=rng.randint(4, 12)) for _ in range(n_sent)]
    return words, sents


def _write_arpa(path, sentences, order, discount=0.5):
    """An ARPA model of `order` over token sequences (lists of strings), with <s>, </s>, <unk>."""
    counts = [Counter() for _ in range(order + 1)]
    for s in sentences:
        toks = ["<s>"] + list(s) + ["</s>"]
        for n in range(1, order + 1):
            for i in range(len(toks) - n + 1):
                g = tuple(toks[i:i + n])
                if g != ("<s>",):
                    counts[n][g] += 1
    vocab = sorted({g[0] for g in counts[1]} | {"<s>", "<unk>"})
    total = sum(counts[1].values())
    prob, bow = {}, {}
    for w in vocab:  # unigrams: discounted, the mass left spread evenly
        c = counts[1].get((w,), 0)
        prob[(w,)] = (max(c - discount, 0) + discount * len(counts[1]) / len(vocab)) / total
    prob[("<s>",)] = 0.0
    for n in range(2, order + 1):
        ctx_tot, ctx_types = Counter(), Counter()
        for g, c in counts[n].items():
            ctx_tot[g[:-1]] += c
            ctx_types[g[:-1]] += 1
        for g, c in counts[n].items():
            prob[g] = (c - discount) / ctx_tot[g[:-1]]
        for ctx in ctx_tot:  # back-off weight: the left mass over the lower order's unseen mass
            left = discount * ctx_types[ctx] / ctx_tot[ctx]
            seen_lower = sum(prob.get(ctx[1:] + (g[-1],), 0.0) for g in counts[n] if g[:-1] == ctx)
            bow[ctx] = left / max(1.0 - seen_lower, 1e-9)
    with open(path, "w") as f:
        f.write("\\data\\\n")
        grams = [[g for g in prob if len(g) == n] for n in range(1, order + 1)]
        for n, gs in enumerate(grams, 1):
            f.write(f"ngram {n}={len(gs)}\n")
        for n, gs in enumerate(grams, 1):
            f.write(f"\n\\{n}-grams:\n")
            for g in sorted(gs):
                p = -99.0 if prob[g] <= 0 else math.log10(prob[g])
                line = f"{p:.6f}\t{' '.join(g)}"
                if n < order and g in bow:
                    line += f"\t{math.log10(bow[g]):.6f}"
                elif n < order:
                    line += "\t0.0"
                f.write(line + "\n")
        f.write("\n\\end\\\n")
    return str(path)


def lm_files(tmp):
    words, sents = _corpus()
    word_arpa = _write_arpa(tmp / "words.arpa", sents, 2)
    char_seqs = [list("|".join(s)) for s in sents]
    char_arpa = _write_arpa(tmp / "chars.arpa", char_seqs, 3)
    return {"word_arpa": word_arpa, "char_arpa": char_arpa, "sentences": sents, "words": words}


def lm_emissions(labels, sentences, B, T, seed, noise=1.0, peak=4.0):
    """(B, T, V) float32 log-probabilities spelling sentences (joined by the space/separator
    label, labels[1]) through Gaussian noise: each character 1-3 frames, a blank frame between
    repeats and at random elsewhere; frames past the text are blank."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    index = {lab: i for i, lab in enumerate(labels)}
    sep = labels[1]
    V = len(labels)
    out = torch.randn(B, T, V, generator=g) * noise
    for b in range(B):
        text = sep.join(rng.choice(sentences))
        t, prev = 0, None
        for ch in text:
            c = index[ch]
            if (c == prev or rng.random() < 0.3) and t < T:
                out[b, t, 0] += peak
                t += 1
            for _ in range(rng.randint(1, 3)):
                if t < T:
                    out[b, t, c] += peak
                    t += 1
            prev = c
        for r in range(t, T):
            out[b, r, 0] += peak
    return out.log_softmax(-1)
