"""Decision-identity check for changes to the objects the engine and the simulator share.

Replays a grid of configurations (traces x policy configurations x budgets x batch sizes x frozen
and learning stores) and writes every counter and simulated time of every replay to JSON; a
second run after a change, compared with `--compare`, lists the replays whose results moved.
A speed-only change must move none.

    python benchmarks/sim_identity.py --sets ref40_test.fmt:ref_hist.fmt:trace:8 \\
        gpu_traces/q128x8_test.fmt:gpu_traces/q128x8_hist.fmt:qwen3-30b-a3b:2 \\
        gpu_traces/q60x4_test.fmt:gpu_traces/q60x4_hist.fmt:qwen1.5-moe-a2.7b:2 --out before.json
    # change the code, then
    python benchmarks/sim_identity.py --sets ... --out after.json --compare before.json

A set is TEST:HISTORY:SHAPE:REQUESTS (SHAPE "trace" = the traced model's own geometry); batch 3 is
replayed on the first set only. `NEAR_FULL` adds replays at 95% and 99% with the absent experts
gathered in the last layers (since session 34). About 2 minutes for the three sets above on one core.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from finemoe.config import EngineConfig, ExpertBudget  # noqa: E402
from finemoe.costmodel import make_cost_model  # noqa: E402
from finemoe.sim_history import empty_history, record_history  # noqa: E402
from finemoe.simulator import simulate  # noqa: E402
from finemoe.trace import load_trace  # noqa: E402

CONFIGS: list[tuple[str, dict]] = [
    ("lru", {}),
    ("lfu", {}),
    ("on-demand", {}),
    ("finemoe", {}),
    ("finemoe-paper", {}),
    ("mixtral-offloading", {}),
    ("promoe", {}),
    ("moe-infinity", {}),
    ("previous-token", {}),
    ("belady", {}),
    ("oracle", {}),
    ("finemoe", {"eviction": "router-ema"}),
    ("finemoe", {"eviction": "map-lfu"}),
    ("lru", {"prefill_eviction": "sweep"}),
    ("finemoe", {"prefill_eviction": "policy"}),
    ("finemoe-paper", {"prefill_eviction": "sweep"}),
    ("finemoe", {"prefill_plans": "maps"}),
    ("finemoe", {"prefill_predict": "before"}),
]

# near 100% with the absent experts gathered in the last layers (`gather_absent`, a warm pool): the
# sink layers' victim searches (`victims._sunk`, `DecayLFUPolicy.layer_victims`) and the iteration
# start's copies back; replayed at NEAR_FULL_BUDGETS, batch 1
NEAR_FULL: list[tuple[str, dict]] = [
    ("finemoe", {"gather_absent": True, "warm_pool": True}),
    ("lru", {"eviction": "decay-lfu", "gather_absent": True, "warm_pool": True}),
    ("lru", {"gather_absent": True, "warm_pool": True}),
    ("finemoe", {"eviction": "map-lfu", "gather_absent": True, "warm_pool": True}),
]
NEAR_FULL_BUDGETS = ("95%", "99%")


def replay_all(sets: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for n, spec in enumerate(sets):
        test_path, hist_path, shape, limit = spec.split(":")
        test = load_trace(test_path)
        test = test.head(int(limit))
        hist = empty_history(test, 1000)
        record_history(load_trace(hist_path), hist)
        cost = make_cost_model(test.spec, shape)
        for policy, knobs in CONFIGS:
            for budget in ("10%", "25%"):
                for batch in (1, 3) if n == 0 else (1,):
                    for learn in (False, True):
                        if learn and (batch > 1 or budget != "25%"):
                            continue
                        cfg = EngineConfig(
                            expert_budget=ExpertBudget.parse(budget), policy=policy, map_store_learn=learn, **knobs
                        )
                        r = simulate(test, cfg, cost, "timed", hist, batch_size=batch).to_dict()
                        r.pop("wall_s")
                        r.pop("layer_steps_per_s")
                        out[f"{Path(test_path).name}|{policy}|{knobs}|{budget}|b{batch}|learn={learn}"] = r
        for policy, knobs in NEAR_FULL:
            for budget in NEAR_FULL_BUDGETS:
                for learn in (False, True):
                    cfg = EngineConfig(
                        expert_budget=ExpertBudget.parse(budget), policy=policy, map_store_learn=learn, **knobs
                    )
                    r = simulate(test, cfg, cost, "timed", hist).to_dict()
                    r.pop("wall_s")
                    r.pop("layer_steps_per_s")
                    out[f"{Path(test_path).name}|{policy}|{knobs}|{budget}|b1|learn={learn}"] = r
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", nargs="+", required=True, help="TEST:HISTORY:SHAPE:REQUESTS per trace")
    ap.add_argument("--out", required=True)
    ap.add_argument("--compare", help="an earlier --out: list the replays whose results differ")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = replay_all(args.sets)
    Path(args.out).write_text(json.dumps(results, sort_keys=True, default=str))
    print(f"{len(results)} replays written to {args.out}")
    if not args.compare:
        return 0
    # (a baseline made before session 44 lists finemoe's learning replays as moved: their recorder no
    # longer counts request matrices, `record_requests`, so `requests_recorded` reads 0; hit rates equal)
    before = json.loads(Path(args.compare).read_text())
    now = json.loads(json.dumps(results, sort_keys=True, default=str))
    moved = sorted(k for k in now.keys() | before.keys() if now.get(k) != before.get(k))
    for k in moved:
        a, b = before.get(k), now.get(k)
        what = "missing on one side" if a is None or b is None else f"hit {a['hit_rate']:.6f} -> {b['hit_rate']:.6f}"
        print(f"moved: {k}  ({what})")
    print(f"{len(moved)} of {len(now)} replays moved")
    return 1 if moved else 0


if __name__ == "__main__":
    raise SystemExit(main())
