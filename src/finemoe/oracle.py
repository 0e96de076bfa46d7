"""Oracles for the simulator: they know every future access of the replay.

- `BeladyPolicy`: optimal eviction (Belady's MIN): evict the resident expert whose next use is
  farthest in the future. With on-demand loading it is the best hit rate any eviction policy can
  reach at a budget. It protects, against prefetches, every expert needed no later than the
  farthest access the latest plan targets, so an oracle prefetch never evicts something needed
  sooner than what it brings in.
- `OraclePredictor`: the experts each layer will really use, planned at the points FineMoE plans
  (layers 0..d-1 at the iteration's start, layer l+d after layer l) with priority 1 / distance.
  With `BeladyPolicy` and the same link it bounds what an online predictor can reach.

Steps: the cache counts one step per layer access; with a schedule of I iterations of L layers,
access (iteration g, layer l) is step g*L + l + 1. `Future` holds that schedule.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable
from typing import Any

from finemoe.types import ExpertId, IterationContext, PrefetchPlan, PrefetchRequest, RoutingEvent

NEVER = float("inf")


class Future:
    """Every access of a replay: `accesses[g][l]` = sorted experts layer l uses in iteration g."""

    def __init__(self, accesses: list[list[list[int]]], num_layers: int) -> None:
        self.accesses, self.num_layers = accesses, num_layers
        self.uses: dict[ExpertId, list[int]] = {}
        for g, layers in enumerate(accesses):
            for layer, experts in enumerate(layers):
                step = g * num_layers + layer + 1
                for e in experts:
                    self.uses.setdefault(ExpertId(layer, e), []).append(step)

    def step(self, iteration: int, layer: int) -> int:
        return iteration * self.num_layers + layer + 1

    def next_use(self, eid: ExpertId, after: int) -> float:
        """The first step > `after` that uses `eid` (inf: never again)."""
        uses = self.uses.get(eid)
        if not uses:
            return NEVER
        i = bisect_right(uses, after)
        return uses[i] if i < len(uses) else NEVER


class BeladyPolicy:
    name = "belady"
    reads_layer_probs = False

    def __init__(self, future: Future) -> None:
        self.future = future
        self.next: dict[ExpertId, float] = {}  # resident expert -> its next use
        self.now = 0  # the latest step seen
        self.horizon = 0  # the farthest step the latest plans target

    def on_plan(self, plan: PrefetchPlan) -> None:
        if plan.iteration >= 0:
            for req in plan.requests:
                self.horizon = max(self.horizon, self.future.step(plan.iteration, req.expert.layer))

    def protected(self, eid: ExpertId) -> bool:
        return self.next.get(eid, NEVER) <= self.horizon

    def on_insert(self, eid: ExpertId, step: int) -> None:
        self.now = max(self.now, step)
        self.next[eid] = self.future.next_use(eid, step)

    def on_access(self, eid: ExpertId, step: int) -> None:
        self.now = max(self.now, step)
        self.next[eid] = self.future.next_use(eid, step)

    def on_evict(self, eid: ExpertId) -> None:
        del self.next[eid]

    def victim(self, evictable: Callable[[ExpertId], bool], pinned_only: bool = False) -> ExpertId | None:
        for eid, _ in sorted(self.next.items(), key=lambda kv: kv[1], reverse=True):
            if evictable(eid):
                return eid
        return None


class OraclePredictor:
    name = "oracle"

    def __init__(self, future: Future, distance: int) -> None:
        self.future, self.distance = future, distance
        self.L = future.num_layers

    def _reqs(self, iteration: int, target: int, layer_now: int) -> list[PrefetchRequest]:
        if iteration >= len(self.future.accesses):
            return []
        dist = max(target - layer_now, 1)
        return [PrefetchRequest(ExpertId(target, e), 1.0 / dist) for e in self.future.accesses[iteration][target]]

    def on_iteration_start(self, ctx: IterationContext) -> PrefetchPlan | None:
        reqs = [r for t in range(min(self.distance, self.L)) for r in self._reqs(ctx.iteration, t, -1)]
        return PrefetchPlan(tuple(reqs), replace=True, iteration=ctx.iteration) if reqs else None

    def on_routing(self, event: RoutingEvent) -> PrefetchPlan | None:
        target = event.layer + self.distance
        if target >= self.L:
            return None
        reqs = self._reqs(event.iteration, target, event.layer)
        return PrefetchPlan(tuple(reqs), iteration=event.iteration) if reqs else None

    def end_requests(self) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {}
