"""The forward-path integration: a `finemoe` experts implementation in transformers' registry and
forward hooks on the routers. Both are attached per model and removed by `detach()`.

The experts function remaps routed expert ids to slots of the device pool and runs transformers'
own grouped kernel over the pool, so the arithmetic is the stock one. When a layer call needs
more experts than the pool can pin at once (large prefill batches under tiny budgets), it runs in
chunks; per-(token, expert) outputs are combined before the top-k sum, so the result is the same.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from finemoe.cache import ExpertCache
from finemoe.duty import PredictionDuty
from finemoe.loader import MoELayerRef
from finemoe.models import FamilyAdapter
from finemoe.pair_kernels import batched_pairs, grouped_pairs, slot_windows
from finemoe.pool import SlotGather
from finemoe.predictor import Predictor, reads_router_probs
from finemoe.prefetcher import Prefetcher
from finemoe.stepper import Stepper
from finemoe.types import IterationContext, MoESpec, RoutingEvent

if TYPE_CHECKING:
    from finemoe.device_plans import DeviceMatches
    from finemoe.graphs import StaticDecoder

log = logging.getLogger(__name__)

IMPLEMENTATION = "finemoe"
MAX_CUDA_GROUPS = 512
# torch's CPU grouped_mm walks every group, empty ones too: ~2.3 us each (torch 2.13, 2-core CPU
# machine, 2026-11-29), so a call over a pool of hundreds of slots costs ~1 ms for a handful of
# experts. Gathering the routed experts into a scratch copy pays while their copy (index_select,
# 5-15 GB/s measured on the same machine) is cheaper than the empty groups it saves.
CPU_GROUP_S = 2.3e-6
CPU_COPY_BYTES_PER_S = 5e9
HOST_HIDDEN_ROWS = 64  # router inputs of at most this many tokens go to the host for speculative gates
_BINDING_ATTR = "_finemoe_binding"
_registrations = 0


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
    # set while a graphed step replays: per MoE layer, (speculative logits {target layer: [T, E]}
    # static on the device, whether they cover every gate stride)
    speculated: list[tuple[dict[int, torch.Tensor], bool]] | None = None
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
    # eager prefill: a layer's routing reaches the predictors once its on-demand copies are issued
    # (`Stepper.serve`), not in the router hook before them (`prefill_predict`)
    predict_after_demand: bool = False
    _gather: SlotGather | None = None

    def __post_init__(self) -> None:
        if self.gather_capacity <= 0:
            self.gather_capacity = 2 * self.spec.top_k
        if self.max_groups <= 0:
            # torch's CUDA grouped_mm refuses 1024+ groups; CPU has no such limit.
            self.max_groups = MAX_CUDA_GROUPS if self.cache.pool.device.type == "cuda" else self.cache.num_slots
        pool, E = self.cache.pool, self.spec.num_experts
        self.layer_parts = [pool.window(layer * E, E) for layer in range(self.spec.num_layers)]
        self.sync_layer_decode_s = [0.0] * self.spec.num_layers
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
        refresh = getattr(self.cache.transfer, "refresh_stream", None)
        if refresh is not None:
            refresh()  # the stream this forward pass computes on
        paused = self.duty is not None and not self.duty.predict(is_prefill)
        self.stepper.predictors = self.always if paused else self.predictors
        if not self.active:
            self.prefetcher.now(iteration, -1)
            self.decode_iterations += not is_prefill
            return
        t0 = time.perf_counter()
        B, T = live.shape
        rows = torch.nonzero(live.reshape(-1)).view(-1)  # [N] into the flattened B*T positions
        emb = None
        if self.want_embeddings and self.embed is not None and rows.numel():
            with torch.no_grad():
                flat = input_ids.reshape(-1)
                tokens = flat if rows.numel() == flat.numel() else flat[rows.to(input_ids.device)]
                emb = self.embed(tokens)  # [N, D] on the device; copied to the host by the predictor
        req_of_row = torch.div(rows, T, rounding_mode="floor")
        ctx = IterationContext(
            iteration, is_prefill, B, rows, req_of_row, emb, request_ids=request_ids, finished_ids=finished_ids
        )
        self.stepper.begin(iteration, ctx)
        if is_prefill:
            self.critical_prefill_s += time.perf_counter() - t0
        else:
            self.critical_decode_s += time.perf_counter() - t0
            self.decode_iterations += 1

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
        return getattr(ref.experts, _BINDING_ATTR)

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
    def critical_s(self) -> float:
        return self.critical_prefill_s + self.critical_decode_s

    def end_requests(self) -> None:
        """The batch is done; forward passes outside `generate` belong to no iteration (-1)."""
        self.stepper.predictors = self.predictors
        self.stepper.end_requests()
        self.iteration = -1


class LayerBinding:
    """Attached to one experts module; runs that layer's experts from the slot pool."""

    def __init__(self, runtime: OffloadRuntime, ref: MoELayerRef) -> None:
        self.rt, self.ref, self.layer = runtime, ref, ref.layer
        self._ids: tuple[torch.Tensor, list[int]] | None = None  # (device idx, unique ids) from the hook
        self._routed: RoutingEvent | None = None  # the routing the eviction policy has not seen yet
        self._deferred: RoutingEvent | None = None  # the routing the predictors see in `run` (after demand)

    def _tell_policy(self) -> None:
        """The eviction policy reads the layer's routing, now that the layer is served."""
        event, self._routed = self._routed, None
        if event is not None and self.rt.policy_routes is not None:
            t0 = time.perf_counter()
            self.rt.policy_routes(event)
            if event.is_prefill:
                self.rt.critical_prefill_s += time.perf_counter() - t0
            else:
                self.rt.critical_decode_s += time.perf_counter() - t0

    def on_router(self, module: nn.Module, args: tuple, output: tuple) -> None:
        rt = self.rt
        if rt.capture is not None:  # recording a graphed decode step: nothing is computed yet
            rt.capture.boundary(self.layer, module, args, output)
            return
        predicting = bool(rt.active)
        listening = rt.observers or rt.policy_routes is not None
        if rt.cache.all_resident and not (predicting or listening):
            return  # nothing on the host needs the routing: no sync
        logits, idx = output[rt.adapter.router_logits_at], output[rt.adapter.router_index_at]
        if not (predicting or listening):
            t1 = time.perf_counter()
            ids_cpu = idx.detach().to("cpu")  # [T, k]; the one host sync per layer
            rt.routed_at = time.perf_counter()
            blocked = rt.routed_at - t1
            rt.sync_s += blocked
            if not rt.is_prefill:
                rt.sync_decode_s += blocked
                rt.sync_layer_decode_s[self.layer] += blocked
            self._ids = (idx, sorted(set(ids_cpu.view(-1).tolist())))
            return
        t0 = time.perf_counter()
        hidden = None
        if rt.want_hidden and args:
            hidden = args[0].detach().reshape(-1, args[0].shape[-1])  # [T, H]
        logits = logits.detach()
        if idx.device.type != "cpu":
            # The predictors' inputs ride on the layer's one host sync: logits (and a decode-sized
            # router input, unless a graphed step computed the gates itself) are copied to pinned
            # host memory first, then the blocking copy of the ids waits for all of them. No
            # predictor touches the device afterwards.
            if rt.late_events is None or rt.graphed_probs:  # (graphed: else the device logits, unread)
                logits = logits.to("cpu", non_blocking=True)
                rt.graphed_logits_copies += rt.late_events is not None
            if rt.speculated is not None:
                _, covers = rt.speculated[self.layer]
                if covers and not rt.extra_hidden:
                    hidden = None  # every gate reads the step's probabilities instead
            if hidden is not None and hidden.shape[0] <= HOST_HIDDEN_ROWS:
                hidden = hidden.to("cpu", non_blocking=True)
        t1 = time.perf_counter()
        ids_cpu = idx.detach().to("cpu")  # [T, k]; the one host sync per layer (not the predictor's)
        self._ids = (idx, sorted(set(ids_cpu.view(-1).tolist())))
        t2 = rt.routed_at = time.perf_counter()
        if rt.late_events is not None and not listening:
            # graphed, only predictors listen: the event is built after the next segment's launch
            # (`routing_event`), so the host work before that launch is lru's
            rt.late_events.append((self, module, logits, ids_cpu, hidden))
            rt.sync_s += t2 - t1
            rt.sync_decode_s += t2 - t1
            rt.sync_layer_decode_s[self.layer] += t2 - t1
            rt.critical_decode_s += (t1 - t0) + (time.perf_counter() - t2)
            return
        event = self.routing_event(module, logits, ids_cpu, hidden)
        for obs in rt.observers:
            obs(event)
        if rt.policy_routes is not None:
            self._routed = event  # for the policy once the layer is served (`_tell_policy`)
        if predicting:
            if rt.late_events is not None:
                rt.late_events.append((None, event))  # (built already: a listener needed it)
            elif rt.is_prefill and rt.predict_after_demand and not rt.cache.all_resident:
                self._deferred = event  # `run` hands it to the stepper once the demand copies are issued
            else:
                rt.stepper.route(event)
        spent = (t1 - t0) + (time.perf_counter() - t2)
        rt.sync_s += t2 - t1
        if rt.is_prefill:
            rt.critical_prefill_s += spent
        else:
            rt.critical_decode_s += spent
            rt.sync_decode_s += t2 - t1
            rt.sync_layer_decode_s[self.layer] += t2 - t1

    def routing_event(
        self, module: nn.Module, logits: torch.Tensor, ids_cpu: torch.Tensor, hidden: torch.Tensor | None
    ) -> RoutingEvent:
        """The layer's `RoutingEvent` from what its router hook gathered (`logits` [T, E] on the host,
        or on the device where no reader wants them; `ids_cpu` [T, k]; `hidden` [T, H] or None).
        In a graphed step it carries the gates' pinned rows, copied when read (`settled_rows`) or
        here for a searcher thread: read them before the step's next replay, which rewrites them."""
        rt = self.rt
        speculated, given = None, None
        if rt.speculated is not None and rt.settle_side is not None:  # (a graphed step with side graphs)
            # the graphed step's gate probabilities, in pinned rows its side graph rewrites every step
            rows, settle = rt.speculated[self.layer][0], rt.settle_side
            if rows and rt.lazy_gate_rows:
                # read in this step by a reader on this thread: the wait for the side graph happens
                # at the first read, after the readers before it in the chain (`settled_rows`)
                speculated, given = dict(rows), settled_rows(settle, self.layer)
            else:  # copied now for readers that keep the event (the searcher thread)
                if rows:
                    settle(self.layer)
                speculated, given = {t: s.clone() for t, s in rows.items()}, _given_probs
        router_probs = rt.adapter.router_probs
        return RoutingEvent(
            rt.iteration,
            self.layer,
            logits,
            ids_cpu,
            rt.is_prefill,
            hidden,
            lambda x: router_probs(module, x),
            speculated=speculated,
            speculated_probs=given,
        )

    def run(self, experts: nn.Module, hidden: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        rt, cache, layer = self.rt, self.rt.cache, self.layer
        T, k = idx.shape
        if rt.capture is not None:  # recording a graphed decode step: device-only work, no host decision
            return self._captured(experts, hidden, idx, weights)
        batched = T * k <= rt.batched_max_pairs
        event, self._deferred = self._deferred, None
        if event is not None and (event.iteration != rt.iteration or not rt.is_prefill):
            event = None  # left over from a forward pass that failed between the router and here
        if cache.all_resident:  # layer l's experts sit in slots [l*E, (l+1)*E): the stock layout
            cache.defer_access(layer, idx)
            if batched:
                out = batched_pairs(experts, rt.layer_parts[layer], hidden, idx, weights)
            else:
                out = grouped_pairs(experts, rt.layer_parts[layer], hidden, idx, weights, rt.spec.num_experts, False)
            return out.view(T, k, -1).sum(dim=1).to(hidden.dtype)
        stash, self._ids = self._ids, None
        unique = stash[1] if stash is not None and stash[0] is idx else sorted(set(idx.view(-1).tolist()))
        S = cache.num_slots
        acc: list[torch.Tensor] = []

        def compute(got: list[int], slots: list[int], whole: bool) -> None:
            if whole and batched:  # every routed expert is resident: gather straight from the pool
                acc.append(batched_pairs(experts, cache.pool.parts, hidden, cache.device_table(layer)[idx], weights))
                return
            windows = slot_windows(slots, S, rt.max_groups)
            if (len(windows) > 1 or len(got) <= rt.cpu_gather_max) and len(got) <= rt.gather_capacity:
                # one kernel call over a scratch copy beats one call per window
                parts, local = rt.gather().take(layer, got, slots)
                acc.append(grouped_pairs(experts, parts, hidden, local[idx], weights, len(got), not whole))
                return
            if whole:
                table = cache.device_table(layer)  # [E] absolute slots; every routed expert is resident
            else:  # a chunk: pairs routed to experts outside it are skipped (sentinel S)
                lut = torch.full((rt.spec.num_experts,), S, dtype=torch.int32)
                lut[got] = torch.tensor(slots, dtype=torch.int32)
                table = lut.to(hidden.device)
            slot_idx = table[idx]  # [T, k]
            for base, size in windows:
                if size == S:
                    win_idx, parts = slot_idx, cache.pool.parts
                else:
                    inside = (slot_idx >= base) & (slot_idx < base + size)
                    win_idx = torch.where(inside, slot_idx - base, size)
                    parts = cache.pool.window(base, size)
                out = grouped_pairs(experts, parts, hidden, win_idx, weights, size, not whole or size != S)
                acc.append(out)  # each pair is non-zero in exactly one term

        planned0 = rt.stepper.deferred_s
        rt.stepper.serve(rt.iteration, layer, unique, compute, event)
        rt.critical_prefill_s += rt.stepper.deferred_s - planned0
        self._tell_policy()
        total = acc[0]
        for out in acc[1:]:
            total = total + out
        return total.view(T, k, -1).sum(dim=1).to(hidden.dtype)

    def _captured(
        self, experts: nn.Module, hidden: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """The layer's experts as a CUDA graph records them: the weights gathered through the device
        slot table row (updated in place between replays; `serve_graphed` makes every routed expert
        resident first), or the stock layout when everything is resident."""
        rt, cache = self.rt, self.rt.cache
        T, k = idx.shape
        if cache.all_resident:
            out = batched_pairs(experts, rt.layer_parts[self.layer], hidden, idx, weights)
        else:
            out = batched_pairs(experts, cache.pool.parts, hidden, cache.table[self.layer][idx], weights)
        return out.view(T, k, -1).sum(dim=1).to(hidden.dtype)

    def serve_graphed(self, idx: torch.Tensor, replay: Callable[[], None]) -> None:
        """A graphed decode step at this layer, after the router's hooks ran: make the routed
        experts (`idx` [T, k], the graph's static ids) resident, then `replay` the segment that
        computes them (where the eager pass calls the experts)."""
        rt, cache, layer = self.rt, self.rt.cache, self.layer
        if cache.all_resident:
            replay()
            return
        stash, self._ids = self._ids, None
        unique = stash[1] if stash is not None and stash[0] is idx else sorted(set(idx.view(-1).tolist()))
        launched = [0.0]  # when the launch call returned
        t0 = time.perf_counter()

        def compute(got: list[int], slots: list[int], whole: bool) -> None:
            if not whole:
                raise RuntimeError(
                    f"graphed decode: layer {layer} could not hold its {len(unique)} routed experts at once; "
                    "raise the expert budget or turn cuda_graphs off"
                )
            tt = time.perf_counter()
            cache.device_table(layer)  # the row the graph reads, updated in place on the compute stream
            t1 = time.perf_counter()
            rt.table_decode_s += t1 - tt
            rt.prelaunch_decode_s += t1 - rt.routed_at
            rt.serve_decode_s += t1 - t0
            replay()
            launched[0] = time.perf_counter()
            rt.launch_decode_s += launched[0] - t1

        rt.stepper.serve(rt.iteration, layer, unique, compute, pump_first=rt.pump_before_launch)
        rt.post_launch_decode_s += time.perf_counter() - launched[0]
        self._tell_policy()  # while the GPU runs the segment just replayed


def _given_probs(layer: int, probs: torch.Tensor) -> torch.Tensor:
    """`RoutingEvent.speculated_probs` of a graphed step's gates: they are probabilities already."""
    return probs


def settled_rows(settle: Callable[[int], None], layer: int) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """`RoutingEvent.speculated_probs` over a graphed step's pinned gate rows of layer `layer`: waits
    for the layer's side graph (`settle`), then copies the row (the next step rewrites it)."""

    def probs_of(target: int, probs: torch.Tensor) -> torch.Tensor:
        settle(layer)
        return probs.clone()

    return probs_of


def finemoe_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The registered experts implementation: delegates to the module's engine binding."""
    binding: LayerBinding | None = getattr(self, _BINDING_ATTR, None)
    if binding is None:
        raise RuntimeError(
            "experts_implementation 'finemoe' is set on a model no finemoe Engine manages (was the engine closed?)"
        )
    return binding.run(self, hidden_states, top_k_index, top_k_weights)


class Attachment:
    """Everything finemoe changed on one model; `detach()` undoes it."""

    def __init__(self, model: nn.Module, runtime: OffloadRuntime, refs: list[MoELayerRef]) -> None:
        global _registrations
        if _registrations == 0:
            ALL_EXPERTS_FUNCTIONS[IMPLEMENTATION] = finemoe_experts_forward
        _registrations += 1
        self.model = model
        self.previous_impl = getattr(model.config, "_experts_implementation", None)
        self.handles = []
        self.modules: list[nn.Module] = []
        for ref in refs:
            binding = LayerBinding(runtime, ref)
            setattr(ref.experts, _BINDING_ATTR, binding)
            self.modules.append(ref.experts)
            self.handles.append(ref.router.register_forward_hook(binding.on_router))
        model.set_experts_implementation(IMPLEMENTATION)
        self.attached = True

    def detach(self) -> None:
        global _registrations
        if not self.attached:
            return
        for h in self.handles:
            h.remove()
        for m in self.modules:
            if hasattr(m, _BINDING_ATTR):
                delattr(m, _BINDING_ATTR)
        if self.previous_impl is not None:
            self.model.config._experts_implementation = self.previous_impl
        _registrations -= 1
        if _registrations == 0 and IMPLEMENTATION in ALL_EXPERTS_FUNCTIONS._local_mapping:
            del ALL_EXPERTS_FUNCTIONS[IMPLEMENTATION]
        self.attached = False
