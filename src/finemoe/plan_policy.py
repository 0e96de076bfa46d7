"""The plan-aware eviction policies: map-aware LFU (the paper's p x freq) and decayed LFU (finemoe's
default), over one shared mechanism, pending-plan protection (`_PlanProtection`).

Experts the latest plans selected for layers the iteration has not reached yet are protected: a
prefetch never evicts them, a demand load only when nothing else is left. Protection is checked
when a victim is sought, so plans cost no ordering work. Victims go lowest key first (`_key(flat)`,
flat = l*E+e); ties go to the least recently used, then the lowest flat id.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left, insort
from collections.abc import Callable

from finemoe.types import ExpertId, PrefetchPlan


class _PlanProtection:
    """Pending-plan protection and the prefill sweep's order, shared by the plan-aware policies.
    `last` [resident flat id -> step of the latest use]; subclasses define `_key(flat)`."""

    reads_layer_probs = False
    filters_protected = True  # `prefetch_victims` passes protected experts over itself

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.num_experts = num_experts
        self.last: dict[int, int] = {}  # resident flat id -> step of the latest use
        self._planned: set[int] = set()  # flat ids a pending plan selected
        self._eid = [ExpertId(f // num_experts, f % num_experts) for f in range(num_layers * num_experts)]
        self._iteration = -1
        self._layer_now = -1
        self._sweep: list[tuple[float, int, int]] = []  # victims_behind: a heap of (key, last use, flat)
        self._sweep_at, self._sweep_upto = -1, 0  # its iteration and the layers it holds (< upto)

    def _key(self, flat: int) -> float:
        raise NotImplementedError

    def _release(self) -> None:
        """Protection may have ended for every expert (a new iteration's plans): subclasses that
        set protected experts aside take them back here."""

    def on_iteration(self, iteration: int) -> None:
        """Iteration `iteration` starts: plans made for earlier ones protect nothing any more (with
        no new plan, e.g. while prediction is paused, they would otherwise protect forever)."""
        if iteration > self._iteration:
            self._iteration, self._layer_now = iteration, -1
            self._planned.clear()
            self._release()

    def on_plan(self, plan: PrefetchPlan) -> None:
        if plan.iteration > self._iteration:
            self._iteration, self._layer_now = plan.iteration, -1
            self._planned.clear()
            self._release()
        E = self.num_experts
        self._planned.update([r[0][0] * E + r[0][1] for r in plan.requests])  # (expert (layer, e), priority)

    def _reach(self, layer: int) -> None:
        """The forward pass reached `layer`: plans for it (and earlier layers) no longer protect."""
        self._layer_now = layer

    def protected(self, eid: ExpertId) -> bool:
        return eid.layer > self._layer_now and eid.layer * self.num_experts + eid.expert in self._planned

    def victims_behind(self, evictable: Callable[[ExpertId], bool], n: int, layer: int) -> list[ExpertId]:
        """Up to `n` experts `evictable` accepts in layers < `layer`, lowest key first (the cache's
        prefill sweep; nothing there is protected). A served layer's residents enter a heap of
        (key, last use, flat) once per iteration as the pass reaches them: their keys hold until a
        later iteration uses them, so an entry whose expert was evicted or used since is dropped."""
        E, last, eids = self.num_experts, self.last, self._eid
        heap = self._sweep
        if self._sweep_at != self._iteration or layer < self._sweep_upto:
            self._sweep_at, self._sweep_upto = self._iteration, 0
            heap.clear()
        if layer > self._sweep_upto:
            key, push = self._key, heapq.heappush
            for f in range(self._sweep_upto * E, layer * E):
                t = last.get(f)
                if t is not None:
                    push(heap, (key(f), t, f))
            self._sweep_upto = layer
        found: list[ExpertId] = []
        kept: list[tuple[float, int, int]] = []
        pop = heapq.heappop
        while heap:
            entry = pop(heap)
            flat = entry[2]
            if last.get(flat) != entry[1]:
                continue  # evicted (or used again) since it entered: dropped
            kept.append(entry)  # back in below; once the caller evicts it, it is dropped as above
            if evictable(eids[flat]):
                found.append(eids[flat])
                if len(found) == n:
                    break
        for entry in kept:
            heapq.heappush(heap, entry)
        return found


class _PlanAwareHeap(_PlanProtection):
    """Victims from a heap of (key, last use, flat id, version) with lazy deletion, for keys that
    may fall as well as rise (map-aware LFU's p changes with every plan): every key change pushes
    an entry, older ones go stale. Protected experts met in a search are set aside until the pass
    reaches their layer, pinned ones (`pinned_only`) until the cache's `on_release`."""

    def __init__(self, num_layers: int, num_experts: int) -> None:
        super().__init__(num_layers, num_experts)
        self._version = [0] * (num_layers * num_experts)  # flat id -> version of its live heap entry
        self._heap: list[tuple[float, int, int, int]] = []
        # entries `victim` found protected, by layer: back in the heap once the pass reaches it
        self._held: dict[int, list[tuple[float, int, int, int]]] = {}
        self._busy: list[tuple[float, int, int, int]] = []  # entries found pinned, until `on_release`

    def _push(self, flat: int) -> None:
        v = self._version[flat] + 1
        self._version[flat] = v
        heapq.heappush(self._heap, (self._key(flat), self.last[flat], flat, v))
        if len(self._heap) > 4 * len(self.last) + 256:  # drop stale entries now and then
            self._compact()

    def _compact(self) -> None:
        """Rebuild the heap from the residents alone (stale entries dropped, set-aside ones back)."""
        self._heap, self._held, self._busy = [], {}, []
        for f in self.last:
            self._version[f] = v = self._version[f] + 1
            self._heap.append((self._key(f), self.last[f], f, v))
        heapq.heapify(self._heap)

    def _reach(self, layer: int) -> None:
        if layer == self._layer_now:
            return
        self._layer_now = layer
        held = self._held
        if held:
            heap = self._heap
            for lay in [lay for lay in held if lay <= layer]:
                for entry in held.pop(lay):
                    heapq.heappush(heap, entry)

    def on_evict(self, eid: ExpertId) -> None:
        flat = eid.layer * self.num_experts + eid.expert
        del self.last[flat]
        self._version[flat] += 1  # its heap entries are stale now

    def _unprotected(self, evictable: Callable[[ExpertId], bool], n: int, pinned_only: bool = False) -> list[ExpertId]:
        """Up to `n` unprotected experts `evictable` accepts, lowest key first (the victims `n`
        successive `victim` calls would return while the caller evicts each and pins what it loads)."""
        heap, held, version, last, eids = self._heap, self._held, self._version, self.last, self._eid
        planned, first_unprotected = self._planned, (self._layer_now + 1) * self.num_experts
        E = self.num_experts
        kept: list[tuple[float, int, int, int]] = []
        found: list[ExpertId] = []
        pop = heapq.heappop
        while heap:
            entry = pop(heap)
            flat = entry[2]
            if version[flat] != entry[3] or flat not in last:
                continue  # stale
            if flat >= first_unprotected and flat in planned:
                lay = flat // E  # protected: set aside until the pass reaches its layer
                if lay in held:
                    held[lay].append(entry)
                else:
                    held[lay] = [entry]
                continue
            if evictable(eids[flat]):
                found.append(eids[flat])  # the caller evicts it (on_evict): its entry would only go stale
                if len(found) == n:
                    break
                continue
            (self._busy if pinned_only else kept).append(entry)  # pinned: aside until on_release
        for entry in kept:
            heapq.heappush(heap, entry)
        return found

    def victims(self, evictable: Callable[[ExpertId], bool], n: int, layer: int) -> list[ExpertId]:
        """Up to `n` victims in one pass for the misses of `layer`, the layer the forward pass is
        at (its plans no longer protect). Unprotected ones only; `victim` covers the rest."""
        if layer != self._layer_now:
            self._reach(layer)
        return self._unprotected(evictable, n)

    def prefetch_victims(self, evictable: Callable[[ExpertId], bool], n: int) -> list[ExpertId]:
        """Victims of `n` prefetches: unprotected only (a prefetch never evicts a protected expert,
        so `victim`'s protected fallback would find nothing for it)."""
        return self._unprotected(evictable, n)

    def victim(self, evictable: Callable[[ExpertId], bool], pinned_only: bool = False) -> ExpertId | None:
        found = self._unprotected(evictable, 1, pinned_only)
        if found:
            return found[0]
        # nothing unprotected can go: the lowest-key protected one that can
        held, version, last, eids = self._held, self._version, self.last, self._eid
        E = self.num_experts
        pick: ExpertId | None = None
        if not held:
            return None
        pool = [entry for entries in held.values() for entry in entries]
        heapq.heapify(pool)
        back: list[tuple[float, int, int, int]] = []
        while pool:
            entry = heapq.heappop(pool)
            flat = entry[2]
            if version[flat] != entry[3] or flat not in last:
                continue
            if evictable(eids[flat]):
                pick = eids[flat]
                break
            back.append(entry)
        held.clear()
        for entry in back + pool:
            lay = entry[2] // E
            if lay in held:
                held[lay].append(entry)
            else:
                held[lay] = [entry]
        return pick

    def on_release(self) -> None:
        """The cache unpinned experts: the entries set aside as pinned go back into the heap."""
        heap = self._heap
        for entry in self._busy:
            heapq.heappush(heap, entry)
        self._busy = []

    def _release(self) -> None:
        if not self._held:
            return
        heap = self._heap
        for entries in self._held.values():
            for entry in entries:
                heapq.heappush(heap, entry)
        self._held = {}


class MapAwarePolicy(_PlanAwareHeap):
    """FineMoE's map-aware LFU (spec §3.7): evict the lowest p x freq first, where p is the
    expert's probability in the most recent searched map for its layer (1/E before any) and freq
    counts its uses while resident, its insertion included (reset on eviction)."""

    name = "map-lfu"
    reads_layer_probs = True

    def __init__(self, num_layers: int, num_experts: int) -> None:
        super().__init__(num_layers, num_experts)
        E = num_experts
        self.prob = [[1.0 / max(E, 1)] * E for _ in range(num_layers)]  # p of the latest searched map
        self.freq: dict[int, float] = {}  # resident flat id -> uses while resident

    def _key(self, flat: int) -> float:
        layer, e = divmod(flat, self.num_experts)
        return self.prob[layer][e] * self.freq[flat]

    def on_plan(self, plan: PrefetchPlan) -> None:
        super().on_plan(plan)
        E, freq = self.num_experts, self.freq
        for layer, probs in plan.layer_probs:
            self.prob[layer] = probs.tolist()
            for flat in range(layer * E, layer * E + E):
                if flat in freq:
                    self._push(flat)

    def on_insert(self, eid: ExpertId, step: int) -> None:
        flat = eid.layer * self.num_experts + eid.expert
        self.freq[flat] = 1.0
        self.last[flat] = step
        self._push(flat)

    def on_access(self, eid: ExpertId, step: int) -> None:
        self._reach(eid.layer)
        flat = eid.layer * self.num_experts + eid.expert
        self.freq[flat] += 1.0
        self.last[flat] = step
        self._push(flat)

    def on_evict(self, eid: ExpertId) -> None:
        super().on_evict(eid)
        del self.freq[eid.layer * self.num_experts + eid.expert]


class DecayLFUPolicy(_PlanProtection):
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
