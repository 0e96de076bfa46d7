"""How fast the simulator replays: token-layer steps per second per policy, on one core.

    python benchmarks/sim_speed.py --traces /tmp/tr/test.fmt --history /tmp/tr/history.fmt \
        --out docs/results/sim_speed.json

`--history-cache FILE` keeps the stores recorded from `--history` in FILE (written when missing,
read when present, ~15 MB for the reference model's 1,000 maps), so a machine that cannot take the
history trace (the GPU machine: 64 MiB per call) replays from the same stores.

Targets (issue 5): >= 200k layer-steps/s for LRU, >= 20k for FineMoE (batch 1, timed link).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import write_record  # noqa: E402
from finemoe.config import EngineConfig, ExpertBudget  # noqa: E402
from finemoe.costmodel import make_cost_model  # noqa: E402
from finemoe.sim_history import History, empty_history, record_history  # noqa: E402
from finemoe.simulator import simulate  # noqa: E402
from finemoe.trace import load_trace  # noqa: E402


def history(test, path: str | None, cache: str | None) -> History:
    """The stores the replays start from: recorded from the trace `path`, or read from `cache`
    (then `path` may be omitted); written to `cache` after recording."""
    hist = empty_history(test, 1000)
    if cache and Path(cache).exists():
        st = torch.load(cache)
        hist.maps.load_rows(st["emb"], st["maps"])
        hist.requests.load_rows(st["eams"])
        return hist
    if path is None:
        raise SystemExit("give --history (a trace), or --history-cache naming an existing file")
    record_history(load_trace(path), hist)
    if cache:
        maps = hist.maps.state()
        torch.save({"emb": maps["emb"], "maps": maps["maps"], "eams": hist.requests.state()["eams"]}, cache)
    return hist


def profile(replay, n: int) -> list[dict]:
    """The `n` functions of most own time in one `replay()` under cProfile, per layer-step (the
    profiler's own overhead included: compare machines, not against the timed figure)."""
    prof = cProfile.Profile()
    r = prof.runcall(replay)
    steps = r.layer_steps or 1
    stats = pstats.Stats(prof).stats  # {(file, line, name): (prim calls, calls, own s, cumulative s, callers)}
    top = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:n]
    return [
        {
            "function": f"{Path(file).name}:{line}({name})" if line else name,
            "us_per_step": own / steps * 1e6,
            "calls_per_step": calls / steps,
        }
        for (file, line, name), (_, calls, own, _, _) in top
    ]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--traces", required=True)
    ap.add_argument("--history", help="the trace whose iterations fill the stores (or --history-cache)")
    ap.add_argument("--history-cache", help="the recorded stores: read if the file exists, else written")
    ap.add_argument("--limit", type=int, default=100, help="requests of --traces replayed")
    ap.add_argument("--budget", default="25%")
    ap.add_argument(
        "--policies", default="lru,lfu,on-demand,previous-token,mixtral-offloading,moe-infinity,finemoe,belady,oracle"
    )
    ap.add_argument("--repeat", type=int, default=2, help="best of N")
    ap.add_argument("--out", default="docs/results/sim_speed.json")
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after the timed replays, one more of each policy under cProfile: its N functions of most own "
        "time (µs per layer-step, calls per layer-step) printed and kept in the record, to compare machines "
        "function by function",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    test = load_trace(args.traces)
    test = test.head(args.limit)
    hist = history(test, args.history, args.history_cache)
    cost = make_cost_model(test.spec, "trace")
    rows = {}
    for policy in args.policies.split(","):
        cfg = EngineConfig(expert_budget=ExpertBudget.parse(args.budget), policy=policy, map_store_learn=False)
        best = None
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            r = simulate(test, cfg, cost, "timed", hist)
            total = time.perf_counter() - t0
            if best is None or r.wall_s < best[0].wall_s:
                best = (r, total)
        r, total = best
        rows[policy] = {
            "layer_steps": r.layer_steps,
            "replay_s": r.wall_s,
            "layer_steps_per_s": r.steps_per_s,
            "with_setup_s": total,
            "hit_rate": r.hit_rate,
        }
        print(f"{policy:<20} {r.steps_per_s / 1e3:8.1f}k layer-steps/s  ({r.layer_steps} steps, {r.wall_s:.2f}s)")
        if args.profile:
            rows[policy]["profile"] = profile(lambda cfg=cfg: simulate(test, cfg, cost, "timed", hist), args.profile)
            for f in rows[policy]["profile"]:
                print(f"    {f['us_per_step']:7.2f} µs {f['calls_per_step']:6.2f} calls  {f['function']}")
    write_record(args.out, vars(args), rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
