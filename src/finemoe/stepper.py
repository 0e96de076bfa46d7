"""The order in which an iteration's events reach the prefetcher, the cache and the predictors.

Mechanism shared by the engine's forward hooks (`execution`) and the trace simulator
(`simulator`), so both drive the same objects through the same calls in the same order: with
the same routing and a synchronous transfer they make identical decisions.

Per iteration: `begin(ctx)`, then per MoE layer `route(event)` (the router ran) and `serve(...)`
(the layer's experts run, in chunks when the pool cannot pin them all at once). A layer's routing
may instead go to `serve(..., event)`: the predictors then plan once the layer's on-demand copies
are issued, so their host work overlaps those copies (`prefill_predict`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from finemoe.cache import ExpertCache
from finemoe.predictor import Predictor
from finemoe.prefetcher import Prefetcher
from finemoe.types import IterationContext, RoutingEvent

# compute(experts acquired, their slots, whole): run one chunk; `whole` when it is the layer's only chunk
ComputeFn = Callable[[list[int], list[int], bool], None]


class Stepper:
    def __init__(self, cache: ExpertCache, prefetcher: Prefetcher, predictors: list[Predictor]) -> None:
        self.cache, self.prefetcher, self.predictors = cache, prefetcher, predictors
        self.deferred_s = 0.0  # host seconds of the routings `serve` passed to the predictors
        self.after_deferred: Callable[[], None] | None = None  # called after each (the simulator's clock)

    def begin(self, iteration: int, ctx: IterationContext | None) -> None:
        """Iteration `iteration` starts; predictors see its context (None: no predictor wants one)."""
        self.prefetcher.now(iteration, -1)
        if ctx is not None:
            submit = self.prefetcher.submit
            for p in self.predictors:
                submit(p.on_iteration_start(ctx))
        self.prefetcher.pump()

    def route(self, event: RoutingEvent) -> None:
        """Layer `event.layer`'s router ran: predictors may plan."""
        submit = self.prefetcher.submit
        for p in self.predictors:
            submit(p.on_routing(event))

    def serve(
        self,
        iteration: int,
        layer: int,
        unique: list[int],
        compute: ComputeFn,
        event: RoutingEvent | None = None,
        pump_first: bool = True,
    ) -> None:
        """Count the accesses of `unique` (sorted expert ids) in `layer`, pin them (on-demand loads
        for misses) and run `compute` on each chunk that fits; refcounts are released even if
        `compute` raises. `event`: the layer's routing, for the predictors once the first chunk's
        on-demand copies are issued (instead of a `route` call before). `pump_first=False`: a
        whole layer's queued prefetches start only once `compute` returned (a graphed step, whose
        `compute` only launches the segment: the launch is not delayed by the prefetch issue), and
        the policy's bookkeeping of an all-hit layer's uses and the prefetch window's update (from
        the time the layer was reached) wait until then too (the policy and the window see the
        same calls in the same order, with the same numbers)."""
        cache, prefetcher = self.cache, self.prefetcher
        stamp = None  # (graphed) when the layer was reached, for the prefetch window after the launch
        if pump_first:
            prefetcher.now(iteration, layer)
            got, slots = cache.enter(layer, unique)  # counts the accesses and pins the first chunk
        else:
            window = prefetcher.window
            if window.adaptive and layer >= 0:
                stamp = window.clock()  # type: ignore[misc]
            prefetcher.now(iteration, layer, stamp is None)
            got, slots = cache.enter(layer, unique, True, True)  # an all-hit layer's uses held back
        if event is not None:  # the predictors plan once the layer's demand copies are issued
            if not pump_first:
                cache.flush_uses()
            try:
                cache.flush_copies()
                t0 = time.perf_counter()
                self.route(event)
                self.deferred_s += time.perf_counter() - t0
                if self.after_deferred is not None:
                    self.after_deferred()
            except BaseException:
                cache.release(layer, got, slots)  # a failing predictor leaves nothing pinned
                raise
        if got and len(got) == len(unique):  # the whole layer pinned: one chunk (the loop below, unrolled)
            if pump_first:
                if not prefetcher.idle:  # (`pump` would return at once)
                    prefetcher.pump()
                try:
                    cache.transfer.before_compute(slots)
                    compute(got, slots, True)
                    if not prefetcher.idle:
                        prefetcher.pump()
                finally:
                    cache.release(layer, got, slots)
                return
            try:  # graphed: the launch first, then what waited for it
                cache.transfer.before_compute(slots)
                compute(got, slots, True)
                cache.flush_uses()
                if stamp is not None:
                    window.on_layer(iteration, layer, stamp)
                if not prefetcher.idle:
                    prefetcher.pump()
            finally:
                cache.flush_uses()  # (if `compute` raised: the policy still hears of the uses)
                cache.release(layer, got, slots)
            return
        if not pump_first:
            cache.flush_uses()
            if stamp is not None:
                window.on_layer(iteration, layer, stamp)
        remaining: list[int] | None = unique
        first = True
        while remaining:
            if not got:
                raise RuntimeError(f"no slot could be freed for layer {layer}; every slot is pinned")
            rest = [e for e in remaining if e not in got] if len(got) < len(remaining) else None
            prefetcher.pump()
            cache.transfer.before_compute(slots)
            try:
                compute(got, slots, first and not rest)
                prefetcher.pump()  # the demand copies may be done by now: resume lookahead
            finally:
                cache.release(layer, got, slots)
            remaining, first = rest, False
            if remaining:
                got = cache.acquire(layer, remaining)
                slots = cache.slots(layer, got)

    def end_requests(self) -> None:
        for p in self.predictors:
            p.end_requests()
        self.prefetcher.now(-1, -1)
