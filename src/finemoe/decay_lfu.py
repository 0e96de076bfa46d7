"""Decayed LFU, finemoe's default eviction policy (`DecayLFUPolicy`), over the pending-plan
protection of `plan_policy`."""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections.abc import Callable

from finemoe.plan_policy import PlanProtection
from finemoe.types import ExpertId


class DecayLFUPolicy(PlanProtection):
    """Decayed-frequency eviction with pending-plan protection (finemoe's default, a measured
    replacement of the paper's p x freq; docs/design/finemoe.md): every expert keeps a use count
    that decays by `gamma` per iteration and, unlike LFU, survives its eviction, so an expert the
    running requests keep coming back to stays. Evict the lowest decayed count first.

    The decayed count s·γ^(now - t) orders experts like log s - t·log γ, which does not change
    with `now`: that is the key (t in iterations, step / L). A use strictly raises it.

    The residents are kept in one list sorted by the (key, last use, flat) each had when it was
    filed (`_order`). A use only updates the numbers: a search walking the list from its front
    re-files an item whose numbers moved on (further back, as they only rise) before judging it,
    so every item it judges is the true lowest of those left (lazy increase-key, as a heap, without
    popping, setting aside and pushing back what it passes over). Victims found leave the list at
    once: the caller evicts them.
    """

    name = "decay-lfu"
    prefetch_count = 0.5  # a prefetch counts as this many uses until the router confirms it

    def __init__(self, num_layers: int, num_experts: int, gamma: float = 0.95) -> None:
        super().__init__(num_layers, num_experts)
        self.num_layers = num_layers
        self.log_gamma = math.log(gamma)
        # flat id -> (count, its time, key = log count - time * log gamma), every expert seen
        self.count: dict[int, tuple[float, float, float]] = {}
        self._order: list[tuple[float, int, int]] = []  # residents' (key, last use, flat) when filed, ascending
        self._item: dict[int, tuple[float, int, int]] = {}  # flat id in `_order` -> its item there
        # `last` (PlanProtection's resident flat id -> stamp of the latest use) holds each resident's
        # (key, last use, flat) now: an `_order` item whose `last` entry is another object is stale

    def _key(self, flat: int) -> float:
        return self.count[flat][2]

    def _use(self, flat: int, step: int) -> None:
        lg = self.log_gamma
        t = step / self.num_layers
        c, t0, _ = self.count.get(flat, (0.0, t, 0.0))
        c = c * math.exp((t - t0) * lg) + 1.0
        self.count[flat] = (c, t, math.log(c) - t * lg)

    def _file(self, flat: int, step: int) -> None:
        """`flat`, just loaded (not in `_order`), used last at `step`: filed at its key."""
        self._item[flat] = self.last[flat] = item = (self.count[flat][2], step, flat)
        insort(self._order, item)

    def on_insert(self, eid: ExpertId, step: int) -> None:
        flat = eid.layer * self.num_experts + eid.expert
        if flat not in self.count:
            t = step / self.num_layers
            self.count[flat] = (self.prefetch_count, t, math.log(self.prefetch_count) - t * self.log_gamma)
        self._file(flat, step)

    def on_access(self, eid: ExpertId, step: int) -> None:
        if eid.layer != self._layer_now:
            self._reach(eid.layer)
        flat = eid.layer * self.num_experts + eid.expert
        self._use(flat, step)  # its item is re-filed when a search reaches it
        self.last[flat] = (self.count[flat][2], step, flat)

    def on_demand_load(self, eid: ExpertId, step: int) -> None:
        """`on_insert` then `on_access` of an expert just loaded: the same count, one filing."""
        if eid.layer != self._layer_now:
            self._reach(eid.layer)
        flat = eid.layer * self.num_experts + eid.expert
        if flat not in self.count:  # on_insert's count if never seen
            self.count[flat] = (self.prefetch_count, step / self.num_layers, 0.0)
        self._use(flat, step)
        self._file(flat, step)

    def on_evict(self, eid: ExpertId) -> None:
        flat = eid.layer * self.num_experts + eid.expert
        del self.last[flat]
        item = self._item.pop(flat, None)
        if item is not None:  # (a victim found by a search has left the list already)
            del self._order[bisect_left(self._order, item)]

    def on_demand_loads(self, evicted: list[ExpertId], loaded: list[ExpertId], step: int) -> None:
        """`on_evict` of each of `evicted`, then `on_demand_load` of each of `loaded` (one layer's
        misses): as `on_prefetch_loads`, each loaded expert used once too."""
        if loaded and loaded[0][0] != self._layer_now:
            self._reach(loaded[0][0])
        self._loads(evicted, loaded, step, True)

    def _loads(self, evicted: list[ExpertId], loaded: list[ExpertId], step: int, used: bool = False) -> None:
        """`on_evict` of each of `evicted`, then `on_insert` (`used`: `on_demand_load`) of each of
        `loaded` (none of them resident before, so the two sets are disjoint): the same state."""
        E, order, items, last = self.num_experts, self._order, self._item, self.last
        for lay, e in evicted:
            flat = lay * E + e
            del last[flat]
            item = items.pop(flat, None)
            if item is not None:
                del order[bisect_left(order, item)]
        count = self.count
        t, lg, exp, log = step / self.num_layers, self.log_gamma, math.exp, math.log
        tlg, first = t * lg, self.prefetch_count
        for lay, e in loaded:
            flat = lay * E + e
            if used:  # on_demand_load: on_insert's count if never seen, then one use
                c, t0, _ = count.get(flat, (first, t, 0.0))
                c = c * exp((t - t0) * lg) + 1.0
                count[flat] = (c, t, k := log(c) - tlg)
            elif flat in count:
                k = count[flat][2]
            else:  # on_insert's first count, inlined
                count[flat] = (first, t, k := log(first) - tlg)
            items[flat] = last[flat] = item = (k, step, flat)
            insort(order, item)

    def on_access_many(self, eids: list[ExpertId], step: int) -> None:
        """`on_access` of each of `eids` (one layer's, in order): the same arithmetic, one call."""
        if not eids:
            return
        layer = eids[0].layer
        if layer != self._layer_now:
            self._reach(layer)
        lg = self.log_gamma
        count, last, exp, log = self.count, self.last, math.exp, math.log
        t = step / self.num_layers
        tlg, base, zero = t * lg, layer * self.num_experts, (0.0, t, 0.0)
        for eid in eids:
            flat = base + eid[1]
            c, t0, _ = count.get(flat, zero)
            c = c * exp((t - t0) * lg) + 1.0
            count[flat] = (c, t, k := log(c) - tlg)
            last[flat] = (k, step, flat)

    def _walk(
        self, evictable: Callable[[ExpertId], bool], n: int, fallback: bool = False, take: bool = True
    ) -> list[ExpertId]:
        """Up to `n` unprotected experts `evictable` accepts, lowest key first, removed from
        `_order` (the caller evicts them; `take` False: left there). `fallback`: if none, the
        lowest-key protected one."""
        order, items, last, eids = self._order, self._item, self.last, self._eid
        planned, first_unprotected = self._planned, (self._layer_now + 1) * self.num_experts
        found: list[ExpertId] = []
        spare = -1  # index of the lowest protected one `evictable` accepts (`fallback`)
        i = 0
        try:
            while True:
                item = order[i]  # (IndexError: the end of the list)
                flat = item[2]
                now = last[flat]
                if now is not item:  # used since filed: further back (its key rose)
                    del order[i]
                    items[flat] = now
                    insort(order, now, i)
                    continue
                eid = eids[flat]
                if flat >= first_unprotected and eid in planned:  # protected
                    if fallback and spare < 0 and evictable(eid):
                        spare = i  # (re-filing happens at i or later: this index holds)
                    i += 1
                elif evictable(eid):
                    found.append(eid)
                    if take:
                        del order[i]
                        del items[flat]
                    else:
                        i += 1
                    if len(found) == n:
                        break
                else:
                    i += 1
        except IndexError:
            pass
        if fallback and not found and spare >= 0:
            flat = order.pop(spare)[2]
            del items[flat]
            found.append(eids[flat])
        return found

    def victims(self, evictable: Callable[[ExpertId], bool], n: int, layer: int) -> list[ExpertId]:
        """Up to `n` victims in one pass for the misses of `layer`, the layer the forward pass is
        at (its plans no longer protect). Unprotected ones only; `victim` covers the rest."""
        if layer != self._layer_now:
            self._reach(layer)
        return self._walk(evictable, n, False)

    def candidates(self, evictable: Callable[[ExpertId], bool], n: int, layer: int) -> list[ExpertId]:
        """The first `n` unprotected experts `evictable` accepts, lowest key first, as `victims`
        (`layer` >= 0) or `prefetch_victims` (-1) would find them, left resident and listed."""
        if layer >= 0 and layer != self._layer_now:
            self._reach(layer)
        return self._walk(evictable, n, False, False)

    def victim(self, evictable: Callable[[ExpertId], bool], pinned_only: bool = False) -> ExpertId | None:
        """The lowest-key unprotected expert `evictable` accepts, else the lowest-key protected one."""
        found = self._walk(evictable, 1, True)
        return found[0] if found else None

    def layer_victims(
        self, evictable: Callable[[ExpertId], bool], n: int, first: int, layer: int = -1, fallback: bool = False
    ) -> list[ExpertId]:
        """`_walk` among the experts of layers >= `first` (the cache's sink layers): up to `n`
        unprotected ones `evictable` accepts, lowest key first, removed from `_order`; `fallback`: if
        none, the lowest-key protected one. `layer` >= 0: the forward pass is there first (as
        `victims`). The same experts as `_walk` with `eid.layer >= first` added to `evictable`, found
        among those layers' residents (sorted by their items now) instead of walking the list's front
        through every earlier layer's: near 100% a sink layer's experts sit deep in the list."""
        if layer >= 0 and layer != self._layer_now:
            self._reach(layer)
        E, last, eids, planned, items = self.num_experts, self.last, self._eid, self._planned, self._item
        first_unprotected = (self._layer_now + 1) * E
        found: list[ExpertId] = []
        spare: ExpertId | None = None
        # those layers' residents still in `_order` (not taken by an earlier search), by their items now
        listed = sorted([last[f] for f in range(first * E, self.num_layers * E) if f in items])
        for item in listed:
            eid = eids[item[2]]
            if item[2] >= first_unprotected and eid in planned:  # protected
                if fallback and spare is None and evictable(eid):
                    spare = eid
            elif evictable(eid):
                found.append(eid)
                if len(found) == n:
                    break
        if fallback and not found and spare is not None:
            found.append(spare)
        order = self._order
        for eid in found:  # (the victims leave the list, as `_walk` takes them)
            flat = eid[0] * E + eid[1]
            del order[bisect_left(order, items.pop(flat))]
        return found

    # The cache's prefetch hooks are the methods themselves (one Python call fewer per prefetch batch):
    # `prefetch_victims(evictable, n)`: victims of `n` prefetches, unprotected only (a prefetch never
    # evicts a protected expert, so `victim`'s protected fallback would find nothing for it).
    prefetch_victims = _walk
    # `on_prefetch_loads(evicted, loaded, step)`: `on_evict` of each of `evicted`, then `on_insert` of
    # each of `loaded`: the same state, one call.
    on_prefetch_loads = _loads
