"""Why the map predictor costs more per layer in the engine than in the simulator (issue 4).

The same `TrajectoryQuery.best` calls (one decode iteration at batch 1: L layers against a full
store of random maps) timed with warm caches, as the simulator runs them back to back, and with a
sweep over a buffer between layers (untimed), as a CPU forward pass streams each layer's weights
through the caches between two router hooks: one the size of an L2 cache, one of a last-level cache.
With `--engine SHAPE`, also the engine's own `best` calls inside its decode steps (a random-weight
model of that shape on the CPU, finemoe at 99%, inline search, a store recorded from random
prompts) against the same store searched between generations.

    python benchmarks/predictor_cache_probe.py --engine reference --out docs/results/predictor_cache_probe.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import write_record  # noqa: E402
from finemoe import expert_map  # noqa: E402
from finemoe.expert_map import ExpertMapStore, StoreGeometry, TrajectoryQuery  # noqa: E402


def one_iteration(store: ExpertMapStore, queries: np.ndarray, sweep: np.ndarray | None) -> float:
    """Seconds spent in `best` over one iteration's layers (`queries` [L, E]), sweeping `sweep`
    (if any) before each layer's call, outside the timed part."""
    tq = TrajectoryQuery(store, 1, 0, 64)
    spent = 0.0
    for layer, q in enumerate(queries):
        if sweep is not None:
            sweep.sum()  # streams the buffer through the caches, as a layer's weights do
        t0 = time.perf_counter()
        tq.best(layer, q)
        spent += time.perf_counter() - t0
    return spent


def in_engine(shape: str) -> dict[str, float]:
    """µs per `TrajectoryQuery.best` call inside a CPU engine's decode steps, and per layer when the
    same engine's store is searched between generations (warm)."""
    from common import shape_config
    from finemoe import SamplingParams
    from predictor_overhead import prompts, recorded_engine

    cfg = shape_config(shape, None)
    eng = recorded_engine(cfg, torch.float32, "cpu", history=40, prompt_len=32, new_tokens=32)
    params = SamplingParams(max_new_tokens=32, ignore_eos=True)
    kw = dict(policy="finemoe", search="sync", map_store_learn=False, prediction_duty="always")
    eng.reconfigure(expert_budget="99%", **kw)
    test = prompts(3, 32, cfg.vocab_size, 2)
    eng.generate(test[0], params)  # warm-up
    spent = [0.0, 0]
    plain = TrajectoryQuery.best

    def timed(self, layer, probs):  # benchmark-only probe on the class, removed below
        t0 = time.perf_counter()
        try:
            return plain(self, layer, probs)
        finally:
            spent[0] += time.perf_counter() - t0
            spent[1] += 1

    expert_map.TrajectoryQuery.best = timed
    try:
        for p in test:
            eng.generate(p, params)
    finally:
        expert_map.TrajectoryQuery.best = plain
    L, E = eng.maps.geometry.num_layers, eng.maps.geometry.num_experts
    q = torch.softmax(torch.randn(20, L, E, generator=torch.Generator().manual_seed(3)) * 2, dim=-1).numpy()
    between = statistics.median(one_iteration(eng.maps, x, None) / L * 1e6 for x in q)
    eng.config = eng.config.__class__(**{**eng.config.__dict__, "map_store": None})  # do not save
    eng.close()
    in_decode = spent[0] / max(spent[1], 1) * 1e6
    return {"us_per_call_in_decode": in_decode, "calls": spent[1], "us_per_layer_between": between}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--experts", type=int, default=60)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--capacity", type=int, default=1000)
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--sweeps-mb", default="2,32", help="buffer sizes swept between layers (MB)")
    ap.add_argument("--engine", help="also time the engine's own calls on a random model of this shape (CPU)")
    ap.add_argument("--out", default="docs/results/predictor_cache_probe.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    L, E = args.layers, args.experts
    store = ExpertMapStore(StoreGeometry(L, E, args.dim), capacity=args.capacity)
    maps = torch.softmax(torch.randn(args.capacity, L, E, generator=gen) * 2, dim=-1)
    store.add(torch.randn(args.capacity, args.dim, generator=gen), maps)
    queries = torch.softmax(torch.randn(args.iterations, L, E, generator=gen) * 2, dim=-1).numpy()
    cases: dict[str, np.ndarray | None] = {"warm": None}
    for mb in args.sweeps_mb.split(","):
        cases[f"sweep {mb} MB"] = np.ones(int(float(mb) * 2**20 / 4), dtype=np.float32)
    results: dict[str, dict] = {}
    for name, sweep in cases.items():
        one_iteration(store, queries[0], sweep)  # warm-up
        per_layer = [one_iteration(store, q, sweep) / L * 1e6 for q in queries]
        results[name] = {"us_per_layer_median": statistics.median(per_layer), "us_per_layer_min": min(per_layer)}
        print(f"{name:<16} {results[name]['us_per_layer_median']:7.1f} us per layer (median of {len(per_layer)})")
    if args.engine:
        results["engine"] = got = in_engine(args.engine)
        print(
            f"engine decode   {got['us_per_call_in_decode']:7.1f} us per call ({got['calls']} calls); "
            f"between generations {got['us_per_layer_between']:.1f} us per layer"
        )
    write_record(args.out, vars(args), results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
