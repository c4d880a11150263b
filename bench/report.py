"""Renders a pytest-benchmark JSON of bench_ctc.py as a markdown table (narvl vs torch).

    python bench/report.py bench/results/ctc_cpu.json
"""
import json
import sys

from setups import CTC_SHAPES


def table(path):
    d = json.load(open(path))
    rows = {}
    for b in d["benchmarks"]:
        ei = b.get("extra_info", {})
        if "impl" not in ei or not b["name"].startswith("test_ctc["):
            continue
        shape = b["params"]["shape"]
        key = (list(CTC_SHAPES).index(shape), shape, b["params"]["mode"], ei["threads"])
        rows.setdefault(key, {})[ei["impl"]] = b["stats"]["median"] * 1e3
    out = []
    for (_, shape, mode, thr), r in sorted(rows.items()):
        B, N, V, lo, hi = CTC_SHAPES[shape]
        out.append(f"| {shape} ({B}, {N}, {V}, {lo}..{hi}) | {mode} | {thr} | {r['narvl']:.2f} | "
                   f"{r['torch']:.2f} | {r['torch'] / r['narvl']:.1f}x |")
    return "\n".join(out)


def floor_table(path):
    """bench_ctc.py's bandwidth-floor entries: narvl's median next to the floor measured in the
    same run, with the CPU model."""
    d = json.load(open(path))
    out = []
    for b in d["benchmarks"]:
        ei = b.get("extra_info", {})
        if b["name"].startswith("test_ctc_bandwidth_floor"):
            out.append((list(CTC_SHAPES).index(b["params"]["shape"]), b["params"]["shape"],
                        ei["mode"], ei["threads"], ei))
    rows = []
    for _, shape, mode, thr, ei in sorted(out, key=lambda r: r[:4]):
        rows.append(f"| {ei['cpu_model']} | {shape} | {mode} | {thr} | {ei['read_gbps']:.1f} | {ei['copy_gbps']:.1f} | "
                    f"{ei['floor_ms']:.2f} | {ei['narvl_ms']:.2f} | {ei['ratio_to_floor']:.2f}x |")
    return "\n".join(rows)


def decode_table(path):
    """Per-sequence times of bench_decode.py: narvl vs flashlight-text (and pyctcdecode)."""
    d = json.load(open(path))
    rows = {}
    for b in d["benchmarks"]:
        ei = b["extra_info"]
        if not b["name"].startswith("test_beam"):
            continue
        key = (ei["impl"] == "pyctcdecode", b["params"].get("shape"), ei["beam"], ei["threads"])
        rows.setdefault((b["params"].get("shape"), ei["beam"], ei["threads"]), {})[ei["impl"]] = (
            b["stats"]["median"] * 1e3 / ei["per"])
    order = {s: i for i, s in enumerate(["vqa", "caption", "asr"])}
    out = []
    for (shape, beam, thr), r in sorted(rows.items(), key=lambda kv: (order[kv[0][0]], kv[0][1], kv[0][2])):
        fl = r.get("flashlight")
        ratio = f"{fl / r['narvl']:.1f}x" if fl else "-"
        py = f"{r['pyctcdecode']:.2f}" if "pyctcdecode" in r else "-"
        out.append(f"| {shape} | {beam} | {thr} | {r['narvl']:.3f} | "
                   f"{fl if fl is None else round(fl, 3)} | {py} | {ratio} |".replace("None", "-"))
    return "\n".join(out)


def model_table(path):
    """bench_model.py: NARVL vs AR generation (ms per call) over output length, and the train
    step with the narvl kernels vs the reference backend."""
    d = json.load(open(path))
    gen, step = {}, {}
    for b in d["benchmarks"]:
        ei = b["extra_info"]
        med = b["stats"]["median"] * 1e3
        if b["name"].startswith("test_generate"):
            gen.setdefault((ei["batch"], ei["out_len"], ei["threads"]), {})[ei["arch"]] = med
        elif b["name"].startswith("test_train_step"):
            step.setdefault(ei["threads"], {})[ei["backend"]] = med
    out = ["| batch | output length | threads | NARVL ms | AR ms | AR / NARVL |", "|---|---|---|---|---|---|"]
    for (bs, L, thr), r in sorted(gen.items()):
        out.append(f"| {bs} | {L} | {thr} | {r['narvl']:.1f} | {r['ar']:.1f} | {r['ar'] / r['narvl']:.1f}x |")
    out += ["", "| train step (batch 16) | threads | narvl kernels ms | reference ms | speed-up |",
            "|---|---|---|---|---|"]
    for thr, r in sorted(step.items()):
        out.append(f"| NARVL tiny caption, V 59,458 | {thr} | {r['auto']:.0f} | {r['reference']:.0f} | "
                   f"{r['reference'] / r['auto']:.2f}x |")
    return "\n".join(out + backbone_rows(d))


