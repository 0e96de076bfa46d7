"""Graphed decode: layers whose experts are all resident run ahead of the host's routing sync.

A replayed step (`graphs.StaticDecoder`) waits on the host after every router: the ids decide which
experts must be resident before the next segment S_l+1 may run. When every expert of layer l is
resident (a budget near 100%), no choice of the router needs a copy, so S_l+1 is launched at once:
layer l's slots are pinned, the segment is launched behind any copy still landing in them, and the
ids (with what the predictors read) are copied to pinned host memory on a stream of their own once
router l is done. The host goes on launching until a layer that is not whole (it then syncs as
usual) or the step's end; only then does it read the routings it skipped, in layer order: the
cache counts the uses and tells the eviction policy (as `Stepper.serve` would; all hits), the pins
drop, and the predictors plan (their host work now overlaps segments already queued on the GPU).

Lossless: a pinned expert cannot be evicted, so what the router picked is resident when its
segment runs, and a later copy into one of its slots waits for that segment (`after_compute` at the
launch). What differs from the synced path is when the host learns of the uses: after the launches
instead of before each. Those routings carry `RoutingEvent.launched`, so the predictors make no
plan for a layer whose compute is launched already, and the side graphs of such layers skip the
gates and defer the map matches nobody will read (`SideGraphs.gates_needed`, `match_needed`). Off
where something else reads the routing in the router hook (observers, a routing policy, a foreign
hook) or `rt.run_ahead` is False.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from finemoe.execution import HOST_HIDDEN_ROWS, LayerBinding

if TYPE_CHECKING:
    from finemoe.runtime import OffloadRuntime
    from finemoe.side_graphs import SideGraphs


DEFER_MODES = ("never", "late", "always")  # `OffloadRuntime.defer_drained_plans`

# a routing not read yet: (layer, binding, router, logits, ids [T, k] on the host, hidden, pinned slots [E])
Skipped = tuple[int, LayerBinding, nn.Module, torch.Tensor, torch.Tensor, "torch.Tensor | None", list[int]]


class RunAhead:
    """The layers of one replayed step launched without a routing sync, until `drain` reads them."""

    def __init__(self, rt: OffloadRuntime, layers: int, device: torch.device) -> None:
        self.rt = rt
        self.stream = torch.cuda.Stream(device)  # the skipped routings' copies to the host
        # per layer: router l is done (compute stream), its copies have landed (`stream`); reused by
        # every step (a step drains before it ends)
        self.routed = [torch.cuda.Event() for _ in range(layers)]
        self.copied = [torch.cuda.Event() for _ in range(layers)]
        self.pending: list[Skipped] = []
        # recorded by a drain before a routing sync: the compute stream is past the sync layer's router
        self.sync_ready = torch.cuda.Event()

    def launch(
        self,
        layer: int,
        binding: LayerBinding,
        router: nn.Module,
        args: tuple,
        output: tuple,
        replay: Callable[[], None],
        sides: SideGraphs | None,
        compute: torch.cuda.Stream,
    ) -> bool:
        """Launch segment `layer` + 1 (`replay`) without waiting for router `layer`'s ids, if every
        expert of `layer` is resident; False (nothing done) otherwise. `sides`: launch the layer's
        side graph too (after router `layer`, on its own stream)."""
        rt = self.rt
        cache = rt.cache
        pinned = cache.pin_layer(layer)
        if pinned is None:
            return False
        try:
            routed = self.routed[layer]
            routed.record(compute)  # router `layer` (the last segment launched) is done
            logits, ids, hidden = self._copy_inputs(layer, args, output, compute)
            transfer = cache.transfer
            transfer.before_compute(pinned)  # behind any copy still landing in the layer's slots
            cache.device_table(layer)
            replay()
            transfer.after_compute(pinned)  # a later copy into these slots waits for the segment
            if sides is not None and sides.due(layer):
                # (the rows and matches are unread only if the drained routings name the targets launched)
                skip = rt.skip_launched_gates and rt.tell_launched
                gates = not skip or sides.gates_needed(layer, cache.slot_of)
                match = not (rt.defer_matches and rt.tell_launched) or sides.match_needed(layer, cache.slot_of)
                sides.launch(layer, after=routed, gates=gates, match=match)
        except BaseException:  # a copy into these slots must still wait for whatever was launched
            cache.transfer.after_compute(pinned)
            cache.unpin(pinned)
            raise
        self.pending.append((layer, binding, router, logits, ids, hidden, pinned))
        rt.run_ahead_by_layer[layer] += 1
        return True

    def _copy_inputs(
        self, layer: int, args: tuple, output: tuple, compute: torch.cuda.Stream
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Router `layer`'s (logits, ids [T, k], router input or None) for the later read: the ids,
        and what the predictors read on the host, copied to pinned memory on `stream` once the
        router is done (`routed[layer]`); the logits stay on the device unless a reader wants them."""
        rt = self.rt
        predicting = bool(rt.active)
        idx = output[rt.adapter.router_index_at]
        logits = output[rt.adapter.router_logits_at].detach()
        hidden = None
        if predicting and rt.want_hidden and args:
            hidden = args[0].detach().reshape(-1, args[0].shape[-1])  # [T, H]
            if rt.speculated is not None and rt.speculated[layer][1] and not rt.extra_hidden:
                hidden = None  # every gate reads the step's probabilities instead
        copy = self.stream
        copy.wait_event(self.routed[layer])
        torch.cuda.set_stream(copy)  # (not a stream context: no device lookups)
        try:
            ids = idx.detach().to("cpu", non_blocking=True)  # [T, k], pinned
            if predicting and rt.graphed_probs:
                logits = logits.to("cpu", non_blocking=True)
                rt.graphed_logits_copies += 1
            if hidden is not None and hidden.shape[0] <= HOST_HIDDEN_ROWS:
                hidden = hidden.to("cpu", non_blocking=True)
            self.copied[layer].record(copy)
        finally:
            torch.cuda.set_stream(compute)
        return logits, ids, hidden

    def drain(self, launched: int, compute: torch.cuda.Stream | None = None) -> None:
        """Read the routings launched ahead, in layer order: the cache's counts and the policy's
        uses, the pins dropped, the predictors' plans (waits for each layer's copies). The step's
        predictor start (`begin_deferred`) comes first. `launched`: the last MoE layer whose experts'
        compute is launched (the layer before the one about to sync, or the last): the predictors
        need not plan for it or earlier ones (`RoutingEvent.launched`). `compute`: the step's compute
        stream where a routing sync follows (layer `launched` + 1, whose router is launched): the
        predictors' work may then go to the step's late events (`rt.defer_drained_plans`)."""
        rt = self.rt
        mode, late = rt.defer_drained_plans, rt.late_events
        if mode not in DEFER_MODES:
            raise ValueError(f"defer_drained_plans must be one of {DEFER_MODES}, not {mode!r}")
        deferrable = compute is not None and late is not None and mode != "never" and bool(self.pending)
        if deferrable and mode == "late":  # (before the predictors' start, which may queue work on `compute`)
            self.sync_ready.record(compute)  # past router `launched` + 1: the last segment launched
        rt.begin_deferred()
        if not self.pending:
            return
        predicting = bool(rt.active)  # (the start decides this iteration's predictors)
        deferrable = deferrable and predicting
        defer = deferrable and mode == "always"
        # the late events run after the sync layer's launch: that layer is launched by then
        late_launched = launched + 1 if rt.tell_launched else -1
        if not rt.tell_launched:
            launched = -1
        cache, prefetcher, stepper = rt.cache, rt.prefetcher, rt.stepper
        pending, self.pending = self.pending, []
        for i, (layer, binding, router, logits, ids, hidden, pinned) in enumerate(pending):
            counted = False
            try:
                t0 = time.perf_counter()
                self.copied[layer].synchronize()
                t1 = time.perf_counter()
                rt.run_ahead_wait_s += t1 - t0
                prefetcher.now(rt.iteration, layer, False)
                cache.account_pinned(layer, sorted(set(ids.view(-1).tolist())), pinned)
                counted = True
                if deferrable and not defer:
                    defer = self.sync_ready.query()  # the host is behind: the sync layer's routing is there
                if defer:
                    late.append((binding, router, logits, ids, hidden, late_launched))  # type: ignore[union-attr]
                    rt.drained_plans_deferred += 1
                elif predicting:
                    t2 = time.perf_counter()
                    stepper.route(binding.routing_event(router, logits, ids, hidden, launched))
                    prefetcher.resume()
                    prefetcher.pump()
                    rt.critical_decode_s += time.perf_counter() - t2
            except BaseException:  # the layers not counted yet keep no pin
                for entry in pending[i + 1 if counted else i :]:
                    cache.unpin(entry[-1])
                raise

    def abandon(self) -> None:
        """Drop the pins of routings not read (a step that failed): nothing is counted."""
        pending, self.pending = self.pending, []
        for entry in pending:
            self.rt.cache.unpin(entry[-1])
