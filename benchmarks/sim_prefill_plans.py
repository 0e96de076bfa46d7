"""What finemoe's prefill plans are worth in the simulator: TTFT, TPOT and hit rate of finemoe and
finemoe-paper with `prefill_plans` maps / gate / none, next to LRU, Belady and the oracle, on the
GPU campaign's traces and their real shapes (25% budget, timed link, batch 1, stores frozen):

    python benchmarks/sim_prefill_plans.py --out docs/results/sim_prefill_plans.json

Traces: gpu_traces/{q128x8,q60x4,m8x2}_{test,hist}.fmt (see docs/results/gpu_trace.md).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import write_record  # noqa: E402
from finemoe.config import EngineConfig, ExpertBudget  # noqa: E402
from finemoe.costmodel import make_cost_model  # noqa: E402
from finemoe.sim_history import empty_history, record_history  # noqa: E402
from finemoe.simulator import simulate  # noqa: E402
from finemoe.trace import load_trace  # noqa: E402

log = logging.getLogger("sim_prefill_plans")

TRACES = (("q128x8", "qwen3-30b-a3b"), ("q60x4", "qwen1.5-moe-a2.7b"), ("m8x2", "mixtral-8x7b"))
BOUNDS = ("lru", "belady", "oracle")
MODES = ("maps", "gate", "none")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="gpu_traces", help="folder of the <name>_test.fmt / <name>_hist.fmt traces")
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--out", default="docs/results/sim_prefill_plans.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    rows = []
    for name, shape in TRACES:
        test = load_trace(Path(args.dir) / f"{name}_test.fmt")
        hist = empty_history(test, 1000)
        record_history(load_trace(Path(args.dir) / f"{name}_hist.fmt"), hist)
        cost = make_cost_model(test.spec, shape)
        runs = [(p, "auto") for p in BOUNDS] + [(p, m) for m in MODES for p in ("finemoe", "finemoe-paper")]
        for policy, mode in runs:
            cfg = EngineConfig(
                expert_budget=ExpertBudget.parse(args.budget), policy=policy, prefill_plans=mode, map_store_learn=False
            )
            r = simulate(test, cfg, cost, "timed", hist)
            rows.append(
                {
                    "trace": name,
                    "shape": shape,
                    "policy": policy,
                    "prefill_plans": None if policy in BOUNDS else mode,
                    "hit_rate": round(r.hit_rate, 4),
                    "ttft_ms": round(r.ttft_s * 1e3, 1),
                    "tpot_ms": round(r.tpot_s * 1e3, 3),
                    "prefetch_precision": round(r.stats["prefetch_precision"], 3),
                }
            )
            log.info("%s %s %s: hit %.3f ttft %.1f ms", name, policy, mode, r.hit_rate, r.ttft_s * 1e3)
    write_record(
        args.out,
        vars(args),
        {"rows": rows},
        note="simulated TTFT/TPOT (timed link, the shape's cost model), batch 1; prefill_plans only affects finemoe's",
    )
    for r in rows:
        mode = r["prefill_plans"] or "-"
        print(f"{r['trace']:7} {r['policy']:14} {mode:5} hit {r['hit_rate']:.3f} ttft {r['ttft_ms']:7.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
