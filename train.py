"""Train and evaluate NARVL (Q-CTC, one-pass decoding), its autoregressive baseline or eP-ALM on
the embedded shapes data (generated offline from --seed), for one of the paper's four tasks.

    python train.py --task caption --arch narvl --out runs/caption_narvl      # ~6 min, 2 cores
    python train.py --task caption --arch ar    --out runs/caption_ar
    torchrun --nproc_per_node 2 train.py --task vqa --out runs/vqa            # DDP (gloo on CPU)
    python train.py --resume --out runs/caption_narvl                          # continue
    python train.py --eval-only runs/caption_narvl/last.safetensors --out runs/eval
    python train.py --task vqa --data vqa_spec.json --image-size 480 --epochs 5 --out runs/vqa   # your files
    python train.py --task caption --distill-from runs/caption_ar/last.safetensors --out runs/kd  # seq-level KD
    python train.py --task vqa --init-ofa ofa_base.pt --ofa-bpe-dir OFA/utils/BPE --data vqa.json \
        --image-size 480 --out runs/vqa_ofa     # fine-tune NARVL from an OFA checkpoint
    python train.py --task caption --arch epalm --out runs/caption_epalm      # eP-ALM, ~15 min, 2 cores
    python train.py --task vqa --arch epalm-nar --lm my_opt --vision my_vit --out runs/vqa_epalm_nar

Writes DIR/last.safetensors (atomic, no pickle; config + tokenizer inside) and DIR/metrics.json
(task, arch, metric_name, metric, latency_ms = mean batch-1 decode time per sample with the
encoder, over --latency-samples samples, each timed 5 times, best kept), params, train_seconds,
the per-step losses, and what training could not use: targets cut at --max-target-len, and
(NARVL) infeasible samples whose target needs more CTC frames than there are queries, per epoch
and in total, ...) and prints a one-line summary.
With --arch both it trains NARVL then AR into OUT/narvl and OUT/ar and writes OUT/comparison.json:
both metrics and a speed-up timed once more with the two models taking turns in one process.
Latency is measured on an inference copy (``narvl.models.prepare_for_inference``), the same for
both architectures.
With --arch epalm (eP-ALM's autoregressive head) or epalm-nar (its Q-CTC head) it trains eP-ALM
(``narvl.models.epalm``) instead, on a frozen OPT and a frozen ViT: --lm / --vision name local
Hugging Face directories, else a small OPT and a small ViT are pretrained first into
OUT/pretrained/lm and OUT/pretrained/vision (reused when there), as
``narvl.models.epalm_pretrain`` describes; the trained adapter goes to OUT/adapter.safetensors
and metrics.json adds the pretraining's steps and losses.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time

import torch

import narvl
from narvl import settings
from narvl.checkpoint import load_model_state, load_optimizer_state, read_checkpoint, save_checkpoint
from narvl.data import TaskData, Tokenizer, load_spec, metrics, sample_texts, shapes, shapes_task
from narvl.data.ofa import OFATokenizer
from narvl.models import (ARBaseline, NARVL, NARVLConfig, enable_peft, from_ofa, prepare_for_inference,
                          time_generate, trainable_fraction)
from narvl.models.config import TASK_QUERIES
from narvl.plots import training_curve

METRIC = {"caption": "CIDEr", "vqa": "VQA accuracy", "grounding": "Acc@0.5", "entailment": "accuracy"}
DEFAULT_STEPS = {"caption": 600, "vqa": 500, "grounding": 600, "entailment": 400}
EPALM_ARCHS = ("epalm", "epalm-nar")
MAX_TEXT_LEN = 48  # prompt tokens of a new model, BOS and EOS included
#: The from-scratch recipe of a new model per task, where measured (docs/results.md, the caption
#: study): OFA's entangled positions (both archs), and per arch the learning rate
#: (``{arch}_lr``) and dropout (``{arch}_dropout``), NARVL's glancing ratio (``glance``) with the
#: plain pass's share of the loss (``glance_plain_weight``) and refinement passes (``refine``). A
#: task or key without an entry keeps OFA's released setup (no entangled positions, 5e-4, dropout
#: 0.1, no glancing, one pass); the flags override it, and --init / --init-ofa keep the
#: checkpoint's settings, 5e-4 and dropout 0.1.
TASK_RECIPE = {"caption": dict(entangle_position_embedding=True, narvl_lr=2.5e-4, narvl_dropout=0.0, ar_dropout=0.0,
                               glance=0.5, glance_plain_weight=0.5)}


def recipe(args, name, off):
    """The value of option ``name`` for a new model: the flag if given, else the task's recipe,
    else ``off``."""
    given = getattr(args, name)
    return given if given is not None else TASK_RECIPE.get(args.task, {}).get(name, off)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where the help does not already state the default and X says something."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def _run_args(p):
    g = p.add_argument_group("what to run")
    g.add_argument("--task", choices=list(METRIC), default="caption",
                   help="what to train and evaluate: caption (CIDEr), vqa (VQA accuracy), grounding (Acc@0.5) "
                        "or entailment (accuracy)")
    g.add_argument("--arch", choices=["narvl", "ar", "both", *EPALM_ARCHS], default="narvl",
                   help="both: narvl then ar into OUT/narvl and OUT/ar, then OUT/comparison.json; epalm / "
                        "epalm-nar: eP-ALM with its autoregressive / Q-CTC head on a frozen OPT and ViT "
                        "(--lm, --vision)")
    g.add_argument("--preset", choices=["tiny", "medium", "base", "large", "huge"], default="tiny",
                   help="model size: tiny (d 256, 4+4 layers, trains in minutes on 2 CPU cores) or the paper's "
                        "medium, base, large, huge")
    g.add_argument("--out", default=None, help="output directory (default runs/{task}_{arch})")


def _training_args(p):
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=None,
                   help="optimizer steps (default per task; eP-ALM's adapter: 600)")
    g.add_argument("--epochs", type=float, default=None, help="alternative to --steps")
    g.add_argument("--batch-size", type=int, default=32, help="global batch (split over ranks)")
    g.add_argument("--lr", type=float, default=None,
                   help="peak AdamW learning rate (default: the task's recipe for the arch, TASK_RECIPE, else 5e-4; "
                        "eP-ALM's adapter: 1e-3)")
    g.add_argument("--warmup", type=int, default=50,
                   help="linear warm-up steps to --lr (at most the run's steps), then a cosine to 0")
    g.add_argument("--weight-decay", type=float, default=0.01,
                   help="AdamW weight decay of the matrices (biases and norms: none)")
    g.add_argument("--dropout", type=float, default=None,
                   help="dropout of a new model (default: the task's recipe for the arch, TASK_RECIPE, else 0.1)")
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    g.add_argument("--fp16", action="store_true",
                   help="float16 autocast with a GradScaler (a step whose gradients overflow is skipped "
                        "and the scale lowered; skipped steps are counted)")
    g.add_argument("--max-target-len", type=int, default=None,
                   help="targets (answer + EOS) are cut to this many tokens, counted (default: the task's "
                        "NARVL queries, what one decoder pass can emit; the same for AR, so both train on "
                        "the same targets)")
    g.add_argument("--freeze-bn", action="store_true",
                   help="the ResNet's BatchNorm layers use their running statistics while training (as when "
                        "fine-tuning from pretrained weights with small per-device batches); with it, DDP "
                        "on k ranks computes what one rank does on the same global batch")
    g.add_argument("--distill-from", default=None, metavar="AR_CKPT",
                   help="sequence-level distillation: decode the training split with this AR checkpoint "
                        "(cached in OUT/distill_targets.json) and train NARVL on its outputs")
    g.add_argument("--distill-beam", type=int, default=1, help="teacher beam width for --distill-from")


def _recipe_args(p):
    g = p.add_argument_group("model and recipe of a new model")
    g.add_argument("--entangle-position-embedding", action=argparse.BooleanOptionalAction, default=None,
                   help="OFA's option for a new model: the encoder also adds the position embeddings "
                        "to the text and image content (off in OFA's released setups; default: the task's "
                        "recipe, TASK_RECIPE)")
    g.add_argument("--queries", type=int, default=None,
                   help="NARVL's (and eP-ALM's NAR head's) query slots N (default: the task's, caption 20, VQA 6, "
                        "grounding 5, entailment 3); targets are still cut at --max-target-len")
    g.add_argument("--dec-layers", type=int, default=None, metavar="L",
                   help="decoder layers of a new model (default: the preset's, tiny 4)")
    g.add_argument("--glance", type=float, default=None, metavar="RATIO",
                   help="NARVL glancing training: RATIO x (first pass's errors) query inputs replaced by the "
                        "embeddings of the labels CTC's best alignment puts there (0 = off; default: the "
                        "task's recipe, TASK_RECIPE)")
    g.add_argument("--glance-plain-weight", type=float, default=None, metavar="W",
                   help="with --glance: the loss is (1 - W) x the glanced pass's + W x the plain pass's (0: the "
                        "glanced pass alone, as GLAT; default: the task's recipe, TASK_RECIPE, else 0)")
    g.add_argument("--aux-ar-weight", type=float, default=None, metavar="W",
                   help="NARVL joint training: the loss adds W x the teacher-forced cross-entropy of an auxiliary "
                        "AR decoder on the same encoder (training only; serving copies drop it; 0 = off; default: "
                        "the task's recipe, TASK_RECIPE, else 0)")
    g.add_argument("--layer-ctc-weight", type=float, default=None, metavar="W",
                   help="NARVL deep supervision: the loss adds W x the mean Q-CTC loss of the inner decoder layers "
                        "(through the final layer norm and the tied projection; training only; 0 = off; default: "
                        "the task's recipe, TASK_RECIPE, else 0)")
    g.add_argument("--refine", type=int, default=None, metavar="K",
                   help="NARVL inference: K Mask-Predict refinement passes after the one pass (confident slots feed "
                        "their labels back as inputs); with --eval-only it overrides the checkpoint's (default: the "
                        "task's recipe for a new model, TASK_RECIPE; the checkpoint's with --eval-only)")


def _data_args(p):
    g = p.add_argument_group("data")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the generated shapes data (evaluation split: seed + 1000), the initial "
                        "weights and the batch order")
    g.add_argument("--image-size", type=int, default=64,
                   help="image side in pixels, a multiple of 16 (a checkpoint keeps its own)")
    g.add_argument("--train-size", type=int, default=6000, help="generated training samples (shapes data)")
    g.add_argument("--eval-size", type=int, default=500,
                   help="evaluation samples (generated; with --data, the first N of its eval split)")
    g.add_argument("--data", default=None, metavar="SPEC.json",
                   help="train and evaluate on files instead of the generated shapes data: a JSON object "
                        "{\"train\": {...}, \"eval\": {...}}, each entry naming the task's files "
                        "(narvl.data.SPEC_KEYS; paths relative to SPEC.json)")
    g.add_argument("--bpe-vocab", type=int, default=1000, help="BPE merges + bytes of a new tokenizer")
    g.add_argument("--num-bins", type=int, default=64, help="location bins of a new tokenizer")


def _eval_args(p):
    g = p.add_argument_group("evaluation")
    g.add_argument("--serve-dtype", choices=["fp32", "bf16", "bf16-emulated"], default="fp32",
                   help="dtype of the serving copies evaluated and timed (prepare_for_inference(dtype=)): bf16 "
                        "stays fp32, with a warning, on a CPU without bfloat16 instructions (AVX512-BF16, "
                        "AMX-BF16); bf16-emulated runs bf16 there anyway (slower; for its quality)")
    g.add_argument("--latency-samples", type=int, default=100,
                   help="evaluation samples timed for latency_ms (batch 1, each timed 5 times, best kept)")
    g.add_argument("--beam", type=int, default=1, help="beam width at evaluation (1 = greedy)")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bar; the log lines and the summary are still printed")


def _checkpoint_args(p):
    g = p.add_argument_group("starting points and checkpoints")
    g.add_argument("--freeze-backbone", action="store_true",
                   help="eP-ALM style: train only the queries, an output projection and a soft prompt")
    g.add_argument("--no-soft-prompt", action="store_true", help="with --freeze-backbone")
    g.add_argument("--init", default=None, help="start from a checkpoint's weights (e.g. with --freeze-backbone)")
    g.add_argument("--init-ofa", default=None, metavar="PATH",
                   help="start from an OFA (or NARVL) checkpoint: fairseq .pt, Hugging Face file or directory")
    g.add_argument("--ofa-bpe-dir", default=None, metavar="DIR",
                   help="with --init-ofa: OFA's BPE files (encoder.json + vocab.bpe + dict.txt, or "
                        "vocab.json + merges.txt)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/last.safetensors")
    g.add_argument("--eval-only", default=None, metavar="CKPT", help="evaluate a checkpoint")
    g.add_argument("--ckpt-every", type=int, default=200, help="optimizer steps between checkpoints")
    g.add_argument("--stop-after", type=int, default=None, metavar="K",
                   help="end after K optimizer steps of the --steps schedule, with a checkpoint (a time-boxed "
                        "job; --resume continues it exactly)")


def _epalm_args(p):
    g = p.add_argument_group("eP-ALM (--arch epalm, epalm-nar)")
    g.add_argument("--lm", default=None, metavar="DIR",
                   help="eP-ALM: freeze this local Hugging Face OPTForCausalLM directory instead of pretraining "
                        "one; its vocabulary must be this project's tokenizer's (ids 0/1/2 = <s>/<pad>/</s>, "
                        "vocab_size at least the tokenizer's: an OPT trained on what --data, --bpe-vocab and "
                        "--num-bins make, e.g. an earlier run's OUT/pretrained/lm)")
    g.add_argument("--vision", default=None, metavar="DIR",
                   help="eP-ALM: freeze this local Hugging Face ViTModel directory (its image_size = "
                        "--image-size) instead of pretraining one")
    g.add_argument("--lm-steps", type=int, default=300,
                   help="eP-ALM without --lm: optimizer steps of the small OPT's causal-LM pretraining on the "
                        "training split's texts (skipped when OUT/pretrained/lm exists)")
    g.add_argument("--vision-steps", type=int, default=400,
                   help="eP-ALM without --vision: optimizer steps of the small ViT's pretraining, classifying "
                        "--train-size generated scenes' per-cell shapes, colours and sizes (skipped when "
                        "OUT/pretrained/vision exists)")


def _check_ranges(p, a):
    """Each option's own range: p.error naming it."""
    for name in ("batch_size", "image_size", "train_size", "eval_size", "latency_samples", "beam", "ckpt_every",
                 "bpe_vocab", "num_bins", "distill_beam", "lm_steps", "vision_steps"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.steps is not None and a.steps < 0:
        p.error("--steps must be >= 0")
    if a.dropout is not None and not 0.0 <= a.dropout < 1.0:
        p.error("--dropout must be in [0, 1)")
    if a.lr is not None and a.lr <= 0:
        p.error("--lr must be > 0")
    if a.image_size % 16:
        p.error("--image-size must be a multiple of 16")
    if a.stop_after is not None and a.stop_after < 1:
        p.error("--stop-after must be >= 1")
    if a.max_target_len is not None and a.max_target_len < 1:
        p.error("--max-target-len must be >= 1")
    if a.queries is not None and a.queries < 1:
        p.error("--queries must be >= 1")
    if a.dec_layers is not None and a.dec_layers < 1:
        p.error("--dec-layers must be >= 1")
    if a.refine is not None and a.refine < 0:
        p.error("--refine must be >= 0")
    if a.glance is not None and not 0.0 <= a.glance <= 1.0:
        p.error("--glance must be in [0, 1]")
    if a.glance_plain_weight is not None and not 0.0 <= a.glance_plain_weight <= 1.0:
        p.error("--glance-plain-weight must be in [0, 1]")
    if a.layer_ctc_weight is not None and not 0.0 <= a.layer_ctc_weight < float("inf"):
        p.error("--layer-ctc-weight must be a finite number >= 0")
    if a.aux_ar_weight is not None and not 0.0 <= a.aux_ar_weight < float("inf"):
        p.error("--aux-ar-weight must be a finite number >= 0")


def _check_combinations(p, a):
    """Options that exclude or need each other: p.error naming them."""
    if a.dec_layers is not None and (a.init_ofa or a.init or a.resume or a.eval_only):
        p.error("--dec-layers sets up a new model (a checkpoint keeps its own layers)")
    if a.aux_ar_weight and (a.arch not in ("narvl", "both") or a.freeze_backbone or a.init_ofa or a.init
                            or a.resume or a.eval_only):
        p.error("--aux-ar-weight sets up a new NARVL trained in full (--arch narvl or both, without --freeze-backbone, "
                "--init, --init-ofa, --resume or --eval-only)")
    if a.layer_ctc_weight and (a.arch not in ("narvl", "both") or a.init_ofa or a.init or a.resume or a.eval_only):
        p.error("--layer-ctc-weight sets up a new NARVL (--arch narvl or both, without --init, --init-ofa, --resume "
                "or --eval-only)")
    if a.bf16 and a.fp16:
        p.error("--bf16 and --fp16 exclude each other")
    if a.init_ofa and not a.ofa_bpe_dir:
        p.error("--init-ofa needs --ofa-bpe-dir DIR (OFA's tokenizer files)")
    if a.init_ofa and (a.init or a.resume or a.eval_only):
        p.error("--init-ofa starts a new run: it excludes --init, --resume and --eval-only")
    if a.distill_from and a.arch != "narvl":
        p.error("--distill-from trains NARVL (--arch narvl)")
    if a.arch in EPALM_ARCHS:
        for name in ("resume", "eval_only", "init", "init_ofa", "freeze_backbone", "no_soft_prompt", "bf16",
                     "fp16", "stop_after", "freeze_bn", "glance", "glance_plain_weight", "aux_ar_weight", "layer_ctc_weight", "refine",
                     "entangle_position_embedding", "dec_layers"):
            if getattr(a, name) not in (None, False):
                p.error(f"--{name.replace('_', '-')} does not apply to --arch {a.arch}")
        if a.serve_dtype != "fp32":
            p.error("--serve-dtype applies to --arch narvl, ar and both")
        if a.queries is not None and a.arch != "epalm-nar":
            p.error("--queries applies to --arch narvl and epalm-nar")
    elif a.lm or a.vision:
        p.error(f"--lm and --vision apply to --arch {' and '.join(EPALM_ARCHS)}")


def make_parser() -> argparse.ArgumentParser:
    """train.py's command line, its options in groups."""
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()),
                                formatter_class=_HelpFormatter)
    for add in (_run_args, _training_args, _recipe_args, _data_args, _eval_args, _checkpoint_args, _epalm_args):
        add(p)
    return p