def backbone_rows(d):
    """bench_model.py test_backbone: the ResNet stages eval / BN-folded / packed, medians."""
    bb = {}
    for b in d["benchmarks"]:
        ei = b["extra_info"]
        if "variant" in ei:
            bb.setdefault((ei["batch"], ei["threads"]), {})[ei["variant"]] = b["stats"]["median"] * 1e3
    if not bb:
        return []
    out = ["", "| ResNet-50 stages 1-3, 64 px | batch | threads | eval ms | BN folded ms | packed ms | "
           "packed vs folded |", "|---|---|---|---|---|---|---|"]
    for (bs, thr), r in sorted(bb.items()):
        out.append(f"| tiny preset | {bs} | {thr} | {r['eval']:.2f} | {r['folded']:.2f} | {r['packed']:.2f} | "
                   f"{r['folded'] / r['packed']:.2f}x |")
    return out


def task_table(path):
    """bench_tasks.py: per-sample batch-1 latency of trained NARVL and AR checkpoints, from the
    median round and from each sample's best round ("best")."""
    d = json.load(open(path))
    rows = {}
    for b in d["benchmarks"]:
        ei = b["extra_info"]
        if not b["name"].startswith("test_task_latency"):  # e.g. the packing comparison
            continue
        for arch in ("narvl", "ar"):
            ms = sorted(ei[f"{arch}_ms"])
            rows.setdefault(ei["task"], {})[arch] = (ms[len(ms) // 2], ei[f"{arch}_best_ms"])
    out = ["| task | NARVL ms (median / best) | AR ms (median / best) | speed-up (median / best) |",
           "|---|---|---|---|"]
    for task in ("caption", "vqa", "grounding", "entailment"):
        if task in rows and len(rows[task]) == 2:
            (nm, nb), (am, ab) = rows[task]["narvl"], rows[task]["ar"]
            out.append(f"| {task} | {nm:.2f} / {nb:.2f} | {am:.2f} / {ab:.2f} | {am / nm:.2f}x / {ab / nb:.2f}x |")
    return "\n".join(out)


def linear_table(path):
    """bench_linear.py: narvl.ops.linear vs F.linear (+ F.gelu), medians in ms."""
    d = json.load(open(path))
    lin = {}
    for b in d["benchmarks"]:
        ei = b["extra_info"]
        if "impl" in ei:
            key = (ei.get("mode", "fwd"), ei["shape"], ei["rows"], ei["threads"])
            lin.setdefault(key, {})[ei["impl"]] = b["stats"]["median"] * 1e3
    out = ["| linear | mode | rows | threads | narvl ms | ATen ms | speed-up | narvl-packed ms | packed vs ATen |",
           "|---|---|---|---|---|---|---|---|---|"]
    for (mode, name, rows, thr), r in sorted(lin.items()):
        p = r.get("narvl-packed")
        packed = f"{p:.3f} | {r['aten'] / p:.2f}x" if p else "- | -"
        out.append(f"| {name} | {mode} | {rows} | {thr} | {r['narvl']:.3f} | {r['aten']:.3f} | "
                   f"{r['aten'] / r['narvl']:.2f}x | {packed} |")
    return "\n".join(out)


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else "bench/results/ctc_cpu.json"
    if "linear" in path:
        print(linear_table(path))
    elif "model" in path:
        print(model_table(path))
    elif "tasks" in path:
        print(task_table(path))
    else:
        print(decode_table(path) if "decode" in path else table(path))
    if "ctc" in path:
        print()
        print(floor_table(path))
