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
        self.count: dict[int, tuple[float, float]] = {}  # flat id -> (count, its time), every expert seen
        self._keys: dict[int, float] = {}  # flat id -> log count - time * log gamma
        self._order: list[tuple[float, int, int]] = []  # residents' (key, last use, flat) when filed, ascending
        self._item: dict[int, tuple[float, int, int]] = {}  # flat id in `_order` -> its item there

    def _key(self, flat: int) -> float:
        return self._keys[flat]

    def _set(self, flat: int, c: float, t: float) -> None:
        self.count[flat] = (c, t)
        self._keys[flat] = math.log(c) - t * self.log_gamma

    def _use(self, flat: int, step: int) -> None:
        t = step / self.num_layers
        c, t0 = self.count.get(flat, (0.0, t))
        self._set(flat, c * math.exp((t - t0) * self.log_gamma) + 1.0, t)

    def _file(self, flat: int, step: int) -> None:
        """`flat`, just loaded (not in `_order`), used last at `step`: filed at its key."""
        self.last[flat] = step
        self._item[flat] = item = (self._keys[flat], step, flat)
        insort(self._order, item)

    def on_insert(self, eid: ExpertId, step: int) -> None:
        flat = eid.layer * self.num_experts + eid.expert
        if flat not in self.count:
            self._set(flat, self.prefetch_count, step / self.num_layers)
        self._file(flat, step)

    def on_access(self, eid: ExpertId, step: int) -> None:
        if eid.layer != self._layer_now:
            self._reach(eid.layer)
        flat = eid.layer * self.num_experts + eid.expert
        self._use(flat, step)  # its item is re-filed when a search reaches it
        self.last[flat] = step

    def on_demand_load(self, eid: ExpertId, step: int) -> None:
        """`on_insert` then `on_access` of an expert just loaded: the same count, one filing."""
        if eid.layer != self._layer_now:
            self._reach(eid.layer)
        flat = eid.layer * self.num_experts + eid.expert
        t = step / self.num_layers
        c, t0 = self.count.get(flat, (self.prefetch_count, t))  # on_insert's count if never seen
        self._set(flat, c * math.exp((t - t0) * self.log_gamma) + 1.0, t)
        self._file(flat, step)

    def on_evict(self, eid: ExpertId) -> None:
        flat = eid.layer * self.num_experts + eid.expert
        del self.last[flat]
        item = self._item.pop(flat, None)
        if item is not None:  # (a victim found by a search has left the list already)
            del self._order[bisect_left(self._order, item)]

    def on_prefetch_loads(self, evicted: list[ExpertId], loaded: list[ExpertId], step: int) -> None:
        """`on_evict` of each of `evicted`, then `on_insert` of each of `loaded` (none of them
        resident before, so the two sets are disjoint): the same state, one call."""
        self._loads(evicted, loaded, step, False)

    def on_demand_loads(self, evicted: list[ExpertId], loaded: list[ExpertId], step: int) -> None:
        """`on_evict` of each of `evicted`, then `on_demand_load` of each of `loaded` (one layer's
        misses): as `on_prefetch_loads`, each loaded expert used once too."""
        if loaded and loaded[0][0] != self._layer_now:
            self._reach(loaded[0][0])
        self._loads(evicted, loaded, step, True)

    def _loads(self, evicted: list[ExpertId], loaded: list[ExpertId], step: int, used: bool) -> None:
        E, last, order, items = self.num_experts, self.last, self._order, self._item
        for lay, e in evicted:
            flat = lay * E + e
            del last[flat]
            item = items.pop(flat, None)
            if item is not None:
                del order[bisect_left(order, item)]
        count, keys = self.count, self._keys
        t, lg, exp, log = step / self.num_layers, self.log_gamma, math.exp, math.log
        first = self.prefetch_count
        for lay, e in loaded:
            flat = lay * E + e
            if used:  # on_demand_load: on_insert's count if never seen, then one use
                c, t0 = count.get(flat, (first, t))
                c = c * exp((t - t0) * lg) + 1.0
                count[flat] = (c, t)
                keys[flat] = k = log(c) - t * lg
            elif flat not in count:  # `_set`, inlined
                count[flat] = (first, t)
                keys[flat] = k = log(first) - t * lg
            else:
                k = keys[flat]
            last[flat] = step
            items[flat] = item = (k, step, flat)
            insort(order, item)

    def on_access_many(self, eids: list[ExpertId], step: int) -> None:
        """`on_access` of each of `eids` (one layer's, in order): the same arithmetic, one call."""
        if not eids:
            return
        layer = eids[0].layer
        if layer != self._layer_now:
            self._reach(layer)
        E, lg = self.num_experts, self.log_gamma
        count, keys, last, exp, log = self.count, self._keys, self.last, math.exp, math.log
        t = step / self.num_layers
        for eid in eids:
            flat = layer * E + eid.expert
            c, t0 = count.get(flat, (0.0, t))
            c = c * exp((t - t0) * lg) + 1.0
            count[flat] = (c, t)
            keys[flat] = log(c) - t * lg
            last[flat] = step

    def _walk(self, evictable: Callable[[ExpertId], bool], n: int, fallback: bool) -> list[ExpertId]:
        """Up to `n` unprotected experts `evictable` accepts, lowest key first, removed from
        `_order` (the caller evicts them). `fallback`: if none, the lowest-key protected one."""
        order, items, keys, last, eids = self._order, self._item, self._keys, self.last, self._eid
        planned, first_unprotected = self._planned, (self._layer_now + 1) * self.num_experts
        found: list[ExpertId] = []
        spare = -1  # index of the lowest protected one `evictable` accepts (`fallback`)
        i = 0
        while i < len(order):
            item = order[i]
            flat = item[2]
            k, t = keys[flat], last[flat]
            if item[0] != k or item[1] != t:  # used since filed: further back (its key rose)
                del order[i]
                items[flat] = item = (k, t, flat)
                insort(order, item, i)
                continue
            if flat >= first_unprotected and flat in planned:  # protected
                if fallback and spare < 0 and evictable(eids[flat]):
                    spare = i  # (re-filing happens at i or later: this index holds)
                i += 1
                continue
            if evictable(eids[flat]):
                found.append(eids[flat])
                del order[i]
                del items[flat]
                if len(found) == n:
                    break
                continue
            i += 1
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

    def prefetch_victims(self, evictable: Callable[[ExpertId], bool], n: int) -> list[ExpertId]:
        """Victims of `n` prefetches: unprotected only (a prefetch never evicts a protected expert,
        so `victim`'s protected fallback would find nothing for it)."""
        return self._walk(evictable, n, False)

    def victim(self, evictable: Callable[[ExpertId], bool], pinned_only: bool = False) -> ExpertId | None:
        """The lowest-key unprotected expert `evictable` accepts, else the lowest-key protected one."""
        found = self._walk(evictable, 1, True)
        return found[0] if found else None
