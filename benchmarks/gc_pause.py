"""How long Python's full garbage collection pauses a process that holds a loaded engine, and what
`gc.freeze()` after loading (the CLI's default, `--no-gc-freeze` to keep the collector) leaves.

A full (generation 2) collection walks every container object the process tracks: the model's
modules and parameters, transformers' and torch's own objects, the engine's stores. It runs
whenever enough objects survive younger collections, inside whichever request allocates then.

    python benchmarks/gc_pause.py --model ~/.cache/finemoe/<reference> --out docs/results/gc_pause.json
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import write_record  # noqa: E402
from finemoe import Engine, SamplingParams  # noqa: E402


def full_collection_ms(rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        gc.collect(2)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--policy", default="finemoe")
    ap.add_argument("--requests", type=int, default=6, help="warm-up requests before measuring")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="docs/results/gc_pause.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    eng = Engine.from_pretrained(
        args.model, expert_budget=args.budget, policy=args.policy, device="cpu", progress=False
    )
    for i in range(args.requests):
        eng.generate(list(range(100 + i, 164 + i)), SamplingParams(max_new_tokens=8, ignore_eos=True))
    tracked = len(gc.get_objects())
    before = full_collection_ms(args.rounds)
    gc.freeze()
    frozen = gc.get_freeze_count()
    after = full_collection_ms(args.rounds)
    gc.unfreeze()
    eng.close()
    rows = {"tracked_objects": tracked, "frozen_objects": frozen, "full_gc_ms": before, "full_gc_ms_frozen": after}
    print(f"{tracked} tracked objects: a full collection takes {before:.1f} ms, {after:.2f} ms after gc.freeze()")
    write_record(args.out, vars(args), rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