def parse_args(argv=None):
    p = make_parser()
    a = p.parse_args(argv)
    _check_ranges(p, a)
    _check_combinations(p, a)
    a.out = a.out or f"runs/{a.task}_{a.arch}"
    return a


def lr_schedule(steps: int, warmup: int):
    """Multiplier of --lr at step s: linear warm-up to 1 over min(warmup, steps) steps, then a
    cosine to 0 over the remaining steps (a run shorter than the warm-up still reaches --lr)."""
    w = max(1, min(warmup, steps))

    def f(s):
        if s < w:
            return (s + 1) / w
        return 0.5 * (1 + math.cos(math.pi * (s - w) / max(steps - w, 1)))
    return f


def total_steps(args, n_train: int, default: int) -> int:
    """--steps, else --epochs over ``n_train`` samples, else ``default``."""
    if args.steps is not None:
        return args.steps
    return math.ceil(args.epochs * n_train / args.batch_size) if args.epochs else default


def arch_recipe(args, name: str, default: float) -> float:
    """Option ``name`` of the arch being trained: the flag if given; else, for a model trained from
    scratch, the task's recipe for the arch (``TASK_RECIPE[task]["{arch}_{name}"]``); else
    ``default`` (also for --init / --init-ofa, the recipe being for models trained from scratch)."""
    given = getattr(args, name)
    if given is not None:
        return given
    if args.init or args.init_ofa:
        return default
    return TASK_RECIPE.get(args.task, {}).get(f"{args.arch}_{name}", default)


