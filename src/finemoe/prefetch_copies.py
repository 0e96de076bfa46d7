"""Prefetch copies of `ExpertCache` (a mixin): one expert (`try_prefetch`) or a planned batch whose
victims the policy finds in one pass (`prefetch_batch`; `_prefetch_all` batches the transfer's and
the policy's calls too). The cache never decides what to prefetch: the `Prefetcher` does."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from finemoe.types import CacheStats, ExpertId


class PrefetchCopies:
    """The prefetch path of `ExpertCache`, over its residency state: `slot_of` [L][E], `owner` [S],
    `prefetched` / `prefetch_iteration` [S], the free slots and the policy's batch hooks."""

    slot_of: list[list[int]]
    owner: list[ExpertId | None]
    prefetched: list[bool]
    prefetch_iteration: list[int]
    now: tuple[int, int]
    step: int
    expert_bytes: int
    stats: CacheStats
    _free: list[int]
    _dirty: list[bool]
    _sweeping: bool
    _shaped: bool
    _prefetch_victims: Any
    _evictable_prefetch: Callable[[ExpertId], bool]
    _on_prefetch_loads: Callable[..., None] | None
    _parts: Callable[[ExpertId], Any] | None
    _load_many: Callable[..., None]

    def try_prefetch(self, eid: ExpertId, iteration: int = -1) -> bool:
        """Start copying `eid` in if absent and a slot can be freed; True if a copy started.
        `iteration` is the iteration the plan was made for (-1: unknown, never protected)."""
        if self.slot_of[eid.layer][eid.expert] >= 0:
            return False
        slot = self._allocate(True)
        if slot is None:
            return False
        self._start_prefetch(eid, slot, iteration)
        return True

    def _start_prefetch(self, eid: ExpertId, slot: int, iteration: int) -> None:
        self._load(eid, slot, False)
        self.prefetched[slot] = True
        self.prefetch_iteration[slot] = iteration
        self.stats.prefetches_issued += 1

    @property
    def batches_prefetches(self) -> bool:
        """True if `prefetch_batch` may be used (the policy finds prefetch victims in one pass)."""
        return self._prefetch_victims is not None

    def prefetch_batch(self, batch: list[tuple[ExpertId, int]]) -> list[int]:
        """`try_prefetch` of each (absent, distinct) expert of `batch` in order, the victims found
        in one policy pass; the slots of the copies started, a prefix of `batch` (the rest found no
        slot). Equal to successive `try_prefetch` calls when every iteration is >= 0: what a
        prefetch loads is then not evictable by the next one. Needs `batches_prefetches`."""
        free = self._free
        need = len(batch) - len(free)
        if need <= 0:
            victims = []
        elif self._sweeping:
            victims = self._swept(self._prefetch_victims, self._evictable_prefetch, need, self.now[1])
        elif self._shaped:
            victims = self._shape(self._prefetch_victims, self._evictable_prefetch, need, -1)
        else:
            victims = self._prefetch_victims(self._evictable_prefetch, need)
        victims.reverse()
        if self._on_prefetch_loads is not None:
            return self._prefetch_all(batch, victims)
        slots: list[int] = []
        for eid, iteration in batch:
            if free:
                slot = free.pop()
            elif victims:
                slot = self._evict(victims.pop())
            else:
                break
            self._start_prefetch(eid, slot, iteration)
            slots.append(slot)
        return slots

    def _prefetch_all(self, batch: list[tuple[ExpertId, int]], victims: list[ExpertId]) -> list[int]:
        """`prefetch_batch`'s loop with `_evict` and `_start_prefetch` inlined and the transfer's and
        the policy's calls batched (`load_many`, `on_prefetch_loads`): the same slots, the same
        state after it. `victims`: the next one last. Its eviction lines repeat those of `enter`'s
        batched miss loop on purpose: one shared helper for both (tried in session 18) slowed the
        LRU replay below issue 5's 200k layer-steps/s (an alternating A/B on one core: 188-202k
        without it, 101-165k with it)."""
        free, slot_of, owner, dirty = self._free, self.slot_of, self.owner, self._dirty
        prefetched, planned_in = self.prefetched, self.prefetch_iteration
        slots: list[int] = []
        gone: list[ExpertId] = []
        loaded: list[ExpertId] = []
        wasted = 0
        for eid, iteration in batch:
            if free:
                slot = free.pop()
            elif victims:
                victim = victims.pop()
                vl, ve = victim
                slot = slot_of[vl][ve]
                slot_of[vl][ve] = -1
                dirty[vl] = True
                gone.append(victim)
                if prefetched[slot]:
                    wasted += 1
            else:
                break
            owner[slot] = eid
            lay = eid[0]
            slot_of[lay][eid[1]] = slot
            dirty[lay] = True
            prefetched[slot] = True
            planned_in[slot] = iteration
            slots.append(slot)
            loaded.append(eid)
        n = len(slots)
        if n:
            parts = self._parts
            self._load_many(slots, [parts(x) for x in loaded] if parts is not None else [[]] * n, False)
            self._on_prefetch_loads(gone, loaded, self.step)
            st, eb = self.stats, self.expert_bytes
            st.evictions += len(gone)
            if wasted:
                st.prefetches_wasted += wasted
                st.prefetch_wasted_bytes += wasted * eb
            st.bytes_copied += n * eb
            st.prefetches_issued += n
        return slots
