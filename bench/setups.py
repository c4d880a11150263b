"""One setup per op, shared by the benchmarks (and importable for ad-hoc runs)."""
import platform

import torch
import torch.nn.functional as F

V_OFA = 59458  # OFA's 59,457 entries + NARVL's blank (as in amazon-science/NARVL)

# name: (B, N or T, V, min L, max L)
CTC_SHAPES = {
    "vqa": (64, 6, V_OFA, 1, 5),
    "caption": (32, 20, V_OFA, 4, 16),
    "asr": (16, 100, 1000, 10, 50),
}


def ctc_inputs(name, dtype=torch.float32, device="cpu", seed=0):
    """logits (B, N, V), padded targets (B, Lmax), target_lengths (B,), blank = V - 1."""
    B, N, V, lo, hi = CTC_SHAPES[name]
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, N, V, generator=g).to(device=device, dtype=dtype)
    tl = torch.randint(lo, hi + 1, (B,), generator=g)
    targets = torch.randint(0, V - 1, (B, hi), generator=g)
    return logits, targets.to(device), tl.to(device), V - 1


# name: (B, T, V)
DECODE_SHAPES = {
    "vqa": (64, 6, V_OFA),
    "caption": (32, 20, V_OFA),
    "asr": (16, 200, 1000),
}
BEAMS = (1, 10, 64)
CUTOFF_TOP_N = 40


def decode_inputs(name, device="cpu", seed=0):
    """log-probabilities (B, T, V) float32, contiguous; blank = V - 1 (NARVL's choice)."""
    B, T, V = DECODE_SHAPES[name]
    g = torch.Generator().manual_seed(seed)
    lp = (torch.randn(B, T, V, generator=g) * 4).log_softmax(-1)
    return lp.to(device), V - 1


# NARVL-base decoder attention (d = 768, 12 heads): name: (B, H, Lq, Lk, D)
ATTN_SHAPES = {
    "self": (32, 12, 20, 20, 64),
    "cross": (32, 12, 20, 930, 64),
    # the NARVL tiny model's shapes (64-px images: 16 image + 12 text tokens, 3 of them padding)
    "model-enc": (16, 4, 28, 28, 64),
    "model-dec-b1": (1, 4, 6, 28, 64),
}


def attention_inputs(name, dtype=torch.float32, device="cpu", seed=0):
    """q, k, v, key_lengths (B,), shared bias (H, Lq, Lk); cross keys padded to 850..930."""
    B, H, Lq, Lk, D = ATTN_SHAPES[name]
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g)
    k = torch.randn(B, H, Lk, D, generator=g)
    v = torch.randn(B, H, Lk, D, generator=g)
    bias = torch.randn(H, Lq, Lk, generator=g) * 0.1
    if name == "self":
        lens = torch.full((B,), Lk)
    elif name == "cross":
        lens = torch.randint(850, Lk + 1, (B,), generator=g)
    else:
        lens = torch.full((B,), Lk - 3)
    return [x.to(device=device, dtype=dtype) for x in (q, k, v)] + [lens.to(device), bias.to(device=device, dtype=dtype)]


# Model level (the paper's Figure 1): tiny preset, shapes-sized images, output lengths.
MODEL_IMAGE_SIZE = 64
MODEL_VOCAB = 600
MODEL_OUT_LENS = (4, 8, 16)
MODEL_BATCHES = (1, 32)


def model_pair(out_len, image_size=MODEL_IMAGE_SIZE, seed=0):
    """(NARVL with N = out_len queries, ARBaseline) at the tiny preset, both prepared the same
    way for inference (``prepare_for_inference``: eval, BN folded, packed convs), and their
    inputs' maker ``make(batch) -> (images, text)``."""
    from narvl.models import ARBaseline, NARVL, NARVLConfig, prepare_for_inference

    cfg = NARVLConfig.from_preset("tiny", image_size=image_size, vocab_size=MODEL_VOCAB, num_bins=64,
                                  num_queries=out_len, max_target_len=max(MODEL_OUT_LENS), dropout=0.0)
    torch.manual_seed(seed)
    nar, ar = prepare_for_inference(NARVL(cfg)), prepare_for_inference(ARBaseline(cfg))

    def make(batch):
        g = torch.Generator().manual_seed(seed)
        images = torch.randn(batch, 3, image_size, image_size, generator=g)
        text = torch.randint(4, MODEL_VOCAB - 100, (batch, 10), generator=g)
        return images, text

    return nar, ar, make


