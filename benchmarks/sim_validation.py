"""Validate finemoe's design choices on the history split only (never the test split): history
requests 0..N-1 preload the stores, the next M history requests are measured (cost model of the
traced model, 25% budget). Writes docs/results/sim_validation.json.

    python benchmarks/sim_validation.py --history /tmp/tr/history.fmt --preload 200 --measure 60
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import run_meta  # noqa: E402
from finemoe import policy as P  # noqa: E402
from finemoe.config import EngineConfig, ExpertBudget  # noqa: E402
from finemoe.costmodel import make_cost_model  # noqa: E402
from finemoe.sim_history import empty_history, record_history  # noqa: E402
from finemoe.simulator import simulate  # noqa: E402
from finemoe.trace import load_trace  # noqa: E402

RUNS = [
    ("finemoe", {}),
    ("finemoe-paper", {}),
    ("mixtral-offloading", {}),
    ("finemoe", {"eviction": "decay0.9"}),
    ("finemoe", {"eviction": "decay0.98"}),
    ("finemoe", {"gate_refine": False}),
    ("finemoe", {"eviction": "map-lfu"}),
]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--history", required=True)
    ap.add_argument("--preload", type=int, default=200)
    ap.add_argument("--measure", type=int, default=60)
    ap.add_argument("--out", default="docs/results/sim_validation.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    h = load_trace(args.history)
    pre = h.subset(list(range(args.preload)))
    val = h.subset(list(range(args.preload, min(args.preload + args.measure, h.num_requests))))
    hist = empty_history(val, 1000)
    record_history(pre, hist)
    cost = make_cost_model(val.spec, "trace")
    for g in (0.9, 0.98):  # variants of decay-lfu's gamma (0.95 is the shipped default)
        P.EVICTION_POLICIES[f"decay{g}"] = functools.partial(P.DecayLFUPolicy, gamma=g)
    rows = []
    for policy, kw in RUNS:
        cfg = EngineConfig(expert_budget=ExpertBudget.parse("25%"), policy=policy, map_store_learn=False, **kw)
        r = simulate(val, cfg, cost, "timed", hist)
        rows.append({"policy": policy, **kw, "hit_rate": r.hit_rate, "precision": r.stats["prefetch_precision"]})
        print(f"{policy:<20} {str(kw):<28} hit {r.hit_rate:.3f}", flush=True)
    Path(args.out).write_text(json.dumps({"meta": run_meta(), "config": vars(args), "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
