"""Where a graphed decode step's time goes, per policy, from `bench_offload.py` records: the
routing-sync wait, the predictors' timed host spans, the layers' serve before, during and after
their segments' launches (records from session 24 on), and the rest of the host's time, per
token, with everything outside the syncs and predictors per MoE layer. Prints a table and draws
stacked bars (one group per record).

    python benchmarks/host_split.py docs/results/s24_qwen3_30b_host_split.json \
        docs/results/s24_qwen3_30b_sync_copies.json --out docs/results/s24_qwen3_30b_host_split.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def split(run: dict, layers: int) -> dict[str, float]:
    """ms per token: TPOT, sync wait, predictor time, the layers' serve before / during / after
    their launches (records from session 24 on; 0 before), the rest; and the rest plus the serve
    in µs per layer."""
    tpot = run["tpot_s"] * 1e3
    sync = run.get("sync_ms_per_decode_step") or 0.0
    pred = run.get("predictor_ms_per_decode_step") or 0.0
    serve = run.get("serve_ms_per_decode_step") or 0.0
    launch = run.get("launch_ms_per_decode_step") or 0.0
    post = run.get("post_launch_ms_per_decode_step") or 0.0
    other = tpot - sync - pred - serve - launch - post
    outside = tpot - sync - pred  # everything the predictors' and syncs' counters leave out
    return {
        "tpot": tpot,
        "sync": sync,
        "pred": pred,
        "serve": serve,
        "launch": launch,
        "post": post,
        "other": other,
        "other_us_layer": outside / layers * 1e3,
    }


def engine_runs(rec: dict) -> list[dict]:
    """The offloaded runs of a record (not the plain transformers or all-GPU references)."""
    return [r for r in rec["runs"] if r.get("budget") not in (None, "100%")]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("records", nargs="+", help="bench_offload.py JSON records")
    ap.add_argument("--layers", type=int, required=True, help="MoE layers of the shape (Qwen3-30B-A3B: 48)")
    ap.add_argument("--out", required=True, help="PNG path")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels: list[str] = []
    parts: list[dict[str, float]] = []
    for i, path in enumerate(args.records):
        rec = json.loads(Path(path).read_text())
        layers = args.layers
        title = f"{rec['config']['shape']}, {rec['config']['budgets']} budget, {rec['meta']['device']}"
        print(f"\n{Path(path).name} (run {i + 1}, {layers} MoE layers)")
        print(
            f"{'policy':<72} {'tpot':>6} {'sync':>6} {'pred':>6} {'serve':>6} {'launch':>6} {'post':>6} "
            f"{'rest':>6} {'outside us/layer':>16}"
        )
        for run in engine_runs(rec):
            s = split(run, layers)
            print(
                f"{run['policy']:<72} {s['tpot']:6.2f} {s['sync']:6.2f} {s['pred']:6.2f} {s['serve']:6.2f} "
                f"{s['launch']:6.2f} {s['post']:6.2f} {s['other']:6.2f} {s['other_us_layer']:16.0f}"
            )
            short = run["policy"].replace("prediction_duty='always'", "always")
            short = short.replace("prefetch_copies=False", "no copies")
            labels.append(f"{i + 1}: {short.replace('+', ' ')}")
            parts.append(s)
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(labels) + 1.5))
    y = range(len(labels))
    left = [0.0] * len(labels)
    for key, name, color in (
        ("sync", "routing-sync wait", "#9ecae1"),
        ("pred", "predictors (timed)", "#fdae6b"),
        ("serve", "serve before launch", "#74c476"),
        ("launch", "launch call", "#31a354"),
        ("post", "serve after launch", "#006d2c"),
        ("other", "other host time", "#e6550d"),
    ):
        vals = [p[key] for p in parts]
        ax.barh(list(y), vals, left=left, color=color, label=name)
        left = [a + b for a, b in zip(left, vals, strict=True)]
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms per decode token")
    ax.set_title(f"{title}: where a decode token's time goes", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
