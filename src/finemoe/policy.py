"""Eviction policies: which resident, unpinned expert leaves the device next.

Policies are plain Python over `ExpertId`s and logical steps (no clock, no CUDA, no transformers),
so the same objects drive the engine and the simulator.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from finemoe.decay_lfu import DecayLFUPolicy
from finemoe.plan_policy import MapAwarePolicy
from finemoe.router_ema import RouterEMAPolicy
from finemoe.types import ExpertId, PrefetchPlan


class EvictionPolicy(Protocol):
    name: str
    reads_layer_probs: bool  # on_plan reads `PrefetchPlan.layer_probs` (else they need not be sent)

    def on_plan(self, plan: PrefetchPlan) -> None:
        """A predictor's plan was submitted (map-aware policies read its probabilities)."""
        ...

    def protected(self, eid: ExpertId) -> bool:
        """True if a pending plan still needs `eid`: prefetches may not evict it."""
        ...

    def on_insert(self, eid: ExpertId, step: int) -> None: ...

    def on_access(self, eid: ExpertId, step: int) -> None: ...

    def on_evict(self, eid: ExpertId) -> None: ...

    def victim(self, evictable: Callable[[ExpertId], bool], pinned_only: bool = False) -> ExpertId | None:
        """The resident expert to evict next among those `evictable` accepts, or None.
        `pinned_only`: `evictable` refuses only experts pinned until the cache's next
        `on_release` (a policy may then set them aside until it)."""
        ...

    # Optional: `victims(evictable, n, layer) -> list[ExpertId]`, up to n victims in one pass for
    # the on-demand misses of `layer` (the cache falls back to `victim` for the rest).
    # Optional: `prefetch_victims(evictable, n) -> list[ExpertId]`, the victims of n prefetches in
    # one pass (as n `victim` calls would pick them while what they load is not `evictable`);
    # with `filters_protected` True it passes protected experts over itself (`evictable` need not ask).
    # Optional: `candidates(evictable, n, layer) -> list[ExpertId]`, the first n experts `victims`
    # (`layer` >= 0) or `prefetch_victims` (-1) would pick, nothing removed (`ExpertCache.keep_whole`).
    # Optional: `on_iteration(iteration)`, told when an iteration starts (before its plans).
    # Optional: `on_access_many(eids, step)`, `on_access` of one layer's experts in order, one call.
    # Optional: `on_demand_load(eid, step)`, `on_insert` then `on_access` of an expert just loaded.
    # Optional: `on_demand_loads(evicted, loaded, step)`, one layer's misses in one call: `on_evict`
    # of each of `evicted` then `on_demand_load` of each of `loaded`, leaving the policy as the
    # interleaved calls (each victim evicted just before its replacement loads) would.
    # Optional: `on_prefetch_loads(evicted, loaded, step)`, likewise for prefetches: `on_evict` of
    # each of `evicted` then `on_insert` of each of `loaded`.


class _PlanBlind:
    """Policies that ignore plans (`plan_blind`: `protected` is always False)."""

    reads_layer_probs = False
    plan_blind = True

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

    def on_demand_load(self, eid: ExpertId, step: int) -> None:
        """`on_insert` then `on_access` of an expert just loaded (not resident before): the end."""
        self._order[eid] = None

    def on_demand_loads(self, evicted: list[ExpertId], loaded: list[ExpertId], step: int) -> None:
        """`on_evict` of `evicted`, then `on_demand_load` of `loaded` (none of them resident
        before): the order is that of the interleaved calls, `loaded` at the end."""
        order = self._order
        for eid in evicted:
            del order[eid]
        for eid in loaded:
            order[eid] = None

    def on_prefetch_loads(self, evicted: list[ExpertId], loaded: list[ExpertId], step: int) -> None:
        """`on_evict` of `evicted`, then `on_insert` of `loaded` (none resident before): as
        `on_demand_loads`, an insertion being a use."""
        self.on_demand_loads(evicted, loaded, step)

    def on_access_many(self, eids: list[ExpertId], step: int) -> None:
        move = self._order.move_to_end
        for eid in eids:
            move(eid)

    def on_evict(self, eid: ExpertId) -> None:
        del self._order[eid]

    def victim(self, evictable: Callable[[ExpertId], bool], pinned_only: bool = False) -> ExpertId | None:
        for eid in self._order:
            if evictable(eid):
                return eid
        return None

    def victims(self, evictable: Callable[[ExpertId], bool], n: int, layer: int) -> list[ExpertId]:
        """The first `n` experts `evictable` accepts, least recent first (as `n` `victim` calls)."""
        out = []
        for eid in self._order:
            if evictable(eid):
                out.append(eid)
                if len(out) == n:
                    break
        return out

    def prefetch_victims(self, evictable: Callable[[ExpertId], bool], n: int) -> list[ExpertId]:
        return self.victims(evictable, n, -1)  # plan-blind: the layer does not matter


class LFUPolicy(_PlanBlind):
    """Least frequently used first, counting uses while resident (reset on eviction, as in
    MoE-Infinity); ties go to the least recently used, then to the earliest inserted.

    A heap of (count, last use, insertion number, expert) refreshed lazily: a use only raises an
    expert's key, so its entry is re-pushed when it reaches the top with an outdated key (the
    victims of a full scan, in a few heap operations)."""

    name = "lfu"

    def __init__(self) -> None:
        self._count: dict[ExpertId, int] = {}
        self._last: dict[ExpertId, int] = {}
        self._seq: dict[ExpertId, int] = {}  # insertion number of the current residency
        self._inserted = 0
        self._heap: list[tuple[int, int, int, ExpertId]] = []
        self._busy: list[tuple[int, int, int, ExpertId]] = []  # found pinned: aside until on_release

    def on_insert(self, eid: ExpertId, step: int) -> None:
        self._inserted += 1
        self._count[eid], self._last[eid], self._seq[eid] = 0, step, self._inserted
        heapq.heappush(self._heap, (0, step, self._inserted, eid))

    def on_access(self, eid: ExpertId, step: int) -> None:
        self._count[eid] += 1  # raises its key: the heap entry is refreshed when it surfaces
        self._last[eid] = step

    def on_evict(self, eid: ExpertId) -> None:
        del self._count[eid], self._last[eid], self._seq[eid]

    def on_release(self) -> None:
        for entry in self._busy:
            heapq.heappush(self._heap, entry)
        self._busy = []

    def victim(self, evictable: Callable[[ExpertId], bool], pinned_only: bool = False) -> ExpertId | None:
        heap, count, last, seq = self._heap, self._count, self._last, self._seq
        kept: list[tuple[int, int, int, ExpertId]] = []
        found = None
        while heap:
            entry = heapq.heappop(heap)
            c, t, q, eid = entry
            if seq.get(eid) != q:
                continue  # left the device since
            if c != count[eid] or t != last[eid]:
                heapq.heappush(heap, (count[eid], last[eid], q, eid))
                continue
            if evictable(eid):
                found = eid  # the caller evicts it
                break
            (self._busy if pinned_only else kept).append(entry)
        for entry in kept:
            heapq.heappush(heap, entry)
        return found


# name -> factory(num_layers, num_experts)
EVICTION_POLICIES: dict[str, Callable[[int, int], EvictionPolicy]] = {
    "lru": lambda num_layers, num_experts: LRUPolicy(),
    "lfu": lambda num_layers, num_experts: LFUPolicy(),
    "map-lfu": MapAwarePolicy,
    "decay-lfu": DecayLFUPolicy,
    "router-ema": RouterEMAPolicy,
}
