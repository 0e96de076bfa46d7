"""Where a graphed decode step's time goes on the GPU: the segments' own spans against the gaps
between them (the GPU idle while the host syncs, serves and launches the next segment), per
configuration, from the torch profiler's CUDA activity (CUPTI records each kernel of a graph
replay with the correlation id of its `cudaGraphLaunch`).

This splits the predictor's added step (`predictor_overhead.py`) into GPU time (longer segments:
e.g. the side graphs' kernels beside them) and host time on the critical path (longer gaps). The
predictor_overhead protocol's model and store (random weights of a real shape, a store recorded from
random prompts), then per configuration one warm-up request (the capture) and one profiled request.

    PYTHONPATH=src python benchmarks/decode_gpu_timeline.py --shape reference --dtype bfloat16 \\
        --configs "lru,decay-lfu,finemoe:device+graph-gates" --out $OUT/timeline.json

A configuration is a policy (`lru`, `decay-lfu`: lru's prefetching with finemoe's eviction) or
`finemoe:` followed by '+'-joined flags: a search mode (`device`, `sync`, ...), `graph-gates`,
`no-copies`; with any policy `gather` (gather_absent) and `predictor_overhead.engine_flags`' flags
(`prio`, `side-first`, `embed-inline`, `no-runahead`, `all-gates`, ...). Profiling slows the host
(its API tracing): the gaps are longer than unprofiled ones; compare configurations side by side,
not with other runs.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import run_meta, shape_config  # noqa: E402
from finemoe import SamplingParams  # noqa: E402
from predictor_overhead import decode, engine_flags, prompts, recorded_engine  # noqa: E402

log = logging.getLogger("decode_gpu_timeline")

SEARCHES = {"sync", "async", "process", "device"}


def split(config: str) -> tuple[str, set[str]]:
    """(policy, flags) of a configuration name "policy:flag+flag"."""
    policy, _, rest = config.partition(":")
    return policy, set(rest.split("+")) - {""}


def knobs(config: str, budget: str) -> dict:
    """`reconfigure` arguments of one configuration name (see the module docstring)."""
    policy, flags = split(config)
    gather = "gather" in flags  # (gather_absent)
    if policy in ("lru", "all-gpu"):
        return dict(policy=policy, expert_budget=budget if policy == "lru" else "100%", gather_absent=gather)
    if policy == "decay-lfu":
        return dict(policy="lru", eviction="decay-lfu", expert_budget=budget, gather_absent=gather)
    if policy != "finemoe":
        return dict(policy=policy, expert_budget=budget, gather_absent=gather)
    search = next(iter(flags & SEARCHES), "sync")
    return dict(
        policy="finemoe",
        expert_budget=budget,
        search=search,
        prediction_duty="always",
        graph_gates="graph-gates" in flags,
        prefetch_copies="no-copies" not in flags,
        gather_absent=gather,
    )


def gpu_groups(trace: dict) -> tuple[list[dict], dict[int, float]]:
    """The graph launches of a chrome trace: per launch {cpu, gpu_start, gpu_end, busy, stream,
    kernels} (µs, the trace's clock), in launch order; and the CPU launch time per correlation id."""
    launches: dict[int, float] = {}
    gpu: dict[int, list[tuple[float, float, int]]] = collections.defaultdict(list)
    for ev in trace.get("traceEvents", []):
        cat, args = ev.get("cat", ""), ev.get("args") or {}
        corr = args.get("correlation")
        if corr is None or "ts" not in ev:
            continue
        if cat == "cuda_runtime" and ev.get("name", "").startswith("cudaGraphLaunch"):
            launches[corr] = float(ev["ts"])
        elif cat in ("kernel", "gpu_memcpy", "gpu_memset"):
            stream, name = int(args.get("stream", -1)), ev.get("name", "")
            gpu[corr].append((float(ev["ts"]), float(ev.get("dur", 0.0)), stream, name))
    groups = []
    for corr, cpu in sorted(launches.items(), key=lambda kv: kv[1]):
        evs = gpu.get(corr)
        if not evs:
            continue
        evs.sort()
        busy, end_so_far = 0.0, -1.0  # union of the intervals
        for ts, dur, _, _ in evs:
            start = max(ts, end_so_far)
            if ts + dur > start:
                busy += ts + dur - start
            end_so_far = max(end_so_far, ts + dur)
        streams = collections.Counter(s for _, _, s, _ in evs)
        groups.append(
            dict(
                cpu=cpu,
                gpu_start=evs[0][0],
                gpu_end=max(ts + dur for ts, dur, _, _ in evs),
                busy=busy,
                stream=streams.most_common(1)[0][0],
                kernels=len(evs),
                nodes=[(name, dur) for _, dur, _, name in evs],
            )
        )
    return groups, launches


def analyse(trace: dict, segments: int) -> dict:
    """Per decode step (`segments` graph launches on the main stream): the segments' GPU spans, the
    GPU gaps between consecutive segments, the host's lateness (launch call after the previous
    segment's end), the side graphs' spans and how much of them overlaps a segment. Means in ms per
    step, and per segment index in µs."""
    groups, _ = gpu_groups(trace)
    if not groups:
        raise RuntimeError("no graph launch with GPU activity in the trace (CUPTI off, or nothing replayed)")
    by_stream = collections.Counter(g["stream"] for g in groups)
    main = by_stream.most_common(1)[0][0]
    segs = [g for g in groups if g["stream"] == main]
    sides = [g for g in groups if g["stream"] != main]
    steps = [segs[i : i + segments] for i in range(0, len(segs) - segments + 1, segments)]
    if len(segs) % segments:
        log.warning("%d main-stream graph launches are not a multiple of %d segments", len(segs), segments)
    per_seg_span = [[] for _ in range(segments)]
    per_gap = [[] for _ in range(segments - 1)]
    per_late = [[] for _ in range(segments - 1)]
    rows = []
    for step in steps:
        span = sum(g["gpu_end"] - g["gpu_start"] for g in step)
        busy = sum(g["busy"] for g in step)
        gaps = [step[i + 1]["gpu_start"] - step[i]["gpu_end"] for i in range(segments - 1)]
        late = [max(0.0, step[i + 1]["cpu"] - step[i]["gpu_end"]) for i in range(segments - 1)]
        for i, g in enumerate(step):
            per_seg_span[i].append(g["gpu_end"] - g["gpu_start"])
        for i in range(segments - 1):
            per_gap[i].append(gaps[i])
            per_late[i].append(late[i])
        t0, t1 = step[0]["gpu_start"], step[-1]["gpu_end"]
        side_in = [s for s in sides if t0 <= s["gpu_start"] <= t1]
        side_span = sum(s["gpu_end"] - s["gpu_start"] for s in side_in)
        overlap = 0.0  # side-graph time during a segment's span
        for s in side_in:
            for g in step:
                overlap += max(0.0, min(s["gpu_end"], g["gpu_end"]) - max(s["gpu_start"], g["gpu_start"]))
        rows.append(
            dict(
                total=t1 - t0,
                seg_span=span,
                seg_busy=busy,
                gaps=sum(gaps),
                host_late=sum(late),
                sides=len(side_in),
                side_span=side_span,
                side_overlap=overlap,
                kernels=sum(g["kernels"] for g in step),
            )
        )
    side_nodes: dict[str, list[float]] = collections.defaultdict(list)  # kernel name -> durations (µs)
    for s in sides:
        for name, dur in s["nodes"]:
            side_nodes[name[:60]].append(dur)
    per_side = len(sides) or 1
    side_kernels = sorted(
        ((name, len(d) / per_side, statistics.median(d)) for name, d in side_nodes.items()), key=lambda x: -x[1] * x[2]
    )
    med = {k: statistics.median(r[k] for r in rows) / (1e3 if k not in ("sides", "kernels") else 1) for k in rows[0]}
    return dict(
        steps=len(rows),
        main_stream=main,
        median_per_step_ms=med,
        seg_span_us=[statistics.median(v) for v in per_seg_span],
        gap_us=[statistics.median(v) for v in per_gap],
        host_late_us=[statistics.median(v) for v in per_late],
        # per side graph: (kernel or copy name, occurrences per side graph, median µs)
        side_kernels=side_kernels,
        side_nodes_per_graph=sum(len(s["nodes"]) for s in sides) / per_side,
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="reference")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--budget", default="99%")
    ap.add_argument("--configs", default="lru,decay-lfu,finemoe:device+graph-gates")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--warm-pool", action="store_true", help="every configuration's pool filled at set-up")
    ap.add_argument("--cores", help="pin the process to these host cores, e.g. 2-7")
    ap.add_argument("--out", default="docs/results/decode_gpu_timeline.json")
    args = ap.parse_args()
    if args.cores:
        lo, _, hi = args.cores.partition("-")
        os.sched_setaffinity(0, set(range(int(lo), int(hi or lo) + 1)))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("decode_gpu_timeline needs CUDA (it reads the GPU's kernel timeline)")
    cfg = shape_config(args.shape, None)
    eng = recorded_engine(cfg, getattr(torch, args.dtype), "cuda", 40, 32, 32)
    test = prompts(2, 32, cfg.vocab_size, seed=2)
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    configs = args.configs.split(",")
    every = sorted({k for c in configs for k in knobs(c, args.budget)})
    base = {k: getattr(eng.config, k) for k in every}
    base["map_store_learn"] = False
    base["warm_pool"] = args.warm_pool  # (every configuration alike)
    rec: dict = {"meta": run_meta(), "config": vars(args), "results": {}}
    assert eng.static is not None, "graphed decode is off"
    segments = len(eng.static.refs) + 1  # S_0 .. S_L
    with tempfile.TemporaryDirectory() as tmp:
        for name in configs:
            eng.reconfigure(**{**base, **knobs(name, args.budget)})
            engine_flags(eng, split(name)[1])
            plain = decode(eng, test, args.new_tokens)["step_ms"]  # (its first request captures)
            acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=acts) as prof:
                eng.generate(test[1], params)
            path = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(path))
            res = analyse(json.loads(path.read_text()), segments)
            res["unprofiled_ms_per_token"] = plain
            rec["results"][name] = res
            log.info("%s: %s", name, res["median_per_step_ms"])
    eng.config = eng.config.__class__(**{**eng.config.__dict__, "map_store": None})  # do not save
    eng.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=1))
    cols = ["total", "seg_span", "seg_busy", "gaps", "host_late", "side_span", "side_overlap"]
    print(f"{'config (ms per step, median)':<34} {'step ms':>7} " + " ".join(f"{c:>12}" for c in cols))
    for name, r in rec["results"].items():
        m = r["median_per_step_ms"]
        print(f"{name:<34} {r['unprofiled_ms_per_token']:>7.2f} " + " ".join(f"{m[c]:>12.3f}" for c in cols))
    for name, r in rec["results"].items():
        if r["side_kernels"]:
            print(f"{name}: {r['side_nodes_per_graph']:.1f} nodes per side graph (per graph, median µs):")
            for kname, n, us in r["side_kernels"]:
                print(f"    {n:4.1f} x {us:6.2f}  {kname}")
    first = next(iter(rec["results"].values()))
    for name, r in list(rec["results"].items())[1:]:
        grow = sorted(
            ((b - a, i) for i, (a, b) in enumerate(zip(first["seg_span_us"], r["seg_span_us"], strict=True))),
            reverse=True,
        )[:5]
        gaps = sorted(
            ((b - a, i) for i, (a, b) in enumerate(zip(first["gap_us"], r["gap_us"], strict=True))), reverse=True
        )[:5]
        print(
            f"{name} vs {configs[0]}: segments grown most (µs, index) "
            + ", ".join(f"{d:+.1f}@{i}" for d, i in grow)
            + "; gaps grown most "
            + ", ".join(f"{d:+.1f}@{i}" for d, i in gaps)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
