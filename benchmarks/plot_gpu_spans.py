"""Where a run's added decode step sits on the GPU, from `predictor_overhead.py --gpu-marks` records:
per record, the paired (same-round) median difference of run `a` minus run `b` in each GPU span of a
replayed step (`finemoe.step_marks`): the stream's idle gap between steps, S_0's start to the last
router's end, the last router's end to the last segment's launch point, and the last segment (the
tail minus that), next to the whole step's. Prints the table it plots.

    python benchmarks/plot_gpu_spans.py --pair "finemoe device:graph-gates+gather 99%=decay-lfu:gather 99%" \
        docs/results/overhead_gpu_reference_s35e.json --out docs/results/overhead_gpu_spans_s35.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

PARTS = ("idle", "to_router", "to_last_launch", "last_segment", "step")


def parts(run: dict) -> dict[str, float]:
    """A round's spans of one run (µs): the round's medians; `last_segment` is the round's median tail
    minus its median `to_last_launch` (absent in records without it), `step` the host's median step."""
    g = run["gpu_step_us"]
    out = {"idle": g["idle"], "to_router": g["to_router"], "step": run["step_ms"] * 1e3}
    if "to_last_launch" in g:
        out["to_last_launch"] = g["to_last_launch"]
        out["last_segment"] = g["tail"] - g["to_last_launch"]
    else:
        out["to_last_launch"] = g["tail"]  # (the whole tail: not split in that record)
    return out


def paired(record: dict, a: str, b: str) -> dict[str, float]:
    """Median over rounds of `a` minus `b` per part (µs)."""
    diffs: dict[str, list[float]] = {p: [] for p in PARTS}
    for rnd in record["rounds"]:
        if a not in rnd or b not in rnd or not rnd[a].get("gpu_step_us") or not rnd[b].get("gpu_step_us"):
            continue
        pa, pb = parts(rnd[a]), parts(rnd[b])
        for p in PARTS:
            if p in pa and p in pb:
                diffs[p].append(pa[p] - pb[p])
    return {p: statistics.median(v) for p, v in diffs.items() if v}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("records", nargs="+")
    ap.add_argument("--pair", action="append", required=True, help="'run a=run b' (a minus b), repeatable")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = []
    for path in args.records:
        rec = json.loads(Path(path).read_text())
        sha = rec["meta"]["git_sha"][:7]
        for pair in args.pair:
            a, b = pair.split("=")
            got = paired(rec, a, b)
            if got:
                groups.append((f"{Path(path).stem.removeprefix('overhead_gpu_reference_')} ({sha})\n- {b}", got))
    if not groups:
        raise SystemExit("no record has GPU spans for those pairs (run predictor_overhead.py with --gpu-marks)")
    print(f"{'record, minus':<48} " + " ".join(f"{p:>14}" for p in PARTS))
    for name, got in groups:
        print(f"{name.replace(chr(10), ' '):<48} " + " ".join(f"{got.get(p, float('nan')):>+14.1f}" for p in PARTS))
    fig, ax = plt.subplots(figsize=(max(6.0, 2.2 * len(groups)), 4.2))
    width = 0.8 / len(PARTS)
    for j, p in enumerate(PARTS):
        xs = [i + (j - (len(PARTS) - 1) / 2) * width for i in range(len(groups))]
        ys = [got.get(p, 0.0) for _, got in groups]
        ax.bar(xs, ys, width, label=p.replace("_", " "))
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([n for n, _ in groups], fontsize=7)
    ax.set_ylabel("µs per decode step (paired median)")
    ax.set_title("finemoe's added step on the GPU, by span (H200, reference shape, 99%)", fontsize=9)
    ax.legend(fontsize=7, ncol=len(PARTS))
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
