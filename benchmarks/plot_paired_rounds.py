"""The added decode step of one run over another, round by round, from `predictor_overhead.py`
records: each round measures every run side by side, so a round's difference is a paired sample
(the host's noise moves both). One column per (record, pair); the target line is 2% of the record's
median all-GPU step. Optionally a second panel from a `catch_up_probe.py` record: the fused match's
µs per layer, per shape, default tile against the session-28 tile (64 rows, 4 warps). Prints the
medians.

    python benchmarks/plot_paired_rounds.py --pair "finemoe device:graph-gates+gather 99%=lru:gather 99%" \
        docs/results/overhead_gpu_reference_s31c.json docs/results/overhead_gpu_reference_s32c.json \
        --probe docs/results/catch_up_probe_s32.json --out docs/results/overhead_paired_s32.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def paired(record: dict, a: str, b: str) -> list[float]:
    """ms per round of run `a` minus run `b` (rounds that have both)."""
    return [r[a]["step_ms"] - r[b]["step_ms"] for r in record["rounds"] if a in r and b in r]


def short(run: str) -> str:
    """A run's name for a tick label: a finemoe run's mode flags, another run's whole name, the budget
    dropped, each flag after the second on a line of its own."""
    head = run.rsplit(" ", 1)[0]
    flags = head.split(":", 1)[1].split("+") if head.startswith("finemoe ") and ":" in head else head.split("+")
    return "+".join(flags[:2]) + "".join(f"\n+{f}" for f in flags[2:])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("records", nargs="+")
    ap.add_argument("--pair", action="append", required=True, help="'run a=run b' (a minus b), repeatable")
    ap.add_argument("--probe", help="a catch_up_probe.py record for a second panel")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols, target = [], []
    for path in args.records:
        rec = json.loads(Path(path).read_text())
        full = statistics.median(r["all-gpu 100%"]["step_ms"] for r in rec["rounds"])
        for pair in args.pair:
            a, b = pair.split("=")
            diffs = paired(rec, a, b)
            if diffs:
                label = Path(path).stem.removeprefix("overhead_gpu_reference_")
                if len(args.pair) > 1:
                    label += f"\n{short(a)}\nminus {short(b)}"
                cols.append((label, diffs))
                target.append(0.02 * full)
                print(
                    f"{Path(path).name:<40} {a} - {b}: median {statistics.median(diffs):+.3f} ms "
                    f"over {len(diffs)} rounds ({min(diffs):+.3f}..{max(diffs):+.3f}); 2% = {0.02 * full:.3f}"
                )
    panels = 2 if args.probe else 1
    fig, axes = plt.subplots(1, panels, figsize=(max(6 + 4 * panels, 1.8 * len(cols)), 5), squeeze=False)
    ax = axes[0][0]
    for i, (_label, diffs) in enumerate(cols):
        ax.scatter([i] * len(diffs), diffs, color="#d1495b", alpha=0.7, zorder=3)
        ax.hlines(statistics.median(diffs), i - 0.3, i + 0.3, color="black", zorder=4)
        ax.hlines(target[i], i - 0.4, i + 0.4, color="#2a9d8f", linestyles="dashed", zorder=2)
    ax.axhline(0, color="#999999", lw=0.8)
    ax.set_xticks(range(len(cols)), [c[0] for c in cols], fontsize=7)
    ax.set_ylabel("ms per decode step, paired per round")
    what = args.pair[0].replace("=", " minus ") if len(args.pair) == 1 else "each pair below"
    ax.set_title(f"{what}, per round\n(bar: median; dashed: 2% of all-GPU)", fontsize=9)
    if args.probe:
        probe = json.loads(Path(args.probe).read_text())["results"]
        ax2 = axes[0][1]
        shapes = list(dict.fromkeys(r["shape"] for r in probe))
        for j, config in enumerate(("64x4", "default")):
            ys = []
            for shape in shapes:
                rows = [r for r in probe if r["shape"] == shape and r["config"] == config]
                one = next((r["us"] for r in rows if r["layers"] == 1), float("nan"))
                many = max(rows, key=lambda r: r["layers"]) if rows else None
                ys.append((one, many["us"] / many["layers"] if many else float("nan")))
            xs = [k + (j - 0.5) * 0.35 for k in range(len(shapes))]
            label = "session 28 tile (64 rows, 4 warps)" if config == "64x4" else "this session's default tile"
            ax2.bar(xs, [y[0] for y in ys], width=0.35, label=f"{label}: one layer", alpha=0.85)
            ax2.scatter(xs, [y[1] for y in ys], color="black", marker="_", s=200, zorder=3)
        ax2.set_xticks(range(len(shapes)), shapes, fontsize=8)
        ax2.set_ylabel("µs per launch of one layer (tick: per layer, many caught up)")
        ax2.set_title("fused match on one SM (H200, 1,000 maps)", fontsize=9)
        ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
