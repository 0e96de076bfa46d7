"""The policy study (issue 5): trace-driven replays of the reference model's workload traces.

History split preloads the stores (offline setup), the test split is measured, batch 1 unless
stated. Parts (each writes docs/results/study_<part>.json and a PNG):

  budget    hit rate vs budget 5-75% for every policy and both oracles (cost model: the trace)
  tpot      estimated TPOT vs budget on real shapes (Qwen1.5-MoE-A2.7B, Qwen3-30B-A3B)
  ablation  hit count -> Map (T) -> Map (T+S) -> Map (T+S+δ) -> + gate refine -> + decay eviction
  distance  prefetch distance 1-8 (hit rate on the trace, TPOT on Qwen1.5-MoE)
  capacity  map store capacity 64-8K
  batch     batch sizes 1-8

    python benchmarks/policy_study.py --traces /tmp/tr/test.fmt --history /tmp/tr/history.fmt \
        --parts budget,tpot --limit 80
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import run_meta  # noqa: E402
from finemoe.config import EngineConfig, ExpertBudget  # noqa: E402
from finemoe.costmodel import make_cost_model  # noqa: E402
from finemoe.sim_history import empty_history, record_history  # noqa: E402
from finemoe.simulator import simulate  # noqa: E402
from finemoe.trace import load_trace  # noqa: E402

POLICIES = ["finemoe", "finemoe-paper", "mixtral-offloading", "promoe", "moe-infinity", "on-demand", "lfu"]
BASELINES = ["mixtral-offloading", "promoe", "moe-infinity", "on-demand", "lfu"]
ORACLES = ["belady", "oracle"]
OUT = Path("docs/results")


def cfg(policy: str, budget: str = "25%", **kw) -> EngineConfig:
    return EngineConfig(expert_budget=ExpertBudget.parse(budget), policy=policy, map_store_learn=False, **kw)


def row(r, **extra) -> dict:
    st = r.stats
    return {
        **extra,
        "policy": r.policy,
        "budget": r.budget,
        "slots": r.slots,
        "hit_rate": st["hit_rate"],
        "precision": st["prefetch_precision"],
        "recall": st["prefetch_recall"],
        "late": st["prefetches_late"],
        "stall_s": r.stall_s,
        "ttft_ms": r.ttft_s * 1e3,
        "tpot_ms": r.tpot_s * 1e3,
        "layer_hit_rate": st["layer_hit_rate"],
        "mean_trajectory_score": r.predictor.get("mean_trajectory_score"),
        "mean_semantic_score": r.predictor.get("mean_semantic_score"),
        "wall_s": r.wall_s,
    }


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def part_budget(test, hist, args) -> list[dict]:
    cost = make_cost_model(test.spec, "trace")
    rows = []
    for budget in ["5%", "10%", "25%", "50%", "75%"]:
        for policy in POLICIES + ORACLES:
            r = simulate(test, cfg(policy, budget), cost, "timed", hist)
            rows.append(row(r, shape="trace"))
            log(f"budget {budget} {policy}: hit {r.hit_rate:.3f}")
    return rows


def part_tpot(test, hist, args) -> list[dict]:
    rows = []
    for shape in ["qwen1.5-moe-a2.7b", "qwen3-30b-a3b"]:
        cost = make_cost_model(test.spec, shape)
        floor = simulate(test, cfg("all-gpu", "100%"), cost, "timed", None)
        rows.append(row(floor, shape=shape))
        for budget in ["10%", "25%", "50%"]:
            for policy in POLICIES + ORACLES:
                r = simulate(test, cfg(policy, budget), cost, "timed", hist)
                rows.append(row(r, shape=shape))
                log(f"tpot {shape} {budget} {policy}: hit {r.hit_rate:.3f} tpot {r.tpot_s * 1e3:.2f} ms")
    return rows


ABLATION = [
    ("hit count", "finemoe-paper", {"map_values": "counts", "semantic_search": False, "delta_rule": "topk"}),
    ("Map (T)", "finemoe-paper", {"semantic_search": False, "delta_rule": "topk"}),
    ("Map (T+S)", "finemoe-paper", {"delta_rule": "topk"}),
    ("Map (T+S+δ) = finemoe-paper", "finemoe-paper", {}),
    ("+ gate refine", "finemoe", {"eviction": "map-lfu"}),
    ("+ decay eviction = finemoe", "finemoe", {}),
]


def part_ablation(test, hist_trace, args) -> list[dict]:
    cost = make_cost_model(test.spec, "trace")
    rows = []
    for label, policy, kw in ABLATION:
        hist = empty_history(test, 1000)
        record_history(hist_trace, hist, map_values=kw.get("map_values", "probs"))
        r = simulate(test, cfg(policy, **kw), cost, "timed", hist)
        rows.append(row(r, shape="trace", variant=label))
        log(f"ablation {label}: hit {r.hit_rate:.3f}")
    return rows


def part_distance(test, hist, args) -> list[dict]:
    rows = []
    for shape in args.distance_shapes.split(","):
        cost = make_cost_model(test.spec, shape)
        for d in range(1, 9):
            for policy in ["finemoe", "finemoe-paper"]:
                r = simulate(test, cfg(policy, prefetch_distance=d), cost, "timed", hist)
                rows.append(row(r, shape=shape, distance=d))
                log(f"distance {shape} d={d} {policy}: hit {r.hit_rate:.3f} tpot {r.tpot_s * 1e3:.2f}")
    return rows


def part_capacity(test, hist_trace, args) -> list[dict]:
    cost = make_cost_model(test.spec, "trace")
    rows = []
    for cap in [64, 256, 1000, 4000, 8000]:
        hist = empty_history(test, cap)
        record_history(hist_trace, hist)
        for policy in ["finemoe", "finemoe-paper"]:
            r = simulate(test, cfg(policy, map_store_capacity=cap), cost, "timed", hist)
            rows.append(row(r, shape="trace", capacity=cap))
            log(f"capacity {cap} {policy}: hit {r.hit_rate:.3f} traj {r.predictor.get('mean_trajectory_score')}")
    return rows


def part_batch(test, hist, args) -> list[dict]:
    cost = make_cost_model(test.spec, "qwen1.5-moe-a2.7b")
    rows = []
    for b in [1, 2, 4, 8]:
        for policy in ["finemoe", "finemoe-paper", "mixtral-offloading", "on-demand", "oracle"]:
            r = simulate(test, cfg(policy), cost, "timed", hist, batch_size=b)
            rows.append(row(r, shape="qwen1.5-moe-a2.7b", batch=b))
            log(f"batch {b} {policy}: hit {r.hit_rate:.3f} ttft {r.ttft_s * 1e3:.1f} tpot {r.tpot_s * 1e3:.2f}")
    return rows


PARTS = {
    "budget": part_budget,
    "tpot": part_tpot,
    "ablation": part_ablation,
    "distance": part_distance,
    "capacity": part_capacity,
    "batch": part_batch,
}
NEEDS_TRACE = {"ablation", "capacity"}  # parts that build their own history stores


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--traces", required=True)
    ap.add_argument("--history", required=True)
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--limit", type=int, default=80, help="test requests measured")
    ap.add_argument("--distance-shapes", default="trace,qwen1.5-moe-a2.7b", help="cost models of the distance part")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    torch.set_num_threads(1)
    test = load_trace(args.traces)
    test = test.head(args.limit)
    hist_trace = load_trace(args.history)
    hist = empty_history(test, 1000)
    record_history(hist_trace, hist)
    for part in args.parts.split(","):
        t0 = time.perf_counter()
        src = hist_trace if part in NEEDS_TRACE else hist
        rows = PARTS[part](test, src, args)
        rec = {
            "meta": run_meta(),
            "config": {**vars(args), "part": part},
            "trace": {"test_requests": test.num_requests, "history_requests": hist_trace.num_requests},
            "seconds": time.perf_counter() - t0,
            "results": rows,
        }
        path = Path(args.out) / f"study_{part}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec, indent=1))
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
