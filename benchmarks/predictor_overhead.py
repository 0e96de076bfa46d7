"""The FineMoE predictor's cost per decode iteration against the decode iteration time of the
100%-budget run without a predictor (issue target: <= 2%).

Two figures: the predictor's time on the forward thread (timed around its calls), and the
honest one, the whole decode step's extra time over the same cache without a predictor (LRU) at
a near-full budget (99%: the predictor searches and plans every layer, almost nothing misses),
which also counts contention between the forward thread and the searcher (the GIL) and the plan
bookkeeping of the eviction policy. Configurations run in interleaved rounds; the added step is
the median over rounds of (finemoe's step - lru's step in the same round), with its range, so drift
between rounds cancels. As `finemoe generate` does for users, the cyclic garbage collector is frozen
over each measured configuration (`--no-gc-freeze`: not; the gc ms column says what collections cost);
`--cores` pins the process to some host cores.

A random-weight model of a real shape (weights do not change the predictor's work: that depends
on L, E, the embedding width and the store size), a map store filled to capacity by recording
random prompts, then batch-1 greedy decoding. Runs on CPU and on the GPU machine:

    python benchmarks/predictor_overhead.py --shape reference --device cpu --out docs/results/overhead_cpu.json
    PYTHONPATH=src python benchmarks/predictor_overhead.py --shape reference --device cuda --dtype bfloat16 \\
        --out docs/results/overhead_gpu_reference.json
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import run_meta, shape_config  # noqa: E402
from finemoe import Engine, SamplingParams  # noqa: E402
from finemoe.runtime import HIGHEST_STREAM_PRIORITY  # noqa: E402
from finemoe.step_marks import SPANS, StepMarks  # noqa: E402
from finemoe.synthetic import random_model  # noqa: E402
from offload_runs import GC_CLOCK  # noqa: E402

log = logging.getLogger("predictor_overhead")


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab - 10, (length,), generator=g).tolist() for _ in range(n)]


def recorded_engine(cfg, dtype: torch.dtype, device: str, history: int, prompt_len: int, new_tokens: int) -> Engine:
    """A finemoe engine over a random-weight model of `cfg` whose map store (a temporary file) has
    recorded `history` random prompts of `prompt_len` tokens, `new_tokens` generated each."""
    model = random_model(cfg, dtype=dtype, device=device)
    store = Path(tempfile.mkdtemp()) / "maps.fms"
    eng = Engine.from_model(model, expert_budget="100%", policy="finemoe", map_store=str(store), progress=False)
    hist = prompts(history, prompt_len, cfg.vocab_size, seed=1)
    eng.generate(hist, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))  # recording
    log.info("map store: %d maps (capacity %d)", eng.maps.size, eng.maps.capacity)
    return eng


class Timed:
    """Benchmark-only probe: wraps one method of one object and sums its wall time in decode
    iterations (`rt.is_prefill` false)."""

    def __init__(self, obj: object, method: str, rt) -> None:
        self.total, self.calls = 0.0, 0
        inner = getattr(obj, method)

        def timed(*a, **k):
            if rt.is_prefill:
                return inner(*a, **k)
            t0 = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                self.total += time.perf_counter() - t0
                self.calls += 1

        setattr(obj, method, timed)


class DrainTimeline:
    """Benchmark-only probe (graphed decode): per MoE layer, host µs from the start of a replayed
    step (`StaticDecoder._replay` entered) to the moment its routing was counted (`cache.enter`
    counting: for a layer run ahead through `account_pinned` in the drain, after its copy landed; for
    a layer served at its routing sync, in its serve) and to the end of its predictors' planning
    (`Stepper.route`), means over the replayed steps. Where the two grow apart between policies,
    the host's work on a layer is late. Also the host's waits for layer l's side graph, µs per
    replayed step: for its gate rows (`SideGraphs.settle`) and its map match (`settle_match`). And
    the host's work on layer l's routing by part, µs per replayed step (`parts`): each predictor's
    `on_routing`, the plans' `submit` (with the policy's `on_plan` apart), the `pump` after them and
    the cache's `account_pinned` (a drained layer's counting), a part charged to the layer whose
    routing the host handles last in the step, none before the step's first (the held-back
    predictor start; session 37's records charged it to the last layer)."""

    def __init__(self, eng: Engine) -> None:
        L = eng.spec.num_layers
        self.sums = {"landed": [0.0] * L, "planned": [0.0] * L}
        self.counts = {"landed": [0] * L, "planned": [0] * L}
        self.waits = {"gate_wait": [0.0] * L, "match_wait": [0.0] * L}  # seconds, summed
        self.steps = 0  # replayed steps seen
        self.origin: float | None = None
        self.parts: dict[str, list[float]] = {}  # seconds summed per layer
        self.layer = -1  # the layer whose routing the host handles now
        static, cache, stepper = eng.static, eng.cache, eng.runtime.stepper
        if static is None:
            return
        for pred in eng.runtime.predictors:
            for m in getattr(pred, "members", [pred]):
                self._timed_part(m, "on_routing", f"{m.name}.on_routing", L, by_event=True)
        self._timed_part(eng.prefetcher, "submit", "submit", L)
        self._timed_part(cache.policy, "on_plan", "policy.on_plan", L)
        self._timed_part(eng.prefetcher, "pump", "pump", L)
        self._timed_part(cache, "account_pinned", "account_pinned", L, by_arg=True)
        replay, enter, route = static._replay, cache.enter, stepper.route

        def replayed(*a, **k):
            self.origin = time.perf_counter()
            self.steps += 1
            self.layer = -1  # (the step's held-back predictor start, before its first routing: no layer's)
            try:
                return replay(*a, **k)
            finally:
                self.origin = None

        sides = static.sides
        if sides is not None:  # (the step's settle hooks bind these attributes when it begins)
            for name, kind in (("settle", "gate_wait"), ("settle_match", "match_wait")):
                setattr(sides, name, self._timed_wait(getattr(sides, name), self.waits[kind]))

        def entered(layer, experts, count=True, *a, **k):
            if count:  # (not a later chunk's `acquire`)
                self._mark("landed", layer)
                self.layer = layer
            return enter(layer, experts, count, *a, **k)

        def routed(event, *a, **k):
            self.layer = event.layer
            try:
                return route(event, *a, **k)
            finally:
                self._mark("planned", event.layer)

        static._replay, cache.enter, stepper.route = replayed, entered, routed

    def _timed_part(self, obj: object, method: str, key: str, L: int, by_event=False, by_arg=False) -> None:
        """Wrap `obj.method`: its wall time inside replayed steps, charged to `self.layer` (set from
        the call's event or first argument where given)."""
        inner = getattr(obj, method, None)
        if inner is None:
            return
        sums = self.parts.setdefault(key, [0.0] * L)

        def timed(*a, **k):
            if self.origin is None:
                return inner(*a, **k)
            if by_event and a:
                self.layer = a[0].layer
            elif by_arg and a:
                self.layer = a[0]
            t0 = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                if 0 <= self.layer < L:
                    sums[self.layer] += time.perf_counter() - t0

        setattr(obj, method, timed)

    @staticmethod
    def _timed_wait(inner, sums: list[float]):
        def waited(layer, *a, **k):
            t0 = time.perf_counter()
            try:
                return inner(layer, *a, **k)
            finally:
                if 0 <= layer < len(sums):
                    sums[layer] += time.perf_counter() - t0

        return waited

    def _mark(self, kind: str, layer: int) -> None:
        if self.origin is not None and 0 <= layer < len(self.sums[kind]):
            self.sums[kind][layer] += time.perf_counter() - self.origin
            self.counts[kind][layer] += 1

    def means_us(self) -> dict[str, list[float | None]]:
        out: dict[str, list[float | None]] = {
            k: [s / n * 1e6 if n else None for s, n in zip(self.sums[k], self.counts[k], strict=True)]
            for k in self.sums
        }
        for k, sums in self.waits.items():
            out[k] = [w / self.steps * 1e6 if self.steps else None for w in sums]
        for k, sums in self.parts.items():
            out[f"part:{k}"] = [w / self.steps * 1e6 if self.steps else None for w in sums]
        return out


