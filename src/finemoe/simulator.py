"""Trace-driven simulation: replay recorded routing through the engine's own cache, prefetcher,
eviction policies and predictors (built by the same functions, driven by the same `Stepper`),
against a model of time: a host link that copies experts one at a time in issue order, dense compute per layer,
expert compute per expert, stalls when compute needs an expert still in flight.

Links: "timed" (the `CostModel`'s copy time, copies in issue order: an on-demand copy waits for
the prefetch copies issued before it, as measured on the H200), "demand-first" (the same, but
on-demand copies overtake queued prefetches) or "instant" (a copy is done when issued, like the
engine's synchronous CPU transfer: with it the replay makes exactly the engine's decisions).

In the replay the router input handed to speculative predictors is each row's (trace row, layer)
([N, 2]), and their gate is a lookup of the speculative probabilities recorded with the trace.
Batches are formed from consecutive requests (padding-free: only real tokens route); a
request leaves its batch when it has generated its tokens.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from finemoe.cache import ExpertCache
from finemoe.config import BudgetPlan, EngineConfig, ExpertBudget
from finemoe.costmodel import CostModel
from finemoe.errors import ConfigError
from finemoe.history import PredictorChain
from finemoe.oracle import BeladyPolicy, Future, OraclePredictor
from finemoe.policy import EVICTION_POLICIES
from finemoe.predictor import PredictorDeps
from finemoe.prefetcher import LinkWindow, Prefetcher
from finemoe.presets import (
    PolicyPreset,
    adaptive_prefetch_window,
    get_preset,
    predict_after_demand,
    predictor_members,
    prefetch_distance,
    prefill_sweep,
    reads_router_inputs,
)
from finemoe.replay_rows import BatchRows, ReplayEvent, accesses_of, schedule
from finemoe.sim_history import History
from finemoe.simlink import Clock, GpuTimeline, InstantLink, NoWeights, SimPool, TimedLink
from finemoe.stepper import Stepper
from finemoe.trace import Trace
from finemoe.types import MoESpec, RoutingEvent

log = logging.getLogger(__name__)

ORACLES = ("belady", "oracle")  # simulator-only policies
LINKS = ("timed", "demand-first", "instant")


# -- the replay ----------------------------------------------------------------------------------
@dataclass
class SimResult:
    """Counters and estimated times of one replay. Times in simulated seconds."""

    policy: str
    budget: str
    slots: int
    link: str
    cost_model: str
    batch_size: int
    stats: dict
    ttft_s: float  # mean over requests
    tpot_s: float  # mean over requests with more than one token
    e2e_s: float  # mean request latency (batch start to last token)
    total_s: float
    stall_s: float
    link_busy_s: float
    layer_steps: int  # token-layer routing steps replayed (decode rows + prefill iterations) x L
    wall_s: float
    predictor: dict = field(default_factory=dict)
    layers_run_ahead: int = 0  # graphed decode: layers launched without their routing sync

    @property
    def hit_rate(self) -> float:
        return self.stats["hit_rate"]

    @property
    def steps_per_s(self) -> float:
        return self.layer_steps / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items()}
        out["hit_rate"] = self.hit_rate
        out["layer_steps_per_s"] = self.steps_per_s
        return out


class Simulator:
    """One policy at one budget over traces; build once, `run` once.

    `graphed`: model the engine's graphed decode (CUDA, single prompts) on two timelines. The
    host serves a layer (its on-demand copies), launches the layer's segment (its experts, then the
    next layer's dense part up to the router), then spends `CostModel.layer_host_s` and runs the
    predictors (`predict_host_s`) and starts their copies, and waits at the next router, whose sync
    costs `sync_host_s` before the next serve and launch; the GPU
    runs the segment once its copies are done. So host time overlaps the copies and the GPU's work.
    `run_ahead` (with `graphed`, as the engine by default, `runahead.py`): a layer whose every expert
    is resident is launched without the routing sync, its slots pinned; its uses are counted and its
    predictors run when the host next syncs (or at the step's end), after the GPU has reached its
    router. Such a launch costs the host no time of its own here (its few tens of µs on the H200 are
    not calibrated). Without `graphed`, one clock runs everything in sequence and decode plans
    come before the copies, as in the eager engine (and the CPU engine the deterministic-mode tests
    compare with)."""

    def __init__(
        self,
        spec: MoESpec,
        config: EngineConfig,
        cost: CostModel | None,
        link: str = "timed",
        history: History | None = None,
        spec_probs: dict[int, torch.Tensor] | None = None,
        future: Future | None = None,
        oracle_noise: float = 0.0,
        graphed: bool = False,
        run_ahead: bool = True,
    ) -> None:
        if link not in LINKS:
            raise ConfigError(f"link must be one of {', '.join(LINKS)}, got {link!r}")
        if link != "instant" and cost is None:
            raise ConfigError("a timed link needs a cost model")
        self.spec, self.config, self.cost, self.link_kind = spec, config, cost, link
        oracle = config.policy in ORACLES
        preset = (
            get_preset("on-demand" if config.policy == "belady" else "finemoe") if oracle else get_preset(config.policy)
        )
        self.preset: PolicyPreset = preset
        self.name = config.policy
        plan = BudgetPlan.make(ExpertBudget("fraction", 1.0) if preset.all_resident else config.expert_budget, spec)
        self.plan = plan
        self.clock = Clock()
        # the current iteration's router stand-in, its NumPy view, the layer routing now and the
        # stand-in's first trace row (plain ints: a single-row stand-in's layer column is not written)
        self._stand_in: list = [None, None, 0, 0]
        order = "demand-first" if link == "demand-first" else "fifo"
        self.transfer = (
            InstantLink()
            if link == "instant" or plan.all_resident
            else TimedLink(self.clock, plan.slots, cost.copy_s, order)
        )
        if oracle:
            if future is None:
                raise ConfigError(f"policy {config.policy} needs the replay's future accesses")
            # the oracle prefetcher with another eviction (`eviction`): what prediction alone adds
            alt = config.eviction if config.policy == "oracle" else None
            policy = EVICTION_POLICIES[alt](spec.num_layers, spec.num_experts) if alt else BeladyPolicy(future)
        else:
            policy = EVICTION_POLICIES[config.eviction or preset.eviction](spec.num_layers, spec.num_experts)
        if cost is not None and (cost.victim_host_s or cost.routing_host_s):
            _charge_host(policy, self.clock, cost.victim_host_s, cost.routing_host_s)
        sweep = prefill_sweep(preset, config) and not oracle  # Belady's choices stay its own
        self.cache = ExpertCache(
            spec,
            SimPool(plan.slots),
            NoWeights(),
            self.transfer,
            policy,
            sweep,
            config.early_issue_misses,
            keep_whole=config.keep_whole_layers and not oracle,  # Belady's choices stay its own
            # (auto: as the engine, where decode steps are graphed)
            gather_absent=(graphed if config.gather_absent is None else config.gather_absent) and not oracle,
        )
        warm = graphed if config.warm_pool is None else config.warm_pool  # (auto: as the engine)
        if warm and not plan.all_resident:
            # the engine's fill of the free slots at set-up (`ExpertCache.fill_free`), which it waits
            # for: landed before the first request, no traffic, no link time
            self.cache.fill_free()
            forget = getattr(self.transfer, "forget_copies", None)
            if forget is not None:
                forget()
        copy_s = getattr(self.transfer, "copy_seconds", None)
        if isinstance(self.transfer, TimedLink):
            copy_s = self.transfer.copy_s  # fixed for the replay: the window reads the number
        transfer, clock = self.transfer, self.clock
        # layer time without the stalls: the time the link has to copy in; in a graphed decode step
        # the wall time, as the engine's window reads it there (its stalls are the GPU's)
        replaying = self._replaying = [False]
        window = LinkWindow(
            config.max_inflight_prefetches,
            (lambda: clock.t - (0.0 if replaying[0] else transfer.stall_s))
            if hasattr(transfer, "stall_s")
            else (lambda: clock.t),
            copy_s,
            adaptive=adaptive_prefetch_window(preset, config, plan.all_resident),
        )
        self.prefetcher = Prefetcher(self.cache, config.max_inflight_prefetches, window, config.prefetch_copies)
        self.distance = prefetch_distance(preset, config.prefetch_distance)
        self.history = history
        members: list = []
        if config.policy == "oracle":
            members = [OraclePredictor(future, self.distance, oracle_noise, spec.num_experts)]
        elif not oracle:
            deps = PredictorDeps(
                spec,
                self.distance,
                history.maps if history else None,
                history.requests if history else None,
                self._gate(spec_probs) if spec_probs else None,
                delta_rule=config.delta_rule,
                semantic=config.semantic_search,
                map_values=config.map_values,
                trajectory_window=config.trajectory_window,
                trajectory_candidates=config.trajectory_candidates,
                trajectory_lag=config.trajectory_lag,
                map_min_score=config.map_min_score,
                map_min_precision=config.map_min_precision,
                store_rows=config.map_store_rows,
                layer_probs=getattr(self.cache.policy, "reads_layer_probs", True),
            )
            if reads_router_inputs(preset, config) and not spec_probs:
                raise ConfigError(f"policy {config.policy} needs a trace recorded with speculative router outputs")
            if preset.predictor in ("finemoe", "moe-infinity") and history is None:
                raise ConfigError(f"policy {config.policy} needs history stores")
            if history is not None:
                history.maps.distance = self.distance
            members = predictor_members(preset, config, deps, plan.all_resident)
        self.predictors = [members[0] if len(members) == 1 else PredictorChain(members)] if members else []
        self.want_hidden = not oracle and reads_router_inputs(preset, config)
        # prefill: predictors once the copies are issued (the oracles keep planning first, as they sweep not)
        self.after_demand = predict_after_demand(preset, config) and not oracle
        self.graphed = graphed and not oracle  # decode plans after the copies (the oracles plan first)
        self.run_ahead = run_ahead
        self.stepper = Stepper(self.cache, self.prefetcher, self.predictors)
        if plan.all_resident:
            self.cache.preload_all()

    def _gate(self, spec_probs: dict[int, torch.Tensor]) -> Callable[[int, torch.Tensor], np.ndarray]:
        tables = {s: t.float().numpy() for s, t in spec_probs.items()}  # [N, L, E] float32, as the gate returns
        rows1 = {s: t[:, :, None] for s, t in tables.items()}  # [N, L, 1, E] views: one row's [1, E] in one index
        current = self._stand_in  # (stand-in tensor, its NumPy view, layer, first row), set by `run`

        def gate(target: int, hidden: torch.Tensor) -> np.ndarray:  # hidden: [N, 2] (trace row, layer)
            if hidden is current[0]:
                h, source, row = current[1], current[2], current[3]
            else:
                h = hidden.numpy()
                r, s = h[0].tolist()  # floats (the stand-in is a float tensor)
                row, source = int(r), int(s)
            table = tables.get(target - source)
            if table is None:
                raise ConfigError(f"the trace has no speculative router outputs for stride {target - source}")
            if h.shape[0] == 1:  # decode at batch 1: one row, a view
                return rows1[target - source][row, source]
            return table[h[:, 0].astype(np.int64), source]

        return gate

    def run(self, trace: Trace, batch_size: int = 1, progress: Callable | None = None) -> SimResult:
        """Replay `trace` in batches of `batch_size` consecutive requests. Python's cyclic garbage
        collector is paused meanwhile (`_collector_paused`)."""
        with _collector_paused():
            return self._run(trace, batch_size, progress)

    def _run(self, trace: Trace, batch_size: int, progress: Callable | None) -> SimResult:
        spec, cost, clock = self.spec, self.cost, self.clock
        L = spec.num_layers
        cache, stepper, prefetcher = self.cache, self.stepper, self.prefetcher
        observe = getattr(cache.policy, "on_routing", None)  # router-probability eviction (`policy_routes`)
        want_events, want_hidden = bool(self.predictors) or observe is not None, self.want_hidden
        after_demand = self.after_demand and bool(self.predictors)
        graphed = self.graphed and bool(self.predictors)
        batches = schedule(trace, batch_size)
        access = accesses_of(trace, batches)
        zero = (lambda *a: 0.0) if cost is None else None
        layer_s = zero or (lambda tokens: cost.layer_s + (tokens - 1) * cost.layer_token_s)
        head_s = 0.0 if cost is None else cost.head_s
        layer_host = 0.0 if cost is None else cost.layer_host_s
        sync_host = 0.0 if cost is None else cost.sync_host_s
        predict_host = 0.0 if cost is None or not self.predictors else cost.predict_host_s
        if (after_demand or graphed) and predict_host:  # deferred: charged once the layer's copies are issued

            def charge() -> None:
                clock.t += predict_host

            stepper.after_deferred = charge
        e_s = 0.0 if cost is None else cost.expert_s
        e_tok = 0.0 if cost is None else cost.expert_token_s
        ttft, tpot, e2e = [], [], []
        per_expert = [0.0]

        def compute(got: list[int], slots: list[int], whole: bool) -> None:
            clock.t += per_expert[0] * len(got)

        # graphed decode: the GPU on its own timeline (an instant link has no time to model)
        link = self.transfer
        gpu = GpuTimeline(clock, link) if self.graphed and isinstance(link, TimedLink) else None
        ahead = gpu is not None and self.run_ahead and observe is None  # (the engine's: no routing policy)
        pending: list[tuple] = []  # layers run ahead, not read yet: (layer, experts, event, pinned, routed at)
        stand_in = self._stand_in  # (a decode step run ahead has one row: the gates read the layer from here)

        def drain(launched: int) -> None:
            """Read the routings run ahead, in layer order, as the engine's `RunAhead.drain`: the host
            waits for each router, the cache counts the uses (all hits) and drops the pins, then
            the predictors plan and their copies start; `launched`: the last layer whose experts'
            compute is launched (`RoutingEvent.launched`: no plan for it or earlier ones)."""
            for lay, used, ev, pinned, routed in pending:
                if routed > clock.t:
                    clock.t = routed
                prefetcher.now(g, lay, False)
                cache.account_pinned(lay, used, pinned)
                if ev is not None:
                    stand_in[2] = lay  # the stand-in router input is this layer's again
                    ev.launched = launched
                    stepper.route(ev)
                    clock.t += predict_host
                    prefetcher.resume()
                    prefetcher.pump()
            pending.clear()

        wall0 = time.perf_counter()
        steps = ran_ahead = 0
        g = 0
        for bi, batch in enumerate(batches):
            t_start = clock.t
            ranges = [trace.row_ranges(r) for r in batch]
            olen = [len(x) for x in ranges]
            stamps: list[list[float]] = [[] for _ in batch]
            rows = BatchRows(trace, batch) if want_events else None
            for it in range(max(olen)):
                live = [i for i, n in enumerate(olen) if it < n]
                parts = [(batch[i], *ranges[i][it]) for i in live]
                prefill = it == 0
                # the predictors after the layer's copies: prefill (`prefill_predict`), graphed decode
                # (the engine graphs the decode of single-prompt batches only, not a batch's last request)
                late = want_events and (after_demand if prefill else graphed and len(batch) == 1)
                # a graphed decode step: the GPU on its own timeline
                replayed = gpu is not None and not prefill and len(batch) == 1
                self._replaying[0] = replayed
                tokens = sum(b - a for _, a, b in parts)
                steps += L * len(parts)
                cache.begin_iteration(prefill)
                if not prefill:
                    cache.gather()  # (`gather_absent`, as the engine's iteration start)
                if rows is not None:
                    # per layer views made at once; the stand-in's layer column written through NumPy
                    ctx, probs, topk, ids, probs_np, lists = rows.iteration(g, prefill, parts)
                    stand = self._stand_in
                    if ids is not stand[0]:  # (a single-row iteration reuses one stand-in)
                        stand[0], stand[1] = ids, ids.numpy()  # the gate reads the stand-in through NumPy
                    ids_np = stand[1]
                    stand[3] = parts[0][1]  # the iteration's first trace row
                    many_rows = ids_np.shape[0] > 1  # then the layer column is written too (row subsets)
                    stepper.begin(g, ctx)
                else:
                    stepper.begin(g, None)
                if not replayed:
                    clock.t += head_s
                layers = access[g]
                dense = layer_s(tokens)
                pairs = tokens * spec.top_k  # routed (token, expert) pairs per layer
                if replayed:
                    gpu.begin(dense)  # the first segment: up to layer 0's router
                for layer, experts in enumerate(layers):
                    pinned = cache.pin_layer(layer) if replayed and ahead else None
                    if replayed and pinned is None:
                        if pending:
                            drain(layer - 1)  # the routings run ahead so far, before this layer's sync
                        gpu.sync()  # the routing sync: the host waits for the segment ending in this router
                        clock.t += sync_host  # (before the serve and launch: the GPU idles through it)
                    elif not replayed:
                        clock.t += dense
                    # each expert reads its weights once and computes its share of the routed pairs
                    per_expert[0] = e_s + (pairs / (len(experts) or 1) - 1) * e_tok
                    if want_events:
                        if want_hidden:
                            stand[2] = layer
                            if many_rows:
                                ids_np[:, 1] = layer
                        hidden = ids if want_hidden else None
                        p = probs[layer]  # [N, E] float32 CPU (or its NumPy rows): what `host_probs()` returns
                        if lists is None:
                            event = RoutingEvent(
                                g, layer, p, topk[layer], prefill, hidden, _host=p, _host_np=probs_np[layer]
                            )
                        else:  # a single-row iteration: NumPy rows, tensors made only if read
                            event = ReplayEvent.of(g, layer, p, topk[layer], prefill, hidden, lists[layer])
                        if not late:
                            stepper.route(event)
                    if pinned is not None:  # every expert resident: launched without the routing sync
                        routed = gpu.end  # router `layer` is done then (the host reads it at the drain)
                        gpu.expert_s = per_expert[0]
                        gpu.launch_pinned(len(experts), pinned)
                        gpu.then(dense if layer < L - 1 else head_s)
                        pending.append((layer, experts, event if late else None, pinned, routed))
                        ran_ahead += 1
                        continue
                    if replayed:  # as the graphed engine: serve, launch, then the predictors and their copies
                        gpu.expert_s = per_expert[0]
                        link.defer = True
                        try:
                            stepper.serve(g, layer, experts, gpu.launch, None, pump_first=False)
                        finally:
                            link.defer = False
                        # the segment runs on to the next router; the last one to the logits (the
                        # LM head on the GPU, while the host does the last layer's work)
                        gpu.then(dense if layer < L - 1 else head_s)
                        if observe is not None:
                            observe(event)
                        clock.t += layer_host
                        if late:
                            stepper.route(event)
                            clock.t += predict_host
                            prefetcher.resume()
                            prefetcher.pump()
                        continue
                    if predict_host and not late:  # the predictors' host work before the layer's copies
                        clock.t += predict_host
                    stepper.serve(g, layer, experts, compute, event if late else None)
                    if observe is not None:  # as the engine: once the layer is served
                        observe(event)
                if replayed:
                    if pending:
                        drain(L - 1)  # (the host reads the routings run ahead before it waits for the logits)
                    gpu.sync()  # the host waits for the step's logits
                for i in live:
                    stamps[i].append(clock.t)
                g += 1
            stepper.end_requests()
            for s in stamps:
                ttft.append(s[0] - t_start)
                e2e.append(s[-1] - t_start)
                if len(s) > 1:
                    tpot.append((s[-1] - s[0]) / (len(s) - 1))
            if progress is not None:
                progress(bi + 1, len(batches))
        wall = time.perf_counter() - wall0
        cache.refresh_stall()
        pstats: dict[str, Any] = {}
        for p in self.predictors:
            pstats.update(p.stats())
        mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
        return SimResult(
            policy=self.name,
            budget=str(self.config.expert_budget),
            slots=self.plan.slots,
            link=self.link_kind,
            cost_model=cost.name if cost else "none",
            batch_size=batch_size,
            stats=cache.stats.to_dict(),
            ttft_s=mean(ttft),
            tpot_s=mean(tpot),
            e2e_s=mean(e2e),
            total_s=clock.t,
            stall_s=getattr(self.transfer, "stall_s", 0.0),
            link_busy_s=getattr(self.transfer, "busy_s", 0.0),
            layer_steps=steps,
            wall_s=wall,
            layers_run_ahead=ran_ahead,
            predictor={k: v for k, v in pstats.items() if not isinstance(v, list)},
        )


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector, restoring its state on exit (exceptions included).
    A replay keeps ~100k new objects alive (accesses, per-row inputs, policy state), enough to set
    off a full collection over every object the process tracks (~430k with torch and a 1K store):
    ~0.19 s, ~10% of a 40-request finemoe replay (measured with `gc.callbacks`). The replay makes
    no reference cycles (what it drops, reference counting frees at once), so nothing piles up;
    a collection runs as usual once the replay is done."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _charge_host(policy: Any, clock: Clock, victim_s: float, routing_s: float) -> None:
    """Advance the replay's clock by the eviction policy's host time (`CostModel.victim_host_s`
    per victim search, `routing_host_s` per routing read): this one policy object's methods are
    wrapped (instance attributes, read by the cache and the replay loop); its decisions are unchanged."""

    def charged(fn: Callable, seconds: float) -> Callable:
        def call(*args: Any, **kwargs: Any) -> Any:
            clock.t += seconds
            return fn(*args, **kwargs)

        return call

    if victim_s:
        for name in ("victim", "victims", "prefetch_victims", "victims_behind", "candidates", "layer_victims"):
            fn = getattr(policy, name, None)
            if fn is not None:
                setattr(policy, name, charged(fn, victim_s))
    if routing_s and getattr(policy, "on_routing", None) is not None:
        policy.on_routing = charged(policy.on_routing, routing_s)


def simulate(
    trace: Trace,
    config: EngineConfig,
    cost: CostModel | None = None,
    link: str = "timed",
    history: History | None = None,
    batch_size: int = 1,
    progress: Callable | None = None,
    oracle_noise: float = 0.0,
    graphed: bool = False,
    run_ahead: bool = True,
) -> SimResult:
    """Replay `trace` under `config` (policy, budget, predictor knobs). `history` is cloned when
    the replay learns (so one preloaded history serves many replays). `oracle_noise`: the
    `oracle` policy's share of wrong experts (`OraclePredictor`); with `config.eviction` set the
    oracle prefetches over that eviction instead of Belady's. `graphed`: decode as the engine's
    CUDA graphs run it (`Simulator`; `run_ahead` there: whole layers skip their routing sync)."""
    hist = history
    if history is not None and config.map_store_learn:
        hist = history.clone()
    future = None
    if config.policy in ORACLES:
        future = Future(accesses_of(trace, schedule(trace, batch_size)), trace.spec.num_layers)
    sim = Simulator(trace.spec, config, cost, link, hist, trace.spec_probs, future, oracle_noise, graphed, run_ahead)
    return sim.run(trace, batch_size, progress)
