"""Oracles for the simulator: they know every future access of the replay.

- `BeladyPolicy`: optimal eviction (Belady's MIN): evict the resident expert whose next use is
  farthest in the future. With on-demand loading it is the best hit rate any eviction policy can
  reach at a budget. It protects, against prefetches, every expert needed no later than the
  farthest access the latest plan targets, so an oracle prefetch never evicts something needed
  sooner than what it brings in.
- `OraclePredictor`: the experts each layer will really use, planned at the points FineMoE plans
  (layers 0..d-1 at the iteration's start, layer l+d after layer l) with priority 1 / distance.
  With `BeladyPolicy` and the same link it bounds what an online predictor can reach. `noise`
  (a study knob) swaps each planned expert, with that probability, for a random expert of the
  same layer the iteration does not use: a predictor of precision = recall = 1 - noise, planning
  as many experts as the oracle at the same points (seeded: the same replay every time).

Steps: the cache counts one step per layer access; with a schedule of I iterations of L layers,
access (iteration g, layer l) is step g*L + l + 1. `Future` holds that schedule.
"""

from __future__ import annotations

import random
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

    def __init__(self, future: Future, distance: int, noise: float = 0.0, num_experts: int = 0, seed: int = 0) -> None:
        if not 0.0 <= noise <= 1.0 or (noise > 0 and num_experts < 1):
            raise ValueError("oracle noise is a probability in [0, 1] and needs the experts per layer")
        self.future, self.distance, self.noise, self.E = future, distance, noise, num_experts
        self.L = future.num_layers
        self._rng = random.Random(seed)

    def _experts(self, iteration: int, target: int) -> list[int]:
        used = self.future.accesses[iteration][target]
        if self.noise == 0.0:
            return used
        rng, out = self._rng, []
        wrong = [e for e in range(self.E) if e not in used]
        rng.shuffle(wrong)
        for e in used:
            out.append(wrong.pop() if wrong and rng.random() < self.noise else e)
        return out

    def _reqs(self, iteration: int, target: int, layer_now: int) -> list[PrefetchRequest]:
        if iteration >= len(self.future.accesses):
            return []
        dist = max(target - layer_now, 1)
        return [PrefetchRequest(ExpertId(target, e), 1.0 / dist) for e in self._experts(iteration, target)]

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
