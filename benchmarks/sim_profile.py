"""Where a policy's replay time goes: microseconds per layer-step in each shared object's entry
points, timed by wrapping them (no profiler, so the split is close to an unprofiled replay).

    taskset -c 1 python benchmarks/sim_profile.py --traces ref40_test.fmt --history ref_hist.fmt \\
        --policy finemoe --out docs/results/sim_profile_s17.json

The wrappers cost ~1 µs per call each, so the per-step total is above `sim_speed.py`'s; compare
parts within one record. "other" is the replay loop, the stepper and every call not wrapped.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import write_record  # noqa: E402
from finemoe.config import EngineConfig, ExpertBudget  # noqa: E402
from finemoe.costmodel import make_cost_model  # noqa: E402
from finemoe.sim_history import empty_history, record_history  # noqa: E402
from finemoe.simulator import Simulator  # noqa: E402
from finemoe.trace import load_trace  # noqa: E402


def timed(obj: object, name: str, key: str, acc: dict[str, float]) -> None:
    """Replace `obj.name` (an instance attribute) by a wrapper that adds its wall time to `acc[key]`."""
    fn = getattr(obj, name)

    def call(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[key] = acc.get(key, 0.0) + time.perf_counter() - t0

    setattr(obj, name, call)


def one_replay(test, cfg, cost, hist) -> dict[str, float]:
    """µs per layer-step of each part, and the total, for one replay."""
    sim = Simulator(test.spec, cfg, cost, "timed", hist, test.spec_probs)
    acc: dict[str, float] = {}
    for pred in sim.predictors:
        for m in getattr(pred, "members", [pred]):
            timed(m, "on_routing", f"predictor {m.name}: routing", acc)
            timed(m, "on_iteration_start", f"predictor {m.name}: iteration start", acc)
    timed(sim.prefetcher, "submit", "prefetcher submit", acc)
    timed(sim.prefetcher, "pump", "prefetcher pump", acc)
    timed(sim.cache, "enter", "cache enter", acc)
    t0 = time.perf_counter()
    r = sim.run(test)
    total = time.perf_counter() - t0
    out = {k: v / r.layer_steps * 1e6 for k, v in sorted(acc.items())}
    out["other"] = total / r.layer_steps * 1e6 - sum(out.values())
    out["total"] = total / r.layer_steps * 1e6
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--traces", required=True)
    ap.add_argument("--history", required=True)
    ap.add_argument("--limit", type=int, default=40, help="requests of --traces replayed")
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--policy", default="finemoe")
    ap.add_argument("--repeat", type=int, default=3, help="best of N (by total)")
    ap.add_argument("--out", default="docs/results/sim_profile.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    test = load_trace(args.traces).head(args.limit)
    hist = empty_history(test, 1000)
    record_history(load_trace(args.history), hist)
    cost = make_cost_model(test.spec, "trace")
    cfg = EngineConfig(expert_budget=ExpertBudget.parse(args.budget), policy=args.policy, map_store_learn=False)
    best = min((one_replay(test, cfg, cost, hist) for _ in range(args.repeat)), key=lambda r: r["total"])
    for k, v in best.items():
        print(f"{k:<40} {v:7.1f} us/layer-step  {v / best['total']:6.1%}")
    write_record(args.out, vars(args), {"us_per_layer_step": best})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