def probes(eng: Engine) -> dict[str, Timed]:
    """Per-part timers of the synchronous predictor path (what a sync search costs, and where)."""
    out: dict[str, Timed] = {}
    rt = eng.runtime
    for pred in eng.runtime.predictors:
        for m in getattr(pred, "members", [pred]):
            out[f"{m.name}.on_routing"] = Timed(m, "on_routing", rt)
            out[f"{m.name}.on_iteration_start"] = Timed(m, "on_iteration_start", rt)
    out["prefetcher.submit"] = Timed(eng.prefetcher, "submit", rt)
    out["prefetcher.pump"] = Timed(eng.prefetcher, "pump", rt)
    out["cache.access"] = Timed(eng.cache, "access", rt)
    out["cache.acquire"] = Timed(eng.cache, "acquire", rt)
    # the graphed serve's parts before the launch (session 27: finemoe's serve is ~0.2 ms per token
    # above lru's without copies); each wrapper adds ~1 µs per call, alike for every run
    out["serve.prefetcher.now"] = Timed(eng.prefetcher, "now", rt)
    out["serve.cache.enter"] = Timed(eng.cache, "enter", rt)
    out["serve.before_compute"] = Timed(eng.cache.transfer, "before_compute", rt)
    out["serve.device_table"] = Timed(eng.cache, "device_table", rt)
    out["serve.release"] = Timed(eng.cache, "release", rt)
    # learning's insert, held back to the next step's first store read, and what it drags along
    # (session 44: where learning's ~0.1 ms over frozen goes is still open)
    store = eng.maps
    for name in ("apply_pending", "_write"):
        store.__dict__.pop(name, None)  # (the store outlives the runs: one probe at a time)
        out[f"store.{name}"] = Timed(store, name, rt)
    if rt.device_matches is not None:
        out["mirror.sync"] = Timed(rt.device_matches.planner, "sync", rt)
    if eng.static is not None and eng.static.record is not None:
        out["record.take"] = Timed(eng.static.record, "take", rt)
    return out


# every flag a run's mode may carry (`fine`, `engine_flags`, the lru modes' `gather`); an unknown
# one is refused, not ignored (a retired flag, e.g. session 35's `embed-prio`, would compare a
# configuration with itself)
KNOWN_FLAGS = frozenset(
    [
        "graph-gates",
        "learn",
        "no-copies",
        "gather",
        "no-gate",
        "keep-whole",
        "duty",
        "prio",
        "side-first",
        "pump-first",
        "torch-match",
        "no-runahead",
        "plan-launched",
        "embed-inline",
        "all-gates",
        "all-matches",
        "store-first",
        "embed-early",
        "embed-noprio",
        "no-side-wait",
        "defer-late",
        "defer-all",
        "no-early-read",
        "no-record",
        "requests",
        "take-now",
        "no-record-wait",
        "host-argmax",
    ]
)


def name_flags(name: str) -> set[str]:
    """The '+'-joined flags of a run named "policy mode:flags budget" (none without a colon)."""
    head = name.rsplit(" ", 1)[0]
    return set(head.partition(":")[2].split("+")) - {""}


