"""Decode one configuration for a while, for a sampling profiler to see where the host's time goes
(the predictor_overhead protocol's model and store, one engine configuration, no timers of its own).

Run under py-spy on the GPU machine, e.g. finemoe with device search and graph gates at 99%:

    py-spy record -r 1000 -f raw -o "$OUT/prof.txt" -- python benchmarks/decode_host_profile.py \\
        --budget 99% --policy finemoe --search device --graph-gates --seconds 30

then fold the stacks with `python benchmarks/decode_host_profile.py --fold "$OUT/prof.txt"`
(self and inclusive shares of the forward thread's frames).
"""

from __future__ import annotations

import argparse
import collections
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import shape_config  # noqa: E402
from finemoe import SamplingParams  # noqa: E402
from predictor_overhead import prompts, recorded_engine  # noqa: E402


def fold(path: str, top: int, root: str) -> None:
    """Self and inclusive sample shares per function of py-spy's raw (collapsed) stacks, the
    decode loop's thread only (stacks through the function `root`, shares of those)."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in Path(path).read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = [f.split(" (")[0] for f in stack.split(";")]
        at = next((i for i, f in enumerate(frames) if f == root or f.endswith("." + root)), None)
        if at is None:
            continue
        count = int(n)
        total += count
        for f in set(frames[at:]):
            inclusive[f] += count
        own[frames[-1]] += count
    print(f"{total} samples under {root}")
    print(f"{'inclusive':>9} {'self':>6}  function")
    for f, n in inclusive.most_common(top):
        print(f"{n / total:>9.1%} {own[f] / total:>6.1%}  {f}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fold", help="fold a py-spy raw profile instead of running")
    ap.add_argument("--top", type=int, default=45)
    ap.add_argument("--root", default="_replay", help="(--fold) count stacks through this function")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="reference")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--budget", default="99%")
    ap.add_argument("--policy", default="finemoe")
    ap.add_argument("--eviction", help="the eviction policy of a baseline (e.g. decay-lfu)")
    ap.add_argument("--search", default="device")
    ap.add_argument("--graph-gates", action="store_true")
    ap.add_argument("--no-copies", action="store_true", help="plans, but no prefetch copy starts")
    ap.add_argument("--seconds", type=float, default=30.0)
    args = ap.parse_args()
    if args.fold:
        fold(args.fold, args.top, args.root)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = shape_config(args.shape, None)
    eng = recorded_engine(cfg, getattr(torch, args.dtype), args.device, 40, 32, 32)
    kw: dict = dict(policy=args.policy, expert_budget=args.budget, map_store_learn=False)
    if args.policy == "finemoe":
        kw.update(search=args.search, prediction_duty="always", graph_gates=args.graph_gates)
        kw.update(prefetch_copies=not args.no_copies)
    if args.eviction:
        kw["eviction"] = args.eviction
    eng.reconfigure(**kw)
    params = SamplingParams(max_new_tokens=32, ignore_eos=True)
    test = prompts(4, 32, cfg.vocab_size, seed=2)
    eng.generate(test[0], params)  # warm-up and capture
    end, n = time.monotonic() + args.seconds, 0
    while time.monotonic() < end:
        eng.generate(test[n % len(test)], params)
        n += 1
    logging.info("%d requests, decode host spans: %s", n, eng.host_time_stats())
    eng.config = eng.config.__class__(**{**eng.config.__dict__, "map_store": None})  # do not save
    eng.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
