"""Pending-plan protection (`PlanProtection`), the mechanism the plan-aware eviction policies share,
and map-aware LFU (the paper's p x freq) over a heap. Decayed LFU, finemoe's default, is in
`decay_lfu`.

Experts the latest plans selected for layers the iteration has not reached yet are protected: a
prefetch never evicts them, a demand load only when nothing else is left. Protection is checked
when a victim is sought, so plans cost no ordering work. Victims go lowest key first (`_key(flat)`,
flat = l*E+e); ties go to the least recently used, then the lowest flat id.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from operator import itemgetter
from typing import Any

from finemoe.types import ExpertId, PrefetchPlan, expert_id_table

_expert = itemgetter(0)  # a PrefetchRequest's expert


class PlanProtection:
    """Pending-plan protection and the prefill sweep's order, shared by the plan-aware policies.
    `last` [resident flat id -> stamp of the latest use]; subclasses define `_key(flat)`."""

    reads_layer_probs = False
    filters_protected = True  # `prefetch_victims` passes protected experts over itself

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.num_experts = num_experts
        # resident flat id -> stamp of its latest use: its step, or a subclass's value that orders
        # residents with one key like the step does and changes with every use (decayed LFU's item)
        self.last: dict[int, Any] = {}
        self._planned: set[ExpertId] = set()  # the experts a pending plan selected
        self._eid = [e for row in expert_id_table(num_layers, num_experts) for e in row]  # by flat id l*E+e
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
        self._planned.update(map(_expert, plan.requests))  # no Python frame per request

    def _reach(self, layer: int) -> None:
        """The forward pass reached `layer`: plans for it (and earlier layers) no longer protect."""
        self._layer_now = layer

    def protected(self, eid: ExpertId) -> bool:
        return eid.layer > self._layer_now and eid in self._planned

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


class _PlanAwareHeap(PlanProtection):
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
            if flat >= first_unprotected and eids[flat] in planned:
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
