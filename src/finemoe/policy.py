"""Eviction policies: which resident, unpinned expert leaves the device next.

Policies are plain Python over `ExpertId`s and logical steps (no clock, no CUDA, no transformers),
so the same objects drive the engine and the simulator.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

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


class _PlanAwareHeap:
    """Shared mechanism of the plan-aware policies: pending-plan protection and a heap of
    (key, last use, flat id, version) with lazy deletion, so a victim costs a few heap operations.

    Experts the latest plans selected for layers the iteration has not reached yet are protected:
    a prefetch never evicts them, a demand load only when nothing else is left. Protection is
    checked when a victim is sought (protected entries are passed over, then taken lowest key
    first if nothing else is evictable), so plans cost no heap work. Subclasses define
    `_key(flat)` (lowest goes first); ties go to the least recently used, then the lowest flat id
    l*E+e.
    """

    reads_layer_probs = False
    filters_protected = True  # `prefetch_victims` passes protected experts over itself

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.num_experts = num_experts
        self.last: dict[int, int] = {}  # resident flat id -> step of the latest use
        self._version = [0] * (num_layers * num_experts)  # flat id -> version of its live heap entry
        self._heap: list[tuple[float, int, int, int]] = []
        self._planned: set[int] = set()  # flat ids a pending plan selected
        # entries `victim` found protected, by layer: back in the heap once the pass reaches it
        self._held: dict[int, list[tuple[float, int, int, int]]] = {}
        self._busy: list[tuple[float, int, int, int]] = []  # entries found pinned, until `on_release`
        self._eid = [ExpertId(f // num_experts, f % num_experts) for f in range(num_layers * num_experts)]
        self._iteration = -1
        self._layer_now = -1
        self._sweep: list[tuple[float, int, int]] = []  # victims_behind: a heap of (key, last use, flat)
        self._sweep_at, self._sweep_upto = -1, 0  # its iteration and the layers it holds (< upto)
        self._key_of: Callable[[int], float] = self._key  # subclasses may bind a faster lookup

    # True if keys only ever rise between pushes (a use raises them): uses then push nothing and a
    # victim search re-pushes an entry whose key rose when it reaches the top (lazy increase-key;
    # the same victims, far fewer heap operations).
    _lazy = False

    def _key(self, flat: int) -> float:
        raise NotImplementedError

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

    def on_iteration(self, iteration: int) -> None:
        """Iteration `iteration` starts: plans made for earlier ones protect nothing any more (with
        no new plan, e.g. while prediction is paused, they would otherwise protect forever)."""
        if iteration > self._iteration:
            self._iteration, self._layer_now = iteration, -1
            self._planned.clear()
            if self._held:
                self._release()

    def on_plan(self, plan: PrefetchPlan) -> None:
        if plan.iteration > self._iteration:
            self._iteration, self._layer_now = plan.iteration, -1
            self._planned.clear()
            if self._held:
                self._release()
        E = self.num_experts
        self._planned.update([r[0][0] * E + r[0][1] for r in plan.requests])  # (expert (layer, e), priority)

    def _reach(self, layer: int) -> None:
        """The forward pass reached `layer`: plans for it (and earlier layers) no longer protect."""
        if layer == self._layer_now:
            return
        self._layer_now = layer
        held = self._held
        if held:
            heap = self._heap
            for lay in [lay for lay in held if lay <= layer]:
                for entry in held.pop(lay):
                    heapq.heappush(heap, entry)

    def protected(self, eid: ExpertId) -> bool:
        return eid.layer > self._layer_now and eid.layer * self.num_experts + eid.expert in self._planned

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
        lazy, key, pop = self._lazy, self._key_of, heapq.heappop
        while heap:
            entry = pop(heap)
            flat = entry[2]
            if version[flat] != entry[3] or flat not in last:
                continue  # stale
            if lazy and (entry[0] != key(flat) or entry[1] != last[flat]):
                v = version[flat] + 1  # its key rose since: back in at its current place (in place:
                version[flat] = v  # `_push` may compact and rebind the heap this loop walks)
                heapq.heappush(heap, (key(flat), last[flat], flat, v))
                continue
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
        lazy = self._lazy
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
            if lazy and (entry[0] != self._key(flat) or entry[1] != last[flat]):
                v = version[flat] + 1
                version[flat] = v
                heapq.heappush(pool, (self._key(flat), last[flat], flat, v))
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
        """Protection may have ended (the pass moved on, or a new iteration's plans): the entries
        set aside as protected go back into the heap."""
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


class DecayLFUPolicy(_PlanAwareHeap):
    """Decayed-frequency eviction with pending-plan protection (finemoe's default, a measured
    replacement of the paper's p x freq; docs/design/finemoe.md): every expert keeps a use count
    that decays by `gamma` per iteration and, unlike LFU, survives its eviction, so an expert the
    running requests keep coming back to stays. Evict the lowest decayed count first.

    The decayed count s·γ^(now - t) orders experts like log s - t·log γ, which does not change
    with `now`: that is the heap key (t in iterations, step / L).
    """

    name = "decay-lfu"
    _lazy = True  # a use adds to the decayed count: log(c·γ^Δt + 1) - t·log γ > log c - t0·log γ
    prefetch_count = 0.5  # a prefetch counts as this many uses until the router confirms it

    def __init__(self, num_layers: int, num_experts: int, gamma: float = 0.95) -> None:
        super().__init__(num_layers, num_experts)
        self.num_layers = num_layers
        self.log_gamma = math.log(gamma)
        self.count: dict[int, tuple[float, float]] = {}  # flat id -> (count, its time), every expert seen
        self._keys: dict[int, float] = {}  # flat id -> log count - time * log gamma (the heap key)
        self._key_of = self._keys.__getitem__

    def _key(self, flat: int) -> float:
        return self._keys[flat]

    def _set(self, flat: int, c: float, t: float) -> None:
        self.count[flat] = (c, t)
        self._keys[flat] = math.log(c) - t * self.log_gamma

    def _use(self, flat: int, step: int) -> None:
        t = step / self.num_layers
        c, t0 = self.count.get(flat, (0.0, t))
        self._set(flat, c * math.exp((t - t0) * self.log_gamma) + 1.0, t)

    def on_insert(self, eid: ExpertId, step: int) -> None:
        flat = eid.layer * self.num_experts + eid.expert
        if flat not in self.count:
            self._set(flat, self.prefetch_count, step / self.num_layers)
        self.last[flat] = step
        self._push(flat)

    def on_access(self, eid: ExpertId, step: int) -> None:
        if eid.layer != self._layer_now:
            self._reach(eid.layer)
        flat = eid.layer * self.num_experts + eid.expert
        self._use(flat, step)  # raises its key: the heap entry is refreshed lazily (`_lazy`)
        self.last[flat] = step

    def on_demand_load(self, eid: ExpertId, step: int) -> None:
        """`on_insert` then `on_access` of an expert just loaded: the same count, one heap entry."""
        if eid.layer != self._layer_now:
            self._reach(eid.layer)
        flat = eid.layer * self.num_experts + eid.expert
        t = step / self.num_layers
        c, t0 = self.count.get(flat, (self.prefetch_count, t))  # on_insert's count if never seen
        self._set(flat, c * math.exp((t - t0) * self.log_gamma) + 1.0, t)
        self.last[flat] = step
        self._push(flat)

    def on_prefetch_loads(self, evicted: list[ExpertId], loaded: list[ExpertId], step: int) -> None:
        """`on_evict` of each of `evicted`, then `on_insert` of each of `loaded` (none of them
        resident before, so the two sets are disjoint): the same state, one call. The heap is
        compacted at most once, at the end (its entries' order, so the victims, do not depend on when)."""
        self._loads(evicted, loaded, step, False)

    def on_demand_loads(self, evicted: list[ExpertId], loaded: list[ExpertId], step: int) -> None:
        """`on_evict` of each of `evicted`, then `on_demand_load` of each of `loaded` (one layer's
        misses): as `on_prefetch_loads`, each loaded expert used once too."""
        if loaded and loaded[0][0] != self._layer_now:
            self._reach(loaded[0][0])
        self._loads(evicted, loaded, step, True)

    def _loads(self, evicted: list[ExpertId], loaded: list[ExpertId], step: int, used: bool) -> None:
        E, last, version = self.num_experts, self.last, self._version
        for lay, e in evicted:
            flat = lay * E + e
            del last[flat]
            version[flat] += 1
        count, keys, heap, push = self.count, self._keys, self._heap, heapq.heappush
        t, lg, exp, log = step / self.num_layers, self.log_gamma, math.exp, math.log
        first = self.prefetch_count
        for lay, e in loaded:
            flat = lay * E + e
            if used:  # on_demand_load: on_insert's count if never seen, then one use
                c, t0 = count.get(flat, (first, t))
                c = c * exp((t - t0) * lg) + 1.0
                count[flat] = (c, t)
                keys[flat] = log(c) - t * lg
            elif flat not in count:  # `_set`, inlined
                count[flat] = (first, t)
                keys[flat] = log(first) - t * lg
            last[flat] = step
            version[flat] = v = version[flat] + 1
            push(heap, (keys[flat], step, flat, v))
        if len(heap) > 4 * len(last) + 256:
            self._compact()

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


# name -> factory(num_layers, num_experts)
EVICTION_POLICIES: dict[str, Callable[[int, int], EvictionPolicy]] = {
    "lru": lambda num_layers, num_experts: LRUPolicy(),
    "lfu": lambda num_layers, num_experts: LFUPolicy(),
    "map-lfu": MapAwarePolicy,
    "decay-lfu": DecayLFUPolicy,
    "router-ema": RouterEMAPolicy,
}
