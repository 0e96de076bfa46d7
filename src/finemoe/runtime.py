"""The state one engine's MoE layers share during forward passes (`OffloadRuntime`): the cache,
prefetcher and predictors, the iteration, the kernels' limits, and the graphed decode step's
per-step hand-offs and host-time counters. `execution` binds it to the model's layers."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from finemoe.cache import ExpertCache
from finemoe.duty import PredictionDuty
from finemoe.loader import MoELayerRef
from finemoe.models import FamilyAdapter
from finemoe.pool import SlotGather
from finemoe.predictor import Predictor, reads_router_probs
from finemoe.prefetcher import Prefetcher
from finemoe.stepper import Stepper
from finemoe.types import IterationContext, MoESpec, RoutingEvent

if TYPE_CHECKING:
    import numpy as np

    from finemoe.device_plans import DeviceMatches
    from finemoe.execution import LayerBinding
    from finemoe.graphs import StaticDecoder
    from finemoe.step_marks import StepMarks
    from finemoe.step_record import StepRecord

log = logging.getLogger(__name__)

MAX_CUDA_GROUPS = 512
# torch's CPU grouped_mm walks every group, empty ones too: ~2.3 us each (torch 2.13, 2-core CPU
# machine, 2026-11-29), so a call over a pool of hundreds of slots costs ~1 ms for a handful of
# experts. Gathering the routed experts into a scratch copy pays while their copy (index_select,
# 5-15 GB/s measured on the same machine) is cheaper than the empty groups it saves.
CPU_GROUP_S = 2.3e-6
CPU_COPY_BYTES_PER_S = 5e9
# a stream priority below every device's range: torch maps it to the highest (CUDA's is -5 or -2)
HIGHEST_STREAM_PRIORITY = -(2**10)
BINDING_ATTR = "_finemoe_binding"  # the experts module's attribute holding its `LayerBinding`


@dataclass
class OffloadRuntime:
    """State shared by every MoE layer of one engine during a forward pass."""

    spec: MoESpec
    adapter: FamilyAdapter
    cache: ExpertCache
    prefetcher: Prefetcher
    predictors: list[Predictor] = field(default_factory=list)
    duty: PredictionDuty | None = None  # decides per iteration whether the planners run (None: always)
    always: list[Predictor] = field(default_factory=list)  # predictors the duty never pauses (recorders)
    observers: list[Callable[[RoutingEvent], None]] = field(default_factory=list)
    # the eviction policy's reader of router probabilities (router-ema), told of a layer's routing
    # once the layer is served (eager: after its experts ran; graphed: after the next segment was
    # replayed, overlapping it): its host work never delays the layer's on-demand copies
    policy_routes: Callable[[RoutingEvent], None] | None = None
    iteration: int = 0
    is_prefill: bool = True
    max_groups: int = 0  # widest slot window one grouped_mm call may span; 0 = the whole pool
    embed: nn.Module | None = None  # the model's input embedding layer (semantic context)
    want_embeddings: bool = False
    want_hidden: bool = False  # a (synchronous) predictor reads router inputs
    critical_prefill_s: float = 0.0  # forward-thread time building contexts and in predictors, prefill
    critical_decode_s: float = 0.0  # the same in decode iterations
    sync_decode_s: float = 0.0  # decode: host time blocked in the layers' routing syncs (device-bound time)
    # the same per MoE layer [L] (a layer whose wait is near zero: the host was late for its sync)
    sync_layer_decode_s: list[float] = field(default_factory=list)
    sync_s: float = 0.0  # the same over prefill and decode
    # graphed decode: host time from each layer's routing sync to its next segment's launch (the
    # host work on the critical path between two segments), and when the latest sync returned
    prelaunch_decode_s: float = 0.0
    routed_at: float = 0.0
    # graphed decode, the layer's serve split in three (summing to `Stepper.serve`'s time there):
    # before the segment's launch (the accesses, the eviction policy's uses and victims, the
    # demand copies' issue), the launch call itself, and after it (unpinning, starting prefetches)
    serve_decode_s: float = 0.0
    table_decode_s: float = 0.0  # of which refreshing the layer's device slot-table row (a copy when it changed)
    launch_decode_s: float = 0.0
    post_launch_decode_s: float = 0.0
    # graphed decode: start a layer's queued prefetches before its segment's launch (True), or after
    # it (False, the default: the launch is not delayed by the prefetch issue; a measurement switch)
    pump_before_launch: bool = False
    # graphed decode: a layer whose experts are all resident launches its next segment without a
    # routing sync (`runahead`); its routing is read after the launches (a measurement switch)
    run_ahead: bool = True
    # graphed decode: routings read after running ahead tell the predictors which layers' compute is
    # launched already (`RoutingEvent.launched`: no plan for them); False: -1 (a measurement switch)
    tell_launched: bool = True
    # graphed decode, the drain before a routing sync (`RunAhead.drain`): the predictors' work of the
    # routings still to read goes after the sync layer's launch (the step's late events, told that
    # layer is launched) once the sync layer's router is done ("late": the host is behind the GPU, and
    # a plan for a layer whose routing is known is useless), for every such routing ("always"), or
    # never ("never", the default: session 36 measured the step on the H200 over 16 paired rounds,
    # "late" +0.03 ms and "always" +0.17 ms slower than "never"; `device_plans.md`, "Session 36")
    defer_drained_plans: str = "never"
    drained_plans_deferred: int = 0  # drained routings whose predictor work went after the launch, in total
    # graphed decode: a layer run ahead whose gate targets all run ahead too replays its side graph
    # without the gates (`SideGraphs.gates_needed`: their rows would never be read); False: always
    # with them (a measurement switch)
    skip_launched_gates: bool = True
    # graphed decode, with routings run ahead named launched: a layer whose map match no plan of the
    # step will read launches none; the next match launched catches its layer up (the fused match,
    # `SideGraphs.match_needed`); False: every matched layer launches its match (a measurement switch)
    defer_matches: bool = True
    # set by the static decoder around a replayed step's `start_iteration`: the predictors' start of the
    # step (the token's embedding, its host copy, the semantic match) waits until S_0 is launched
    # (`begin_deferred`), instead of delaying that launch
    defer_begin: bool = False
    # a held-back start computes the token's embedding on a stream of its own, behind the step's input
    # only (`_embed_launch`); False: on the compute stream, behind every segment launched (a switch)
    embed_beside: bool = True
    # a replayed step with side graphs brings the device copy of the map store up to date (online
    # learning's new rows) on the side stream after S_0's launch, where only the matches read it;
    # False: on the compute stream before S_0's launch, host and device time on the step (a switch)
    store_sync_beside: bool = True
    _begin: tuple | None = None
    _embed_stream: torch.cuda.Stream | None = None  # a held-back start's embedding (`_embed_launch`)
    # that stream's priority (torch's: lower runs sooner, out-of-range values map to the nearest end
    # of `torch.cuda.Stream.priority_range()`): its kernels wait for SMs the segments beside them
    # hold, and the host's drain waits for its copy. Default: the highest (session 35, 16 paired
    # rounds on the H200: the drain's first routing read 1.85 -> 1.68 ms into the step, the step's
    # median -15 µs against priority 0; `predictor_overhead.py`'s `embed-noprio` sets 0)
    embed_priority: int = HIGHEST_STREAM_PRIORITY
    _embed_made: int = 0  # the priority `_embed_stream` was made with (torch maps it into its range)
    # a held-back start's embedding is launched right after S_0's launch (`embed_held`, called by the
    # static decoder), not when the start runs at the drain's start, where the host would wait for
    # its kernels queued behind the segments launched since (a measurement switch, `embed-early`)
    embed_early: bool = False
    _early: tuple | None = None  # (input ids, (embeddings, host copy)) launched by `embed_held`
    # the stream every forward pass runs on while set (`pin_stream`: the static decoder's running
    # context); iterations then skip the compute stream's lookup, and their events record on it
    fixed_stream: torch.cuda.Stream | None = None
    # events reused step after step: a held-back start's input ready, its embedding's host copy landed
    _ready: torch.cuda.Event | None = None
    _embedded: torch.cuda.Event | None = None
    run_ahead_by_layer: list[int] = field(default_factory=list)  # [L] steps that ran the layer ahead of its sync
    run_ahead_wait_s: float = 0.0  # host seconds waiting for their routings' copies (off the critical path)
    # replayed steps: host seconds from the step's first launch to its last routing sync's marks (drain
    # starts, drain done, routing read, next segment launched, the replay done), summed over the
    # `sync_marks_steps` [5] steps that had each mark; where the host is late at the sync that paces a
    # run-ahead step
    sync_marks_s: list[float] = field(default_factory=lambda: [0.0] * 5)
    sync_marks_steps: list[int] = field(default_factory=lambda: [0] * 5)
    # replayed steps after a replayed step: host seconds from the last replay's end to `decode`'s
    # return (the replay's cleanup), from there to its token fed (the logits read and sampled,
    # `StaticDecoder.feed`), from there to the step's `start_iteration`, in it, from it to the
    # step's first launch, and that launch, summed over `step_spans_steps` steps
    # (`graphs.StaticDecoder._span`)
    step_spans_s: list[float] = field(default_factory=lambda: [0.0] * 6)
    step_spans_steps: int = 0
    # GPU-side timing events of replayed steps (a measurement probe, `step_marks.StepMarks`; None: off)
    step_marks: StepMarks | None = None
    decode_iterations: int = 0

    gather_capacity: int = 0  # experts a layer call may gather into scratch (0: twice top-k)
    # Layer calls of at most this many (token, expert) pairs whose experts are all resident run as
    # a gather of their weights and two bmm (transformers' `batched_mm`, what its generate switches
    # to for decoding on GPUs): grouped_mm's host cost per call (occupancy queries, attribute
    # calls, copies) outweighs the weight gather at decode sizes. The gathered weights are transient
    # memory beyond the budget, T*k experts: -1 = 2 x top-k (batch <= 2, the same bound as the
    # gather scratch); on a CPU at most `cpu_gather_max` (copies there pay only for small experts:
    # the reference model gains, a 2-layer OLMoE shape in float32 decodes 2.9x slower with them).
    batched_max_pairs: int = -1
    capture: StaticDecoder | None = None  # set while a decode step is being captured into CUDA graphs
    # graphed decode: routings held for the predictors until the next segment is replayed (their
    # host work then overlaps its GPU work), each (binding, module, logits, ids, hidden) to build
    # the event from (`LayerBinding.routing_event`), or (None, event); None: predictors run in the hook
    late_events: list[tuple] | None = None
    # Speculative gates a graphed decode step computes on the device (`graphs.StaticDecoder`): the
    # strides of the gate predictors, their gate (`gate.RouterGate`), and whether anything else
    # reads router inputs (then they are still copied to the host).
    gate_strides: tuple[int, ...] = ()
    router_gate: Any = None
    extra_hidden: bool = False
    # set while a graphed step replays: per MoE layer, (the speculative gates' probabilities
    # {target layer: [T, E]} in static pinned rows, whether they cover every gate stride, NumPy
    # views of those rows)
    speculated: list[tuple[dict[int, torch.Tensor], bool, dict[int, np.ndarray]]] | None = None
    # search="device": the map match a graphed decode step computes on the GPU
    device_matches: DeviceMatches | None = None
    # set while a graphed step replays with predictor graphs beside the segments: settle_side(l)
    # makes layer l's gate rows and match readable (`side_graphs.SideGraphs.settle`)
    settle_side: Callable[[int], None] | None = None
    # the gate rows reach their readers uncopied until read (no searcher thread keeps the events)
    lazy_gate_rows: bool = True
    # set per graphed step: whether anything reads the routers' probabilities on the host (an
    # observer, the eviction policy, a predictor whose `graphed_reads_probs` says so); if not, the
    # router logits stay on the device (no pinned copy, one D2H fewer before the routing sync)
    graphed_probs: bool = True
    graphed_logits_copies: int = 0  # layers of graphed steps whose router logits went to the host
    # the history recorders that take a replayed step's expert map from the device's record
    # (`step_record.StepRecord`) instead of each layer's logits: set by the engine where they run on
    # the forward thread; the record made for the step that replays now (None: none)
    map_recorders: list = field(default_factory=list)
    step_record: StepRecord | None = None
    # eager prefill: a layer's routing reaches the predictors once its on-demand copies are issued
    # (`Stepper.serve`), not in the router hook before them (`prefill_predict`)
    predict_after_demand: bool = False
    _gather: SlotGather | None = None
    # graphed decode: where the host has predictor work between a routing's launch and its sync (the
    # drain before a sync, the late events after a launch), the ids [T, k] of the router to sync on are
    # copied to pinned memory first (`read_early`), so the sync finds them landed (`take_early`)
    # instead of paying a blocking copy's round trip after that work (session 36: ~56 µs at the last
    # sync of the reference shape's 99% step); False: always the blocking copy (a measurement switch)
    early_routing_read: bool = True
    _early_read: tuple[int, torch.Tensor] | None = None  # (layer, ids [T, k] pinned, landing)
    _early_read_done: torch.cuda.Event | None = None
    early_reads: int = 0  # routing syncs served by an early copy, in total

    def __post_init__(self) -> None:
        if self.gather_capacity <= 0:
            self.gather_capacity = 2 * self.spec.top_k
        if self.max_groups <= 0:
            # torch's CUDA grouped_mm refuses 1024+ groups; CPU has no such limit.
            self.max_groups = MAX_CUDA_GROUPS if self.cache.pool.device.type == "cuda" else self.cache.num_slots
        pool, E = self.cache.pool, self.spec.num_experts
        self.layer_parts = [pool.window(layer * E, E) for layer in range(self.spec.num_layers)]
        self.sync_layer_decode_s = [0.0] * self.spec.num_layers
        self.run_ahead_by_layer = [0] * self.spec.num_layers
        # CPU: gathering n experts pays while n copies cost less than the (S - n) empty groups of
        # the two grouped calls over the whole pool (0 on CUDA: its calls span windows of slots)
        on_cpu = pool.device.type == "cpu"
        copy_s = self.spec.expert_bytes / CPU_COPY_BYTES_PER_S
        self.cpu_gather_max = int(2 * CPU_GROUP_S * self.cache.num_slots / (copy_s + 2 * CPU_GROUP_S)) if on_cpu else 0
        if self.batched_max_pairs < 0:
            # each pair copies one expert's weights: on a CPU only while such copies pay (as the gather)
            self.batched_max_pairs = 2 * self.spec.top_k
            if on_cpu:
                self.batched_max_pairs = min(self.batched_max_pairs, self.cpu_gather_max)
        self.stepper = Stepper(self.cache, self.prefetcher, self.predictors)

    def start_iteration(
        self,
        iteration: int,
        is_prefill: bool,
        input_ids: torch.Tensor,
        live: torch.Tensor,
        request_ids: tuple[int, ...] | None = None,
        finished_ids: tuple[int, ...] = (),
    ) -> None:
        """Publish the iteration's context (`input_ids` [B, T] on the device, `live` [B, T] bool;
        a continuous-batching scheduler also names each row's request, see `IterationContext`)."""
        self.iteration, self.is_prefill = iteration, is_prefill
        self.cache.begin_iteration(is_prefill)
        if self.fixed_stream is None:
            refresh = getattr(self.cache.transfer, "refresh_stream", None)
            if refresh is not None:
                refresh()  # the stream this forward pass computes on
        if not is_prefill:
            self.cache.gather()  # (`gather_absent`: copies only when an earlier layer lacks an expert)
        paused = self.duty is not None and not self.duty.predict(is_prefill)
        self.stepper.predictors = self.always if paused else self.predictors
        if not self.active:
            self.prefetcher.now(iteration, -1)
            self.decode_iterations += not is_prefill
            return
        if self.defer_begin and not is_prefill:  # a replayed step: the predictors start once S_0 is launched
            ready = None
            if self.embed_beside and self.want_embeddings and self.embed is not None and input_ids.is_cuda:
                # the step's input ids are in place (before S_0 is launched); one event reused: the
                # last step's start waited on it already (`_begin_predictors`) or was dropped
                if self._ready is None:
                    self._ready = torch.cuda.Event()
                ready = self._ready
                ready.record(self.fixed_stream)  # (None: the current stream)
            self._begin = (iteration, input_ids, live, request_ids, finished_ids, ready)
            self.decode_iterations += 1
            return
        self._begin_predictors(iteration, is_prefill, input_ids, live, request_ids, finished_ids)
        if not is_prefill:
            self.decode_iterations += 1

    def pin_stream(self, stream: torch.cuda.Stream | None) -> None:
        """`stream` (the current stream) is the one every forward pass runs on until `pin_stream(None)`:
        the transfer takes it as the compute stream now, iterations skip the lookup. The contract: no
        forward pass meanwhile runs under another stream context (the replay, its side launches and
        copies restore this stream as current)."""
        self.fixed_stream = stream
        refresh = getattr(self.cache.transfer, "refresh_stream", None)
        if stream is not None and refresh is not None:
            refresh()

    def read_early(self, layer: int, idx: torch.Tensor, stream: torch.cuda.Stream) -> None:
        """Copy router `layer`'s ids `idx` [T, k] (device) to pinned host memory behind `stream`'s
        work (its router), for the layer's routing sync to take (`take_early`)."""
        ids = idx.detach().to("cpu", non_blocking=True)  # [T, k], pinned (the current stream: `stream`)
        done = self._early_read_done
        if done is None:
            done = self._early_read_done = torch.cuda.Event()
        done.record(stream)
        self._early_read = (layer, ids)

    def take_early(self, layer: int) -> torch.Tensor | None:
        """The ids [T, k] `read_early` copied for `layer`, once landed (waits), or None (none for it)."""
        early = self._early_read
        if early is None:
            return None
        self._early_read = None
        if early[0] != layer:
            return None
        self._early_read_done.synchronize()  # type: ignore[union-attr]
        self.early_reads += 1
        return early[1]

    def drop_early(self) -> None:
        """Forget an early copy nobody took (its layer ran ahead, or the step ended)."""
        self._early_read = None

    def drop_deferred(self) -> None:
        """Forget a replayed step's held-back predictor start (`start_iteration`) without running it
        (the step failed before its first routing was read)."""
        self._begin = self._early = None

    def embed_held(self) -> None:
        """Launch the held-back start's token embedding on its stream now (S_0 just launched), for
        `begin_deferred` to take (`embed_early`): the same embedding `_begin_predictors` would launch
        there, queued before the later segments are. Nothing without a held-back start that embeds
        beside the compute stream."""
        held = self._begin
        if held is None or self._early is not None or not (self.want_embeddings and self.embed is not None):
            return
        input_ids, live, ready = held[1], held[2], held[5]
        if ready is None or not bool(live.all()):  # (`_begin_predictors` gathers such rows on the compute stream)
            return
        with torch.no_grad():
            self._early = (input_ids, self._embed_launch(input_ids.reshape(-1), ready))

    def begin_deferred(self) -> None:
        """The predictors' start of a replayed decode step `start_iteration` held back (nothing if
        none): called by the replay before it reads the step's first routing."""
        held, self._begin = self._begin, None
        if held is not None:
            iteration, input_ids, live, request_ids, finished_ids, ready = held
            self._begin_predictors(iteration, False, input_ids, live, request_ids, finished_ids, ready)

    def _begin_predictors(
        self,
        iteration: int,
        is_prefill: bool,
        input_ids: torch.Tensor,
        live: torch.Tensor,
        request_ids: tuple[int, ...] | None,
        finished_ids: tuple[int, ...],
        ready: torch.cuda.Event | None = None,
    ) -> None:
        """`ready`: a start held back in a replayed step (`begin_deferred`) whose input ids were in
        place at this event: the embedding runs on a stream of its own behind it, not behind the
        segments launched since, and reaches the host from there (the predictor's copy would wait
        for every segment queued on the compute stream)."""
        t0 = time.perf_counter()
        B, T = live.shape
        rows = torch.nonzero(live.reshape(-1)).view(-1)  # [N] into the flattened B*T positions
        emb = host = None
        if self.want_embeddings and self.embed is not None and rows.numel():
            with torch.no_grad():
                flat = input_ids.reshape(-1)
                every = rows.numel() == flat.numel()
                tokens = flat if every else flat[rows.to(input_ids.device)]
                early, self._early = self._early, None
                if ready is None or not every:  # (a gather on the compute stream: the side would not wait for it)
                    emb = self.embed(tokens)  # [N, D] on the device; copied to the host by the predictor
                elif early is not None and early[0] is input_ids:  # launched after S_0 (`embed_held`)
                    emb, host = early[1]
                    self._embed_wait()
                else:
                    emb, host = self._embed_launch(tokens, ready)
                    self._embed_wait()
        for rec in self.map_recorders:  # (a graphed step's map held back: before anything reads the store)
            rec.maps.apply_pending()
        req_of_row = torch.div(rows, T, rounding_mode="floor")
        ctx = IterationContext(iteration, is_prefill, B, rows, req_of_row, emb, host, request_ids, finished_ids)
        if self.step_record is not None and not is_prefill:
            ctx.step_maps = self.step_record
        self.stepper.begin(iteration, ctx)
        if is_prefill:
            self.critical_prefill_s += time.perf_counter() - t0
        else:
            self.critical_decode_s += time.perf_counter() - t0

    def _embed_launch(self, tokens: torch.Tensor, ready: torch.cuda.Event) -> tuple[torch.Tensor, torch.Tensor]:
        """The embeddings [N, D] of `tokens` (device) launched on the side stream after `ready`, and
        their float32 host copy [N, D] (landed after `_embed_wait`)."""
        compute = self.fixed_stream if self.fixed_stream is not None else torch.cuda.current_stream(tokens.device)
        side = self._embed_stream
        if side is None or self._embed_made != self.embed_priority:
            side = self._embed_stream = torch.cuda.Stream(tokens.device, priority=self.embed_priority)
            self._embed_made = self.embed_priority
        done = self._embedded
        if done is None:
            done = self._embedded = torch.cuda.Event()  # (reused: synchronized below before the next record)
        side.wait_event(ready)
        torch.cuda.set_stream(side)  # (not a stream context: no lookup of the current stream)
        try:
            emb = self.embed(tokens)  # [N, D]
            host = emb.float().to("cpu", non_blocking=True)  # pinned
            done.record(side)
        finally:
            torch.cuda.set_stream(compute)
        emb.record_stream(compute)  # (a predictor may read it on the compute stream)
        return emb, host

    def _embed_wait(self) -> None:
        """Wait for the embedding `_embed_launch` launched last and its host copy."""
        assert self._embedded is not None
        self._embedded.synchronize()  # the embedding only: the side stream waits for nothing launched since `ready`

    def gather(self) -> SlotGather:
        """The scratch for layers whose experts span several slot windows (made on first use)."""
        if self._gather is None or self._gather.capacity != self.gather_capacity:
            pool = self.cache.pool
            with torch.inference_mode(False):  # made during generate; used by any later forward
                self._gather = SlotGather(pool, self.spec.num_layers, self.spec.num_experts, self.gather_capacity)
            log.info("gather scratch: %d experts, %.1f MiB", self.gather_capacity, self._gather.nbytes / 2**20)
        return self._gather

    @property
    def scratch_bytes(self) -> int:
        """Device bytes of the gather scratch (0 until a layer call needed it)."""
        return self._gather.nbytes if self._gather is not None else 0

    @staticmethod
    def binding_of(ref: MoELayerRef) -> LayerBinding:
        return getattr(ref.experts, BINDING_ATTR)

    def release(self) -> None:
        """Drop the runtime's views of the pool and its scratch (the engine is detaching)."""
        self.layer_parts = []
        self._gather = None

    def reads_graphed_probs(self) -> bool:
        """Whether a graphed step's routing must bring the router logits to the host (see `graphed_probs`)."""
        return bool(self.observers) or self.policy_routes is not None or any(map(reads_router_probs, self.active))

    @property
    def active(self) -> list[Predictor]:
        """The predictors running in the current iteration (all, or `always` while paused)."""
        return self.stepper.predictors

    @property
    def run_ahead_layers(self) -> int:
        """MoE layers of replayed steps launched without their routing sync (`runahead`)."""
        return sum(self.run_ahead_by_layer)

    @property
    def critical_s(self) -> float:
        return self.critical_prefill_s + self.critical_decode_s

    def end_requests(self) -> None:
        """The batch is done; forward passes outside `generate` belong to no iteration (-1)."""
        self.stepper.predictors = self.predictors
        self.stepper.end_requests()
        self.iteration = -1
