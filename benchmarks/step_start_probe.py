"""Where a graphed decode step's host time goes between the previous step's end and its first
launch (S_0), per configuration: the engine's `start_iteration` and the replay's work before S_0,
timed call by call (count, mean, median, 90th percentile, max; µs).

`predictor_overhead.py`'s "between replayed steps" line says how long each span is on average; this
probe says which call inside it is long, and whether always or in a few steps. `predictor_overhead.py`'s
model and store; `decode_gpu_timeline.py`'s configuration names (`--configs`: "decay-lfu:gather",
"lru:gather", "finemoe:device+graph-gates+gather", a finemoe name with `+learn` learning online, ...;
the session-34 records `step_start_s34{,b}.json` were made when it used `predictor_overhead.py`'s,
"finemoe device:graph-gates+gather"). CUDA only.

    PYTHONPATH=src python benchmarks/step_start_probe.py --cores 2-7 --out $OUT/step_start.json
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import run_meta, shape_config  # noqa: E402
from decode_gpu_timeline import knobs, split  # noqa: E402
from finemoe import SamplingParams  # noqa: E402
from predictor_overhead import engine_flags, prompts, recorded_engine  # noqa: E402

log = logging.getLogger("step_start_probe")


class Calls:
    """Benchmark-only probe: wraps `method` of `obj` (an instance attribute) and keeps each decode
    call's wall time (s)."""

    def __init__(self, obj: object, method: str, rt) -> None:
        self.times: list[float] = []
        self.obj, self.method = obj, method
        inner = getattr(obj, method)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                if not rt.is_prefill:
                    self.times.append(time.perf_counter() - t0)

        setattr(obj, method, timed)

    def undo(self) -> None:
        delattr(self.obj, self.method)

    def summary(self) -> dict:
        t = sorted(x * 1e6 for x in self.times)
        if not t:
            return {"calls": 0}
        return {
            "calls": len(t),
            "mean": statistics.fmean(t),
            "median": t[len(t) // 2],
            "p90": t[int(len(t) * 0.9)],
            "max": t[-1],
        }


def probe(eng, name: str, budget: str, test: list[list[int]], new: int, reset: dict, profile: bool) -> dict:
    """One configuration's call times (and with `profile`, cProfile's top functions by own time in
    the decode steps' `start_iteration` and from a decode step's entry to S_0's launch)."""
    learn = "learn" in split(name)[1]  # (`+learn`: the store learns online, the engine's default)
    eng.reconfigure(**{**reset, **knobs(name, budget), "warm_pool": True, "map_store_learn": learn})
    engine_flags(eng, split(name)[1])
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    eng.generate(test[0], params)  # warm-up: the capture
    rt, static = eng.runtime, eng.static
    if static is None or not (static.use_graphs and static.graphs):
        raise SystemExit(f"{name}: decode steps are not replayed from CUDA graphs (nothing to probe)")
    targets = [
        (eng, "_start_iteration"),
        (rt, "start_iteration"),
        (rt, "_begin_predictors"),
        (eng.cache, "begin_iteration"),
        (eng.cache, "gather"),
        (rt, "reads_graphed_probs"),
        (static, "_begin_sides"),
        (static, "_replay"),
        (static.sides, "before_step"),
    ]
    if static.record is not None:
        targets.append((static.record, "before_step"))
    if rt.device_matches is not None:
        targets.append((rt.device_matches.planner, "full_load_due"))
        targets.append((rt.device_matches, "before_step"))
    calls = {f"{type(o).__name__}.{m}": Calls(o, m, rt) for o, m in targets}
    gathered0 = eng.cache.stats.gathered
    try:
        for p in test:
            eng.generate(p, params)
    finally:
        for c in calls.values():
            c.undo()
    out = {k: c.summary() for k, c in calls.items()}
    out["gathered"] = eng.cache.stats.gathered - gathered0
    if profile:
        out["profiles"] = profiled(eng, test, params)
    return out


def profiled(eng, test: list[list[int]], params: SamplingParams) -> dict[str, list]:
    """cProfile's top functions by own time (µs per decode step) in two spans of the decode steps:
    `start_iteration`, and a decode step's entry to S_0's launch."""
    rt, static = eng.runtime, eng.static
    spans = {"start_iteration": cProfile.Profile(), "decode_to_s0": cProfile.Profile()}
    start, decode, s0 = rt.start_iteration, static.decode, static.graphs[0]
    s0_replay = s0.replay
    steps = [0]

    def start_timed(iteration, is_prefill, *a, **k):
        if is_prefill:
            return start(iteration, is_prefill, *a, **k)
        steps[0] += 1
        return spans["start_iteration"].runcall(start, iteration, is_prefill, *a, **k)

    def decode_timed(position):
        spans["decode_to_s0"].enable()
        try:
            return decode(position)
        finally:
            spans["decode_to_s0"].disable()  # (if S_0's replay did not already)

    def s0_timed():
        s0_replay()
        spans["decode_to_s0"].disable()

    rt.start_iteration, static.decode, s0.replay = start_timed, decode_timed, s0_timed
    try:
        for p in test:
            eng.generate(p, params)
    finally:
        del rt.start_iteration, static.decode, s0.replay
    out = {}
    for name, prof in spans.items():
        st = pstats.Stats(prof)
        rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:14]  # (cc, nc, tottime, cumtime, callers)
        out[name] = [
            [f"{Path(f).name}:{line}:{fn}", nc, tt / max(steps[0], 1) * 1e6, ct / max(steps[0], 1) * 1e6]
            for (f, line, fn), (cc, nc, tt, ct, _) in rows
        ]
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="reference")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--budget", default="99%")
    ap.add_argument("--configs", default="decay-lfu:gather,finemoe:device+graph-gates+gather")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--cores")
    ap.add_argument("--profile", action="store_true", help="also cProfile the two spans (top functions)")
    ap.add_argument("--out", default="step_start.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("step_start_probe needs a CUDA device")
    if args.cores:
        lo, _, hi = args.cores.partition("-")
        os.sched_setaffinity(0, set(range(int(lo), int(hi or lo) + 1)))
    logging.basicConfig(level=logging.WARNING)
    cfg = shape_config(args.shape)
    eng = recorded_engine(cfg, getattr(torch, args.dtype), "cuda", 40, 32, args.new_tokens)
    test = prompts(args.prompts, 32, cfg.vocab_size, seed=2)
    rec = {"meta": run_meta(), "config": vars(args), "results": {}}
    names = args.configs.split(",")
    base = eng.config  # each configuration starts from the engine's first one for every knob any sets
    every = {k for n in names for k in knobs(n, args.budget)} | {"warm_pool", "map_store_learn"}
    reset = {k: getattr(base, k) for k in sorted(every)}
    for name in names:
        res = probe(eng, name, args.budget, test, args.new_tokens, reset, args.profile)
        rec["results"][name] = res
        print(f"{name}: gathered {res['gathered']}")
        for k, s in res.items():
            if isinstance(s, dict) and s.get("calls"):
                print(
                    f"  {k:<40} {s['calls']:5d} calls  mean {s['mean']:8.1f}  median {s['median']:8.1f}  "
                    f"p90 {s['p90']:8.1f}  max {s['max']:9.1f} µs"
                )
        for span, rows in res.get("profiles", {}).items():
            print(
                f"  cProfile {span} (own µs per step, cumulative): "
                + "; ".join(f"{fn} x{n} {tt:.1f}/{ct:.1f}" for fn, n, tt, ct in rows[:10])
            )
    Path(args.out).write_text(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
