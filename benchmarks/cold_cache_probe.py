"""What one step of the trajectory search costs when it follows a layer's matmul, as it does in
the eager CPU engine (the predictor runs between two layers' compute on the same core).

    python benchmarks/cold_cache_probe.py --out docs/results/cold_cache_probe_s38.json

The step is the pruned search's [K, E] @ [E] product over a strided view (K = 64 candidate maps,
E = 16 experts, 30 layers: `TrajectoryQuery._best_pruned`). Timed alone in a warm loop, and right
after a float32 matmul of `--size` squared with torch's threads at 2 and at 1: the gap is what a
cold cache costs the predictor, not its arithmetic. µs per call, means over `--calls`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from numpy._core._multiarray_umath import c_einsum

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_record  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024, help="the matmul's square size")
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--out", default="docs/results/cold_cache_probe.json")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    maps = rng.random((64, 30, 16), dtype=np.float32)  # [K, L, E] candidate maps, row-major
    view, vec = maps[:, 5], rng.random(16, dtype=np.float32)  # [K, E] strided view, [E]
    big = torch.randn(args.size, args.size)

    def warm() -> float:
        t0 = time.perf_counter()
        for _ in range(args.calls):
            c_einsum("ck,k->c", view, vec)
        return (time.perf_counter() - t0) / args.calls * 1e6

    def after_matmul(threads: int) -> tuple[float, float]:
        torch.set_num_threads(threads)
        step = mm = 0.0
        for _ in range(args.calls):
            t0 = time.perf_counter()
            torch.mm(big, big)
            t1 = time.perf_counter()
            c_einsum("ck,k->c", view, vec)
            step += time.perf_counter() - t1
            mm += t1 - t0
        return step / args.calls * 1e6, mm / args.calls * 1e3

    results: dict = {"warm_us": warm()}
    for threads in (2, 1):
        us, ms = after_matmul(threads)
        results[f"after_matmul_{threads}_threads_us"] = us
        results[f"matmul_{threads}_threads_ms"] = ms
    for k, v in results.items():
        print(f"{k:<32} {v:8.2f}")
    write_record(args.out, vars(args), results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
