"""Where the decode step's host time goes at the near-full budget, per configuration, from
`predictor_overhead.py` records (session 26 on: they carry `host_ms_per_iteration`). One panel
per record, one stacked bar per run, all from the record's last round (ms per token): blocked
in the routing syncs (the host waiting for the GPU), the serve before each launch (the slot-table
refresh apart), the launch calls, the serve after them, the predictors' timed host work, and the
rest of the step. Prints the same numbers as a table.

    python benchmarks/plot_overhead_spans.py docs/results/overhead_gpu_reference_s26b.json \
        docs/results/overhead_gpu_reference_s26c.json --out docs/results/overhead_gpu_reference_s26_spans.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PARTS = ("sync", "serve", "table", "launch", "post", "predictor", "rest")
COLORS = ("#c7d7ea", "#e6893b", "#f2c48d", "#8f6bb3", "#9bc58c", "#d1495b", "#bbbbbb")


def spans(run: dict) -> dict[str, float]:
    """ms per token of one run (one round): the parts above, summing to its step."""
    host = run.get("host_ms_per_iteration")
    if host is None:
        raise SystemExit("the record has no host spans (predictor_overhead.py records from session 26 on)")
    out = {
        "sync": host["decode_sync_s"],
        "serve": host["decode_serve_s"] - host.get("decode_table_s", 0.0),
        "table": host.get("decode_table_s", 0.0),
        "launch": host["decode_launch_s"],
        "post": host["decode_post_launch_s"],
        "predictor": run["predictor_ms_per_decode_iteration"],
    }
    out["rest"] = run["step_ms"] - sum(out.values())
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("records", nargs="+")
    ap.add_argument("--budget", default="99%", help="the runs shown: those at this budget, and all-gpu")
    ap.add_argument("--out", required=True, help="PNG path")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [(Path(p).stem, json.loads(Path(p).read_text())) for p in args.records]
    fig, axes = plt.subplots(1, len(recs), figsize=(5.5 * len(recs) + 1.6, 4.6), sharey=True, squeeze=False)
    print(f"{'record':<32} {'run':<32} {'step':>6} " + " ".join(f"{p:>9}" for p in PARTS))
    for ax, (name, rec) in zip(axes[0], recs, strict=True):
        last = rec["rounds"][-1]
        runs = [k for k in last if k.endswith(f" {args.budget}")]
        rows = [spans(last[k]) for k in runs]
        for k, r in zip(runs, rows, strict=True):
            line = " ".join(f"{r[p]:>9.2f}" for p in PARTS)
            print(f"{name:<32} {k:<32} {last[k]['step_ms']:>6.2f} {line}")
        bottom = [0.0] * len(runs)
        labels = [k.removesuffix(f" {args.budget}").replace("finemoe ", "finemoe\n").replace("+", "\n+") for k in runs]
        for part, color in zip(PARTS, COLORS, strict=True):
            vals = [max(r[part], 0.0) for r in rows]
            ax.bar(labels, vals, bottom=bottom, color=color, label=part)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        base = last.get("all-gpu 100%", {}).get("step_ms")
        if base:
            ax.axhline(base, color="black", lw=0.8, ls="--", label="100% step (one graph)")
            ax.axhline(base * 1.02, color="black", lw=0.8, ls=":", label="+2% (issue 4's target)")
        sha = rec.get("meta", {}).get("git_sha", "")[:7]
        ax.set_title(f"{name} ({sha}), last round, {args.budget}", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    axes[0][0].set_ylabel("ms per token")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
