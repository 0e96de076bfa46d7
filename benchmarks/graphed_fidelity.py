"""Does the replay's graphed decode reproduce a measured H200 run? Side by side with its record.

The `s20q3` device run (`docs/results/s20_qwen3_30b_host_or_copies.json`: Qwen3-30B-A3B at full
depth, 25%, trace routing of `q128x8_t2` with model layer l replaying trace layer l mod 30, two
rounds of its two requests, history from `q128x8_hist`) found finemoe's prefetch copies costing
more than they saved. This replays the same setup: the traces tiled to 48 layers
(`Trace.with_layers`, as the engine's routing replay does), the two requests twice, the history's
maps preloaded, each policy in the graphed order (`simulate(..., graphed=True)`, two timelines)
and, for contrast, in the eager order (one sequential clock). Host costs per layer are the
calibration (µs of the shape): `--layer-overhead-us` fits the all-gpu graphed step, the victim
search (before the copies) and the rest of the host's work per layer (`--layer-host-us`, after
the launch) fit lru's step, and the predictors' time is the engine's own measurement
(`predictor_ms_per_decode_step` / 48: 300 µs planning only, 360 µs with the copies' issue); the
map-aware policies' bookkeeping adds `--finemoe-host-us` to their host work. Writes a JSON record
and a bar plot.

    python benchmarks/graphed_fidelity.py --traces gpu_traces/q128x8_t2.fmt \
        --history gpu_traces/q128x8_hist.fmt --out docs/results/graphed_fidelity_qwen3.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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

MEASURED = Path(__file__).resolve().parents[1] / "docs/results/s20_qwen3_30b_host_or_copies.json"
# the record's policy labels -> this script's runs
LABELS = {
    "lru": "lru",
    "finemoe+prediction_duty='always'": "finemoe",
    "finemoe+prediction_duty='always'+prefetch_copies=False": "plans only",
}


def figures(tpot_s: float, hit_rate: float, counts: dict) -> dict:
    """TPOT (ms), hit rate and prefetches issued / used / late per 100 expert uses, from `counts`
    (hits, misses, prefetches_*: a device run's record or a replay's cache stats)."""
    uses = counts["hits"] + counts["misses"]
    return {
        "tpot_ms": tpot_s * 1e3,
        "hit_rate": hit_rate,
        **{f"{k}_per_100": 100 * counts[f"prefetches_{k}"] / uses for k in ("issued", "used", "late")},
    }


def line(label: str, f: dict) -> str:
    return f"{label:<44} {f['tpot_ms']:8.2f} {f['hit_rate']:6.3f} {f['issued_per_100']:7.1f} {f['late_per_100']:6.1f}"


def measured() -> dict[str, dict]:
    """The device run's figures, by run name."""
    runs = json.loads(MEASURED.read_text())["runs"]
    return {LABELS[r["policy"]]: figures(r["tpot_s"], r["hit_rate"], r) for r in runs if r["policy"] in LABELS}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--traces", required=True, help="q128x8_t2 (the device run's routing)")
    ap.add_argument("--history", required=True, help="q128x8_hist (its history)")
    ap.add_argument("--history-requests", type=int, default=12)
    ap.add_argument("--layers", type=int, default=48, help="the shape's MoE layers (the traces are tiled to them)")
    ap.add_argument("--shape", default="qwen3-30b-a3b")
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--layer-overhead-us", type=float, default=235.0, help="fits the all-gpu graphed step")
    ap.add_argument("--victim-host-us", type=float, default=125.0, help="host µs per victim search")
    ap.add_argument("--layer-host-us", type=float, default=240.0, help="host µs per layer after the launch")
    ap.add_argument("--finemoe-host-us", type=float, default=150.0, help="finemoe's extra host µs per layer")
    ap.add_argument("--plan-us", type=float, default=300.0, help="predictor µs per layer, planning only")
    ap.add_argument("--plan-copy-us", type=float, default=360.0, help="predictor µs per layer with the copies")
    ap.add_argument("--levers", action="store_true", help="also screen finemoe's knobs in the graphed order")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    test = load_trace(args.traces)
    test = test.subset([r for _ in range(2) for r in range(min(2, test.num_requests))]).with_layers(args.layers)
    history = empty_history(test, 1000)
    record_history(load_trace(args.history).head(args.history_requests).with_layers(args.layers), history)
    budget = ExpertBudget.parse(args.budget)

    def cost(predict_us: float, extra_us: float):
        return make_cost_model(
            test.spec,
            args.shape,
            layer_overhead_s=args.layer_overhead_us * 1e-6,
            predict_host_s=predict_us * 1e-6,
            victim_host_s=args.victim_host_us * 1e-6,
            layer_host_s=(args.layer_host_us + extra_us) * 1e-6,
        )

    floor = simulate(test, EngineConfig(policy="all-gpu", expert_budget=budget), cost(0, 0), "timed")
    fine = EngineConfig(policy="finemoe", expert_budget=budget, map_store_learn=False, prediction_duty="always")
    runs = (
        ("lru", EngineConfig(policy="lru", expert_budget=budget), 0.0, 0.0),
        ("finemoe", fine, args.plan_copy_us, args.finemoe_host_us),
        ("plans only", dataclasses.replace(fine, prefetch_copies=False), args.plan_us, args.finemoe_host_us),
    )
    want = measured()
    rows = []
    print(f"all-gpu graphed step {floor.tpot_s * 1e3:.2f} ms (measured 12.78)")
    print(f"{'run, order':<44} {'TPOT ms':>8} {'hit':>6} {'issued':>7} {'late':>6}   (per 100 expert uses)")
    for name, config, predict_us, extra_us in runs:
        for graphed in (True, False):
            r = simulate(test, config, cost(predict_us, extra_us), "timed", history, graphed=graphed)
            row = {"run": name, "order": "graphed" if graphed else "eager", **figures(r.tpot_s, r.hit_rate, r.stats)}
            rows.append(row)
            print(line(f"{name}, {row['order']}", row))
        print(line(f"{name}, H200", want[name]))
    levers = []
    if args.levers:  # finemoe's knobs, and its costs removed, in the graphed order at the same host costs
        alone = EngineConfig(policy="on-demand", eviction="decay-lfu", prefill_eviction="sweep", expert_budget=budget)
        screen = [
            ("finemoe's eviction alone", alone, 0.0, args.finemoe_host_us),
            *(
                (f"max_inflight_prefetches={m}", dataclasses.replace(fine, max_inflight_prefetches=m), None, None)
                for m in (1, 2)
            ),
            *((f"prefetch_distance={d}", dataclasses.replace(fine, prefetch_distance=d), None, None) for d in (2, 3)),
            *(
                (f"map_min_precision={p}", dataclasses.replace(fine, map_min_precision=p), None, None)
                for p in (0.3, 0.5)
            ),
            ("prefetch_window=fixed", dataclasses.replace(fine, prefetch_window="fixed"), None, None),
            ("a free predictor", fine, 0.0, None),
            ("a free predictor, no extra bookkeeping", fine, 0.0, 0.0),
        ]
        print("levers (graphed order):")
        for name, config, predict_us, extra_us in screen:
            predict_us = args.plan_copy_us if predict_us is None else predict_us
            extra_us = args.finemoe_host_us if extra_us is None else extra_us
            r = simulate(test, config, cost(predict_us, extra_us), "timed", history, graphed=True)
            levers.append({"lever": name, **figures(r.tpot_s, r.hit_rate, r.stats)})
            print(line(f"  {name}", levers[-1]))
    write_record(args.out, vars(args), rows, measured=want, all_gpu_tpot_ms=floor.tpot_s * 1e3, levers=levers)
    plot(rows, want, Path(args.out).with_suffix(".png"), args)
    return 0


def plot(rows: list[dict], want: dict[str, dict], path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(want)
    tpot = {(r["run"], r["order"]): r["tpot_ms"] for r in rows}
    series = [
        ("H200 (measured)", [want[n]["tpot_ms"] for n in names]),
        ("replay, graphed order", [tpot[n, "graphed"] for n in names]),
        ("replay, eager order", [tpot[n, "eager"] for n in names]),
    ]
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    width = 0.26
    for i, (label, values) in enumerate(series):
        xs = [j + (i - 1) * width for j in range(len(names))]
        ax.bar(xs, values, width, label=label)
        for x, v in zip(xs, values, strict=True):
            ax.text(x, v + 0.5, f"{v:.1f}", ha="center", fontsize=7)
    ax.set_xticks(range(len(names)), [n if n != "plans only" else "finemoe, plans\nwithout copies" for n in names])
    ax.set_ylabel("TPOT (ms)")
    ax.set_title(f"{args.shape}, {args.budget}, always predicting: the replay against the H200 run", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