def train_inputs(batch=16, image_size=MODEL_IMAGE_SIZE, seed=0, vocab=V_OFA):
    """A NARVL caption model (tiny preset, 20 queries, OFA's vocabulary + blank by default) and
    one batch of inputs for a train step."""
    from narvl.models import NARVL, NARVLConfig

    cfg = NARVLConfig.from_preset("tiny", task="caption", image_size=image_size, vocab_size=vocab)
    torch.manual_seed(seed)
    model = NARVL(cfg)
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, image_size, image_size, generator=g)
    text = torch.randint(4, MODEL_VOCAB - 100, (batch, 10), generator=g)
    lengths = torch.randint(4, 15, (batch,), generator=g)
    targets = torch.randint(4, MODEL_VOCAB - 100, (batch, 14), generator=g)
    return model, (images, text, targets, lengths)


def torch_qctc_loss(logits, targets, target_lengths, *, blank, label_smoothing=0.0, weights=None,
                    zero_infinity=True):
    """The peer of ``narvl.qctc_loss`` in plain torch: log_softmax in float32 + F.ctc_loss over
    the query axis, mean reduction, label smoothing as NARVL's."""
    lp = logits.float().log_softmax(-1)
    B, N, _ = lp.shape
    nll = F.ctc_loss(lp.transpose(0, 1), targets, torch.full((B,), N, dtype=torch.long), target_lengths,
                     blank=blank, reduction="none", zero_infinity=zero_infinity)
    loss = nll / target_lengths.clamp_min(1)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * lp.mean((1, 2))
    if weights is not None:
        loss = loss * weights
    return loss.mean()


def torch_query_attention(q, k, v, key_lengths=None, attn_bias=None, scale=None):
    """The peer of ``narvl.query_attention`` in plain torch: SDPA with the key padding and the
    bias in one float mask."""
    mask = torch.zeros(q.shape[0], 1, 1, k.shape[2], dtype=q.dtype)
    if key_lengths is not None:
        pad = torch.arange(k.shape[2])[None, :] >= key_lengths[:, None]
        mask = mask.masked_fill(pad[:, None, None, :], float("-inf"))
    if attn_bias is not None:
        mask = mask + attn_bias
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def use_torch_peers(monkeypatch):
    """Swaps the model layer's Q-CTC and attention for their plain-torch peers and keeps every
    linear on ATen (NARVL_CPU_FASTPATH=0): the model as a plain-PyTorch NARVL would run it."""
    import narvl.models.layers
    import narvl.models.narvl

    monkeypatch.setenv("NARVL_CPU_FASTPATH", "0")
    monkeypatch.setattr(narvl.models.narvl, "qctc_loss", torch_qctc_loss)
    monkeypatch.setattr(narvl.models.layers, "query_attention", torch_query_attention)


# Linear layers of the tiny model (d 256, FFN 1024) at the row counts inference sees: one AR
# step (1), an AR beam (5), the decoder's queries (20), encoder tokens (26) and a batch of 32
# samples' encoder tokens (832).
LINEAR_ROWS = (1, 5, 20, 26, 832)
LINEAR_SHAPES = {"ffn1+gelu": (256, 1024, "gelu"), "ffn2": (1024, 256, None), "qkv": (256, 768, None)}


def linear_inputs(rows, name, seed=0):
    """x (rows, K), weight (N, K), bias (N,), activation for ``LINEAR_SHAPES[name]``."""
    K, N, act = LINEAR_SHAPES[name]
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, K, generator=g), torch.randn(N, K, generator=g) / K ** 0.5,
            torch.randn(N, generator=g), act)


BACKBONE_BATCHES = (1, 8)


def backbone_variants(image_size=MODEL_IMAGE_SIZE, seed=0):
    """The tiny preset's ResNet-50 stages 1-3 three ways: eval mode with BatchNorm, BN folded
    (``fold_batchnorm_``), and folded + packed for fused oneDNN (``pack_for_cpu_``)."""
    import copy

    from narvl.models.inference import fold_batchnorm_, pack_for_cpu_
    from narvl.models.resnet import ResNetStages

    torch.manual_seed(seed)
    net = ResNetStages((3, 4, 6)).eval()
    folded = fold_batchnorm_(copy.deepcopy(net))
    packed = fold_batchnorm_(copy.deepcopy(net))
    pack_for_cpu_(packed, image_size)
    return {"eval": net, "folded": folded, "packed": packed}


def cpu_model():
    """The CPU's model name (/proc/cpuinfo), with its family and model numbers (a VM may name
    only the vendor line, e.g. "AMD EPYC"), named in every benchmark result."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if ":" in line:
                    key, val = (part.strip() for part in line.split(":", 1))
                    info.setdefault(key, val)
                if not line.strip() and info:
                    break
    except OSError:
        pass
    name = info.get("model name") or platform.processor() or "unknown"
    if "cpu family" in info and "model" in info:
        name += f" (family {info['cpu family']}, model {info['model']})"
    return name
