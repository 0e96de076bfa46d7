"""What device-resident planning (docs/design/device_plans.md) would cost in hit rate, priced in the
simulator before any GPU work: the match there follows every stored map (`trajectory_candidates=0`)
and reaches the host one layer late (`trajectory_lag=1`: the plan for target m + d comes from the
trajectory through layer m - 1, the semantic match at layer 0).

Replays each trace set with finemoe as it is, with the full search, and with the full search one
layer late, beside the best baseline (mixtral-offloading), at several budgets; prints a table and
writes a JSON record:

    python benchmarks/device_plans_lag.py --sets ref40_test.fmt:ref_hist.fmt:trace:40 \\
        gpu_traces/q60x4_test.fmt:gpu_traces/q60x4_hist.fmt:qwen1.5-moe-a2.7b:60 \\
        --out docs/results/device_plans_lag.json

A set is TEST:HISTORY:SHAPE:REQUESTS, as in `sim_identity.py`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import run_meta  # noqa: E402
from finemoe.config import EngineConfig, ExpertBudget  # noqa: E402
from finemoe.costmodel import make_cost_model  # noqa: E402
from finemoe.sim_history import empty_history, record_history  # noqa: E402
from finemoe.simulator import simulate  # noqa: E402
from finemoe.trace import load_trace  # noqa: E402

VARIANTS: list[tuple[str, str, dict]] = [
    ("finemoe", "finemoe", {}),
    ("full search", "finemoe", {"trajectory_candidates": 0}),
    ("full search, one layer late", "finemoe", {"trajectory_candidates": 0, "trajectory_lag": 1}),
    ("mixtral-offloading", "mixtral-offloading", {}),
]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", nargs="+", required=True)
    ap.add_argument("--budgets", default="10%,25%,50%")
    ap.add_argument("--out", default="docs/results/device_plans_lag.json")
    args = ap.parse_args()
    rec: dict = {"meta": run_meta(), "config": vars(args), "results": {}}
    budgets = args.budgets.split(",")
    for spec in args.sets:
        test_path, hist_path, shape, limit = spec.split(":")
        test = load_trace(test_path).head(int(limit))
        hist = empty_history(test, 1000)
        record_history(load_trace(hist_path), hist)
        cost = make_cost_model(test.spec, shape)
        name = Path(test_path).name
        print(f"\n{name} ({shape}, {limit} requests): hit rate, prefetch precision")
        print(f"{'variant':<30}" + "".join(f"{b:>18}" for b in budgets))
        for label, policy, knobs in VARIANTS:
            row = []
            for budget in budgets:
                budget_of = ExpertBudget.parse(budget)
                cfg = EngineConfig(expert_budget=budget_of, policy=policy, map_store_learn=False, **knobs)
                t0 = time.perf_counter()
                r = simulate(test, cfg, cost, "timed", hist).to_dict()
                st = r["stats"]
                got = {
                    "hit_rate": st["hit_rate"],
                    "prefetch_precision": st.get("prefetch_precision"),
                    "tpot_ms": r["tpot_s"] * 1e3 if r.get("tpot_s") is not None else None,
                    "wall_s": time.perf_counter() - t0,
                }
                rec["results"][f"{name}|{label}|{budget}"] = got
                prec = got["prefetch_precision"]
                row.append(f"{got['hit_rate']:.4f} / {prec:.2f}" if prec is not None else f"{got['hit_rate']:.4f} / -")
            print(f"{label:<30}" + "".join(f"{c:>18}" for c in row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
