"""Bars of two `finemoe simulate --json` records side by side: TPOT relative to the shape's all-GPU
replay, per (shape, budget, policy), for an A/B of one switch (e.g. `--gather-absent`).

    python benchmarks/plot_sim_ab.py docs/results/simulator_shapes_s31_plain.json \\
        docs/results/simulator_shapes_s31_gather.json --labels plain,gather_absent \\
        --out docs/results/simulator_shapes_s31.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def tpot_rel(path: str) -> dict[tuple[str, str, str], float]:
    """(shape, budget, policy) -> TPOT / the shape's all-GPU TPOT."""
    rows = json.loads(Path(path).read_text())["results"]
    full = {r["shape"]: r["tpot_s"] for r in rows if r["policy"] == "all-gpu"}
    return {
        (r["shape"], r["budget"], r["policy"]): r["tpot_s"] / full[r["shape"]] for r in rows if r["policy"] != "all-gpu"
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--labels", default="A,B", help="two comma-separated names")
    ap.add_argument("--out", required=True, help="PNG path")
    args = ap.parse_args()
    la, lb = args.labels.split(",")
    ra, rb = tpot_rel(args.a), tpot_rel(args.b)
    keys = [k for k in ra if k in rb]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(keys)), 4.2))
    xs = range(len(keys))
    ax.bar([x - 0.2 for x in xs], [ra[k] for k in keys], 0.4, label=la)
    ax.bar([x + 0.2 for x in xs], [rb[k] for k in keys], 0.4, label=lb)
    ax.set_xticks(list(xs), [f"{s}\n{b} {p}" for s, b, p in keys], rotation=90, fontsize=7)
    ax.axhline(1.0, color="grey", lw=0.8)
    lo = min(min(ra[k], rb[k]) for k in keys)
    ax.set_ylim(min(0.98, lo - 0.02), None)
    ax.set_ylabel("TPOT / all-GPU TPOT (simulated)")
    ax.set_title(f"{Path(args.a).stem} vs {Path(args.b).stem}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    for k in keys:
        print(f"{k[0]:<20} {k[1]:>5} {k[2]:<10} {la} {ra[k]:.3f}  {lb} {rb[k]:.3f}  ({rb[k] / ra[k] - 1:+.1%})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
