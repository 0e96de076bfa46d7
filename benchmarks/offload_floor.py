"""The link floor of a trace-routed `bench_offload.py` record, from the simulator (runs on a CPU).

At a budget, no policy moves fewer experts over the host link than Belady's optimal eviction
with perfect knowledge of the future (the simulator's `belady` bound); moving them takes at least
that many copies at the measured per-expert copy time. The floor of a decode step is therefore

    floor = max(all-gpu TPOT, Belady's copies per decode token x per-expert copy time)

(copies overlapping compute perfectly). The replay is the record's trace requests in the order
the benchmark ran them (rounds x requests), with the shape's layer mapping (`Trace.with_layers`).
Also reports the `oracle` bound's hit rate (perfect prediction at FineMoE's plan points). Adds a
`floor` section to the record and prints finemoe's TPOT over it.

    python benchmarks/offload_floor.py docs/results/offload_qwen15moe_trace.json --trace /tmp/tr7/q60x4.fmt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import shape_config  # noqa: E402
from finemoe.config import EngineConfig, ExpertBudget  # noqa: E402
from finemoe.costmodel import CostModel  # noqa: E402
from finemoe.simulator import simulate  # noqa: E402
from finemoe.trace import load_trace  # noqa: E402


def floor(record: dict, trace_path: str) -> dict:
    cfg = record["config"]
    layers = shape_config(cfg["shape"], cfg.get("layers")).num_hidden_layers
    trace = load_trace(trace_path).with_layers(layers)
    n = min(cfg["trace_requests"], trace.num_requests)
    replay = trace.subset(list(range(n)) * cfg["repeats"])
    cb = record["copy_bandwidth"]
    copy_s = cb["expert_bytes"] / (cb["gbps"] * 1e9)
    cost = CostModel("link-only", copy_s, 0.0, 0.0, 0.0, 0.0, 0.0, cb["expert_bytes"])
    all_gpu = next(r for r in record["runs"] if r["policy"] == "all-gpu")["tpot_s"]
    out = {"per_expert_copy_s": copy_s, "all_gpu_tpot_s": all_gpu, "layers": layers, "requests": n, "budgets": {}}
    for budget in cfg["budgets"].split(","):
        b = ExpertBudget.parse(budget)
        bel = simulate(replay, EngineConfig(policy="belady", expert_budget=b), cost, "timed")
        ora = simulate(replay, EngineConfig(policy="oracle", expert_budget=b), None, "instant")
        link_s = bel.tpot_s  # decode stall per token with no compute to hide behind = copies x copy time
        fl = max(all_gpu, link_s)
        row = {
            "belady_hit_rate": bel.hit_rate,
            "belady_copies_per_token": link_s / copy_s,
            "belady_link_s_per_token": link_s,
            "oracle_hit_rate": ora.hit_rate,
            "floor_tpot_s": fl,
        }
        for r in record["runs"]:
            if r["budget"] == budget and "hit_rate" in r:
                row[f"{r['policy']}_over_floor"] = r["tpot_s"] / fl
        out["budgets"][budget] = row
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("record", help="a bench_offload.py JSON record made with --trace")
    ap.add_argument("--trace", help="the trace file (default: the record's --trace path)")
    args = ap.parse_args()
    path = Path(args.record)
    record = json.loads(path.read_text())
    if not record["config"].get("trace"):
        raise SystemExit("the record was not made with --trace: no routing to replay")
    record["floor"] = floor(record, args.trace or record["config"]["trace"])
    path.write_text(json.dumps(record, indent=1))
    f = record["floor"]
    print(f"per-expert copy {f['per_expert_copy_s'] * 1e3:.3f} ms, all-gpu TPOT {f['all_gpu_tpot_s'] * 1e3:.2f} ms")
    for budget, row in f["budgets"].items():
        print(
            f"{budget}: Belady {row['belady_copies_per_token']:.1f} copies/token "
            f"({row['belady_link_s_per_token'] * 1e3:.2f} ms), hit {row['belady_hit_rate']:.3f}; "
            f"oracle hit {row['oracle_hit_rate']:.3f}; floor {row['floor_tpot_s'] * 1e3:.2f} ms; "
            + ", ".join(f"{k} {v:.2f}" for k, v in row.items() if k.endswith("_over_floor"))
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
