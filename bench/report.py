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


if __name__ == "__main__":
    print(table(sys.argv[1] if len(sys.argv) > 1 else "bench/results/ctc_cpu.json"))
