"""Residency upkeep of `ExpertCache` (a mixin): filling the pool at set-up (`fill_free`,
`preload_all`), the pins of a graphed decode layer run ahead of its routing sync (`pin_layer`,
`account_pinned`, `unpin`; `runahead.py`) and the copies back that keep the layers before the sink
layers whole (`gather`, `EngineConfig.gather_absent`; the victims' side is in `victims.py`). None of
it is a prediction: the copies are counted apart from prefetches, and the eviction policy hears of
them as inserts and uses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from finemoe.types import CacheStats, ExpertId, MoESpec


class ResidencyUpkeep:
    """The residency upkeep of `ExpertCache`, over the state it keeps: `slot_of` [L][E] (slot or -1),
    `owner` [S], `refcount` [S], the free slots, the policy, the transfer and the store."""

    spec: MoESpec
    slot_of: list[list[int]]
    owner: list[ExpertId | None]
    refcount: list[int]
    num_slots: int
    sink: int
    absent: int
    step: int
    all_resident: bool
    stats: CacheStats
    policy: Any
    transfer: Any
    store: Any
    _free: list[int]
    _sweeping: bool
    _eids: list[list[ExpertId]]
    _evictable_for_prefetch: Callable[[ExpertId], bool]
    _sink_victim: Callable[[Callable[[ExpertId], bool]], ExpertId | None]
    _on_release: Callable[[], None] | None

    def fill_free(self, each: Callable[[int], object] | None = None) -> int:
        """Load absent experts into the free slots, layer by layer in expert order, until none is
        left free (a warm start, `EngineConfig.warm_pool`): whole layers first, so a budget near
        100% has layers whose every expert is resident from the first step. Told to the policy as
        inserts at the current step; not counted as traffic. `each(1)` after every copy issued (a
        progress bar). Returns how many were loaded."""
        free, eids, loaded = self._free, self._eids, 0
        for layer in range(self.spec.num_layers):
            row = self.slot_of[layer]
            for e in range(self.spec.num_experts):
                if not free:
                    break
                if row[e] >= 0:
                    continue
                slot, eid = free.pop(), eids[layer][e]
                self.transfer.load(slot, self.store.parts(eid), False)
                self.owner[slot] = eid
                self._set(eid, slot)
                self.policy.on_insert(eid, self.step)
                loaded += 1
                if each is not None:
                    each(1)
        self.flush_copies()
        return loaded

    def preload_all(self) -> None:
        """Make every expert resident in slot l*E + e (requires S == L*E); all-resident plans."""
        assert self.num_slots == self.spec.num_total_experts and len(self._free) == self.num_slots
        for layer in range(self.spec.num_layers):
            for e in range(self.spec.num_experts):
                eid = ExpertId(layer, e)
                slot = self._allocate()
                assert slot == layer * self.spec.num_experts + e
                self.transfer.load(slot, self.store.parts(eid), demand=False)
                self.owner[slot] = eid
                self._set(eid, slot)
                self.policy.on_insert(eid, self.step)
        for layer in range(self.spec.num_layers):
            self.device_table(layer)
        self.all_resident = True

    def pin_layer(self, layer: int) -> list[int] | None:
        """Pin every expert of `layer` if all of them are resident: their slots [E] (expert order),
        else None (nothing pinned). Whatever the router picks is then resident until `account_pinned`."""
        row = self.slot_of[layer]
        if -1 in row:  # (absent: -1)
            return None
        slots = list(row)
        refcount = self.refcount
        for s in slots:
            refcount[s] += 1
        return slots

    def account_pinned(self, layer: int, experts: list[int], pinned: list[int]) -> None:
        """The routed uses of `layer` (`experts`, sorted unique ids), computed while `pin_layer` held
        its slots `pinned`: counted and told to the policy as `enter` does (all hits: they were never
        evicted), then every pin dropped. No `after_compute`: whoever launched the layer's compute
        recorded its last use of the slots then."""
        _, slots = self.enter(layer, experts)
        refcount = self.refcount
        for s in slots:
            refcount[s] -= 1
        self.unpin(pinned)

    def unpin(self, slots: list[int]) -> None:
        """Drop pins `pin_layer` took, nothing counted (a step abandoned before `account_pinned`)."""
        refcount = self.refcount
        for s in slots:
            refcount[s] -= 1
        if self._on_release is not None:
            self._on_release()

    def gather(self) -> int:
        """`gather_absent` (`sink` >= 0), at a decode iteration's start with the pool full: copy back
        the experts missing in layers before the sink layers, each in place of a sink layer's expert
        (the policy's order among those a prefetch may evict: never a pinned or planned one), each
        layer's copies issued as a run of their own. Residency upkeep, not a prediction: counted in
        `stats.gathered` and the bytes copied, not as prefetches, and done also with
        `prefetch_copies` off. Stops when no sink expert can go. Returns the copies started."""
        sink = self.sink
        if sink < 0 or self._free or self._sweeping:
            return 0
        slot_of = self.slot_of
        if sum(row.count(-1) for row in slot_of[sink:]) >= self.absent:
            return 0  # every absent expert is in a sink layer
        started, eids, pred, victim = 0, self._eids, self._evictable_for_prefetch, self._sink_victim
        try:
            for layer in range(sink):
                row = slot_of[layer]
                if min(row) >= 0:
                    continue
                for e, slot in enumerate(row):
                    if slot < 0:
                        gone = victim(pred)
                        if gone is None:
                            return started
                        self._load(eids[layer][e], self._evict(gone), False)
                        self.stats.gathered += 1
                        started += 1
                # a queueing transfer issues each layer's copies as a run of their own: a layer run
                # ahead waits for its own copies, not for every later layer's
                self.flush_copies()
        finally:
            self.flush_copies()
        return started