def dropout_rate(args) -> float:
    """--dropout, else the task's recipe for the arch (``{arch}_dropout``), else 0.1."""
    return arch_recipe(args, "dropout", 0.1)


def learning_rate(args) -> float:
    """--lr if given, else the task's recipe for the arch (``{arch}_lr``), else 5e-4."""
    return arch_recipe(args, "lr", 5e-4)


def dist_setup():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group("gloo")
        return dist.get_rank(), world
    return 0, 1


def build_model(arch, cfg, **options):
    return (NARVL if arch == "narvl" else ARBaseline)(cfg, **options)


def make_tokenizer(train_data=None, vocab_size=1000, num_bins=64):
    """BPE on the shapes corpus, or on ``train_data``'s texts (``--data``)."""
    texts = (shapes.corpus(image_size=64, seed=0, n=1500) if train_data is None
             else sample_texts(train_data.samples))
    return Tokenizer.train(texts, vocab_size=vocab_size, num_bins=num_bins)


def load_data(args, split, image_size):
    """``split`` ("train" or "eval") of the generated shapes task, or of the ``--data`` files."""
    if args.data is None:
        n, seed = (args.train_size, args.seed) if split == "train" else (args.eval_size, args.seed + 1000)
        return shapes_task(args.task, n, image_size, seed=seed)
    try:
        with open(args.data, encoding="utf-8") as f:
            spec = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f"error: --data {args.data}: {e}")
    if not isinstance(spec, dict) or split not in spec:
        sys.exit(f"error: --data {args.data} needs a {split!r} entry ({{\"train\": {{...}}, \"eval\": {{...}}}})")
    try:
        data = load_spec(args.task, spec[split], image_size, base_dir=os.path.dirname(os.path.abspath(args.data)),
                         split=split)
    except ValueError as e:
        sys.exit(f"error: --data {args.data} ({split}): {e}")
    if split == "eval" and len(data) > args.eval_size:
        data = TaskData(data.task, data.samples[: args.eval_size], data.image_size, data.images, data.skipped)
    for reason, n in data.skipped.items():
        print(f"[narvl] --data {split}: {n} {reason} left out", file=sys.stderr)
    return data