def engine_flags(eng: Engine, flags: set[str]) -> None:
    """Apply the flags `reconfigure` has no knob for to a freshly configured engine (before its first
    request: the graphs are captured then). `prio`: the segments' streams (capture, replay) at the
    highest priority and the predictors' side stream at the lowest, so the GPU's block scheduler
    prefers the segments' kernels; `side-first`: side graphs launched before the serve
    (`SideGraphs.first`); `pump-first`: a layer's queued prefetches start before its
    segment's launch (`OffloadRuntime.pump_before_launch`); `torch-match`: search="device"'s match as
    torch ops, not the fused Triton kernel (`fused_match`); `no-runahead`: every layer syncs on its
    routing, also those whose experts are all resident (`OffloadRuntime.run_ahead`, `runahead`);
    `plan-launched`: the predictors plan from a routing read after running ahead also for layers
    whose compute is launched already (`OffloadRuntime.tell_launched` off); `embed-inline`: a replayed
    step's predictor start embeds its token on the compute stream (`OffloadRuntime.embed_beside` off);
    `all-gates`: side graphs keep their gates where their targets run ahead (`skip_launched_gates` off);
    `all-matches`: every matched layer launches its map match, also where no plan reads it
    (`defer_matches` off); `store-first`: the map store's new rows reach the device on the compute
    stream before S_0's launch (`store_sync_beside` off); `embed-noprio`: a replayed step's token embedding
    (the predictors' start, `_embed_launch`) on a stream of the default priority 0, not the highest
    (`embed_priority`, whose default the old `embed-prio` flag set);
    `embed-early`: that embedding launched right after S_0's launch, not at the drain's start
    (`embed_early`); `no-side-wait`: a replayed step does not wait for the last step's side graphs
    (`SideGraphs.wait_last`, a probe: plans may then read rewritten tensors, tokens stay exact);
    `defer-late` / `defer-all`: the predictors' work of the routings drained before a routing sync goes
    after the sync layer's launch once its router is done / always (`defer_drained_plans`);
    `no-early-read`: a routing sync always copies its ids with a blocking copy, none copied to pinned
    memory before the drain or the late events (`OffloadRuntime.early_routing_read` off);
    `no-record`: learning reads every layer's router logits on the host, no record
    (`OffloadRuntime.map_recorders` emptied, as before session 41); `take-now`: a graphed learning step
    waits for its record at the last layer (`HistoryRecorder.read_at_insert` off, as before session 45);
    `no-record-wait`: the next step's segments do not wait for the step record on the GPU
    (`StepRecord.wait_next` off; a probe: the record may read rewritten router outputs, tokens stay exact);
    `host-argmax`: a replayed step's greedy token taken by the host from the logits after the step
    (`StaticDecoder.graph_argmax` off, as before session 46), not in the last graph (any policy's run)."""
    eng.runtime.pump_before_launch = "pump-first" in flags
    eng.runtime.run_ahead = "no-runahead" not in flags
    eng.runtime.tell_launched = "plan-launched" not in flags
    eng.runtime.embed_beside = "embed-inline" not in flags
    eng.runtime.skip_launched_gates = "all-gates" not in flags
    eng.runtime.defer_matches = "all-matches" not in flags
    eng.runtime.store_sync_beside = "store-first" not in flags
    eng.runtime.embed_early = "embed-early" in flags
    eng.runtime.early_routing_read = "no-early-read" not in flags
    if "no-record" in flags:
        eng.runtime.map_recorders = []
    for rec in eng.runtime.map_recorders:  # (`take-now`: the record waited for at the step's end, before session 45)
        rec.read_at_insert = "take-now" not in flags
    # (`defer-late` / `defer-all`: the drained routings' predictor work after the sync layer's launch)
    eng.runtime.defer_drained_plans = "late" if "defer-late" in flags else "always" if "defer-all" in flags else "never"
    # (`embed-noprio`: the beside embedding's stream at priority 0, not the highest)
    eng.runtime.embed_priority = 0 if "embed-noprio" in flags else HIGHEST_STREAM_PRIORITY
    static = eng.static
    if static is not None:
        static.graph_argmax = "host-argmax" not in flags
    if static is not None and static.record is not None:  # (`no-record-wait`: a probe, stored maps may be wrong)
        static.record.wait_next = "no-record-wait" not in flags
    if static is None or not static.use_graphs:
        return
    assert static.sides is not None
    static.sides.first = "side-first" in flags
    static.sides.wait_last = "no-side-wait" not in flags  # (a probe: plans may read rewritten tensors)
    if eng.runtime.device_matches is not None and "torch-match" in flags:
        eng.runtime.device_matches.fused = False  # the match's torch ops instead of the fused kernel
    if "prio" in flags:
        least, greatest = torch.cuda.Stream.priority_range()
        dev = static.device
        static.stream = torch.cuda.Stream(dev, priority=greatest)
        static.capture_stream = torch.cuda.Stream(dev, priority=greatest)
        static.sides.stream = torch.cuda.Stream(dev, priority=least)


