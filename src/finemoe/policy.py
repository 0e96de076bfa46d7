"""Eviction policies: which resident, unpinned expert leaves the device next.

Policies are plain Python over `ExpertId`s and logical steps (no clock, no CUDA, no transformers),
so the same objects drive the engine and the simulator.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from finemoe.types import ExpertId


class EvictionPolicy(Protocol):
    name: str

    def on_insert(self, eid: ExpertId, step: int) -> None: ...

    def on_access(self, eid: ExpertId, step: int) -> None: ...

    def on_evict(self, eid: ExpertId) -> None: ...

    def victim(self, evictable: Callable[[ExpertId], bool]) -> ExpertId | None:
        """The resident expert to evict next among those `evictable` accepts, or None."""
        ...


class LRUPolicy:
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


class LFUPolicy:
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


EVICTION_POLICIES: dict[str, Callable[[], EvictionPolicy]] = {"lru": LRUPolicy, "lfu": LFUPolicy}
