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
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from finemoe.loader import MoELayerRef
from finemoe.pair_kernels import batched_pairs, grouped_pairs, slot_windows
from finemoe.runtime import BINDING_ATTR, OffloadRuntime
from finemoe.types import RoutingEvent

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

IMPLEMENTATION = "finemoe"
HOST_HIDDEN_ROWS = 64  # router inputs of at most this many tokens go to the host for speculative gates
_registrations = 0


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
            ids_cpu = rt.take_early(self.layer) if rt._early_read is not None else None
            if ids_cpu is None:
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
        copying = False  # a non-blocking copy to the host issued here (the ids' blocking copy waits for it)
        on_device = idx.device.type != "cpu"
        # (a graphed step whose gates all read the step's probabilities needs no router input; the
        # torch calls that would fetch it cost the host ~5-10 µs each at the step's routing sync)
        covered = on_device and rt.speculated is not None and rt.speculated[self.layer][1] and not rt.extra_hidden
        if rt.want_hidden and args and not covered:
            hidden = args[0].detach().reshape(-1, args[0].shape[-1])  # [T, H]
        if logits.requires_grad:
            logits = logits.detach()
        if on_device:
            # The predictors' inputs ride on the layer's one host sync: logits (and a decode-sized
            # router input, unless a graphed step computed the gates itself) are copied to pinned
            # host memory first, then the blocking copy of the ids waits for all of them. No
            # predictor touches the device afterwards.
            if rt.late_events is None or rt.graphed_probs:  # (graphed: else the device logits, unread)
                logits = logits.to("cpu", non_blocking=True)
                rt.graphed_logits_copies += rt.late_events is not None
                copying = True
            if hidden is not None and hidden.shape[0] <= HOST_HIDDEN_ROWS:
                hidden = hidden.to("cpu", non_blocking=True)
                copying = True
        t1 = time.perf_counter()
        ids_cpu = None
        if rt._early_read is not None:  # (an early copy serves only where no copy above needs the sync)
            ids_cpu = rt.take_early(self.layer) if not copying else rt.drop_early()
        if ids_cpu is None:
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
        self,
        module: nn.Module,
        logits: torch.Tensor,
        ids_cpu: torch.Tensor,
        hidden: torch.Tensor | None,
        launched: int = -1,
    ) -> RoutingEvent:
        """The layer's `RoutingEvent` from what its router hook gathered (`logits` [T, E] on the host,
        or on the device where no reader wants them; `ids_cpu` [T, k]; `hidden` [T, H] or None;
        `launched`: the last MoE layer whose experts' compute is launched already, see `RoutingEvent`).
        In a graphed step it carries the gates' pinned rows, copied when read (`settled_rows`) or
        here for a searcher thread: read them before the step's next replay, which rewrites them."""
        rt = self.rt
        speculated, given = None, None
        if rt.speculated is not None and rt.settle_side is not None:  # (a graphed step with side graphs)
            # the graphed step's gate probabilities, in pinned rows its side graph rewrites every step
            rows, _, views = rt.speculated[self.layer]
            settle = rt.settle_side
            if rows and rt.lazy_gate_rows:
                # read in this step by a reader on this thread: the wait for the side graph happens
                # at the first read, after the readers before it in the chain (`settled_rows`)
                speculated, given = dict(rows), settled_rows(settle, self.layer, rows, views)
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
            launched=launched,
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


def settled_rows(
    settle: Callable[[int], None],
    layer: int,
    rows: dict[int, torch.Tensor],
    views: dict[int, np.ndarray],
) -> Callable[[int, torch.Tensor], torch.Tensor | np.ndarray]:
    """`RoutingEvent.speculated_probs` over a graphed step's pinned gate rows of layer `layer`
    (`rows`: {target: [T, E] float32}, `views`: their NumPy views): waits for the layer's side graph
    (`settle`), then copies the row (the next step rewrites it), as NumPy where the reader passes
    the row itself (no torch call: ~5-10 µs each on the H200 machine's host), else as a tensor."""

    def probs_of(target: int, probs: torch.Tensor) -> torch.Tensor | np.ndarray:
        settle(layer)
        if probs is rows.get(target):
            return views[target].copy()  # [T, E] float32, the same values
        return probs.clone()

    return probs_of


def finemoe_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The registered experts implementation: delegates to the module's engine binding."""
    binding: LayerBinding | None = getattr(self, BINDING_ATTR, None)
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
            setattr(ref.experts, BINDING_ATTR, binding)
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
            if hasattr(m, BINDING_ATTR):
                delattr(m, BINDING_ATTR)
        if self.previous_impl is not None:
            self.model.config._experts_implementation = self.previous_impl
        _registrations -= 1
        if _registrations == 0 and IMPLEMENTATION in ALL_EXPERTS_FUNCTIONS._local_mapping:
            del ALL_EXPERTS_FUNCTIONS[IMPLEMENTATION]
        self.attached = False
