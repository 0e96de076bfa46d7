"""Host cost of the eviction policies' bookkeeping per layer of uses: one `on_access` call per
expert against one `on_access_many` call per layer (the cache's path), in one process,
interleaved rounds, best of N (the machine's noise moves whole runs, not one side).

    python benchmarks/policy_bookkeeping.py --out docs/results/policy_bookkeeping.json
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import write_record  # noqa: E402
from finemoe.policy import DecayLFUPolicy, LRUPolicy  # noqa: E402
from finemoe.types import ExpertId  # noqa: E402


def per_layer_us(policy, layers: list[list[ExpertId]], batched: bool, iterations: int) -> float:
    """Microseconds per layer of uses, `iterations` passes over every layer."""
    step = 0
    t0 = time.perf_counter()
    for _ in range(iterations):
        for eids in layers:
            step += 1
            if batched:
                policy.on_access_many(eids, step)
            else:
                for eid in eids:
                    policy.on_access(eid, step)
    return (time.perf_counter() - t0) / (iterations * len(layers)) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8, help="uses per layer (Qwen3-30B-A3B: 8 of 128)")
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default="docs/results/policy_bookkeeping.json")
    args = ap.parse_args()
    rng = random.Random(0)
    L, E = args.layers, args.experts
    layers = [[ExpertId(layer, e) for e in sorted(rng.sample(range(E), args.top_k))] for layer in range(L)]
    makers = {"decay-lfu": lambda: DecayLFUPolicy(L, E), "lru": LRUPolicy}
    results = {}
    for name, make in makers.items():
        times: dict[str, list[float]] = {"one_call_per_use": [], "one_call_per_layer": []}
        for _ in range(args.rounds):
            for key, batched in (("one_call_per_use", False), ("one_call_per_layer", True)):
                policy = make()
                for eids in layers:
                    for eid in eids:
                        policy.on_insert(eid, 0)
                times[key].append(per_layer_us(policy, layers, batched, args.iterations))
        results[name] = {k: {"best_us": min(v), "all_us": v} for k, v in times.items()}
        print(
            f"{name:<10} per layer of {args.top_k} uses: one call per use {min(times['one_call_per_use']):.2f} us, "
            f"one call per layer {min(times['one_call_per_layer']):.2f} us"
        )
    write_record(args.out, vars(args), results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
