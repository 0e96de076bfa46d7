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
from finemoe.sim_history import History, empty_history, record_history  # noqa: E402
from finemoe.simjobs import Replay, replay_all  # noqa: E402
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


# Each part lists its replays as (the row's extra columns, Replay); `main` runs them all through
# `replay_all` (--jobs worker processes) and logs each as it finishes. Histories by name: "probs" the
# history split's maps (1K), "counts" its hit-count maps (the ablation), "cap<N>" a store of N maps.
Job = tuple[dict, Replay]


def part_budget(test, args) -> list[Job]:
    cost = make_cost_model(test.spec, "trace")
    return [
        ({"shape": "trace"}, Replay(cfg(policy, budget), cost, history="probs"))
        for budget in ["5%", "10%", "25%", "50%", "75%"]
        for policy in POLICIES + ORACLES
    ]


def part_tpot(test, args) -> list[Job]:
    jobs: list[Job] = []
    for shape in ["qwen1.5-moe-a2.7b", "qwen3-30b-a3b"]:
        cost = make_cost_model(test.spec, shape)
        jobs.append(({"shape": shape}, Replay(cfg("all-gpu", "100%"), cost)))
        for budget in ["10%", "25%", "50%"]:
            jobs += [
                ({"shape": shape}, Replay(cfg(policy, budget), cost, history="probs")) for policy in POLICIES + ORACLES
            ]
    return jobs


ABLATION = [
    ("hit count", "finemoe-paper", {"map_values": "counts", "semantic_search": False, "delta_rule": "topk"}),
    ("Map (T)", "finemoe-paper", {"semantic_search": False, "delta_rule": "topk"}),
    ("Map (T+S)", "finemoe-paper", {"delta_rule": "topk"}),
    ("Map (T+S+δ) = finemoe-paper", "finemoe-paper", {}),
    ("+ gate refine", "finemoe", {"eviction": "map-lfu"}),
    ("+ decay eviction = finemoe", "finemoe", {}),
]


def part_ablation(test, args) -> list[Job]:
    cost = make_cost_model(test.spec, "trace")
    return [
        ({"shape": "trace", "variant": label}, Replay(cfg(policy, **kw), cost, history=kw.get("map_values", "probs")))
        for label, policy, kw in ABLATION
    ]


def part_distance(test, args) -> list[Job]:
    jobs: list[Job] = []
    for shape in args.distance_shapes.split(","):
        cost = make_cost_model(test.spec, shape)
        for d in range(1, 9):
            for policy in ["finemoe", "finemoe-paper"]:
                jobs.append(
                    ({"shape": shape, "distance": d}, Replay(cfg(policy, prefetch_distance=d), cost, history="probs"))
                )
    return jobs


CAPACITIES = [64, 256, 1000, 4000, 8000]


def part_capacity(test, args) -> list[Job]:
    cost = make_cost_model(test.spec, "trace")
    return [
        ({"shape": "trace", "capacity": cap}, Replay(cfg(policy, map_store_capacity=cap), cost, history=f"cap{cap}"))
        for cap in CAPACITIES
        for policy in ["finemoe", "finemoe-paper"]
    ]


def part_batch(test, args) -> list[Job]:
    cost = make_cost_model(test.spec, "qwen1.5-moe-a2.7b")
    return [
        ({"shape": "qwen1.5-moe-a2.7b", "batch": b}, Replay(cfg(policy), cost, history="probs", batch_size=b))
        for b in [1, 2, 4, 8]
        for policy in ["finemoe", "finemoe-paper", "mixtral-offloading", "on-demand", "oracle"]
    ]


def histories(parts: list[str], test, hist_trace) -> dict[str, History]:
    """The stores the parts' replays start from, each recorded once from the history trace."""
    want = {"probs"}
    if "ablation" in parts:
        want.add("counts")
    if "capacity" in parts:
        want.update(f"cap{c}" for c in CAPACITIES if c != 1000)
    out = {}
    for name in sorted(want):
        cap = int(name[3:]) if name.startswith("cap") else 1000
        out[name] = empty_history(test, cap)
        record_history(hist_trace, out[name], map_values="counts" if name == "counts" else "probs")
        log(f"history {name}: {out[name].maps.size} maps")
    out["cap1000"] = out["probs"]
    return out


PARTS = {
    "budget": part_budget,
    "tpot": part_tpot,
    "ablation": part_ablation,
    "distance": part_distance,
    "capacity": part_capacity,
    "batch": part_batch,
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--traces", required=True)
    ap.add_argument("--history", required=True)
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--limit", type=int, default=80, help="test requests measured")
    ap.add_argument("--distance-shapes", default="trace,qwen1.5-moe-a2.7b", help="cost models of the distance part")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--jobs", type=int, default=0, help="replays at once in worker processes (0: every usable core)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    test = load_trace(args.traces)
    test = test.head(args.limit)
    hist_trace = load_trace(args.history)
    parts = args.parts.split(",")
    stores = histories(parts, test, hist_trace)
    for part in parts:
        t0 = time.perf_counter()
        jobs = PARTS[part](test, args)

        def report(i: int, r, part=part, jobs=jobs) -> None:
            extra = " ".join(f"{k}={v}" for k, v in jobs[i][0].items())
            log(f"{part} {extra} {r.budget} {r.policy}: hit {r.hit_rate:.3f} tpot {r.tpot_s * 1e3:.2f} ms")

        results = replay_all(test, [j for _, j in jobs], stores, args.jobs, report)
        rows = [row(r, **extra) for (extra, _), r in zip(jobs, results, strict=True)]
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
