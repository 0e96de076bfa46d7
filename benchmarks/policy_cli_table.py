"""Issue 4's hit-rate table made through the CLI, as its acceptance words it: `finemoe generate --json`
over the workload's test prompts at a 25% budget, one run per policy, the history split preloaded into
the map store (the paper's offline setup). Each run's last JSON line (`{"summary": ...}`, the engine's
counters over every prompt of the run) is the table's row.

    python benchmarks/policy_cli_table.py --history 600 --test 60 --store /tmp/finemoe-bench/hist_cli.fms \
        --out docs/results/policies_cli_25.json          # + policies_cli_25.png

The store is recorded once (`finemoe generate ... --expert-budget 100% --map-store STORE`, batches of
8) unless STORE exists; every policy then loads it frozen (`--freeze-map-store`). The commands run are
in the record (`results.commands`). Generation stops at the end-of-sequence token unless `--ignore-eos`
(then every prompt runs --max-new-tokens tokens, as `policy_hit_rates.py` runs them).

A long table can run as several processes, one or a few policies each, over the same STORE (record it
first), and be merged into one record and plot:

    python benchmarks/policy_cli_table.py --merge /tmp/t/finemoe.json /tmp/t/lru.json --out docs/results/t.json

(the records must agree on --history, --test, --max-new-tokens, --ignore-eos, --budget and --store).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import plot_policy_hit_rates, write_record  # noqa: E402

POLICIES = "finemoe,finemoe-paper,mixtral-offloading,promoe,moe-infinity,previous-token,on-demand,lfu"
KEEP = (
    "hit_rate",
    "hits",
    "misses",
    "prefetch_precision",
    "prefetch_recall",
    "prefetches_issued",
    "prefetches_wasted",
    "stall_s",
    "search",
    "prefetch_distance",
    "layer_hit_rate",
)


def finemoe_cmd() -> list[str]:
    """The console script next to this interpreter (the venv's), else `python -m finemoe`."""
    script = Path(sys.executable).with_name("finemoe")
    return [str(script)] if script.exists() else [sys.executable, "-m", "finemoe"]


def run(args: list[str], label: str) -> tuple[dict | None, float]:
    """Run the CLI with `args`; stderr passes through (progress); returns (the last line's summary
    or None, seconds)."""
    t0 = time.perf_counter()
    print(f"[{label}] {' '.join(args)}", file=sys.stderr, flush=True)
    proc = subprocess.run([*finemoe_cmd(), *args], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{label}: finemoe exited with {proc.returncode}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    summary = json.loads(lines[-1]).get("summary") if lines else None
    return summary, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--history", type=int, default=600, help="history prompts recorded into the store")
    ap.add_argument("--test", type=int, default=60, help="test prompts per policy")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--ignore-eos", action="store_true", help="every prompt runs --max-new-tokens tokens")
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--policies", default=POLICIES)
    ap.add_argument("--store", default="/tmp/finemoe-bench/hist_cli.fms", help="the map store (recorded if missing)")
    ap.add_argument("--out", default="docs/results/policies_cli_25.json")
    ap.add_argument("--merge", nargs="+", metavar="RECORD", help="merge these records' rows into --out; run nothing")
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge, Path(args.out))
    store = Path(args.store)
    tokens = ["--max-new-tokens", str(args.max_new_tokens), "--json", *(["--ignore-eos"] if args.ignore_eos else [])]
    commands = []
    history_s = None
    if store.exists():
        print(f"[history] reusing {store}: its recording settings are not checked", file=sys.stderr)
    else:
        store.parent.mkdir(parents=True, exist_ok=True)
        cmd = ["generate", "--prompts", "workload", "--split", "history", "--limit", str(args.history)]
        cmd += ["--expert-budget", "100%", "--map-store", str(store), "--batch-size", "8", *tokens]
        _, history_s = run(cmd, "history")
        commands.append(" ".join(["finemoe", *cmd]))
    rows: dict[str, dict] = {}
    for policy in args.policies.split(","):
        cmd = ["generate", "--prompts", "workload", "--split", "test", "--limit", str(args.test)]
        cmd += ["--expert-budget", args.budget, "--policy", policy, "--map-store", str(store)]
        cmd += ["--freeze-map-store", *tokens]
        summary, secs = run(cmd, policy)
        commands.append(" ".join(["finemoe", *cmd]))
        if summary is None:
            raise SystemExit(f"{policy}: no summary line in the output")
        rows[policy] = {k: summary.get(k) for k in KEEP} | {"wall_s": secs}
        r = rows[policy]
        print(
            f"{policy:<20} hit {r['hit_rate']:.3f}  precision {r['prefetch_precision']:.3f}  "
            f"recall {r['prefetch_recall']:.3f}  stall {r['stall_s']:.2f} s  ({secs:.0f} s)",
            flush=True,
        )
    # (a reused store may have been recorded with other --history / --max-new-tokens / --ignore-eos: say so)
    config = vars(args) | {"history_recorded_s": history_s, "store_reused": history_s is None}
    finish(Path(args.out), config, rows, commands, args.budget)
    return 0


def finish(out: Path, config: dict, rows: dict, commands: list[str], budget: str, meta: dict | None = None) -> None:
    """Write the table's record and plot; print finemoe against the best baseline."""
    write_record(out, config, {"policies": rows, "commands": commands}, meta=meta)
    plot_policy_hit_rates(rows, budget, out.with_suffix(".png"), "expert hit rate (finemoe generate --json)")
    baselines = [p for p in rows if not p.startswith("finemoe")]  # (finemoe-paper is ours, not a baseline)
    if "finemoe" in rows and baselines:
        best = max(baselines, key=lambda p: rows[p]["hit_rate"])
        print(f"finemoe {rows['finemoe']['hit_rate']:.3f} vs the best baseline {best} {rows[best]['hit_rate']:.3f}")


SAME = ("history", "test", "max_new_tokens", "ignore_eos", "budget", "store")


def merge(paths: list[str], out: Path) -> int:
    """One record from several runs' records (their rows in the given order, their commands, each
    run's meta under `merged_from`); refuses records whose settings differ or whose policies repeat."""
    recs = [json.loads(Path(p).read_text()) for p in paths]
    first = recs[0]["config"]
    rows: dict[str, dict] = {}
    commands: list[str] = []
    for path, rec in zip(paths, recs, strict=True):
        differ = [k for k in SAME if rec["config"].get(k) != first.get(k)]
        if differ:
            raise SystemExit(f"{path}: settings differ from {paths[0]}'s: {', '.join(differ)}")
        again = set(rec["results"]["policies"]) & set(rows)
        if again:
            raise SystemExit(f"{path}: policies already merged from an earlier record: {', '.join(sorted(again))}")
        rows.update(rec["results"]["policies"])
        commands += [c for c in rec["results"]["commands"] if c not in commands]
    config = {k: first.get(k) for k in SAME} | {"policies": ",".join(rows), "merged": paths}
    meta = {"merged_from": [r["meta"] for r in recs]}
    finish(out, config, rows, commands, first["budget"], meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
