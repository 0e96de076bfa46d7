"""Plots and markdown tables of the policy study (benchmarks/policy_study.py output).

python benchmarks/plot_study.py --dir docs/results
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DASHED = ("belady", "oracle")


def load(d: Path, part: str) -> list[dict] | None:
    p = d / f"study_{part}.json"
    return json.loads(p.read_text())["results"] if p.exists() else None


def pct(b: str) -> float:
    return float(b.rstrip("%"))


def plot_budget(rows: list[dict], out: Path) -> str:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for pol in dict.fromkeys(r["policy"] for r in rows):
        pts = sorted((pct(r["budget"]), r["hit_rate"]) for r in rows if r["policy"] == pol)
        ax.plot(*zip(*pts, strict=True), "--" if pol in DASHED else "-", marker="o", label=pol)
    ax.set_xlabel("expert budget (% of routed experts)")
    ax.set_ylabel("expert hit rate")
    ax.set_title("reference model, workload test split (history preloaded)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    budgets = sorted({r["budget"] for r in rows}, key=pct)
    pols = list(dict.fromkeys(r["policy"] for r in rows))
    lines = ["| policy | " + " | ".join(budgets) + " |", "|---|" + "---|" * len(budgets)]
    for pol in pols:
        vals = {r["budget"]: r["hit_rate"] for r in rows if r["policy"] == pol}
        lines.append(f"| {pol} | " + " | ".join(f"{vals[b]:.3f}" for b in budgets) + " |")
    base = [p for p in pols if p not in DASHED and not p.startswith("finemoe")]
    for fm in [p for p in pols if p.startswith("finemoe")]:
        cells_b, cells_o = [], []
        for b in budgets:
            v = {r["policy"]: r["hit_rate"] for r in rows if r["budget"] == b}
            best = max(base, key=lambda p, v=v: v[p])
            cells_b.append(f"{v[fm] / v[best]:.2f}× ({best})" if v[best] > 0 else "–")
            cells_o.append(f"{v[fm] / v['oracle']:.0%}" if "oracle" in v else "–")
        lines.append(f"| {fm} / best baseline | " + " | ".join(cells_b) + " |")
        lines.append(f"| {fm} / oracle | " + " | ".join(cells_o) + " |")
    return "\n".join(lines)


def plot_tpot(rows: list[dict], out: Path) -> str:
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    lines = []
    for ax, shape in zip(axes[0], shapes, strict=True):
        sub = [r for r in rows if r["shape"] == shape]
        floor = [r for r in sub if r["policy"] == "all-gpu"]
        for pol in dict.fromkeys(r["policy"] for r in sub if r["policy"] != "all-gpu"):
            pts = sorted((pct(r["budget"]), r["tpot_ms"]) for r in sub if r["policy"] == pol)
            ax.plot(*zip(*pts, strict=True), "--" if pol in DASHED else "-", marker="o", label=pol)
        if floor:
            ax.axhline(floor[0]["tpot_ms"], color="k", lw=0.8, label="all-gpu (no offload)")
        ax.set_title(f"estimated TPOT, {shape} cost model")
        ax.set_xlabel("expert budget (%)")
        ax.set_ylabel("TPOT (ms)")
        ax.legend(fontsize=7)
        budgets = sorted({r["budget"] for r in sub if r["policy"] != "all-gpu"}, key=pct)
        lines += [f"\n**{shape}** (all-gpu floor {floor[0]['tpot_ms']:.2f} ms)\n" if floor else f"\n**{shape}**\n"]
        lines += [
            "| policy | " + " | ".join(f"{b} TPOT ms (hit)" for b in budgets) + " |",
            "|---|" + "---|" * len(budgets),
        ]
        for pol in dict.fromkeys(r["policy"] for r in sub if r["policy"] != "all-gpu"):
            vals = {r["budget"]: r for r in sub if r["policy"] == pol}
            cells = [f"{vals[b]['tpot_ms']:.2f} ({vals[b]['hit_rate']:.3f})" for b in budgets]
            lines.append(f"| {pol} | " + " | ".join(cells) + " |")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return "\n".join(lines)


def plot_simple(rows: list[dict], key: str, out: Path, ylabel: str = "hit_rate", title: str = "") -> str:
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.2), squeeze=False)
    lines = []
    for ax, shape in zip(axes[0], shapes, strict=True):
        sub = [r for r in rows if r["shape"] == shape]
        metric = "hit_rate" if shape == "trace" else ylabel
        for pol in dict.fromkeys(r["policy"] for r in sub):
            pts = sorted((r[key], r[metric]) for r in sub if r["policy"] == pol)
            ax.plot(*zip(*pts, strict=True), marker="o", label=pol)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.set_title(f"{title} ({shape})")
        if key == "capacity":
            ax.set_xscale("log")
        ax.legend(fontsize=7)
        pols = list(dict.fromkeys(r["policy"] for r in sub))
        xs = sorted({r[key] for r in sub})
        lines += [f"\n**{shape}** ({metric})\n", f"| {key} | " + " | ".join(pols) + " |", "|---|" + "---|" * len(pols)]
        for x in xs:
            cells = []
            for pol in pols:
                v = [r for r in sub if r["policy"] == pol and r[key] == x]
                if not v:
                    cells.append("–")
                elif metric == "hit_rate":
                    cells.append(f"{v[0]['hit_rate']:.3f}")
                else:
                    cells.append(f"{v[0][metric]:.2f} ({v[0]['hit_rate']:.3f})")
            lines.append(f"| {x} | " + " | ".join(cells) + " |")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="docs/results")
    args = ap.parse_args()
    d = Path(args.dir)
    if rows := load(d, "budget"):
        print("## budget\n" + plot_budget(rows, d / "study_budget.png"))
    if rows := load(d, "tpot"):
        print("## tpot\n" + plot_tpot(rows, d / "study_tpot.png"))
    if rows := load(d, "ablation"):
        print("## ablation\n| variant | hit rate | precision |\n|---|---|---|")
        for r in rows:
            print(f"| {r['variant']} | {r['hit_rate']:.3f} | {r['precision']:.3f} |")
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.barh([r["variant"] for r in rows], [r["hit_rate"] for r in rows])
        ax.invert_yaxis()
        ax.set_xlabel("hit rate (25% budget)")
        fig.tight_layout()
        fig.savefig(d / "study_ablation.png", dpi=110)
    if rows := load(d, "distance"):
        print("## distance\n" + plot_simple(rows, "distance", d / "study_distance.png", "tpot_ms", "prefetch distance"))
    if rows := load(d, "capacity"):
        print("## capacity\n" + plot_simple(rows, "capacity", d / "study_capacity.png", title="map store capacity"))
    if rows := load(d, "batch"):
        print("## batch\n" + plot_simple(rows, "batch", d / "study_batch.png", "tpot_ms", "batch size"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
