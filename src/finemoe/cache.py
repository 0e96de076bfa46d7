"""The device tier: a global pool of S expert slots, a [L, E] -> slot table and refcounts.

Invariants: at most S experts are resident; an acquired expert (refcount > 0) is never evicted;
hits + misses == accesses. The cache asks its `EvictionPolicy` for victims and its `Transfer` for
copies; it never decides what to prefetch.

Which experts may go, and in what order (the prefill sweep, whole layers kept whole, the sink
layers), is in `victims.VictimSearch`; the residency upkeep (the warm fill, the run-ahead pins, the
copies back to the layers before the sink) in `residency.ResidencyUpkeep`; the prefetch copies in
`prefetch_copies.PrefetchCopies`. `ExpertCache` extends all three."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from finemoe.config import EARLY_ISSUE_MISSES
from finemoe.policy import EvictionPolicy
from finemoe.pool import SlotPool
from finemoe.prefetch_copies import PrefetchCopies
from finemoe.residency import ResidencyUpkeep
from finemoe.store import ExpertStore
from finemoe.transfer import Transfer
from finemoe.types import CacheStats, ExpertId, MoESpec, expert_id_table
from finemoe.victims import VictimSearch, sink_layers

log = logging.getLogger(__name__)

# A layer with at least EARLY_ISSUE_MISSES on-demand misses issues its copies in growing runs while
# the acquire loop still picks slots (`enter`); `EngineConfig.early_issue_misses` sets it per engine


class ExpertCache(ResidencyUpkeep, PrefetchCopies, VictimSearch):
    """Residency of experts in the device `SlotPool`."""

    def __init__(
        self,
        spec: MoESpec,
        pool: SlotPool,
        store: ExpertStore,
        transfer: Transfer,
        policy: EvictionPolicy,
        prefill_sweep: bool = False,
        early_issue_misses: int = EARLY_ISSUE_MISSES,
        keep_whole: bool = False,
        gather_absent: bool = False,
    ) -> None:
        self.spec, self.pool, self.store, self.transfer, self.policy = spec, pool, store, transfer, policy
        self.prefill_sweep = prefill_sweep
        # misses from which a layer issues its copies in runs (0: never; needs a queueing transfer)
        self.early_issue_misses = early_issue_misses
        self._sweeping = False  # this iteration is a prefill and prefill_sweep is on
        self._on_release = getattr(policy, "on_release", None)  # optional: unpinning news for the policy
        # a transfer whose `after_compute` does nothing (`after_compute_noop`) is not called per layer
        self._after_compute = None if getattr(transfer, "after_compute_noop", False) else transfer.after_compute
        self._victims = getattr(policy, "victims", None)  # optional: several victims in one pass
        self._prefetch_victims = getattr(policy, "prefetch_victims", None)  # optional: likewise for prefetches
        self._victims_behind = getattr(policy, "victims_behind", None)  # optional: the sweep in the policy's order
        self._on_access, self._is_done = policy.on_access, transfer.is_done  # bound once: asked per access
        self._on_access_many = getattr(policy, "on_access_many", None)  # optional: a layer's uses in one call
        self._deferred_uses: tuple[list[ExpertId], int] | None = None  # `enter(defer_uses=True)`'s, until flushed
        self._on_load = getattr(policy, "on_demand_load", None)  # optional: on_insert + on_access, one call
        self._flush = getattr(transfer, "flush", None)  # optional: a transfer that queues copies issues them
        self._settled = getattr(transfer, "settled", None)  # optional: every copy issued so far has landed
        # a layer's misses in one transfer call and one policy call where both offer it (`enter`),
        # unless the transfer queues copies (`flush`: a long miss list issues them in runs meanwhile)
        self._load_many = getattr(transfer, "load_many", None)
        self._on_loads = getattr(policy, "on_demand_loads", None)
        self._batched = self._load_many is not None and self._on_loads is not None and self._flush is None
        on_prefetch_loads = getattr(policy, "on_prefetch_loads", None)  # likewise for a batch of prefetches
        self._on_prefetch_loads = on_prefetch_loads if self._load_many is not None and self._flush is None else None
        self._parts = store.parts if getattr(store, "holds_weights", True) else None  # None: no weights to copy
        self.num_slots = S = pool.num_slots
        L, E = spec.num_layers, spec.num_experts
        # victims spare whole layers where they can: only while fewer experts than layers are absent
        self._candidates = getattr(policy, "candidates", None)  # optional: a look at its next victims
        # optional: its search among the experts of the last layers (the sink's victims) alone
        self._layer_victims = getattr(policy, "layer_victims", None)
        self.absent = max(0, L * E - S)  # experts absent once the pool is full
        # the first of the sink layers (`gather_absent`, `victims.sink_layers`), or -1
        self.sink = sink_layers(L, E, S) if gather_absent else -1
        # (gathering takes precedence over keep_whole)
        self.keep_whole = keep_whole and self.sink < 0 and self.absent < L and self._candidates is not None
        self._shaped = self.keep_whole or self.sink >= 0  # victims other than the policy's own order
        self.slot_of = [[-1] * E for _ in range(L)]  # CPU truth of residency
        self._eids = expert_id_table(L, E)  # shared keys
        self.owner: list[ExpertId | None] = [None] * S
        self.refcount = [0] * S
        self.prefetched = [False] * S  # loaded by a prefetch and not used yet
        self.prefetch_iteration = [-1] * S  # the iteration a prefetched slot was planned for
        self.now = (-1, -1)  # (iteration, MoE layer) the forward pass is at; set by the prefetcher
        self._free = list(range(S - 1, -1, -1))
        self.stats = CacheStats(L)
        self.expert_bytes = spec.expert_bytes
        self.step = 0
        self.on_demand_miss: Callable[[], None] | None = None  # run before on-demand copies (pauses prefetching)
        self._demand_slots: list[int] = []  # slots of the latest on-demand copies
        self.all_resident = False  # set by preload_all: expert (l, e) sits in slot l*E + e, forever
        self._deferred: list[tuple[int, torch.Tensor]] = []  # (layer, top-k ids on device), counted later
        # Device copy of the table; sentinel S marks "not resident" (grouped_mm skips it).
        self.table = torch.full((L, E), S, dtype=torch.int32, device=pool.device)
        pin = pool.device.type == "cuda"
        self._table_host = torch.full((L, E), S, dtype=torch.int32, pin_memory=pin) if pin else self.table
        self._dirty = [False] * L
        self.table_rows_copied = 0  # device slot-table rows refreshed (`device_table`)
        self._row_copied: list[torch.cuda.Event | None] = [None] * L  # last H2D copy of each host row
        self._evictable_landed = self._landed_predicate()
        self._evictable_settled = self._landed_predicate(check_landed=False)
        self._evictable_prefetch = self._prefetch_predicate()

    def begin_iteration(self, prefill: bool) -> None:
        """An iteration starts (before any of its accesses); `prefill`: it runs prompt tokens."""
        self._sweeping = self.prefill_sweep and prefill

    # -- queries -------------------------------------------------------------------------------
    def is_resident(self, eid: ExpertId) -> bool:
        return self.slot_of[eid.layer][eid.expert] >= 0

    def resident_count(self) -> int:
        return self.num_slots - len(self._free)

    def resident(self) -> list[ExpertId]:
        return [e for e in self.owner if e is not None]

    def device_table(self, layer: int) -> torch.Tensor:
        """The layer's expert -> slot row [E] on the device (sentinel S: not resident), rebuilt
        from `slot_of` if residency changed since the last call."""
        if self._dirty[layer]:
            self.table_rows_copied += 1
            S = self.num_slots
            row = torch.tensor([s if s >= 0 else S for s in self.slot_of[layer]], dtype=torch.int32)
            if self._table_host is not self.table:
                ev = self._row_copied[layer]
                if ev is not None:  # the pinned row may still be in flight: never write under it
                    ev.synchronize()  # returns at once in practice (issued an iteration ago)
                self._table_host[layer] = row
                self.table[layer].copy_(self._table_host[layer], non_blocking=True)
                ev = torch.cuda.Event()
                stream = getattr(self.transfer, "compute_stream", None)
                ev.record(stream if stream is not None else torch.cuda.current_stream(self.table.device))
                self._row_copied[layer] = ev
            else:
                self.table[layer] = row
            self._dirty[layer] = False
        return self.table[layer]

    # -- residency changes ---------------------------------------------------------------------
    def _set(self, eid: ExpertId, slot: int) -> None:
        self.slot_of[eid.layer][eid.expert] = slot
        self._dirty[eid.layer] = True

    def _allocate(self, for_prefetch: bool = False) -> int | None:
        """A free slot, evicting the policy's victim if needed; None if every slot is pinned (or,
        for a prefetch, pinned or protected by a pending plan)."""
        if self._free:
            return self._free.pop()
        if self._sweeping:
            evictable = self._evictable_for_prefetch if for_prefetch else self._evictable_landed
            behind = self._behind(evictable, 1, self.now[1])
            if behind:
                return self._evict(behind[0])
        if for_prefetch:
            pred = self._evictable_for_prefetch
            victim = self._victim(pred) if self._shaped else self.policy.victim(pred)
        else:
            # A slot whose copy is still running would make the demand copy wait for it (the wait
            # is outside the timed copy): take it only if no landed, unprotected expert can go;
            # then the policy's own order (protected experts last).
            pred = self._evictable_landed
            victim = self._victim(pred) if self._shaped else self.policy.victim(pred)
            if victim is None:  # refuses only pinned experts: they stay pinned until `release`
                victim = self.policy.victim(self._evictable, pinned_only=True)
        if victim is None:
            return None
        return self._evict(victim)

    def _evict(self, victim: ExpertId) -> int:
        """Evict `victim` (resident, unpinned); returns its slot, now free to load into."""
        layer, expert = victim
        slot = self.slot_of[layer][expert]
        self.policy.on_evict(victim)
        self.slot_of[layer][expert] = -1
        self._dirty[layer] = True
        self.owner[slot] = None
        st = self.stats
        st.evictions += 1
        if self.prefetched[slot]:
            st.prefetches_wasted += 1
            st.prefetch_wasted_bytes += self.expert_bytes
            self.prefetched[slot] = False
        return slot

    def _load(self, eid: ExpertId, slot: int, demand: bool) -> None:
        self.transfer.load(slot, self.store.parts(eid), demand)
        self.owner[slot] = eid
        self.slot_of[eid.layer][eid.expert] = slot
        self._dirty[eid.layer] = True
        self.policy.on_insert(eid, self.step)
        st = self.stats
        st.bytes_copied += self.expert_bytes
        if demand:
            st.demand_bytes += self.expert_bytes

    # -- the forward path ----------------------------------------------------------------------
    def access(self, layer: int, experts: list[int]) -> None:
        """Count one routed use of each of `experts` (unique ids) in `layer`: hit or miss."""
        self.step += 1
        st = self.stats
        row, prefetched, done = self.slot_of[layer], self.prefetched, self.transfer.is_done
        hits = 0
        for e in experts:
            slot = row[e]
            if slot < 0:
                continue
            hit = done(slot)
            if prefetched[slot]:
                st.prefetches_used += 1
                if not hit:
                    st.prefetches_late += 1
                prefetched[slot] = False
            if hit:
                hits += 1
        misses = len(experts) - hits
        st.hits += hits
        st.misses += misses
        st.layer_hits[layer] += hits
        st.layer_misses[layer] += misses

    def acquire(self, layer: int, experts: list[int]) -> list[int]:
        """Pin as many of `experts` as fit (resident ones first, then on-demand loads).

        Returns the experts acquired; the caller computes them, calls `release`, and acquires the
        rest. With S >= k every call acquires at least one expert.
        """
        return self.enter(layer, experts, False)[0]

    def flush_uses(self) -> None:
        """Tell the policy the uses a `enter(defer_uses=True)` held back (nothing if none)."""
        held = self._deferred_uses
        if held is not None:
            self._deferred_uses = None
            self._on_access_many(*held)

    def enter(
        self, layer: int, experts: list[int], count: bool = True, defer_uses: bool = False
    ) -> tuple[list[int], list[int]]:
        """`access` then `acquire` of `experts` (sorted unique ids of `layer`) in one pass, the
        layer's first chunk: returns (experts acquired, their slots), as `acquire` and `slots`.
        `count` False: `acquire` alone (a later chunk, its accesses counted already). `defer_uses`:
        when every expert hit, a policy with `on_access_many` is told of the uses only at
        `flush_uses()` (the caller's next cache call; e.g. after a graphed segment's launch, so the
        policy's bookkeeping leaves the launch's critical path; its decisions are the same)."""
        if count:
            self.step += 1
        acquired, slots, missing, used = [], [], [], []  # used: the hits' ids, for `on_access_many`
        row, refcount, prefetched, step, st = self.slot_of, self.refcount, self.prefetched, self.step, self.stats
        row = row[layer]
        on_access, eids, many, done = self._on_access, self._eids[layer], self._on_access_many, self._is_done
        hits = 0
        settled = self._settled is not None and self._settled()  # then every copy is done: no queries
        for e in experts:
            slot = row[e]
            if slot >= 0:
                if count:  # `access`: a hit if its copy is done; a prefetch used (late if not)
                    hit = settled or done(slot)
                    if hit:
                        hits += 1
                    if prefetched[slot]:
                        st.prefetches_used += 1
                        if not hit:
                            st.prefetches_late += 1
                        prefetched[slot] = False
                elif prefetched[slot]:  # prefetched while an earlier chunk of this call ran
                    prefetched[slot] = False
                    st.prefetches_used += 1
                refcount[slot] += 1
                if many is None:
                    on_access(eids[e], step)
                else:
                    used.append(eids[e])
                acquired.append(e)
                slots.append(slot)
            else:
                missing.append(e)
        if count:
            misses = len(experts) - hits
            st.hits += hits
            st.misses += misses
            st.layer_hits[layer] += hits
            st.layer_misses[layer] += misses
        if used:  # the same uses in the same order, before any miss's
            if defer_uses and not missing:
                self._deferred_uses = (used, step)
            else:
                many(used, step)
        if missing:
            if self.on_demand_miss is not None:
                self.on_demand_miss()
            # The victims of the whole miss list in one policy pass where the policy offers it (as
            # one call per miss would pick them: what is loaded here stays pinned meanwhile).
            free = self._free
            need = len(missing) - len(free)
            # Several misses (`early_issue_misses`, 2 by default: a prefill layer or a decode step): the
            # link starts on the first copy while the loop picks the rest, issued in runs of 1, 4,
            # 16, ... (a queueing transfer issues them at once). The first copy's victim is then
            # searched alone (none with a free slot) and the rest once it is issued: the same victims
            # as one pass (what a load brings in stays pinned meanwhile) provided every layer the
            # pass served routed an expert (so the policy already stands at the layer before; a
            # layer that routed none could leave a plan's protection to the first search) and, with
            # CUDA, up to the copies that land between the two searches (then evictable too).
            flush = self._flush
            n_early = self.early_issue_misses
            early = 1 if flush is not None and 0 < n_early <= len(missing) else 0
            evictable = self._evictable_settled if settled else self._evictable_landed
            ahead, searched = [], 0
            if need > 0:
                searched = (0 if free else 1) if early else need
                if not searched:
                    pass
                elif self._sweeping or self._victims is None or self._shaped:
                    ahead = self._find_victims(searched, layer, evictable)
                else:  # `_find_victims`, one call fewer on the replay's hottest path
                    ahead = self._victims(evictable, searched, layer)
                ahead.reverse()
            first = len(slots)
            if self._batched and not early and len(ahead) >= need:
                # `_load_each` with a slot for every miss, the transfer's and the policy's calls
                # batched (`load_many`, `on_demand_loads`): the same slots, the same state after it
                slot_of, owner, dirty = self.slot_of, self.owner, self._dirty
                gone: list[ExpertId] = []
                loaded: list[ExpertId] = []
                wasted = 0
                for e in missing:
                    if free:
                        slot = free.pop()
                    else:
                        victim = ahead.pop()
                        vl, ve = victim
                        slot = slot_of[vl][ve]
                        slot_of[vl][ve] = -1
                        dirty[vl] = True
                        gone.append(victim)
                        if prefetched[slot]:
                            wasted += 1
                            prefetched[slot] = False
                    owner[slot] = eid = eids[e]
                    row[e] = slot
                    refcount[slot] += 1
                    slots.append(slot)
                    loaded.append(eid)
                new = slots[first:]
                parts = self._parts
                self._load_many(new, [parts(x) for x in loaded] if parts is not None else [[]] * len(new), True)
                self._on_loads(gone, loaded, step)
                evicted = len(gone)
            else:
                evicted, wasted = self._load_each(layer, missing, ahead, slots, step, early, max(need - searched, 0))
                new = slots[first:]
            n = len(new)
            self._demand_slots = new
            if n:
                self._dirty[layer] = True
                acquired += missing if n == len(missing) else missing[:n]
            eb = self.expert_bytes
            st.evictions += evicted
            if wasted:
                st.prefetches_wasted += wasted
                st.prefetch_wasted_bytes += wasted * eb
            st.bytes_copied += n * eb
            st.demand_bytes += n * eb
        return acquired, slots

    def _load_each(
        self, layer: int, missing: list[int], ahead: list[ExpertId], slots: list[int], step: int, early: int, rest: int
    ) -> tuple[int, int]:
        """Load `missing` (experts of `layer`) into free slots, then those of `ahead` (victims, the
        next one last), then `rest` more victims found once `ahead` runs out, then `_allocate`'s,
        pinned, their slots appended to `slots`; stops when no slot can be freed. `early` (0 or 1):
        issue the copies in runs of 1, 4, 16, ... `_evict` and `_load` inlined (the replay's
        hottest path): the same updates, in order. Returns (evictions, prefetches wasted) not yet counted."""
        free, slot_of, owner, refcount = self._free, self.slot_of, self.owner, self.refcount
        row, eids, prefetched = slot_of[layer], self._eids[layer], self.prefetched
        on_evict, on_insert, on_access = self.policy.on_evict, self.policy.on_insert, self.policy.on_access
        load, parts = self.transfer.load, self.store.parts
        loaded = self._on_load
        evicted = wasted = 0
        first = len(slots)
        flush = self._flush
        for e in missing:
            if not free and not ahead and rest:  # the rest of the victims, the first copy issued
                ahead = self._find_victims(rest, layer, self._evictable_landed)
                ahead.reverse()
                rest = 0
            if free:
                slot = free.pop()
            elif ahead:
                victim = ahead.pop()
                vl, ve = victim
                slot = slot_of[vl][ve]
                on_evict(victim)
                slot_of[vl][ve] = -1
                self._dirty[vl] = True
                owner[slot] = None
                evicted += 1
                if prefetched[slot]:
                    wasted += 1
                    prefetched[slot] = False
            else:
                self.stats.evictions += evicted
                evicted = 0
                slot = self._allocate()
                if slot is None:
                    break
            eid = eids[e]
            load(slot, parts(eid), True)
            owner[slot] = eid
            row[e] = slot
            refcount[slot] += 1
            if loaded is not None:
                loaded(eid, step)
            else:
                on_insert(eid, step)
                on_access(eid, step)
            slots.append(slot)
            if early and len(slots) - first == early:
                flush()
                early = 4 * early + 1
        return evicted, wasted

    def flush_copies(self) -> None:
        """Issue the copies the transfer queued (no-op for a transfer that issues them in `load`)."""
        if self._flush is not None:
            self._flush()

    def demand_pending(self) -> bool:
        """True while an on-demand copy issued by the latest miss is still running."""
        done = self.transfer.is_done
        return not all(map(done, self._demand_slots))

    def slots(self, layer: int, experts: list[int]) -> list[int]:
        row = self.slot_of[layer]
        return [row[e] for e in experts]

    def release(self, layer: int, experts: list[int], slots: list[int] | None = None) -> None:
        """Unpin `experts` of `layer` (`slots`: theirs, if the caller has them)."""
        refcount = self.refcount
        if slots is None:
            row = self.slot_of[layer]
            slots = [row[e] for e in experts]
        if self._after_compute is not None:
            self._after_compute(slots)
        for s in slots:
            refcount[s] -= 1
        if self._on_release is not None:
            self._on_release()

    def defer_access(self, layer: int, ids: torch.Tensor) -> None:
        """Record a use without a host sync (all-resident: every access is a hit); counted by flush."""
        self._deferred.append((layer, ids))
        if len(self._deferred) >= 4096:
            self.flush_deferred()

    def flush_deferred(self) -> None:
        for layer, ids in self._deferred:
            n = len(set(ids.view(-1).tolist()))
            self.stats.hits += n
            self.stats.layer_hits[layer] += n
            self.step += 1
        self._deferred.clear()

    def refresh_stall(self) -> None:
        """Bring lazily measured counters (stall time, deferred hits) up to date."""
        self.flush_deferred()
        self.stats.stall_s = self.transfer.demand_seconds()
