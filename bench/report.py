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
        if "impl" not in ei:
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


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else "bench/results/ctc_cpu.json"
    print(decode_table(path) if "decode" in path else table(path))
