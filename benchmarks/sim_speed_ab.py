"""Replay speed of this tree against another, alternated in one process (issue 5's speed work).

This 2-core machine's speed drifts by ±30% over seconds, more than most single changes. So the
two trees' replays alternate in one process, each round running both on the same traces, and the
figure is the per-round ratio (median, range) beside each tree's best.

    git worktree add /tmp/base <commit>
    taskset -c 1 python benchmarks/sim_speed_ab.py --base-src /tmp/base/src --traces ref40_test.fmt \\
        --history ref_hist.fmt --policy finemoe --rounds 8 --out docs/results/sim_speed_ab.json

Both trees' `finemoe` modules are imported once, each under its own copy of `sys.modules`, which
is swapped in before that tree's replay (a lazy import inside a replay finds its own tree).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import pkgutil
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_record  # noqa: E402

HERE_SRC = str(Path(__file__).resolve().parents[1] / "src")
SKIP = ("server", "cli", "chat", "__main__")  # prefixes: need the server extra; nothing the replay uses


def _load(src: str, args: argparse.Namespace) -> dict[str, Any]:
    """Import the `finemoe` of `src` (all its modules), load the traces with it."""
    for name in [m for m in sys.modules if m == "finemoe" or m.startswith("finemoe.")]:
        del sys.modules[name]
    sys.path.insert(0, src)
    try:
        pkg = importlib.import_module("finemoe")
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.ispkg and not info.name.startswith(SKIP):
                importlib.import_module("finemoe." + info.name)
    finally:
        sys.path.remove(src)
    mods = {m: mod for m, mod in sys.modules.items() if m == "finemoe" or m.startswith("finemoe.")}
    cfgm, sim, trace = mods["finemoe.config"], mods["finemoe.simulator"], mods["finemoe.trace"]
    test = trace.load_trace(args.traces).head(args.limit)
    hmod = mods.get("finemoe.sim_history", sim)  # (trees before session 23 keep it in the simulator)
    hist = hmod.empty_history(test, 1000)
    if args.history_cache:  # the stores `sim_speed.py --history-cache` wrote
        st = torch.load(args.history_cache)
        hist.maps.load_rows(st["emb"], st["maps"])
        hist.requests.load_rows(st["eams"])
    elif not args.record:  # (`--record` fills its own stores, timed)
        hmod.record_history(trace.load_trace(args.history), hist)
    cost = mods["finemoe.costmodel"].make_cost_model(test.spec, "trace")
    cfg = cfgm.EngineConfig(
        expert_budget=cfgm.ExpertBudget.parse(args.budget), policy=args.policy, map_store_learn=False
    )
    native = mods["finemoe._native"].summary() if "finemoe._native" in mods else "pure (no build)"
    print(f"{src}: hot modules {native}")
    if args.record:
        return {"mods": mods, "native": native, "run": lambda: _record(hmod, trace, test, args)}
    return {"mods": mods, "native": native, "run": lambda: sim.simulate(test, cfg, cost, "timed", hist)}


def _record(hmod: Any, trace: Any, test: Any, args: argparse.Namespace) -> SimpleNamespace:
    """`--record N`: fill fresh 1K stores from the history trace's first N requests (what `finemoe
    simulate --history` does before its replays): its layer-steps (iterations x L) and seconds, and as
    `hit_rate` a checksum of the stores' contents (equal iff both trees stored the same)."""
    src = trace.load_trace(args.history).head(args.record)
    hist = hmod.empty_history(test, 1000)
    t0 = time.perf_counter()
    hmod.record_history(src, hist)
    wall = time.perf_counter() - t0
    n = hist.maps.size
    check = float(hist.maps.maps[:n].double().sum()) + hist.maps.replacements + float(hist.requests.mats.sum())
    return SimpleNamespace(layer_steps=src.layer_steps(), wall_s=wall, hit_rate=check)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-src", required=True, help="the other tree's src/ folder (e.g. a git worktree)")
    ap.add_argument("--traces", required=True)
    hist = ap.add_mutually_exclusive_group(required=True)
    hist.add_argument("--history", help="the history trace the stores are recorded from")
    hist.add_argument("--history-cache", help="the stores `sim_speed.py --history-cache` wrote (instead)")
    ap.add_argument("--limit", type=int, default=40, help="requests of --traces replayed")
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--policy", default="finemoe")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument(
        "--record",
        type=int,
        default=0,
        metavar="N",
        help="time filling the stores from the history trace's first N requests instead of a replay (needs "
        "--history; the 'hit rate' printed is then a checksum of the stores)",
    )
    ap.add_argument("--out", default="docs/results/sim_speed_ab.json")
    args = ap.parse_args()
    if args.record and not args.history:
        ap.error("--record needs --history (the trace the stores are filled from)")
    torch.set_num_threads(1)
    trees = {"base": _load(args.base_src, args), "this": _load(HERE_SRC, args)}
    speed: dict[str, list[float]] = {name: [] for name in trees}
    hits: dict[str, float] = {}
    for r in range(args.rounds):
        for name in list(trees)[:: 1 if r % 2 == 0 else -1]:  # ABBA: neither tree always first
            tree = trees[name]
            sys.modules.update(tree["mods"])
            gc.collect()  # each replay starts clean: none pays for the other tree's survivors (untimed)
            res = tree["run"]()
            speed[name].append(res.layer_steps / res.wall_s)
            hits[name] = res.hit_rate
        print(f"round {r + 1}: base {speed['base'][-1] / 1e3:.2f}k  this {speed['this'][-1] / 1e3:.2f}k")
    ratios = sorted(t / b for b, t in zip(speed["base"], speed["this"], strict=True))
    results = {
        name: {
            "best": max(v),
            "median": statistics.median(v),
            "all": v,
            "hit_rate": hits[name],
            "modules": trees[name]["native"],
        }
        for name, v in speed.items()
    }
    results["ratio_this_over_base"] = {"median": statistics.median(ratios), "min": ratios[0], "max": ratios[-1]}
    for name in trees:
        print(
            f"{name}: best {max(speed[name]) / 1e3:.2f}k  median {statistics.median(speed[name]) / 1e3:.2f}k"
            f"  layer-steps/s, hit rate {hits[name]:.6f}"
        )
    print(f"this / base per round: median {statistics.median(ratios):.3f} ({ratios[0]:.3f}..{ratios[-1]:.3f})")
    if hits["base"] != hits["this"]:
        print("the hit rates differ: the change is not decision-identical")
    # (run_meta would name whichever tree's modules were imported last)
    write_record(args.out, vars(args), results, meta={"finemoe_modules": {n: t["native"] for n, t in trees.items()}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
