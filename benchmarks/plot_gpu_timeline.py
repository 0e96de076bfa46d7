"""The GPU's side of graphed decode steps, per configuration, from `decode_gpu_timeline.py`
records: per step (median, ms) the segments' kernels, the segments' spans beyond them, the GPU
idle between segments (the host's sync, serve and launch), and beside them the predictors' side
graphs. Profiling inflates the host's share (the gaps); the segment spans are the GPU's own. One
panel per record; prints the numbers as a table.

    python benchmarks/plot_gpu_timeline.py docs/results/decode_gpu_timeline_s28.json \\
        docs/results/decode_gpu_timeline_s28d.json --out docs/results/decode_gpu_timeline_s28.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PARTS = ("kernels", "segment gaps", "idle between segments")
COLORS = ("#4c72b0", "#9db4d8", "#dddddd")


def parts(result: dict) -> dict[str, float]:
    """ms per step of one configuration: the parts above (summing to the step's GPU span) and the
    side graphs' span."""
    m = result["median_per_step_ms"]
    return {
        "kernels": m["seg_busy"],
        "segment gaps": m["seg_span"] - m["seg_busy"],
        "idle between segments": m["gaps"],
        "side graphs": m["side_span"],
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("records", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [(Path(p).stem, json.loads(Path(p).read_text())) for p in args.records]
    rows = max(len(r["results"]) for _, r in recs)
    fig, axes = plt.subplots(len(recs), 1, figsize=(10, 0.55 * rows * len(recs) + 1.2), squeeze=False)
    for ax, (title, rec) in zip(axes[:, 0], recs, strict=True):
        names = list(rec["results"])
        print(title)
        for i, name in enumerate(names):
            got = parts(rec["results"][name])
            left = 0.0
            for part, color in zip(PARTS, COLORS, strict=True):
                ax.barh(i, got[part], left=left, color=color, label=part if i == 0 else None)
                left += got[part]
            ax.barh(i + 0.32, got["side graphs"], height=0.18, color="#d1495b", label="side graphs" if i == 0 else None)
            print(f"  {name:<45} " + ", ".join(f"{k} {v:.3f}" for k, v in got.items()))
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
        ax.set_title(f"{title}: GPU time per decode step (profiled, medians)")
        ax.set_xlabel("ms per step")
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
