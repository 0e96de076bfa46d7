"""How good must a predictor be for prefetching to pay? A noisy oracle in the simulator.

The `oracle` predictor plans exactly the experts each layer will use, `--distances` layers ahead
(FineMoE's plan points); `noise` swaps each planned expert for a wrong one with that probability
(precision = recall = 1 - noise, same plan sizes). Prefetching over an online eviction (`lru`,
finemoe's `decay-lfu`) against that eviction alone, on a trace of the shape's expert geometry,
with the cost model calibrated to the measured graphed all-gpu step (`--layer-overhead-us`).
Writes a JSON record and a plot (TPOT over the eviction alone, per noise and distance).

    python benchmarks/oracle_noise.py --traces q60x4.fmt --limit 4 --shape qwen1.5-moe-a2.7b \
        --layer-overhead-us 213 --out docs/results/oracle_noise_qwen15.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import write_record  # noqa: E402
from finemoe.config import EngineConfig, ExpertBudget  # noqa: E402
from finemoe.costmodel import make_cost_model  # noqa: E402
from finemoe.simulator import simulate  # noqa: E402
from finemoe.trace import load_trace  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--traces", required=True)
    ap.add_argument("--limit", type=int, default=4)
    ap.add_argument("--shape", required=True)
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--layer-overhead-us", type=float, required=True)
    ap.add_argument("--evictions", default="lru,decay-lfu")
    ap.add_argument("--noises", default="0,0.1,0.2,0.3,0.4,0.5")
    ap.add_argument("--distances", default="1,2,3")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    trace = load_trace(args.traces)
    trace = trace.head(args.limit)
    cost = make_cost_model(trace.spec, args.shape, layer_overhead_s=args.layer_overhead_us * 1e-6)
    budget = ExpertBudget.parse(args.budget)
    rows = []
    floor = simulate(trace, EngineConfig(policy="all-gpu", expert_budget=budget), cost, "timed")
    print(f"all-gpu TPOT {floor.tpot_s * 1e3:.2f} ms (calibrate --layer-overhead-us to the measured step)")
    for ev in args.evictions.split(","):
        base = simulate(trace, EngineConfig(policy="lru", eviction=ev, expert_budget=budget), cost, "timed")
        print(f"{ev:>10} alone: TPOT {base.tpot_s * 1e3:.2f} ms, hit {base.hit_rate:.3f}")
        rows.append({"eviction": ev, "distance": 0, "noise": None, "tpot_s": base.tpot_s, "hit_rate": base.hit_rate})
        for d in (int(x) for x in args.distances.split(",")):
            for noise in (float(x) for x in args.noises.split(",")):
                cfg = EngineConfig(policy="oracle", eviction=ev, prefetch_distance=d, expert_budget=budget)
                r = simulate(trace, cfg, cost, "timed", oracle_noise=noise)
                rows.append(
                    {
                        "eviction": ev,
                        "distance": d,
                        "noise": noise,
                        "tpot_s": r.tpot_s,
                        "ttft_s": r.ttft_s,
                        "hit_rate": r.hit_rate,
                        "precision": r.stats.get("prefetch_precision"),
                        "vs_eviction_alone": r.tpot_s / base.tpot_s,
                    }
                )
                print(
                    f"{ev:>10} d={d} noise={noise:.1f}: TPOT {r.tpot_s * 1e3:6.2f} ms = "
                    f"{r.tpot_s / base.tpot_s:.2f}x alone, hit {r.hit_rate:.3f}"
                )
    write_record(args.out, vars(args) | {"all_gpu_tpot_s": floor.tpot_s}, rows)
    plot(rows, Path(args.out).with_suffix(".png"), args)
    return 0


def plot(rows: list[dict], path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evictions = args.evictions.split(",")
    fig, axes = plt.subplots(1, len(evictions), figsize=(6 * len(evictions), 4.2), squeeze=False)
    for ax, ev in zip(axes[0], evictions, strict=True):
        for d in sorted({r["distance"] for r in rows if r["eviction"] == ev and r["distance"]}):
            pts = [r for r in rows if r["eviction"] == ev and r["distance"] == d]
            x, y = [1 - r["noise"] for r in pts], [r["vs_eviction_alone"] for r in pts]
            ax.plot(x, y, marker="o", label=f"{d} ahead")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("predictor precision = recall (1 - noise)")
        ax.set_ylabel(f"TPOT / {ev} alone")
        ax.set_title(f"{args.shape}, {args.budget}, prefetch over {ev}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
