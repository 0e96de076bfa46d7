"""What plain Python allows for the simulator's LRU replay (issue 5's 200k layer-steps/s target).

Replays `on-demand` (LRU eviction, no prefetch; timed FIFO link, batch 1) twice on one trace: once
through `finemoe.simulator` (the engine's own cache, policy, stepper and link objects) and once as
one bare loop over lists and an OrderedDict that makes the same decisions by construction (the
script checks: equal hits, misses and simulated time). The ratio is what the shared objects'
generality (pins, chunks, prefetch state, statistics, protocols) costs per layer-step.

    taskset -c 1 python benchmarks/sim_speed_floor.py --traces ref40_test.fmt --out docs/results/sim_speed_floor.json

Not a second simulator: the bare loop knows one policy and no predictor, and exists to be timed.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import OrderedDict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import write_record  # noqa: E402
from finemoe.config import BudgetPlan, EngineConfig, ExpertBudget  # noqa: E402
from finemoe.costmodel import make_cost_model  # noqa: E402
from finemoe.replay_rows import accesses_of, schedule  # noqa: E402
from finemoe.simulator import simulate  # noqa: E402
from finemoe.trace import load_trace  # noqa: E402


def bare_lru(trace, access, slots: int, cost) -> dict:
    """LRU over `slots` slots, a FIFO link of `cost.copy_s` per copy, the simulator's clock
    arithmetic (`Simulator.run`); a layer's hits are pinned while its misses pick victims, and a
    victim must have landed. Returns hits, misses, total simulated seconds, layer-steps."""
    L, E, k = trace.spec.num_layers, trace.spec.num_experts, trace.spec.top_k
    order: OrderedDict[int, None] = OrderedDict()  # flat l*E+e, least recent first
    slot_of = [-1] * (L * E)
    done = [0.0] * slots  # when the latest copy into the slot ends
    free = list(range(slots - 1, -1, -1))
    t = tail = 0.0
    hits = misses = steps = 0
    copy_s, e_s, e_tok = cost.copy_s, cost.expert_s, cost.expert_token_s
    g = 0
    for r in range(trace.num_requests):
        for it in range(int(trace.output_len[r])):
            a, b = trace.rows(r, it)
            tokens = b - a
            dense = cost.layer_s + (tokens - 1) * cost.layer_token_s
            t += cost.head_s
            for layer, experts in enumerate(access[g]):
                steps += 1
                t += dense
                per_expert = e_s + (tokens * k / max(len(experts), 1) - 1) * e_tok
                base = layer * E
                pinned = set()
                missing = []
                for e in experts:
                    f = base + e
                    s = slot_of[f]
                    if s < 0:
                        missing.append(f)
                        continue
                    if done[s] <= t:
                        hits += 1
                    else:
                        misses += 1  # resident but its copy is still running: counted as a miss
                    pinned.add(f)
                for f in pinned:  # uses in expert order (the cache's on_access_many)
                    order.move_to_end(f)
                if missing:
                    need = len(missing) - len(free)
                    victims = []
                    if need > 0:
                        for v in order:
                            if v not in pinned and done[slot_of[v]] <= t:
                                victims.append(v)
                                if len(victims) == need:
                                    break
                    victims.reverse()
                    for f in missing:
                        misses += 1
                        if free:
                            s = free.pop()
                        else:
                            v = victims.pop()
                            s = slot_of[v]
                            slot_of[v] = -1
                            del order[v]
                        start = tail if tail > t else t
                        tail = done[s] = start + copy_s
                        slot_of[f] = s
                        order[f] = None
                        pinned.add(f)
                for f in pinned:
                    d = done[slot_of[f]]
                    if d > t:
                        t = d
                t += per_expert * len(experts)
            g += 1
    return {"hits": hits, "misses": misses, "total_s": t, "layer_steps": steps}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--traces", required=True)
    ap.add_argument("--limit", type=int, default=40, help="requests of --traces replayed")
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--repeat", type=int, default=3, help="best of N")
    ap.add_argument("--out", default="docs/results/sim_speed_floor.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    trace = load_trace(args.traces)
    trace = trace.head(args.limit)
    cost = make_cost_model(trace.spec, "trace")
    cfg = EngineConfig(expert_budget=ExpertBudget.parse(args.budget), policy="on-demand", map_store_learn=False)
    slots = BudgetPlan.make(cfg.expert_budget, trace.spec).slots
    access = accesses_of(trace, schedule(trace, 1))
    objects = min((simulate(trace, cfg, cost, "timed") for _ in range(args.repeat)), key=lambda r: r.wall_s)
    bare, bare_s = None, float("inf")
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        out = bare_lru(trace, access, slots, cost)
        dt = time.perf_counter() - t0
        if dt < bare_s:
            bare, bare_s = out, dt
    same = (
        bare["hits"] == objects.stats["hits"]
        and bare["misses"] == objects.stats["misses"]
        and abs(bare["total_s"] - objects.total_s) <= 1e-9 * objects.total_s
    )
    if not same:
        print(
            f"the bare loop disagrees: {bare} vs hits {objects.stats['hits']} misses {objects.stats['misses']} "
            f"total {objects.total_s}"
        )
        return 1
    rows = {
        "shared_objects": {"layer_steps_per_s": objects.steps_per_s, "replay_s": objects.wall_s},
        "bare_loop": {"layer_steps_per_s": bare["layer_steps"] / bare_s, "replay_s": bare_s},
        "hits": bare["hits"],
        "misses": bare["misses"],
        "layer_steps": bare["layer_steps"],
        "slots": slots,
    }
    print(
        f"on-demand (LRU) {args.budget}: shared objects {objects.steps_per_s / 1e3:.1f}k, bare loop "
        f"{bare['layer_steps'] / bare_s / 1e3:.1f}k layer-steps/s (same hits, misses and time)"
    )
    write_record(args.out, vars(args), rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
