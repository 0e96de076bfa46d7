"""Eviction policies: which resident, unpinned expert leaves the device next.

Policies are plain Python over `ExpertId`s and logical steps (no clock, no CUDA, no transformers),
so the same objects drive the engine and the simulator.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from finemoe.types import ExpertId, PrefetchPlan


class EvictionPolicy(Protocol):
    name: str

    def on_plan(self, plan: PrefetchPlan) -> None:
        """A predictor's plan was submitted (map-aware policies read its probabilities)."""
        ...

    def protected(self, eid: ExpertId) -> bool:
        """True if a pending plan still needs `eid`: prefetches may not evict it."""
        ...

    def on_insert(self, eid: ExpertId, step: int) -> None: ...

    def on_access(self, eid: ExpertId, step: int) -> None: ...

    def on_evict(self, eid: ExpertId) -> None: ...

    def victim(self, evictable: Callable[[ExpertId], bool]) -> ExpertId | None:
        """The resident expert to evict next among those `evictable` accepts, or None."""
        ...


class _PlanBlind:
    """Policies that ignore plans."""

    def on_plan(self, plan: PrefetchPlan) -> None:
        pass

    def protected(self, eid: ExpertId) -> bool:
        return False


class LRUPolicy(_PlanBlind):
    """Least recently used first; an insertion counts as a use."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[ExpertId, None] = OrderedDict()

    def on_insert(self, eid: ExpertId, step: int) -> None:
        self._order[eid] = None
        self._order.move_to_end(eid)

    def on_access(self, eid: ExpertId, step: int) -> None:
        self._order.move_to_end(eid)

    def on_evict(self, eid: ExpertId) -> None:
        del self._order[eid]

    def victim(self, evictable: Callable[[ExpertId], bool]) -> ExpertId | None:
        for eid in self._order:
            if evictable(eid):
                return eid
        return None


class LFUPolicy(_PlanBlind):
    """Least frequently used first, counting uses while resident (reset on eviction, as in
    MoE-Infinity); ties go to the least recently used."""

    name = "lfu"

    def __init__(self) -> None:
        self._count: dict[ExpertId, int] = {}
        self._last: dict[ExpertId, int] = {}

    def on_insert(self, eid: ExpertId, step: int) -> None:
        self._count[eid] = 0
        self._last[eid] = step

    def on_access(self, eid: ExpertId, step: int) -> None:
        self._count[eid] += 1
        self._last[eid] = step

    def on_evict(self, eid: ExpertId) -> None:
        del self._count[eid]
        del self._last[eid]

    def victim(self, evictable: Callable[[ExpertId], bool]) -> ExpertId | None:
        best, best_key = None, None
        for eid, count in self._count.items():
            key = (count, self._last[eid])
            if (best_key is None or key < best_key) and evictable(eid):
                best, best_key = eid, key
        return best


class MapAwarePolicy:
    """FineMoE's map-aware LFU (spec §3.7): evict the lowest p x freq first, where p is the
    expert's probability in the most recent searched map for its layer (1/E before any) and freq
    counts its uses while resident, its insertion included (reset on eviction). Recency only breaks
    ties. Experts the latest plans selected for layers the iteration has not reached yet are
    protected: a prefetch never evicts them, a demand load only when nothing else is left.
    """

    name = "map-lfu"

    def __init__(self, num_experts: int = 1) -> None:
        self.default_p = 1.0 / max(num_experts, 1)
        self._prob: dict[int, tuple[float, ...]] = {}  # layer -> p [E] of the latest searched map
        self._freq: dict[ExpertId, int] = {}
        self._last: dict[ExpertId, int] = {}
        self._planned: dict[int, set[int]] = {}  # layer -> experts a pending plan selected
        self._iteration = -1
        self._layer_now = -1

    def on_plan(self, plan: PrefetchPlan) -> None:
        if plan.iteration > self._iteration:
            self._iteration, self._layer_now = plan.iteration, -1
            self._planned.clear()
        for layer, probs in plan.layer_probs:
            self._prob[layer] = probs
        for req in plan.requests:
            self._planned.setdefault(req.expert.layer, set()).add(req.expert.expert)

    def protected(self, eid: ExpertId) -> bool:
        return eid.layer > self._layer_now and eid.expert in self._planned.get(eid.layer, ())

    def score(self, eid: ExpertId) -> float:
        probs = self._prob.get(eid.layer)
        p = probs[eid.expert] if probs is not None else self.default_p
        return p * self._freq[eid]

    def on_insert(self, eid: ExpertId, step: int) -> None:
        self._freq[eid] = 1
        self._last[eid] = step

    def on_access(self, eid: ExpertId, step: int) -> None:
        if eid.layer != self._layer_now:
            self._layer_now = eid.layer
            self._planned.pop(eid.layer, None)  # this layer's plan is served
        self._freq[eid] += 1
        self._last[eid] = step

    def on_evict(self, eid: ExpertId) -> None:
        del self._freq[eid]
        del self._last[eid]

    def victim(self, evictable: Callable[[ExpertId], bool]) -> ExpertId | None:
        best, best_key = None, None
        for eid in self._freq:
            key = (self.protected(eid), self.score(eid), self._last[eid])
            if (best_key is None or key < best_key) and evictable(eid):
                best, best_key = eid, key
        return best


EVICTION_POLICIES: dict[str, Callable[[int], EvictionPolicy]] = {
    "lru": lambda num_experts: LRUPolicy(),
    "lfu": lambda num_experts: LFUPolicy(),
    "map-lfu": MapAwarePolicy,
}
