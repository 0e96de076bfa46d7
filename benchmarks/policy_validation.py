"""Policy variants on a validation slice of the history split (never the test split): the same
recorded map store as `policy_hit_rates.py`, prompts after the recorded ones, 25% budget.

    python benchmarks/policy_validation.py --first 600 --count 12 \\
        "dict(policy='mixtral-offloading')" "dict(policy='finemoe', prefetch_distance=1)"

Each argument is a dict of `Engine.reconfigure` overrides, applied on top of the base config.
"""

from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from finemoe import Engine, SamplingParams, reference  # noqa: E402
from finemoe.workload import load_workload  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("variants", nargs="+", help="e.g. \"dict(policy='finemoe', prefetch_distance=1)\"")
    ap.add_argument("--first", type=int, default=600, help="index of the first validation prompt")
    ap.add_argument("--count", type=int, default=12)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--map-store", default="/tmp/finemoe-bench/history.fms")
    ap.add_argument("--capacity", type=int, default=1000)
    args = ap.parse_args()
    path = reference.ensure_built()
    val = [p.prompt for p in load_workload(split="history")][args.first : args.first + args.count]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    eng = Engine.from_pretrained(
        path,
        expert_budget=args.budget,
        policy="lru",
        map_store=args.map_store,
        map_store_capacity=args.capacity,
        map_store_learn=False,
        progress=False,
    )
    base = dict(eng.config.__dict__)
    try:
        for text in args.variants:
            call = ast.parse(text, mode="eval").body
            kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords}  # dict(a=..., b=...)
            eng.reconfigure(**{**base, **kw})
            before = eng.stats().cache
            t0 = time.perf_counter()
            for p in val:
                eng.generate(p, params)
            c = eng.stats().cache.minus(before)
            print(
                f"{text:70s} hit {c.hit_rate:.3f} precision {c.prefetch_precision:.3f} "
                f"recall {c.prefetch_recall:.3f} ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    finally:
        eng.config = eng.config.__class__(**{**eng.config.__dict__, "map_store": None})  # leave the file as it is
        eng.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
