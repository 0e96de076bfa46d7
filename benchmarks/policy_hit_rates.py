"""Hit rate of every policy on the reference model with the workload (the paper's offline setup).

1. History: the workload's history split runs with every expert resident while the engine records
   expert maps and request matrices into a map store (online mode), saved to --map-store.
2. Test: for each policy, the test split runs one prompt at a time (batch 1, greedy) at --budget
   with the store loaded and frozen; the cache counters of the test prompts are summed.
3. Overhead: the predictor's time on the forward thread per decode iteration (sync and async
   search), against the iteration time of the 100%-budget run without a predictor.

    python benchmarks/policy_hit_rates.py --history 800 --test 100 --out docs/results/policies_25.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import plot_policy_hit_rates, run_meta  # noqa: E402
from finemoe import Engine, SamplingParams, reference  # noqa: E402
from finemoe.workload import load_workload  # noqa: E402

POLICIES = [
    "finemoe",
    "finemoe-paper",
    "mixtral-offloading",
    "promoe",
    "moe-infinity",
    "previous-token",
    "on-demand",
    "lfu",
]

log = logging.getLogger("policy_hit_rates")


def record_history(path: Path, prompts: list[str], store: Path, params: SamplingParams, batch: int) -> dict:
    t0 = time.perf_counter()
    with Engine.from_pretrained(
        path, expert_budget="100%", policy="finemoe", map_store=str(store), progress=False
    ) as eng:
        for i in range(0, len(prompts), batch):
            eng.generate(prompts[i : i + batch], params)
            if (i // batch) % 10 == 0:
                log.info("history %d/%d prompts, %d maps offered", i + batch, len(prompts), eng.maps.inserts)
        info = {"maps": eng.maps.size, "maps_offered": eng.maps.inserts, "requests": eng.requests.size}
    info["seconds"] = time.perf_counter() - t0
    return info


def run_policy(eng: Engine, prompts: list[str], params: SamplingParams) -> dict:
    before = eng.stats()
    iters = 0
    decode_s = 0.0
    t0 = time.perf_counter()
    crit0 = eng.runtime.critical_s
    for p in prompts:
        out = eng.generate(p, params)[0]
        iters += len(out.token_ids)
        decode_s += out.tpot_s * max(len(out.token_ids) - 1, 0)
    wall = time.perf_counter() - t0
    st = eng.stats()
    c = st.cache.minus(before.cache)
    return {
        "hit_rate": c.hit_rate,
        "hits": c.hits,
        "misses": c.misses,
        "prefetch_precision": c.prefetch_precision,
        "prefetch_recall": c.prefetch_recall,
        "prefetches_issued": c.prefetches_issued,
        "prefetches_late": c.prefetches_late,
        "prefetches_wasted": c.prefetches_wasted,
        "prefetch_wasted_bytes": c.prefetch_wasted_bytes,
        "stall_s": c.stall_s,
        "bytes_copied": c.bytes_copied,
        "layer_hit_rate": c.layer_hit_rate,
        "iterations": iters,
        "wall_s": wall,
        "predictor_critical_s": eng.runtime.critical_s - crit0,
        "predictor_critical_ms_per_iteration": (eng.runtime.critical_s - crit0) / max(iters, 1) * 1e3,
        "extra": {k: v for k, v in st.extra.items() if not isinstance(v, list)},
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--history", type=int, default=800, help="history prompts recorded (0 = all)")
    ap.add_argument("--test", type=int, default=100, help="test prompts measured (0 = all)")
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8, help="batch size while recording history")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--search", default="sync", help="search modes to run each policy in (sync,async)")
    ap.add_argument("--map-store", default="/tmp/finemoe-bench/history.fms")
    ap.add_argument("--reuse-store", action="store_true", help="skip recording if the store file exists")
    ap.add_argument("--out", default="docs/results/policies_25.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    path = reference.ensure_built()
    history = [p.prompt for p in load_workload(split="history")]
    test = [p.prompt for p in load_workload(split="test")]
    history = history[: args.history] if args.history else history
    test = test[: args.test] if args.test else test
    params = SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    store = Path(args.map_store)
    rec: dict = {"meta": run_meta(), "config": vars(args), "model": str(path)}
    if not (args.reuse_store and store.exists()):
        store.unlink(missing_ok=True)
        store.parent.mkdir(parents=True, exist_ok=True)
        rec["history"] = record_history(path, history, store, params, args.batch)
        log.info("history recorded: %s", rec["history"])
    results = {}
    with Engine.from_pretrained(
        path, expert_budget="100%", policy="all-gpu", map_store=str(store), map_store_learn=False, progress=False
    ) as eng:
        r = run_policy(eng, test[: min(len(test), 30)], params)
        rec["all_gpu"] = {"tpot_ms": r["wall_s"] / max(r["iterations"], 1) * 1e3, **r}
        log.info("100%% budget, no predictor: %.2f ms per iteration", rec["all_gpu"]["tpot_ms"])
        for name in args.policies.split(","):
            for search in args.search.split(","):
                eng.reconfigure(policy=name, expert_budget=args.budget, search=search)
                r = run_policy(eng, test, params)
                key = name if search == "sync" else f"{name} ({search} search)"
                results[key] = r
                log.info(
                    "%-28s hit %.3f  precision %.3f  recall %.3f  stall %.2fs  predictor %.3f ms/it",
                    key,
                    r["hit_rate"],
                    r["prefetch_precision"],
                    r["prefetch_recall"],
                    r["stall_s"],
                    r["predictor_critical_ms_per_iteration"],
                )
    rec["policies"] = results
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=1))
    plot(rec, out.with_suffix(".png"))
    print(f"{'policy':<28} {'hit rate':>8} {'precision':>9} {'recall':>7} {'stall s':>8} {'pred ms/it':>10}")
    for k, r in results.items():
        print(
            f"{k:<28} {r['hit_rate']:>8.3f} {r['prefetch_precision']:>9.3f} {r['prefetch_recall']:>7.3f} "
            f"{r['stall_s']:>8.2f} {r['predictor_critical_ms_per_iteration']:>10.3f}"
        )
    print(f"100% budget iteration: {rec['all_gpu']['tpot_ms']:.2f} ms")
    return 0


def plot(rec: dict, path: Path) -> None:
    plot_policy_hit_rates(rec["policies"], rec["config"]["budget"], path)


if __name__ == "__main__":
    raise SystemExit(main())
