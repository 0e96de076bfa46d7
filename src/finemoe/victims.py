"""Which resident experts may leave the device, and in what order: `VictimSearch`, the victim
predicates and searches `ExpertCache` runs over its residency lists (a mixin: one concept apart
from the slots, their copies and their counts).

Prefill sweep (`prefill_sweep`, on for finemoe): a prefill iteration uses nearly every expert of
every layer, in layer order, so an expert of a layer the pass has not reached is needed again
within the iteration, one of a layer it has served only in the next. Victims then come from the
served layers first (in the policy's order where it offers `victims_behind`, else the latest served
layer first, experts in id order), the policy's own search among the rest only when none is
left. LRU's order does the opposite (what the previous request used in the coming layers is the
least recent): on the Qwen1.5 / Qwen3 traces the sweep cuts LRU's simulated TTFT by 17-18%
(`docs/design/finemoe.md`, "Prefill sweep").

Whole layers kept whole (`keep_whole`, in the engine and the simulator with
`EngineConfig.keep_whole_layers`): a layer whose every expert is resident needs no copy
whatever its router picks, so a graphed decode step runs ahead of its routing sync there
(`runahead.py`); each layer an eviction breaks costs a sync. When fewer experts are absent than
there are layers (a budget near 100%: whole layers must exist), a victim in a layer that already
misses an expert is taken before the policy's first choices if it is among its next
`WHOLE_WINDOW` candidates (a policy offering `candidates`: decayed LFU), in the prefill sweep too.
At lower budgets nothing changes (and nothing is checked). Off by default: not yet measured to pay
in the engine (docs/design/device_plans.md, session 30).

Absent experts gathered in the last layers (`sink`, `EngineConfig.gather_absent`): near 100% the
absent experts are given the last few MoE layers, as many as hold them at up to a third of each
(`sink_layers`; off when that is more than a quarter of the layers). Victims come from those layers
first (the policy's order among their experts, then the policy's own search), and
`ExpertCache.gather` copies back, at each decode iteration's start with the pool full, what earlier
layers miss (the prefill's sweep breaks layers behind it). Every earlier layer is then whole: a
replayed step syncs on the sink layers' routings only. Under uniform routing the expected misses
per token do not depend on where the absent experts are (top-k x absent / E); with skew, the
coldest of the sink layers are warmer than the coldest of all. It takes precedence over
`keep_whole`; the prefill sweep keeps its own order."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from finemoe.types import ExpertId

# `keep_whole`: a victim may be passed over for one in a layer already missing an expert only if
# that one is among the policy's next WHOLE_WINDOW candidates (so it is nearly as cold; decayed LFU's
# keys often tie). On the reference traces at 99% (20 requests, warm pool) decayed LFU's decode
# layers missing an expert per token fall 4.26 -> 3.35 at 16 with the hit rate unchanged (0.99952 ->
# 0.99951); unbounded, far fewer at a lower hit rate (0.99849). LRU's order barely meets such a
# layer near its front (3.36 -> 3.35, 0.9817 -> 0.9798): it offers no `candidates`, so its victims
# stay its own
WHOLE_WINDOW = 16


def sink_layers(layers: int, experts: int, slots: int) -> int:
    """The first of the last layers the absent experts gather in (`gather_absent`): enough to hold
    them at up to a third of each layer's experts; -1 (no gathering) if none is absent or that takes
    more than a quarter of the layers."""
    absent = layers * experts - slots
    if absent <= 0:
        return -1
    n = -(-absent // max(1, experts // 3))
    return layers - n if n <= max(1, layers // 4) else -1


class VictimSearch:
    """The victim predicates and searches of `ExpertCache`, over the residency it keeps: `slot_of`
    [L][E] (slot or -1), `refcount` [S], `prefetched` / `prefetch_iteration` [S], `now`, the policy
    and the transfer."""

    slot_of: list[list[int]]
    refcount: list[int]
    prefetched: list[bool]
    prefetch_iteration: list[int]
    now: tuple[int, int]
    policy: Any
    transfer: Any
    keep_whole: bool
    sink: int
    _shaped: bool
    _sweeping: bool
    _eids: list[list[ExpertId]]
    _victims: Any
    _victims_behind: Any
    _candidates: Any
    _layer_victims: Any

    def _behind(self, evictable: Callable[[ExpertId], bool], n: int, layer: int) -> list[ExpertId]:
        """Prefill sweep: up to `n` experts `evictable` accepts in layers < `layer`: the policy's
        `victims_behind` if it has one, else the latest layer first, experts in id order; with
        `keep_whole`, those in layers missing an expert first among the next `n + WHOLE_WINDOW`."""
        if self.keep_whole:
            return self._spare_whole(self._behind_order(evictable, n + WHOLE_WINDOW, layer), n)
        return self._behind_order(evictable, n, layer)

    def _behind_order(self, evictable: Callable[[ExpertId], bool], n: int, layer: int) -> list[ExpertId]:
        """`_behind`'s candidates in the sweep's order (nothing taken: the caller evicts them)."""
        if self._victims_behind is not None:
            return self._victims_behind(evictable, n, layer)
        found: list[ExpertId] = []
        slot_of, eids = self.slot_of, self._eids
        for lay in range(layer - 1, -1, -1):
            row = slot_of[lay]
            for e, slot in enumerate(row):
                if slot >= 0 and evictable(eids[lay][e]):
                    found.append(eids[lay][e])
                    if len(found) == n:
                        return found
        return found

    def _swept(self, find: Callable, evictable: Callable[[ExpertId], bool], n: int, layer: int) -> list[ExpertId]:
        """`n` victims in a sweeping prefill: `_behind` first, then `find(predicate, m)` (the policy's
        search) among the layers from `layer` on (every evictable expert behind is taken already)."""
        found = self._behind(evictable, n, layer)
        if len(found) < n and find is not None:
            found += find(lambda eid: eid[0] >= layer and evictable(eid), n - len(found))
        return found

    def _whole_kept(self, find: Callable, evictable: Callable[[ExpertId], bool], n: int, layer: int) -> list[ExpertId]:
        """`n` victims by `find(predicate, m)` (a policy search) sparing whole layers (`keep_whole`): of
        the policy's first `n + WHOLE_WINDOW` candidates (`candidates`), those in layers with an absent
        expert first, then the rest, each in the policy's order; taken out by `find` as its own search
        would (so the policy's state is that of a search that found them)."""
        cands = self._candidates(evictable, n + WHOLE_WINDOW, layer)
        if len(cands) <= n:
            return find(evictable, n)
        chosen = set(self._spare_whole(cands, n))
        return find(lambda eid: eid in chosen, n)

    def _spare_whole(self, cands: list[ExpertId], n: int) -> list[ExpertId]:
        """`n` of `cands` (in the policy's order): those in layers missing an expert first, then the rest."""
        broken = [min(row) < 0 for row in self.slot_of]  # [L]: the layer misses an expert
        pick = [eid for eid in cands if broken[eid[0]]][:n]
        if len(pick) < n:
            pick += [eid for eid in cands if not broken[eid[0]]][: n - len(pick)]
        return pick

    def _sunk(self, find: Callable, evictable: Callable[[ExpertId], bool], n: int, layer: int) -> list[ExpertId]:
        """`n` victims by `find(predicate, m)` (a policy search that takes out what it finds, at the
        forward pass's `layer`, -1: none): those in the sink layers (from `sink` on) first, then
        the policy's own choices among the rest. A policy with `layer_victims` searches the sink
        layers alone (the same victims, without walking its order through every earlier layer)."""
        sink = self.sink
        if self._layer_victims is not None:
            found = self._layer_victims(evictable, n, sink, layer)
        else:
            found = find(lambda eid: eid[0] >= sink and evictable(eid), n)
        if len(found) < n:
            found += find(lambda eid: eid[0] < sink and evictable(eid), n - len(found))
        return found

    def _shape(self, find: Callable, evictable: Callable[[ExpertId], bool], n: int, layer: int) -> list[ExpertId]:
        """`n` victims by `find(predicate, m)` (a policy search), from the sink layers first where
        there are some (`_sunk`), else sparing whole layers (`_whole_kept`); `layer` as `_whole_kept`'s."""
        if self.sink >= 0:
            return self._sunk(find, evictable, n, layer)
        return self._whole_kept(find, evictable, n, layer)

    def _victim(self, evictable: Callable[[ExpertId], bool]) -> ExpertId | None:
        """The policy's `victim` among those `evictable` accepts: from the sink layers first where
        there are some, else sparing whole layers (`keep_whole`)."""
        victim = self.policy.victim
        if self.sink >= 0:
            found = self._sink_victim(evictable)
            return found if found is not None else victim(evictable)
        found = self._whole_kept(lambda pred, n: [v] if (v := victim(pred)) is not None else [], evictable, 1, -1)
        return found[0] if found else None

    def _sink_victim(self, evictable: Callable[[ExpertId], bool]) -> ExpertId | None:
        """The policy's `victim` among the sink layers' experts `evictable` accepts (its protected
        fallback included), or None."""
        if self._layer_victims is not None:
            found = self._layer_victims(evictable, 1, self.sink, -1, True)
            return found[0] if found else None
        sink = self.sink
        return self.policy.victim(lambda eid: eid[0] >= sink and evictable(eid))

    def _evictable(self, eid: ExpertId) -> bool:
        slot = self.slot_of[eid.layer][eid.expert]
        return self.refcount[slot] == 0

    def _landed_predicate(self, check_landed: bool = True) -> Callable[[ExpertId], bool]:
        """`_evictable_landed`: unpinned, unprotected and its copy finished (without issuing queued
        copies). A closure over the (never rebound) residency lists, asked once per candidate
        victim; a plan-blind policy protects nothing, so its check is skipped. `check_landed`
        False: `_evictable_settled`, the same predicate while every copy has landed (`settled`)."""
        slot_of, refcount, landed, protected = self.slot_of, self.refcount, self.transfer.landed, self.policy.protected
        blind = getattr(self.policy, "plan_blind", False)
        if blind and not check_landed:

            def evictable(eid: ExpertId) -> bool:
                return refcount[slot_of[eid[0]][eid[1]]] == 0

        elif blind:

            def evictable(eid: ExpertId) -> bool:
                slot = slot_of[eid[0]][eid[1]]
                return refcount[slot] == 0 and landed(slot)

        elif not check_landed:

            def evictable(eid: ExpertId) -> bool:
                return refcount[slot_of[eid[0]][eid[1]]] == 0 and not protected(eid)

        else:

            def evictable(eid: ExpertId) -> bool:
                slot = slot_of[eid[0]][eid[1]]
                return refcount[slot] == 0 and landed(slot) and not protected(eid)

        return evictable

    def _evictable_for_prefetch(self, eid: ExpertId) -> bool:
        """A prefetch may not evict what a pending plan still needs: an expert the policy protects,
        or one prefetched for a layer of this iteration not reached yet and not used so far."""
        if not self._evictable(eid) or self.policy.protected(eid):
            return False
        slot = self.slot_of[eid.layer][eid.expert]
        if self.prefetched[slot]:
            it, layer = self.now
            planned = self.prefetch_iteration[slot]
            return not (planned >= 0 and planned == it and eid.layer > layer)
        return True

    def _prefetch_predicate(self) -> Callable[[ExpertId], bool]:
        """`_evictable_for_prefetch` as one closure over the (never rebound) residency lists, for the
        policies' `prefetch_victims`: those that pass protected experts over themselves
        (`filters_protected`) are not asked `protected` again."""
        slot_of, refcount, prefetched = self.slot_of, self.refcount, self.prefetched
        planned_in = self.prefetch_iteration
        protected = None if getattr(self.policy, "filters_protected", False) else self.policy.protected
        cache = self

        def evictable(eid: ExpertId) -> bool:
            lay = eid[0]
            slot = slot_of[lay][eid[1]]
            if refcount[slot] or (protected is not None and protected(eid)):
                return False
            if prefetched[slot]:
                it, layer = cache.now
                planned = planned_in[slot]
                return not (planned >= 0 and planned == it and lay > layer)
            return True

        return evictable

    def _find_victims(self, n: int, layer: int, evictable: Callable[[ExpertId], bool]) -> list[ExpertId]:
        """Up to `n` victims `evictable` accepts for on-demand misses of `layer` in one policy pass
        (the sweep's order in a sweeping prefill); fewer when the policy offers no such pass or runs out."""
        victims = self._victims
        if self._sweeping:
            find = (lambda pred, m: victims(pred, m, layer)) if victims is not None else None
            return self._swept(find, evictable, n, layer)
        if victims is None:
            return []
        if self._shaped:
            return self._shape(lambda pred, m: victims(pred, m, layer), evictable, n, layer)
        return victims(evictable, n, layer)
