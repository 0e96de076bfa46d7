"""How cheap must the predictor be on the host for prediction to pay? A sweep in the simulator.

finemoe's decode plans cost host time in every layer. In the replay that time is charged on the
critical path, per layer in which predictors run (`--predict-host-us`, `CostModel.predict_host_s`).
The sweep compares finemoe at several such costs (`--graphed`: the graphed engine's order, the host
and the GPU on their own timelines, so host time overlaps the copies and the GPU's work; give the
host's other work with `--layer-host-us` and `--victim-host-us`, or it idles) with:

- `lru`, the baseline;
- finemoe's eviction alone: decayed LFU with the prefill sweep and no predictor, which is what the
  adaptive duty leaves running when it pauses prediction;
- finemoe planning without copies (`prefetch_copies=False`) at the same host costs: the plans' host
  time and eviction hints, no prefetch (what the `s20q3` device run measures).

The cost model is calibrated to a measured graphed all-gpu step (`--layer-overhead-us`). The
break-even is the host cost at which finemoe's TPOT reaches its eviction alone's: above it,
pausing prediction is faster. Writes a JSON record and a plot; `--measured-us` marks what the
engine's predictor was measured to cost per layer on the GPU machine.

    python benchmarks/predictor_host_cost.py --traces gpu_traces/q128x8_test.fmt \
        --history gpu_traces/q128x8_hist.fmt --shape qwen3-30b-a3b --layer-overhead-us 230 \
        --measured-us 280 --out docs/results/predictor_host_cost_qwen3.json
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import write_record  # noqa: E402
from finemoe.config import EngineConfig, ExpertBudget  # noqa: E402
from finemoe.costmodel import make_cost_model  # noqa: E402
from finemoe.sim_history import empty_history, record_history  # noqa: E402
from finemoe.simulator import simulate  # noqa: E402
from finemoe.trace import load_trace  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--traces", required=True)
    ap.add_argument("--history", required=True, help="a trace whose maps preload the stores")
    ap.add_argument("--limit", type=int, default=8, help="requests of --traces replayed")
    ap.add_argument("--shape", required=True)
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--layer-overhead-us", type=float, required=True, help="calibrates the all-gpu step")
    ap.add_argument("--host-us", default="0,5,10,20,40,80,160,280", help="predictor host µs per layer")
    ap.add_argument("--measured-us", type=float, help="the engine's measured predictor µs per layer (plot)")
    ap.add_argument(
        "--graphed",
        action="store_true",
        help="decode as the engine's CUDA graphs run it: the predictors' host time after the layer's copies",
    )
    ap.add_argument(
        "--layer-host-us",
        type=float,
        default=0.0,
        help="with --graphed: the host's other work per layer after the launch (every run; calibration)",
    )
    ap.add_argument("--victim-host-us", type=float, default=0.0, help="host µs per victim search (every run)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    trace = load_trace(args.traces).head(args.limit)
    history = empty_history(trace, 1000)
    record_history(load_trace(args.history), history)
    budget = ExpertBudget.parse(args.budget)

    def cost(host_us: float):
        return make_cost_model(
            trace.spec,
            args.shape,
            layer_overhead_s=args.layer_overhead_us * 1e-6,
            predict_host_s=host_us * 1e-6,
            layer_host_s=args.layer_host_us * 1e-6,
            victim_host_s=args.victim_host_us * 1e-6,
        )

    def row(name: str, host_us: float | None, r) -> dict:
        print(
            f"{name:<22} host {'' if host_us is None else f'{host_us:5.0f} µs'}  TPOT {r.tpot_s * 1e3:7.2f} ms  "
            f"hit {r.hit_rate:.3f}"
        )
        return {
            "run": name,
            "host_us": host_us,
            "tpot_s": r.tpot_s,
            "ttft_s": r.ttft_s,
            "hit_rate": r.hit_rate,
            "precision": r.stats.get("prefetch_precision"),
            "prefetches_issued": r.stats.get("prefetches_issued"),
        }

    floor = simulate(trace, EngineConfig(policy="all-gpu", expert_budget=budget), cost(0), "timed")
    print(f"all-gpu TPOT {floor.tpot_s * 1e3:.2f} ms (calibrate --layer-overhead-us to the measured step)")
    g = args.graphed
    lru = EngineConfig(policy="lru", expert_budget=budget)
    rows = [row("lru", None, simulate(trace, lru, cost(0), "timed", graphed=g))]
    alone = EngineConfig(policy="on-demand", eviction="decay-lfu", prefill_eviction="sweep", expert_budget=budget)
    rows.append(row("eviction alone", None, simulate(trace, alone, cost(0), "timed", graphed=g)))
    fine = EngineConfig(policy="finemoe", expert_budget=budget, map_store_learn=False)
    plans_only = dataclasses.replace(fine, prefetch_copies=False)
    for us in (float(x) for x in args.host_us.split(",")):
        for name, config in (("finemoe", fine), ("plans only", plans_only)):
            rows.append(row(name, us, simulate(trace, config, cost(us), "timed", history, graphed=args.graphed)))
    base = rows[1]["tpot_s"]
    sweep = [r for r in rows if r["run"] == "finemoe"]
    breakeven = None
    for a, b in zip(sweep, sweep[1:], strict=False):
        if a["tpot_s"] <= base < b["tpot_s"]:  # linear between the two costs around it
            share = (base - a["tpot_s"]) / (b["tpot_s"] - a["tpot_s"])
            breakeven = a["host_us"] + share * (b["host_us"] - a["host_us"])
    if sweep and sweep[0]["tpot_s"] > base:
        breakeven = 0.0  # prediction does not pay even for free
    print(f"break-even: {'above the sweep' if breakeven is None else f'{breakeven:.0f} µs'} per layer")
    write_record(args.out, vars(args), rows, all_gpu_tpot_s=floor.tpot_s, breakeven_host_us=breakeven)
    plot(rows, Path(args.out).with_suffix(".png"), args, breakeven)
    return 0


def plot(rows: list[dict], path: Path, args, breakeven: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for run, style in (("finemoe", "o-"), ("plans only", "x--")):
        sweep = [r for r in rows if r["run"] == run]
        label = "finemoe" if run == "finemoe" else "finemoe planning, no copies"
        ax.plot([r["host_us"] for r in sweep], [r["tpot_s"] * 1e3 for r in sweep], style, label=label)
    for r, style in zip(rows[:2], ("--", ":"), strict=True):
        ax.axhline(r["tpot_s"] * 1e3, ls=style, color="grey", label=r["run"])
    if args.measured_us:
        label = f"measured on the GPU host ({args.measured_us:.0f} µs)"
        ax.axvline(args.measured_us, color="tab:red", lw=0.8, label=label)
    if breakeven is not None:
        ax.axvline(breakeven, color="tab:green", lw=0.8, label=f"break-even ({breakeven:.0f} µs)")
    ax.set_xlabel("predictor host time per layer on the critical path (µs)")
    ax.set_ylabel("simulated TPOT (ms)")
    order = "graphed decode: host time after the copies" if args.graphed else "host time before the copies"
    ax.set_title(f"{args.shape}, {args.budget}: what prediction is worth\n({order})", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