def batch_indices(step, batch, n, seed):
    """Global sample indices of ``step``: consecutive slices of per-epoch permutations (seeded by
    seed and epoch), so a resumed run sees exactly the batches it would have seen."""
    out = []
    pos = step * batch
    while len(out) < batch:
        epoch, off = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        take = perm[off: off + batch - len(out)].tolist()
        out += take
        pos += len(take)
    return out


def decode_text(task, tok, ids, image_size):
    if task == "grounding":
        return tok.ids_to_box(ids, image_size)
    return tok.decode(ids)


def serving_copy(model, args):
    """The serving copy evaluated and timed: ``prepare_for_inference`` in ``--serve-dtype``."""
    if args.serve_dtype == "fp32":
        return prepare_for_inference(model)
    return prepare_for_inference(model, dtype=torch.bfloat16, fallback=args.serve_dtype == "bf16")


def latency_inputs(data, tok, max_text_len, n):
    """The first ``n`` samples of ``data`` as batch-1 (images, text) pairs."""
    return [data.batch([i], tok, max_text_len)[:2] for i in range(min(n, len(data)))]


@torch.inference_mode()
def evaluate(infer, data, tok, task, beam, latency_samples, max_text_len, bf16=False, batch=64):
    """The task's metric of ``infer``'s outputs on ``data`` and its batch-1 latency (ms per sample,
    ``time_generate``); ``infer`` is a serving copy (``prepare_for_inference``, the same for NARVL
    and AR) or any model with ``generate(images, text, beam_width)``. Returns (metric, latency,
    extra metrics, the first examples)."""
    preds = []
    ctx = torch.autocast("cpu", torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
    with ctx:
        for i in range(0, len(data), batch):
            idx = list(range(i, min(i + batch, len(data))))
            images, text, *_ = data.batch(idx, tok, max_text_len)
            for ids in infer.generate(images, text, beam_width=beam):
                preds.append(decode_text(task, tok, ids, data.image_size))
        ss = data.samples
        if task == "caption":
            refs = [s["refs"] for s in ss]
            metric = 100 * metrics.cider(preds, refs)
            extra = {"BLEU-4": 100 * metrics.bleu4(preds, refs)}
        elif task == "vqa":
            metric = 100 * sum(metrics.vqa_accuracy(p, s["answers"]) for p, s in zip(preds, ss)) / len(ss)
            extra = {}
        elif task == "grounding":
            metric = 100 * metrics.grounding_accuracy(preds, [s["box"] for s in ss])
            extra = {}
        else:
            metric = 100 * metrics.accuracy(preds, [s["label"] for s in ss])
            extra = {}
        inputs = latency_inputs(data, tok, max_text_len, latency_samples)
        latency = time_generate({"model": infer}, inputs, beam)["model"].best_ms
    examples = [{"text": s["text"], "pred": p if not isinstance(p, list) else [round(c, 1) for c in p],
                 "target": s["target"]} for s, p in zip(ss[:5], preds[:5])]
    return metric, latency, extra, examples


def main(argv=None):
    args = parse_args(argv)
    if args.arch in EPALM_ARCHS:
        run_epalm(args)
        return 0
    if args.arch != "both":
        run(args)
        return 0
    if args.resume or args.eval_only or args.init:
        sys.exit("error: --arch both trains from scratch (give one --arch to resume or evaluate)")
    res, trained = {}, {}
    for arch in ("narvl", "ar"):
        a = copy.copy(args)
        a.arch, a.out = arch, os.path.join(args.out, arch)
        trained[arch] = run(a)
        if int(os.environ.get("RANK", "0")) == 0:
            with open(os.path.join(a.out, "metrics.json")) as f:
                res[arch] = json.load(f)
    if int(os.environ.get("RANK", "0")) == 0:
        n, r = res["narvl"], res["ar"]
        # The speed-up comes from one more timing of both models in this process, taking turns
        # on the same samples, so a change in the machine's speed between the runs cancels out.
        (nm, tok), (am, _) = trained["narvl"], trained["ar"]
        data = load_data(args, "eval", nm.cfg.image_size)
        timing = time_generate({"narvl": serving_copy(nm, args), "ar": serving_copy(am, args)},
                               latency_inputs(data, tok, nm.cfg.max_text_len, args.latency_samples), args.beam)
        lat = {k: t.best_ms for k, t in timing.items()}
        comp = dict(task=args.task, metric_name=n["metric_name"], narvl_metric=n["metric"], ar_metric=r["metric"],
                    metric_ratio=round(n["metric"] / r["metric"], 4) if r["metric"] else None,
                    narvl_latency_ms=round(lat["narvl"], 2), ar_latency_ms=round(lat["ar"], 2),
                    speedup=round(lat["ar"] / lat["narvl"], 2), latency_samples=args.latency_samples,
                    latency_method="batch 1, encoder included, both models in one process taking turns "
                                   "(all samples per turn), 5 rounds, mean over samples of each sample's best",
                    threads=torch.get_num_threads(), serve_dtype=n["serve_dtype"])
        with open(os.path.join(args.out, "comparison.json"), "w") as f:
            json.dump(comp, f, indent=2)
        print(f"[narvl] {args.task}: NARVL {n['metric_name']} {n['metric']:.2f} vs AR {r['metric']:.2f}; "
              f"latency {comp['narvl_latency_ms']:.2f} vs {comp['ar_latency_ms']:.2f} ms/sample "
              f"({comp['speedup']:.1f}x faster) -> {os.path.join(args.out, 'comparison.json')}")
    return 0


@dataclasses.dataclass
class Setup:
    """What ``build`` gives ``run``: the model and how it was made."""
    model: torch.nn.Module
    tok: object
    cfg: NARVLConfig
    meta: dict | None  # the checkpoint's metadata (--eval-only, --resume, --init)
    tensors: dict | None  # the checkpoint's tensors (optimizer state for --resume)
    train_data: TaskData | None  # --data's training split, when already read
    peft: bool


def build(args) -> Setup:
    """The model, tokenizer and config: from an OFA checkpoint (--init-ofa), from one of ours
    (--eval-only, --resume, --init), or new (the task's recipe)."""
    meta, tensors, train_data, model = None, None, None, None
    if args.init_ofa:
        train_data = load_data(args, "train", args.image_size) if args.data else None
        try:
            tok = OFATokenizer.from_files(args.ofa_bpe_dir)
            model = from_ofa(args.init_ofa, arch=args.arch, task=args.task, image_size=args.image_size,
                             num_bins=tok.num_bins, dropout=dropout_rate(args), max_text_len=64,
                             max_target_len=args.max_target_len or TASK_QUERIES[args.task])
        except (OSError, ValueError) as e:
            sys.exit(f"error: --init-ofa: {e}")
        cfg = model.cfg
        if tok.vocab_size != cfg.vocab_size:
            sys.exit(f"error: --ofa-bpe-dir gives {tok.vocab_size - 1} OFA entries, the checkpoint "
                     f"{cfg.vocab_size - 1}: not the same vocabulary")
    elif args.eval_only or args.resume or args.init:
        src = args.eval_only or args.init or os.path.join(args.out, "last.safetensors")
        tensors, meta = read_checkpoint(src)
        tok = Tokenizer.from_json(meta["tokenizer"])
        cfg = NARVLConfig.from_json(meta["config"])
        if args.refine is not None:
            cfg = dataclasses.replace(cfg, refine_steps=args.refine)
        arch, task = meta["arch"], meta["task"]
        if (args.resume or args.init) and (arch != args.arch or task != args.task):
            sys.exit(f"error: {src} holds a {task}/{arch} model, not {args.task}/{args.arch}")
        args.arch, args.task = arch, task
    else:
        train_data = load_data(args, "train", args.image_size) if args.data else None
        tok = make_tokenizer(train_data, args.bpe_vocab, args.num_bins)
        cfg = NARVLConfig.from_preset(args.preset, task=args.task, image_size=args.image_size,
                                      vocab_size=tok.vocab_size, num_bins=tok.num_bins,
                                      dropout=dropout_rate(args), max_text_len=MAX_TEXT_LEN,
                                      max_target_len=args.max_target_len or TASK_QUERIES[args.task],
                                      entangle_position_embedding=recipe(args, "entangle_position_embedding", False),
                                      glance_ratio=recipe(args, "glance", 0.0),
                                      glance_plain_weight=recipe(args, "glance_plain_weight", 0.0),
                                      aux_ar_weight=recipe(args, "aux_ar_weight", 0.0) if args.arch == "narvl" else 0.0,
                                      layer_ctc_weight=recipe(args, "layer_ctc_weight", 0.0) if args.arch == "narvl" else 0.0,
                                      refine_steps=recipe(args, "refine", 0),
                                      **({} if args.queries is None else dict(num_queries=args.queries)),
                                      **({} if args.dec_layers is None else dict(dec_layers=args.dec_layers)))
    # a checkpoint trained parameter-efficiently (and not used as --init) is rebuilt that way
    saved_peft = bool(meta and json.loads(meta.get("peft", "false")) and not args.init)
    if model is None:
        soft_prompt = json.loads(meta.get("soft_prompt", "true")) if saved_peft else True
        model = build_model(args.arch, cfg, peft=saved_peft, soft_prompt=soft_prompt)
    if meta is not None:
        load_model_state(model, tensors, meta)
    if args.freeze_backbone and not saved_peft:
        enable_peft(model, soft_prompt=not args.no_soft_prompt)
    return Setup(model, tok, cfg, meta, tensors, train_data, saved_peft or bool(args.freeze_backbone))


def training_data(args, s: Setup, rank, world):
    """The training split; with --distill-from, its targets replaced by the AR teacher's outputs
    (decoded by rank 0, cached in OUT, read by the other ranks)."""
    data = s.train_data if s.train_data is not None else load_data(args, "train", s.cfg.image_size)
    if not args.distill_from:
        return data, None
    from narvl.models.distill import distill_data
    info = None
    if rank == 0:
        data_0, info = distill_data(args.distill_from, data, s.tok, s.cfg, args.task, args.out, args.distill_beam)
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        data_0, _ = distill_data(args.distill_from, data, s.tok, s.cfg, args.task, args.out,
                                 args.distill_beam, log=lambda *_: None)
    return data_0, info


@dataclasses.dataclass
class Progress:
    """What a run has done so far (kept in checkpoints for --resume): per-epoch counts of the
    samples the loss cannot use (this rank's share until ``reduce_counts``), the loss per step,
    the fp16 steps skipped, and the training time."""
    counts: dict = dataclasses.field(default_factory=lambda: {"cut": {}, "infeasible": {}, "samples": {}})
    losses: list = dataclasses.field(default_factory=list)
    skipped_steps: int = 0
    train_seconds: float = 0.0
    start: int = 0

    def count(self, epoch: str, cut: int, infeasible: int, samples: int):
        for k, v in (("cut", cut), ("infeasible", infeasible), ("samples", samples)):
            self.counts[k][epoch] = self.counts[k].get(epoch, 0) + v

    def reduce_counts(self, world):
        """Sums every rank's counts (DDP: each rank counted its own shard)."""
        if world > 1:
            for k in self.counts:
                keys = sorted(self.counts[k], key=int)
                t = torch.tensor([self.counts[k][e] for e in keys], dtype=torch.long)
                torch.distributed.all_reduce(t)
                self.counts[k] = dict(zip(keys, t.tolist()))
            torch.distributed.barrier()


def make_optimizer(args, model):
    """AdamW at the recipe's learning rate, weight decay on the matrices only."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=learning_rate(args))
    return opt, params


def resume_progress(args, s: Setup, opt, scaler) -> Progress:
    """--resume: the optimizer, the scaler and the progress of the checkpoint; else a new start."""
    if not args.resume:
        return Progress()
    load_optimizer_state(opt, s.tensors)
    state = json.loads(s.meta.get("train_state", "{}"))
    if "scaler" in state and args.fp16:
        scaler.load_state_dict(state["scaler"])
    fresh = Progress()
    return Progress(counts=state.get("counts", fresh.counts), losses=state.get("losses", []),
                    skipped_steps=state.get("skipped_steps", 0),
                    train_seconds=float(s.meta.get("train_seconds", 0.0)), start=int(s.meta["step"]))


def set_train_mode(args, s: Setup):
    s.model.train()
    if s.peft or args.freeze_bn:  # frozen BatchNorm: running statistics, not the batch's
        for m in s.model.encoder.backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()


def log_epoch(log, cfg, prog: Progress, epoch: str, n_queries):
    c = prog.counts
    log(f"[narvl] epoch {epoch}: {c['samples'][epoch]} samples, {c['cut'][epoch]} targets "
        f"cut at {cfg.max_target_len} tokens"
        + (f", {c['infeasible'][epoch]} infeasible (more CTC frames needed than the "
           f"{n_queries} queries: zero CTC loss under zero_infinity)" if n_queries else ""))


def optimizer_step(args, loss_value, step, opt, scaler, params, prog: Progress, log, ckpt_path):
    """Clips and steps (fp16: through the GradScaler, which skips a step whose gradients
    overflow; the skip is counted). A non-finite fp32/bf16 loss stops the run before stepping."""
    if args.fp16:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scale = scaler.get_scale()
        scaler.step(opt)  # skipped when the gradients hold inf/NaN
        scaler.update()
        if scaler.get_scale() < scale:
            prog.skipped_steps += 1
            log(f"[narvl] step {step}: fp16 gradients overflowed (loss {loss_value}); step skipped, "
                f"scale {scale:g} -> {scaler.get_scale():g}")
        return
    if not math.isfinite(loss_value):
        sys.exit(f"error: loss is {loss_value} at step {step} (no optimizer step was taken; "
                 f"the last checkpoint is {ckpt_path})")
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def save(args, s: Setup, opt, scaler, prog: Progress, done: int, t0: float, ckpt_path: str):
    train_state = dict(counts=prog.counts, losses=prog.losses, skipped_steps=prog.skipped_steps)
    if args.fp16:
        train_state["scaler"] = scaler.state_dict()
    save_checkpoint(ckpt_path, s.model, opt, meta=dict(
        config=s.cfg.to_json(), tokenizer=s.tok.to_json(), arch=args.arch, task=args.task,
        step=str(done), peft=json.dumps(s.peft), soft_prompt=json.dumps(not args.no_soft_prompt),
        train_seconds=str(prog.train_seconds + time.time() - t0), train_state=json.dumps(train_state)))


def train(args, s: Setup, rank: int, world: int) -> tuple[float, dict]:
    """The training loop. Returns (training seconds, the report of what training could not use
    and the loss curve, for metrics.json)."""
    data, distill_info = training_data(args, s, rank, world)
    cfg, ckpt_path = s.cfg, os.path.join(args.out, "last.safetensors")
    steps = total_steps(args, len(data), DEFAULT_STEPS[args.task])
    opt, params = make_optimizer(args, s.model)
    lr, sched = learning_rate(args), lr_schedule(steps, args.warmup)
    scaler = torch.amp.GradScaler("cpu", enabled=args.fp16)
    prog = resume_progress(args, s, opt, scaler)
    ddp = s.model if world == 1 else torch.nn.parallel.DistributedDataParallel(s.model, find_unused_parameters=s.peft)
    set_train_mode(args, s)
    bar = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=steps, initial=prog.start, desc=f"{args.task}/{args.arch}", dynamic_ncols=True)
    log = bar.write if bar is not None else print
    amp = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    n_queries = cfg.num_queries if args.arch == "narvl" else None
    end = steps if args.stop_after is None else min(steps, args.stop_after)
    t0, loss_ema = time.time(), None
    for step in range(prog.start, end):
        idx = batch_indices(step, args.batch_size, len(data), args.seed)[rank::world]
        stats = {}
        images, text, targets, lengths, weights = data.batch(idx, s.tok, cfg.max_text_len, cfg.max_target_len,
                                                             stats=stats)
        epoch = str(step * args.batch_size // len(data))
        infeasible = int((narvl.ctc_min_frames(targets, lengths) > n_queries).sum()) if n_queries else 0
        prog.count(epoch, stats.get("cut", 0), infeasible, len(idx))
        if rank == 0 and (str((step + 1) * args.batch_size // len(data)) != epoch or step + 1 == end):
            log_epoch(log, cfg, prog, epoch, n_queries)  # an epoch ends (or training does)
        for g in opt.param_groups:
            g["lr"] = lr * sched(step)
        with torch.autocast("cpu", amp, enabled=amp is not None):
            loss = ddp(images, text, targets, lengths, weights if args.task == "vqa" else None)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if world > 1:  # log the global batch's loss: the mean of the ranks' (equal-sized) shards
            lt = loss.detach().clone()
            torch.distributed.all_reduce(lt)
            lv = lt.item() / world
        else:
            lv = loss.item()
        optimizer_step(args, lv, step, opt, scaler, params, prog, log, ckpt_path)
        prog.losses.append(round(lv, 5) if math.isfinite(lv) else None)  # JSON has no inf/NaN
        if math.isfinite(lv):
            loss_ema = lv if loss_ema is None else 0.95 * loss_ema + 0.05 * lv
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_ema:.3f}" if loss_ema is not None else "-",
                            lr=f"{opt.param_groups[0]['lr']:.1e}")
        if rank == 0 and ((step + 1) % args.ckpt_every == 0 or step + 1 == end):
            save(args, s, opt, scaler, prog, step + 1, t0, ckpt_path)
    if bar is not None:
        bar.close()
    prog.train_seconds += time.time() - t0
    prog.reduce_counts(world)
    return prog.train_seconds, training_report(args, s, data, prog, n_queries, rank, distill_info)


def training_report(args, s: Setup, data, prog: Progress, n_queries, rank, distill_info):
    """metrics.json's account of what training could not use (printed on one line too)."""
    c, cfg = prog.counts, s.cfg
    report = {} if distill_info is None else {"distillation": distill_info}
    report.update(
        max_target_len=cfg.max_target_len,
        targets_cut=sum(c["cut"].values()), targets_cut_per_epoch=c["cut"],
        infeasible=sum(c["infeasible"].values()) if n_queries else None,
        infeasible_per_epoch=c["infeasible"] if n_queries else None,
        trained_samples_per_epoch=c["samples"], skipped_steps=prog.skipped_steps,
        train_set=dict(samples=len(data), cut=data.count_cut(s.tok, cfg.max_target_len), skipped=data.skipped),
        losses=prog.losses)
    if rank == 0:
        print(f"[narvl] training used {sum(c['samples'].values())} samples: "
              f"{report['targets_cut']} targets cut at {cfg.max_target_len} tokens"
              + (f", {report['infeasible']} infeasible for {n_queries} queries" if n_queries else "")
              + (f", {prog.skipped_steps} fp16 steps skipped" if args.fp16 else ""))
    return report


def save_results(args, out: dict, n_examples: int = 3):
    """Writes ``out`` to OUT/metrics.json, prints the first evaluation outputs against their
    references, and plots the training losses (if any) into OUT/curve.png."""
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(out, f, indent=2)
    for e in out["examples"][:n_examples]:
        print(f"[narvl]   {e['text'].strip()!r} -> {e['pred']!r} (reference {e['target']!r})")
    if out.get("losses"):
        curve = training_curve(os.path.join(args.out, "curve.png"), out["losses"],
                               f"{args.task} / {args.arch}: {out['metric_name']} {out['metric']:.1f} "
                               f"after {len(out['losses'])} steps")
        print(f"[narvl] loss curve -> {curve}" if curve else
              "[narvl] loss curve skipped: matplotlib is not installed (pip install 'narvl[plot]')")


def write_metrics(args, s: Setup, eval_data, train_seconds, report, world):
    """Evaluates, writes OUT/metrics.json and prints the one-line summary."""
    cfg, model = s.cfg, s.model
    n_train, n_all, frac = trainable_fraction(model)
    # the served model's size: joint training's auxiliary AR decoder is never run at inference
    aux = getattr(model, "aux_decoder", None)
    aux_params = sum(p.numel() for p in aux.parameters()) if aux is not None else 0
    n_all -= aux_params
    n_train -= sum(p.numel() for p in aux.parameters() if p.requires_grad) if aux is not None else 0
    frac = n_train / max(n_all, 1)
    infer = serving_copy(model, args)
    metric, latency, extra, examples = evaluate(infer, eval_data, s.tok, args.task,
                                                args.beam, args.latency_samples, cfg.max_text_len, args.bf16)
    narvl_only = (lambda v: v) if args.arch == "narvl" else (lambda v: None)
    out = dict(task=args.task, arch=args.arch, preset=cfg.preset, metric_name=METRIC[args.task],
               metric=round(metric, 2), latency_ms=round(latency, 2), params=n_all,
               trainable_params=n_train, trainable_fraction=round(frac, 6),
               train_seconds=round(train_seconds, 1), beam=args.beam, image_size=cfg.image_size,
               num_queries=narvl_only(cfg.num_queries), glance_ratio=narvl_only(cfg.glance_ratio),
               glance_plain_weight=narvl_only(cfg.glance_plain_weight),
               aux_ar_weight=narvl_only(cfg.aux_ar_weight), aux_decoder_params=aux_params,
               layer_ctc_weight=narvl_only(cfg.layer_ctc_weight),
               refine_steps=narvl_only(cfg.refine_steps),
               entangle_position_embedding=cfg.entangle_position_embedding, lr=learning_rate(args),
               warmup=args.warmup, dropout=cfg.dropout, eval_samples=len(eval_data), threads=torch.get_num_threads(),
               world_size=world, backend=settings.current()["NARVL_BACKEND"],
               precision="bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
               serve_dtype=str(infer.embed_tokens.weight.dtype).replace("torch.", ""), **extra, **report,
               examples=examples)
    save_results(args, out)
    trainable = f" trainable {100 * frac:.2f}%" if s.peft else ""
    print(f"[narvl] task={args.task} arch={args.arch} {METRIC[args.task]}={metric:.2f} "
          f"latency={latency:.2f} ms/sample params={n_all / 1e6:.1f}M{trainable} "
          f"train={train_seconds:.0f}s -> {os.path.join(args.out, 'metrics.json')}")


def run(args):
    """One architecture: build, train (unless --eval-only), evaluate. Returns (model, tokenizer)
    on rank 0."""
    rank, world = dist_setup()
    torch.manual_seed(args.seed + rank)
    os.makedirs(args.out, exist_ok=True)
    s = build(args)
    eval_data = load_data(args, "eval", s.cfg.image_size)
    train_seconds, report = 0.0, {}
    if not args.eval_only:
        train_seconds, report = train(args, s, rank, world)
    if rank == 0:
        write_metrics(args, s, eval_data, train_seconds, report, world)
    if world > 1:
        torch.distributed.destroy_process_group()
    return (s.model, s.tok) if rank == 0 else None


def run_epalm(args):
    """--arch epalm / epalm-nar: the frozen OPT and ViT (--lm / --vision, else pretrained into
    OUT/pretrained or reused from there), the adapter trained on them (OUT/adapter.safetensors),
    then the evaluation (OUT/metrics.json), as ``narvl.models.epalm_pretrain`` describes."""
    from narvl.models import epalm_pretrain as ep  # needs transformers
    from narvl.models.epalm import EPALM

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.exit(f"error: --arch {args.arch} runs in one process (no torchrun)")
    os.makedirs(args.out, exist_ok=True)
    train_data = load_data(args, "train", args.image_size)
    tok = make_tokenizer(train_data if args.data else None, args.bpe_vocab, args.num_bins)
    eval_data = load_data(args, "eval", args.image_size)

    def recipe(steps, lr):
        return ep.Recipe(steps, args.batch_size, lr, args.warmup, args.weight_decay, args.seed, lr_schedule,
                         batch_indices, progress=not args.no_progress)

    pretrained = os.path.join(args.out, "pretrained")
    nar = args.arch == "epalm-nar"
    max_target_len = args.max_target_len or TASK_QUERIES[args.task]
    lr = args.lr or ep.ADAPTER_LR
    steps = total_steps(args, len(train_data), ep.ADAPTER_STEPS)
    try:
        lm, lm_record = ep.language_model(args.lm, os.path.join(pretrained, "lm"), tok, train_data,
                                          recipe(args.lm_steps, ep.PRETRAIN_LR))
        vision, vision_record = ep.vision_model(args.vision, os.path.join(pretrained, "vision"), args.image_size,
                                                args.train_size, recipe(args.vision_steps, ep.PRETRAIN_LR))
        torch.manual_seed(args.seed)
        model = EPALM(lm, vision, "nar" if nar else "ar", (args.queries or TASK_QUERIES[args.task]) if nar else None)
        losses, train_seconds, cut = ep.train_adapter(model, train_data, tok, recipe(steps, lr), MAX_TEXT_LEN,
                                                      max_target_len)
    except (ValueError, FloatingPointError) as e:  # a bad --lm / --vision, or a diverged loss
        sys.exit(f"error: {e}")
    adapter = os.path.join(args.out, "adapter.safetensors")
    model.save_adapter(adapter)
    metric, latency, extra, examples = evaluate(ep.Served(model, max_target_len), eval_data, tok, args.task,
                                                args.beam, args.latency_samples, MAX_TEXT_LEN)
    n_train, n_all, frac = model.trainable_fraction()
    out = dict(task=args.task, arch=args.arch, metric_name=METRIC[args.task], metric=round(metric, 2),
               latency_ms=round(latency, 2), params=n_all, trainable_params=n_train,
               trainable_fraction=round(frac, 6), train_seconds=round(train_seconds, 1), beam=args.beam,
               image_size=args.image_size, **ep.settings(model), lr=lr, warmup=args.warmup, steps=steps,
               batch_size=args.batch_size, eval_samples=len(eval_data), threads=torch.get_num_threads(),
               world_size=1, backend=settings.current()["NARVL_BACKEND"], precision="fp32", **extra,
               max_target_len=max_target_len, targets_cut=cut, adapter=adapter, losses=losses,
               pretraining=dict(lm=lm_record, vision=vision_record), examples=examples)
    save_results(args, out)
    print(f"[narvl] task={args.task} arch={args.arch} {METRIC[args.task]}={metric:.2f} "
          f"latency={latency:.2f} ms/sample params={n_all / 1e6:.1f}M trainable {100 * frac:.2f}% "
          f"train={train_seconds:.0f}s -> {os.path.join(args.out, 'metrics.json')}")


if __name__ == "__main__":
    sys.exit(main())