def decode(
    eng: Engine, ps: list[list[int]], new: int, breakdown: bool = False, freeze: bool = True, gpu_marks: bool = False
) -> dict:
    """Median decode-step time (ms) and the predictor's forward-thread ms per decode iteration;
    `freeze`: the garbage collector frozen over the measured requests (what exists then is not scanned);
    `gpu_marks`: replayed steps' GPU-side spans too (`step_marks`, up to five timing events per step)."""
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    if gpu_marks and eng.runtime.step_marks is None and eng.device.type == "cuda":
        eng.runtime.step_marks = StepMarks()
    eng.generate(ps[0], params)  # warm-up
    timers = probes(eng) if breakdown else {}
    drain = DrainTimeline(eng) if breakdown else None
    rt = eng.runtime
    c0, n0, pl0 = rt.critical_decode_s, rt.decode_iterations, rt.prelaunch_decode_s
    spans0 = eng.host_time_stats()
    waits0 = eng.sync_wait_by_layer()
    copies0, rows0, ahead0 = rt.graphed_logits_copies, eng.cache.table_rows_copied, rt.run_ahead_layers
    early0 = rt.early_reads
    by0 = list(rt.run_ahead_by_layer)
    marks0, marked0 = list(rt.sync_marks_s), list(rt.sync_marks_steps)
    spans0_, spanned0 = list(rt.step_spans_s), rt.step_spans_steps
    sides = eng.static.sides if eng.static is not None else None
    side0 = (sides.gates_skipped, sides.matches_deferred, sides.late_matches) if sides is not None else (0, 0, 0)
    cs0 = eng.stats().cache
    steps = []
    if rt.step_marks is not None:
        rt.step_marks.summary()  # (drops the warm-up's)
    if freeze:
        gc.collect()
        gc.freeze()
    gc0, _ = GC_CLOCK.read()
    try:
        for p in ps:
            out = eng.generate(p, params)[0]
            t = out.token_times_s
            steps += [b - a for a, b in zip(t[1:], t[2:], strict=False)]
    finally:
        if freeze:
            gc.unfreeze()
    gc_s = GC_CLOCK.read()[0] - gc0
    n = rt.decode_iterations - n0
    st = eng.stats()
    cs = st.cache
    link = {  # the link's traffic per iteration (prefill included: the counters do not split it)
        "mb_copied": (cs.bytes_copied - cs0.bytes_copied) / n / 1e6 if n else 0.0,
        "misses": (cs.misses - cs0.misses) / n if n else 0.0,
        "prefetches_issued": (cs.prefetches_issued - cs0.prefetches_issued) / n if n else 0.0,
        "prefetches_wasted": (cs.prefetches_wasted - cs0.prefetches_wasted) / n if n else 0.0,
        "prefetches_late": (cs.prefetches_late - cs0.prefetches_late) / n if n else 0.0,
        "stall_ms": (cs.stall_s - cs0.stall_s) / n * 1e3 if n else 0.0,
    }
    spans = {k: (v - spans0[k]) / n * 1e3 if n else 0.0 for k, v in eng.host_time_stats().items()}
    # (medians per step, µs: the GPU idle between steps, S_0's start to the last router's end, the rest)
    gpu = rt.step_marks.summary() if rt.step_marks is not None else {}
    return {
        "gpu_step_us": gpu,
        "step_ms": statistics.median(steps) * 1e3,
        "predictor_ms_per_decode_iteration": (rt.critical_decode_s - c0) / n * 1e3 if n else 0.0,
        # graphed decode: host ms per step between the layers' routing syncs and their segments' launches
        "prelaunch_ms_per_decode_iteration": (rt.prelaunch_decode_s - pl0) / n * 1e3 if n else 0.0,
        "decode_iterations": n,
        "gc_ms_per_decode_iteration": gc_s / n * 1e3 if n else 0.0,  # cyclic collections, prefill included
        "breakdown_ms_per_iteration": {k: t.total / n * 1e3 for k, t in timers.items()} if n else {},
        # where the decode steps' host time went, ms per iteration (`Engine.host_time_stats`)
        "host_ms_per_iteration": spans,
        # per MoE layer, ms per iteration blocked in its routing sync (near 0: the host was late)
        "sync_ms_by_layer": [
            (b - a) / n * 1e3 if n else 0.0 for a, b in zip(waits0, eng.sync_wait_by_layer(), strict=True)
        ],
        # replayed steps, last round: per layer, µs from the step's start to its routing counted / planned
        "drain_timeline_us": drain.means_us() if drain is not None else {},
        "graphed_logits_copies_per_iteration": (rt.graphed_logits_copies - copies0) / n if n else 0.0,
        "table_rows_copied_per_iteration": (eng.cache.table_rows_copied - rows0) / n if n else 0.0,
        # MoE layers per iteration launched without a routing sync (every expert resident, `runahead`)
        "run_ahead_layers_per_iteration": (rt.run_ahead_layers - ahead0) / n if n else 0.0,
        "early_reads_per_iteration": (rt.early_reads - early0) / n if n else 0.0,  # syncs on an early copy
        # side launches per iteration without their gates, without their map match (deferred), and
        # matches launched only when read (`SideGraphs`)
        "side_skips_per_iteration": [
            (b - a) / n if n else 0.0
            for a, b in zip(
                side0,
                (sides.gates_skipped, sides.matches_deferred, sides.late_matches) if sides is not None else (0, 0, 0),
                strict=True,
            )
        ],
        # per MoE layer, the share of decode iterations it ran ahead (1: always whole), and where the
        # experts absent after the runs sit (which layers must sync)
        "run_ahead_share_by_layer": [
            (b - a) / n if n else 0.0 for a, b in zip(by0, rt.run_ahead_by_layer, strict=True)
        ],
        "absent_experts_by_layer": [sum(s < 0 for s in row) for row in eng.cache.slot_of],
        # replayed steps: ms from the first launch to the last routing sync's drain start, drain end,
        # routing read, next launch and the replay's end (means over the steps that had the mark)
        "sync_marks_ms": [
            (b - a) / (m - n) * 1e3 if m > n else 0.0
            for a, b, n, m in zip(marks0, rt.sync_marks_s, marked0, rt.sync_marks_steps, strict=True)
        ],
        # replayed steps after a replayed step, µs per step: the last replay's end to its token fed
        # (logits read, sampled), to the step's start_iteration, start_iteration, from it to S_0's launch, the launch
        "step_spans_us": [
            (b - a) / (rt.step_spans_steps - spanned0) * 1e6 if rt.step_spans_steps > spanned0 else 0.0
            for a, b in zip(spans0_, rt.step_spans_s, strict=True)
        ],
        "hit_rate": st.cache.hit_rate,
        "link_per_iteration": link,
        "search": eng.search_mode,
        "search_thread_s": st.extra.get("search_thread_s"),
        "contexts_dropped": st.extra.get("contexts_dropped"),
        "map_store_size": st.extra.get("map_store_size", eng.maps.size),
        "search_process_s": st.extra.get("search_process_s"),
        # the adaptive duty's state at the run's end (`:duty`; cumulative over the rounds)
        "duty": {k: v for k, v in st.extra.items() if k.startswith(DUTY_KEYS)},
    }


