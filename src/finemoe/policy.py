"""Eviction policies: which resident, unpinned expert leaves the device next.

Policies are plain Python over `ExpertId`s and logical steps (no clock, no CUDA, no transformers),
so the same objects drive the engine and the simulator.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

import torch

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

    The eviction order is computed with a few tensor ops and reused until the next plan or access,
    so a burst of prefetches pays for one ordering (experts inserted during a burst join the order
    at the next recomputation).
    """

    name = "map-lfu"

    def __init__(self, num_layers: int, num_experts: int) -> None:
        L, E = num_layers, num_experts
        self.num_experts = E
        self.prob = torch.full((L, E), 1.0 / max(E, 1))  # p of the latest searched map, per layer
        self.freq = torch.zeros(L, E)
        self.last = torch.zeros(L, E)  # step of the latest use (tie-break only)
        self.resident = torch.zeros(L, E, dtype=torch.bool)
        self._planned: set[tuple[int, int]] = set()  # (layer, expert) a pending plan selected
        self._iteration = -1
        self._layer_now = -1
        self._order: list[int] | None = None  # flat ids l*E+e, next victim first
        self._pos = 0

    def on_plan(self, plan: PrefetchPlan) -> None:
        if plan.iteration > self._iteration:
            self._iteration, self._layer_now = plan.iteration, -1
            self._planned.clear()
        for layer, probs in plan.layer_probs:
            self.prob[layer] = probs
        self._planned.update(req.expert for req in plan.requests)
        self._order = None

    def protected(self, eid: ExpertId) -> bool:
        return eid.layer > self._layer_now and eid in self._planned

    def on_insert(self, eid: ExpertId, step: int) -> None:
        self.freq[eid.layer, eid.expert] = 1.0
        self.last[eid.layer, eid.expert] = step
        self.resident[eid.layer, eid.expert] = True

    def on_access(self, eid: ExpertId, step: int) -> None:
        self._layer_now = eid.layer
        self.freq[eid.layer, eid.expert] += 1.0
        self.last[eid.layer, eid.expert] = step
        self._order = None

    def on_evict(self, eid: ExpertId) -> None:
        self.freq[eid.layer, eid.expert] = 0.0
        self.resident[eid.layer, eid.expert] = False

    def _compute_order(self) -> list[int]:
        """Resident experts by (protected, p x freq, last use), flat ids; a handful of tensor ops."""
        key = self.prob * self.freq + self.last * 1e-12  # recency only separates equal scores
        pending = [(a, e) for a, e in self._planned if a > self._layer_now]  # not yet served
        if pending:
            idx = torch.tensor(pending, dtype=torch.int64)
            key[idx[:, 0], idx[:, 1]] += 1e6  # protected experts go last
        key = key.masked_fill(~self.resident, float("inf")).view(-1)
        n = int(self.resident.sum())
        return torch.argsort(key)[:n].tolist()

    def victim(self, evictable: Callable[[ExpertId], bool]) -> ExpertId | None:
        fresh = self._order is None
        if fresh:
            self._order, self._pos = self._compute_order(), 0
        E, res = self.num_experts, self.resident
        first_blocked = None
        for i in range(self._pos, len(self._order)):
            flat = self._order[i]
            eid = ExpertId(flat // E, flat % E)
            if not res[eid.layer, eid.expert]:
                if first_blocked is None:
                    self._pos = i + 1  # evicted since the ordering: never a candidate again
                continue
            if evictable(eid):
                return eid
            if first_blocked is None:
                first_blocked = i
        if not fresh:  # experts inserted since the ordering may be the only candidates left
            self._order = None
            return self.victim(evictable)
        return None


# name -> factory(num_layers, num_experts)
EVICTION_POLICIES: dict[str, Callable[[int, int], EvictionPolicy]] = {
    "lru": lambda num_layers, num_experts: LRUPolicy(),
    "lfu": lambda num_layers, num_experts: LFUPolicy(),
    "map-lfu": MapAwarePolicy,
}
