"""`finemoe simulate`: sweeps of policies x budgets x shapes over traces, as a table, a JSON
record and plots. The replay itself is `simulator.simulate`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from finemoe.config import PREFILL_EVICTION, PREFILL_PLANS, PREFILL_PREDICT
from finemoe.policy import EVICTION_POLICIES

log = logging.getLogger(__name__)

DEFAULT_POLICIES = "finemoe,mixtral-offloading,promoe,moe-infinity,on-demand,lfu,belady,oracle"


def add_prefill_args(ap: argparse.ArgumentParser) -> None:
    """`--prefill-eviction` and `--prefill-predict`, shared by the engine commands and `simulate`."""
    ap.add_argument(
        "--prefill-eviction",
        choices=list(PREFILL_EVICTION),
        default="auto",
        help="prefill victims: sweep (served layers first), policy (its own order); auto: the policy's",
    )
    ap.add_argument(
        "--prefill-predict",
        choices=list(PREFILL_PREDICT),
        default="auto",
        help="a prefill layer's predictors: before or after its on-demand copies are issued; auto: the policy's",
    )


def add_window_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--max-inflight-prefetches", type=int, default=4, help="prefetch copies in flight at most")
    ap.add_argument(
        "--prefetch-window",
        choices=["link", "fixed"],
        default="link",
        help="link: in flight only what the link copies in one layer's time (1..max); fixed: always the max",
    )


def add_simulate_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--traces", required=True, help="the trace to measure (finemoe trace record --out ...)")
    ap.add_argument("--history", help="a trace whose maps preload the history stores (the paper's offline setup)")
    ap.add_argument("--policies", default=DEFAULT_POLICIES, help="comma-separated; belady and oracle are bounds")
    ap.add_argument("--budgets", default="10%,25%,50%", help="comma-separated shares, slot counts or sizes")
    ap.add_argument("--shape", default="trace", help="cost model(s): trace or a named shape, comma-separated")
    ap.add_argument("--link", choices=["timed", "demand-first", "instant"], default="timed")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--prefetch-distance", type=int, help="layers ahead (default: each policy's)")
    ap.add_argument("--map-store-capacity", type=int, default=1000)
    ap.add_argument("--learn", action="store_true", help="the stores also learn from the measured trace (online)")
    ap.add_argument("--delta-rule", choices=["paper", "demo", "topk"], default="paper")
    ap.add_argument("--no-gate-refine", action="store_true", help="finemoe from expert maps alone")
    ap.add_argument("--no-semantic", action="store_true", help="FineMoE without the semantic match (ablation)")
    ap.add_argument("--prefill-plans", choices=list(PREFILL_PLANS), default="auto", help="finemoe's plans in prefill")
    ap.add_argument("--map-values", choices=["probs", "counts"], default="probs", help="counts: the hit-count ablation")
    ap.add_argument("--trajectory-window", type=int, default=0)
    ap.add_argument("--trajectory-candidates", type=int, default=64, help="decode: follow the K leading maps (0: all)")
    ap.add_argument("--map-min-score", type=float, default=0.0, help="finemoe: plan only from matches scoring this")
    ap.add_argument("--map-min-precision", type=float, default=0.0, help="finemoe: withhold imprecise map plans")
    ap.add_argument("--map-store-rows", choices=["all", "last"], default="all")
    ap.add_argument("--eviction", choices=sorted(EVICTION_POLICIES), help="override every policy's eviction")
    add_prefill_args(ap)
    add_window_args(ap)
    ap.add_argument(
        "--oracle-noise",
        type=float,
        default=0.0,
        help="the oracle plans this share of wrong experts (precision = recall = 1 - noise); with --eviction "
        "the oracle prefetches over that eviction instead of Belady's",
    )
    ap.add_argument(
        "--predict-host-us",
        type=float,
        default=0.0,
        help="host time per layer in which a policy's predictors run (cost model calibration)",
    )
    ap.add_argument(
        "--victim-host-us",
        type=float,
        default=0.0,
        help="host time per victim search of the eviction policy, before the copies it makes room for "
        "(cost model calibration; applies to every policy of the run)",
    )
    ap.add_argument(
        "--routing-host-us",
        type=float,
        default=0.0,
        help="host time per layer of an eviction policy that reads the routing (router-ema; calibration)",
    )
    ap.add_argument("--layer-overhead-us", type=float, default=100.0, help="fixed cost per layer (cost model)")
    ap.add_argument(
        "--graphed-decode",
        action="store_true",
        help="decode as the engine's CUDA graphs run it (single prompts), the host and the GPU on their own "
        "timelines: a layer's host work after its segment's launch (--layer-host-us, --predict-host-us) "
        "overlaps the copies and the GPU's work",
    )
    ap.add_argument(
        "--no-run-ahead",
        action="store_true",
        help="with --graphed-decode: every layer syncs on its routing, also those whose experts are all "
        "resident (the engine runs those ahead by default)",
    )
    ap.add_argument(
        "--layer-host-us",
        type=float,
        default=0.0,
        help="with --graphed-decode: host time per layer besides the predictors (sync, serving, launch; calibration)",
    )
    ap.add_argument(
        "--sync-host-us",
        type=float,
        default=0.0,
        help="with --graphed-decode: host time per routing sync before the next launch, the GPU idle (the "
        "wake-up, serving, the launch; calibration: ~45 us on the H200, docs/results/simulator.md)",
    )
    ap.add_argument(
        "--keep-whole-layers",
        action="store_true",
        help="near 100%%: decayed LFU's victims spare layers whose experts are all resident (keep_whole_layers)",
    )
    ap.add_argument(
        "--gather-absent",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="near 100%%: the absent experts gather in the last layers, the others stay whole (gather_absent; "
        "default: with --graphed-decode)",
    )
    ap.add_argument(
        "--warm-pool",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="start every replay with the free slots filled, layer by layer (the engine's warm_pool; "
        "default: with --graphed-decode)",
    )
    ap.add_argument("--limit", type=int, help="measure only the first N requests of --traces")
    ap.add_argument(
        "--jobs",
        type=int,
        default=0,
        help="replays run at once, in worker processes (0, the default: every usable core; 1: one at a time "
        "in this process); the results do not depend on it",
    )
    ap.add_argument("--json", dest="json_out", help="write the JSON record here")
    ap.add_argument("--plot", help="write a PNG (hit rate and estimated TPOT vs budget) here")


def _config(args: argparse.Namespace, policy: str, budget: str) -> Any:
    from finemoe.config import EngineConfig, ExpertBudget

    return EngineConfig(
        expert_budget=ExpertBudget.parse(budget),
        policy=policy,
        prefetch_distance=args.prefetch_distance,
        map_store_capacity=args.map_store_capacity,
        map_store_learn=args.learn,
        delta_rule=args.delta_rule,
        semantic_search=not args.no_semantic,
        gate_refine=not args.no_gate_refine,
        prefill_plans=args.prefill_plans,
        map_values=args.map_values,
        trajectory_window=args.trajectory_window,
        trajectory_candidates=args.trajectory_candidates,
        map_min_score=args.map_min_score,
        map_min_precision=args.map_min_precision,
        map_store_rows=args.map_store_rows,
        eviction=args.eviction,
        prefill_eviction=args.prefill_eviction,
        prefill_predict=args.prefill_predict,
        max_inflight_prefetches=args.max_inflight_prefetches,
        prefetch_window=args.prefetch_window,
        warm_pool=args.warm_pool,
        keep_whole_layers=args.keep_whole_layers,
        gather_absent=args.gather_absent,
        search="sync",
    )


def run_sweep(args: argparse.Namespace) -> int:
    import torch

    from finemoe.costmodel import make_cost_model
    from finemoe.errors import ConfigError
    from finemoe.presets import PRESETS
    from finemoe.sim_history import empty_history, record_history
    from finemoe.simjobs import Replay, replay_all, resolve_jobs
    from finemoe.simulator import ORACLES, SimResult
    from finemoe.trace import load_trace

    policies = [p for p in args.policies.split(",") if p]
    bad = [p for p in policies if p not in PRESETS and p not in ORACLES]
    if bad:
        raise ConfigError(f"unknown policies {bad}; choose from {', '.join([*PRESETS, *ORACLES])}")
    if args.batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
    if (args.layer_host_us or args.sync_host_us) and not args.graphed_decode:
        raise ConfigError(
            "--layer-host-us and --sync-host-us are host time in a graphed decode step: add --graphed-decode"
        )
    if args.no_run_ahead and not args.graphed_decode:
        raise ConfigError("--no-run-ahead changes graphed decode steps only: add --graphed-decode")
    test = load_trace(args.traces)
    if args.limit:
        test = test.head(args.limit)
    history = empty_history(test, args.map_store_capacity)
    if args.history:
        hist = load_trace(args.history)
        if hist.identity != test.identity:
            raise ConfigError(f"{args.history} was recorded on another model than {args.traces}")
        t0 = time.perf_counter()
        record_history(hist, history, args.map_store_rows, args.map_values)
        log.info(
            "history: %d maps from %d requests in %.1fs", history.maps.size, hist.num_requests, time.perf_counter() - t0
        )
    budgets = [b for b in args.budgets.split(",") if b]
    shapes = [s for s in args.shape.split(",") if s]
    jobs: list[tuple[str, Replay]] = []  # (shape, replay), in the table's order
    for shape in shapes:
        cost = make_cost_model(
            test.spec,
            shape,
            layer_overhead_s=args.layer_overhead_us * 1e-6,
            predict_host_s=args.predict_host_us * 1e-6,
            victim_host_s=args.victim_host_us * 1e-6,
            routing_host_s=args.routing_host_us * 1e-6,
            layer_host_s=args.layer_host_us * 1e-6,
            sync_host_s=args.sync_host_us * 1e-6,
        )
        knobs = {
            "cost": cost,
            "link": args.link,
            "batch_size": args.batch_size,
            "oracle_noise": args.oracle_noise,
            "graphed": args.graphed_decode,
            "run_ahead": not args.no_run_ahead,
        }
        for bi, budget in enumerate(budgets):
            for policy in policies:
                jobs.append((shape, Replay(_config(args, policy, budget), history="history", **knobs)))
            if bi == 0:  # the all-resident floor, once per shape
                floor = Replay(_config(args, "all-gpu", "100%"), cost, args.link, None, args.batch_size)
                jobs.append((shape, floor))
    workers = resolve_jobs(args.jobs, len(jobs))
    torch.set_num_threads(1)  # (as in the workers: the same results for any --jobs)
    log.info("%d replays on %d worker process(es)", len(jobs), workers)
    done = [0]

    def report(i: int, r: SimResult) -> None:
        done[0] += 1
        if r.policy == "all-gpu":
            return
        print(
            f"[{done[0]}/{len(jobs)}] {jobs[i][0]} {r.budget:>5} {r.policy:<20} hit {r.hit_rate:.3f} "
            f"tpot {r.tpot_s * 1e3:.3f}ms ({r.steps_per_s / 1e3:.0f}k steps/s)",
            file=sys.stderr,
        )

    results = replay_all(test, [j for _, j in jobs], {"history": history}, workers, report)
    rows = [{"shape": shape, **r.to_dict()} for (shape, _), r in zip(jobs, results, strict=True)]
    _print_table(rows)
    if args.json_out:
        rec = {
            "meta": _meta(),
            "config": {**vars(args), "workers": workers},
            "trace": _trace_info(test),
            "results": rows,
        }
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(rec, indent=1, default=str))
    if args.plot:
        plot_sweep(rows, Path(args.plot))
    return 0


def _trace_info(tr: Any) -> dict:
    return {
        "requests": tr.num_requests,
        "layers": tr.spec.num_layers,
        "experts": tr.spec.num_experts,
        "top_k": tr.spec.top_k,
        "layer_steps": tr.layer_steps(),
    }


def _meta() -> dict:
    import platform
    import subprocess

    import torch

    from finemoe import __version__

    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        sha = ""
    return {
        "finemoe": __version__,
        "git_sha": sha,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _print_table(rows: list[dict]) -> None:
    print(
        f"{'shape':<18} {'budget':>6} {'policy':<20} {'hit':>6} {'prec':>6} {'recall':>6} {'stall ms':>9} "
        f"{'TTFT ms':>8} {'TPOT ms':>8}"
    )
    for r in rows:
        st = r["stats"]
        print(
            f"{r['shape']:<18} {r['budget']:>6} {r['policy']:<20} {st['hit_rate']:>6.3f} "
            f"{st['prefetch_precision']:>6.3f} {st['prefetch_recall']:>6.3f} {r['stall_s'] * 1e3:>9.1f} "
            f"{r['ttft_s'] * 1e3:>8.2f} {r['tpot_s'] * 1e3:>8.3f}"
        )


def plot_sweep(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({r["shape"] for r in rows})
    fig, axes = plt.subplots(len(shapes), 2, figsize=(12, 4 * len(shapes)), squeeze=False)
    for i, shape in enumerate(shapes):
        sub = [r for r in rows if r["shape"] == shape and r["policy"] != "all-gpu"]
        floor = [r for r in rows if r["shape"] == shape and r["policy"] == "all-gpu"]
        for policy in dict.fromkeys(r["policy"] for r in sub):
            pts = [(r["slots"], r["hit_rate"], r["tpot_s"] * 1e3) for r in sub if r["policy"] == policy]
            pts.sort()
            style = "--" if policy in ("belady", "oracle") else "-"
            axes[i][0].plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=policy)
            axes[i][1].plot([p[0] for p in pts], [p[2] for p in pts], style, marker="o", label=policy)
        if floor:
            axes[i][1].axhline(floor[0]["tpot_s"] * 1e3, color="k", lw=0.8, label="all-gpu")
        axes[i][0].set_ylabel("expert hit rate")
        axes[i][1].set_ylabel("estimated TPOT (ms)")
        for ax in axes[i]:
            ax.set_xlabel("expert slots (budget)")
            ax.set_title(f"cost model: {shape}")
        axes[i][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