DUTY_KEYS = ("prediction_", "decode_iterations_", "decode_step_ms")  # `PredictionDuty.stats` in `Engine.stats`


def print_lists(res: dict, key: str, fmt: str, title: str) -> None:
    """Print `title`, then each run's list `key` (where any is nonzero), formatted by `fmt`."""
    print(title)
    for k, r in res.items():
        values = r.get(key) or []
        if any(values):
            print(f"{k:<36} " + " ".join(fmt.format(v) for v in values))


def print_end_on_one_clock(rounds: list[dict]) -> None:
    """The step's end with the host's marks and the GPU's spans on one clock (µs from the host's
    `t_step`; the GPU's start event is recorded then on an idle stream, ~5 µs off): medians over
    rounds of the drain's end, router L-1 done on the GPU, the host's read of it, the lag between
    the two, and the host's replay end minus the GPU's step end (positive: the GPU waits for the host)."""
    names = [n for n in rounds[-1] if rounds[-1][n].get("gpu_step_us") and any(rounds[-1][n]["sync_marks_ms"])]
    if not names:
        return
    print(
        "the step's end on one clock (median over rounds, µs from S_0's launch): drain end, router L-1 done (GPU), "
        "its read (host), read - done, replay end - the GPU's step end"
    )
    for n in names:
        per = [r[n] for r in rounds if n in r and r[n].get("gpu_step_us")]
        drain, read, end = (statistics.median(p["sync_marks_ms"][i] * 1e3 for p in per) for i in (1, 2, 4))
        done = statistics.median(p["gpu_step_us"]["to_router"] for p in per)
        gpu_end = statistics.median(p["gpu_step_us"]["to_router"] + p["gpu_step_us"]["tail"] for p in per)
        print(f"{n:<36} {drain:8.0f} {done:8.0f} {read:8.0f} {read - done:+8.0f} {end - gpu_end:+8.0f}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="reference")
    ap.add_argument("--layers", type=int, help="override the number of layers")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--history", type=int, default=40, help="random prompts recorded into the store")
    ap.add_argument("--prompts", type=int, default=4, help="prompts measured per configuration")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--near-full", default="99%", help="budget of the overhead comparison (predictor runs, ~no misses)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--modes",
        default="sync,async,process",
        help="finemoe search modes compared; a suffix of '+'-joined flags varies the run: ':graph-gates' computes "
        "the speculative gates' logits in the graph (graph_gates=True), ':pump-first' starts a layer's queued "
        "prefetches before its segment's launch (the behaviour before session 19), ':no-copies' plans but "
        "starts no prefetch copy (prefetch_copies=False: the predictor's own cost, its copies apart), ':prio' gives "
        "the segments' streams the highest priority and "
        "the side graphs' the lowest, ':side-first' launches a layer's side graph before its serve "
        "(SideGraphs.first), ':torch-match' keeps the device match's torch ops instead of the fused Triton kernel, "
        "':no-runahead' syncs on every layer's routing, also where every expert is resident (runahead.py), "
        "':plan-launched' lets the predictors plan for layers launched already (OffloadRuntime.tell_launched off), "
        "':embed-inline' embeds a replayed step's token for the predictors on the compute stream (embed_beside off), "
        "':keep-whole' spares whole layers in decayed LFU's victims near 100%% (keep_whole_layers=True), "
        "':learn' keeps learning every iteration's maps into the store (map_store_learn=True, the engine's "
        "default; every other run's store is frozen at the history's 1K maps), ':requests' has such an arm "
        "also keep each request's activation matrix (record_requests=True; else False, as the engine's default "
        "without a map-store file), "
        "':gather' gathers the absent experts in the last layers near 100%% (gather_absent=True; also an "
        "--lru-modes flag), ':no-gate' runs finemoe's maps without the speculative gate (gate_refine=False), "
        "':all-gates' keeps the gates in the side graphs of layers run ahead whose targets run ahead too "
        "(OffloadRuntime.skip_launched_gates off), ':duty' runs the adaptive prediction duty (the CUDA default) "
        "instead of always predicting, ':all-matches' launches every matched layer's map match, also "
        "where no plan of the step reads it (OffloadRuntime.defer_matches off), ':store-first' copies the map "
        "store's new rows to the device before a replayed step's first launch (store_sync_beside off), "
        "':embed-noprio' embeds a replayed step's token on a stream of priority 0, not the highest "
        "(embed_priority), "
        "':embed-early' launches that embedding right after S_0's launch (embed_early), ':no-side-wait' "
        "lets a replayed step start without waiting for the last step's side graphs (a probe), ':defer-late' / "
        "':defer-all' plan the routings drained before a sync after that layer's launch once its router is "
        "done / always (defer_drained_plans)",
    )
    ap.add_argument(
        "--no-eviction-reference",
        action="store_true",
        help="leave out the run of finemoe's eviction without a predictor (policy lru, eviction decay-lfu) "
        "at the near-full budget, against which the finemoe runs' step is also compared",
    )
    ap.add_argument(
        "--lru-modes",
        default="",
        help="comma-separated flag sets for extra lru runs at the near-full budget, e.g. 'no-runahead': "
        "a finemoe mode carrying those flags is compared with that lru run instead of plain lru",
    )
    ap.add_argument(
        "--warm-pool",
        action="store_true",
        help="every run starts with its pool filled, whole layers first (warm_pool=True): the measured "
        "requests then see the budget's steady state, not the first uses of experts never loaded",
    )
    ap.add_argument(
        "--near-full-only",
        action="store_true",
        help="leave out the runs at --budget: more rounds of the near-full comparison in the same time",
    )
    ap.add_argument("--no-gc-freeze", action="store_true", help="leave the garbage collector running")
    ap.add_argument(
        "--gpu-marks",
        action="store_true",
        help="time every replayed step on the GPU too (up to five timing events per step, every run alike): "
        "the stream's idle gap between steps, S_0's start to the last router's end, the rest (split at the "
        "last segment's launch), the side graphs' end against the step's",
    )
    ap.add_argument("--cores", help="pin the process to these host cores, e.g. 2-5 or 2,3,4")
    ap.add_argument("--out", default="docs/results/overhead.json")
    args = ap.parse_args()
    if args.cores:
        cores: set[int] = set()
        for part in args.cores.split(","):
            lo, _, hi = part.partition("-")
            cores.update(range(int(lo), int(hi or lo) + 1))
        os.sched_setaffinity(0, cores)
        # (and as many intra-op threads: torch sized its pool at import; 16 threads on 6 cores made the
        # learning arms' recorder ~20x slower, s40b. Runs before session 40 kept every thread)
        torch.set_num_threads(len(cores))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = shape_config(args.shape, args.layers)
    eng = recorded_engine(cfg, getattr(torch, args.dtype), args.device, args.history, args.prompt_len, args.new_tokens)
    test = prompts(args.prompts, args.prompt_len, cfg.vocab_size, seed=2)
    rec: dict = {"meta": run_meta(), "config": vars(args), "rounds": [], "results": {}}
    near = args.near_full
    modes = args.modes.split(",")
    unknown = {f for m in [*modes, *args.lru_modes.split(",")] for f in m.partition(":")[2].split("+")}
    unknown |= {f for v in args.lru_modes.split(",") for f in v.split("+")}
    unknown -= KNOWN_FLAGS | {""}
    if unknown:
        ap.error(f"unknown flags {sorted(unknown)} (known: {' '.join(sorted(KNOWN_FLAGS))})")

    def fine(budget: str, mode: str) -> tuple[str, dict]:
        # always predicting: the adaptive duty (the CUDA default) would measure its verdict instead
        search, _, variant = mode.partition(":")
        flags = set(variant.split("+")) - {""}
        kw = dict(policy="finemoe", expert_budget=budget, search=search, map_store_learn="learn" in flags)
        # (`:duty`: the CUDA default, predicting only while the measured step says it pays; its state
        # carries over the rounds, as in a long-running engine)
        kw.update(prediction_duty="adaptive" if "duty" in flags else "always", graph_gates="graph-gates" in flags)
        kw.update(prefetch_copies="no-copies" not in flags)
        kw.update(keep_whole_layers="keep-whole" in flags, gather_absent="gather" in flags)
        kw.update(gate_refine="no-gate" not in flags)
        # `:requests`: a learning arm's recorder also keeps each request's activation matrix (the
        # request store, which finemoe never reads), counting every layer's routing as before session 44
        # (and as an engine with a map-store file does); without it none, as the engine's default without
        # a file (auto would keep them here: this engine's history came from a file, `recorded_engine`)
        kw.update(record_requests="requests" in flags)
        return f"finemoe {mode} {budget}", kw

    runs = [("all-gpu 100%", dict(policy="all-gpu", map_store_learn=False))]
    # (plain lru without gathering, as before session 33 made gathering the default where decode is graphed)
    runs += [(f"lru {near}", dict(policy="lru", expert_budget=near, gather_absent=False))]
    lru_modes = [v for v in args.lru_modes.split(",") if v]
    runs += [
        (f"lru:{v} {near}", dict(policy="lru", expert_budget=near, gather_absent="gather" in v.split("+")))
        for v in lru_modes
    ]
    evict = f"decay-lfu {near}"  # finemoe's eviction alone: what the predictor adds, apart from the eviction
    evict_gather = f"decay-lfu:gather {near}"  # the same with the absent experts gathered (finemoe modes with gather)
    if not args.no_eviction_reference:
        runs += [(evict, dict(policy="lru", eviction="decay-lfu", expert_budget=near, gather_absent=False))]
        if any("gather" in v.split("+") for v in lru_modes):
            runs += [(evict_gather, dict(policy="lru", eviction="decay-lfu", expert_budget=near, gather_absent=True))]
    runs += [fine(near, m) for m in modes]
    if not args.near_full_only:
        runs += [
            (f"lru {args.budget}", dict(policy="lru", expert_budget=args.budget)),
            (f"mixtral-offloading {args.budget}", dict(policy="mixtral-offloading", expert_budget=args.budget)),
            *(fine(args.budget, m) for m in modes),
        ]
    for _, kw in runs:  # every run's pool filled at set-up (what a budget near 100% holds in steady use), or
        kw["warm_pool"] = args.warm_pool  # none (the engine's default fills it where decode is graphed)
    # `reconfigure` keeps every knob it is not given: each run starts from the engine's first
    # configuration for the knobs any run sets (before session 27 they leaked from one run into the
    # next: e.g. `eviction="decay-lfu"` from the eviction reference into lru's later rounds and the
    # 25% baselines, finemoe's `prefetch_copies`, `graph_gates` and duty into mixtral-offloading)
    base = eng.config
    knobs = sorted({k for _, kw in runs for k in kw})
    reset = {k: getattr(base, k) for k in knobs}
    reset["map_store_learn"] = False  # nothing learns in any run (a learning lru would record history) but
    # the ':learn' arms, whose learned rows are undone after each run: every run matches the same 1K maps
    frozen = eng.maps.state() if any(kw.get("map_store_learn") for _, kw in runs) else None
    for rnd in range(args.rounds):  # interleaved rounds: drift hits every configuration alike
        got = {}
        # every other round in reverse order: a drift within a round moves a pair's two runs alike
        # in the mean (the last round, whose breakdown is printed, is in the given order when odd)
        for name, kw in runs if (args.rounds - 1 - rnd) % 2 == 0 else runs[::-1]:
            eng.reconfigure(**{**reset, **kw})
            engine_flags(eng, name_flags(name))
            last = rnd == args.rounds - 1 and not name.startswith("all-gpu")
            got[name] = decode(
                eng, test, args.new_tokens, breakdown=last, freeze=not args.no_gc_freeze, gpu_marks=args.gpu_marks
            )
            log.info("round %d %s: %s", rnd, name, got[name])
            if frozen is not None and kw.get("map_store_learn"):
                eng.maps.load_rows(frozen["emb"], frozen["maps"])
        rec["rounds"].append(got)
    for name, _ in runs:
        per = [r[name] for r in rec["rounds"]]
        rec["results"][name] = {
            **per[-1],
            "step_ms": statistics.median(p["step_ms"] for p in per),
            "predictor_ms_per_decode_iteration": statistics.median(p["predictor_ms_per_decode_iteration"] for p in per),
            "prelaunch_ms_per_decode_iteration": statistics.median(p["prelaunch_ms_per_decode_iteration"] for p in per),
            "gc_ms_per_decode_iteration": statistics.median(p["gc_ms_per_decode_iteration"] for p in per),
            # (the rounds' medians of each GPU span)
            "gpu_step_us": {k: statistics.median(p["gpu_step_us"][k] for p in per) for k in per[-1]["gpu_step_us"]},
        }
    res = rec["results"]
    base = res["all-gpu 100%"]["step_ms"]
    for name, r in res.items():
        r["predictor_share_of_100pct_step"] = r["predictor_ms_per_decode_iteration"] / base
        lru_name = f"lru {near}" if near in name else f"lru {args.budget}"
        if near in name:  # a finemoe run with flags an lru variant has too is compared with that variant
            flags = name_flags(name)
            lru_name = next((f"lru:{v} {near}" for v in lru_modes if set(v.split("+")) <= flags), lru_name)
        ref = res.get(lru_name)
        # The honest figure: the whole step's extra time over the same cache without a predictor
        # (forward-thread work, lock/GIL contention with the searcher, plan bookkeeping).
        if name.startswith("finemoe") and ref is not None:
            r["compared_with"] = lru_name
            paired = [rd[name]["step_ms"] - rd[lru_name]["step_ms"] for rd in rec["rounds"]]  # same round
            r["added_ms_vs_lru_rounds"] = paired
            r["added_ms_vs_lru"] = statistics.median(paired)
            r["added_share_of_100pct_step"] = r["added_ms_vs_lru"] / base
            ev = evict_gather if "gather" in name_flags(name) and evict_gather in res else evict
            if near in name and ev in res:  # the predictor's own addition, the eviction policy apart
                r["compared_with_eviction"] = ev
                paired = [rd[name]["step_ms"] - rd[ev]["step_ms"] for rd in rec["rounds"]]
                r["added_ms_vs_eviction_rounds"] = paired
                r["added_ms_vs_eviction"] = statistics.median(paired)
                r["added_vs_eviction_share_of_100pct_step"] = r["added_ms_vs_eviction"] / base
    eng.config = eng.config.__class__(**{**eng.config.__dict__, "map_store": None})  # do not save
    eng.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=1))
    print(
        f"{'run':<28} {'step ms':>8} {'fwd-thread ms/it':>16} {'share':>7} "
        f"{'added ms vs lru':>15} {'share':>7} {'rounds (min..max)':>17} {'hit':>6} {'pre-launch':>10} {'gc ms/it':>8}"
    )
    for k, r in res.items():
        added = r.get("added_ms_vs_lru")
        if added is not None:
            lo, hi = min(r["added_ms_vs_lru_rounds"]), max(r["added_ms_vs_lru_rounds"])
            extra = f"{added:>15.2f} {r['added_share_of_100pct_step']:>7.2%} {f'{lo:.2f}..{hi:.2f}':>17}"
        else:
            extra = f"{'':>15} {'':>7} {'':>17}"
        print(
            f"{k:<28} {r['step_ms']:>8.2f} {r['predictor_ms_per_decode_iteration']:>16.3f} "
            f"{r['predictor_share_of_100pct_step']:>7.2%} {extra} {r['hit_rate']:>6.3f}"
            f" {r['prelaunch_ms_per_decode_iteration']:>10.3f} {r['gc_ms_per_decode_iteration']:>8.3f}"
        )
    print(f"{'run':<28} {'added ms vs decay-lfu':>21} {'share':>7}  host ms per iteration (last round)")
    for k, r in res.items():
        added = r.get("added_ms_vs_eviction")
        col = f"{added:>21.2f} {r['added_vs_eviction_share_of_100pct_step']:>7.2%}" if added is not None else " " * 29
        host = r["host_ms_per_iteration"].items()
        spans = ", ".join(f"{p.removeprefix('decode_').removesuffix('_s')} {v:.2f}" for p, v in host)
        copies, rows = r["graphed_logits_copies_per_iteration"], r.get("table_rows_copied_per_iteration", 0.0)
        ahead = r.get("run_ahead_layers_per_iteration", 0.0)
        early = r.get("early_reads_per_iteration", 0.0)
        skips = "/".join(f"{v:.1f}" for v in r.get("side_skips_per_iteration", ()))
        print(
            f"{k:<28} {col}  {spans}, logits copies {copies:.1f}, table rows {rows:.1f}, run ahead {ahead:.1f}, "
            f"early reads {early:.1f}, sides without gates/match, late matches {skips}"
        )
    for k, r in res.items():
        duty = r.get("duty") or {}
        if duty.get("prediction_duty") == "adaptive":
            on, off = duty.get("decode_iterations_predicting"), duty.get("decode_iterations_not_predicting")
            print(
                f"{k}: adaptive duty, predicting {on} / not {off} decode iterations, now "
                f"{'on' if duty.get('prediction_on') else 'off'}, medians {duty.get('decode_step_ms_predicting')} / "
                f"{duty.get('decode_step_ms_not_predicting')} ms"
            )
    print(
        "the last layers' routings on the host (last round, µs from a replayed step's start): counted / "
        "planned [waits per step for the layer's side graph: gate rows + map match]"
    )
    for k, r in res.items():
        tl = r.get("drain_timeline_us") or {}
        landed, planned = tl.get("landed") or [], tl.get("planned") or []
        gw, mw = tl.get("gate_wait") or [], tl.get("match_wait") or []
        if any(v is not None for v in landed):
            cells = []
            for i in range(max(0, len(landed) - 6), len(landed)):
                if landed[i] is None:
                    continue
                cell = f"{i}: {landed[i]:.0f}/{'-' if planned[i] is None else f'{planned[i]:.0f}'}"
                wait = (gw[i] or 0.0) + (mw[i] or 0.0) if i < len(gw) and i < len(mw) else 0.0
                cells.append(cell + (f" [{gw[i] or 0.0:.0f}+{mw[i] or 0.0:.0f}]" if wait else ""))
            print(f"{k:<36} " + ", ".join(cells))
            parts = {p[5:]: v for p, v in tl.items() if p.startswith("part:") and any(v or ())}
            for p, v in parts.items():  # the host's parts on the last layers' routings, µs per step
                lo = max(0, len(v) - 7)
                print(f"{'':<8}{p:<28} " + " ".join(f"{i}:{v[i] or 0.0:5.1f}" for i in range(lo, len(v))))
    print("layers that synced in most steps (run ahead in under half; last round) and absent experts by layer")
    for k, r in res.items():
        share = r.get("run_ahead_share_by_layer") or []
        if any(share):
            synced = [i for i, v in enumerate(share) if v < 0.5]
            absent = {i: a for i, a in enumerate(r.get("absent_experts_by_layer", [])) if a}
            print(f"{k:<36} synced {synced}  absent {absent}")
    print_lists(
        res,
        "sync_marks_ms",
        "{:7.3f}",
        "the last routing sync of a replayed step (last round, ms from its first launch): drain start, "
        "drain end, routing read, next launch, replay end",
    )
    print_lists(
        res,
        "step_spans_us",
        "{:7.1f}",
        "between replayed steps (last round, µs per step): replay end -> decode returned (the replay's cleanup), "
        "-> token fed (the logits read and sampled), -> the step's on_iteration, on_iteration (start_iteration), "
        "-> S_0 launch, S_0 launch (records before session 37: 5 spans, the first two as one)",
    )
    if any(r.get("gpu_step_us") for r in res.values()):
        print(f"replayed steps on the GPU (median over rounds of each round's median, µs): {', '.join(SPANS)}")
        for k, r in res.items():
            g = r.get("gpu_step_us") or {}
            if g:
                print(f"{k:<36} " + " ".join(f"{g[s]:8.1f}" for s in SPANS))
        print_end_on_one_clock(rec["rounds"])
    print("link per iteration (last round): MB copied, misses, prefetches issued / wasted / late, stall ms")
    for k, r in res.items():
        lk = r.get("link_per_iteration") or {}
        if lk:
            print(
                f"{k:<36} {lk['mb_copied']:8.2f} {lk['misses']:6.2f} {lk['prefetches_issued']:6.2f} "
                f"{lk['prefetches_wasted']:6.2f} {lk['prefetches_late']:6.2f} {lk['stall_ms']:7.3f}"
            )
    for k, r in res.items():
        if r.get("breakdown_ms_per_iteration"):
            parts = ", ".join(f"{p} {v:.3f}" for p, v in r["breakdown_ms_per_iteration"].items())
            print(f"{k} (last round, decode iterations, ms per iteration): {parts}")
    print("routing-sync wait per layer (last round, µs per iteration): min, median, layers under 20 µs")
    for k, r in res.items():
        waits = sorted(w * 1e3 for w in r.get("sync_ms_by_layer", []))
        if waits and waits[-1] > 0:
            short = sum(w < 20 for w in waits)
            print(f"{k:<36} {waits[0]:8.1f} {statistics.median(waits):8.1f} {short:4d} of {len(waits)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
