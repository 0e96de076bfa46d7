"""Decayed LFU's sorted resident list (lazily re-filed) against a brute-force reference."""

from __future__ import annotations

import random

from finemoe.decay_lfu import DecayLFUPolicy
from finemoe.types import ExpertId, PrefetchPlan, PrefetchRequest


def _reference(policy: DecayLFUPolicy, evictable, n: int, fallback: bool) -> list[ExpertId]:
    """The victims from scratch: residents by (current key, last use, flat), unprotected first."""
    E = policy.num_experts
    ranked = sorted((policy.count[f][2], t, f) for f, t in policy.last.items())
    eids = [ExpertId(f // E, f % E) for _, _, f in ranked]
    free = [e for e in eids if not policy.protected(e) and evictable(e)]
    if free or not fallback:
        return free[:n]
    spare = [e for e in eids if policy.protected(e) and evictable(e)]
    return spare[:1]


def test_decay_lfu_victims_equal_a_full_sort_through_uses_loads_plans_and_pins() -> None:
    L, E = 4, 6
    rng = random.Random(7)
    policy = DecayLFUPolicy(L, E)
    resident: set[ExpertId] = set()
    step = 0
    checked = 0
    for iteration in range(60):
        policy.on_iteration(iteration)
        # a plan for random experts of later layers (protected until the pass reaches them)
        reqs = tuple(PrefetchRequest(ExpertId(rng.randrange(1, L), rng.randrange(E)), 0.5) for _ in range(4))
        policy.on_plan(PrefetchPlan(reqs, iteration=iteration))
        for layer in range(L):
            step = iteration * L + layer
            used = sorted(rng.sample(range(E), 2))
            hits = [ExpertId(layer, e) for e in used if ExpertId(layer, e) in resident]
            policy.on_access_many(hits, step)
            pinned = set(hits)
            for e in used:
                evictable = lambda eid, pinned=pinned: eid not in pinned  # noqa: E731
                eid = ExpertId(layer, e)
                if eid in resident:
                    continue
                if len(resident) >= 8:  # full: one victim, checked against the reference first
                    fallback = rng.random() < 0.3
                    if fallback:  # half the time nothing unprotected can go: the protected fallback
                        if rng.random() < 0.5:
                            evictable = lambda eid, pinned=pinned: eid not in pinned and policy.protected(eid)  # noqa: E731
                        v = policy.victim(evictable)
                        got = [] if v is None else [v]
                    else:
                        got = policy.victims(evictable, 1, layer)  # (reaches `layer` first)
                    want = _reference(policy, evictable, 1, fallback)  # the state is that of before the search
                    assert got == want
                    checked += 1
                    if not got:
                        continue
                    policy.on_evict(got[0])
                    resident.discard(got[0])
                policy.on_demand_load(eid, step)
                resident.add(eid)
                pinned.add(eid)
            # a prefetch of up to two experts of the next layer, victims found in one pass
            if layer + 1 < L:
                evictable = lambda eid, pinned=pinned: eid not in pinned  # noqa: E731
                want_in = [ExpertId(layer + 1, e) for e in rng.sample(range(E), 2)]
                want_in = [x for x in want_in if x not in resident]
                n = max(0, len(resident) + len(want_in) - 8)
                victims = policy.prefetch_victims(evictable, n) if n else []
                ref = _reference(policy, evictable, n, False) if n else []
                assert victims == ref
                checked += 1
                loaded = want_in[: len(want_in) - (n - len(victims))]
                policy.on_prefetch_loads(victims, loaded, step)
                resident.difference_update(victims)
                resident.update(loaded)
            assert sorted(policy.last) == sorted(x.layer * E + x.expert for x in resident)
    assert checked > 200


def _sink_search_agrees(policy: DecayLFUPolicy, resident: set[ExpertId], rng: random.Random, layer: int) -> bool:
    """One check of `layer_victims` against `_walk` with the layer bound, on two copies of `policy`
    (the sink: the last one or two layers; two pinned experts; sometimes only protected ones
    evictable, then the fallback); True if the fallback gave a protected expert."""
    import copy

    first = rng.choice((policy.num_layers - 1, policy.num_layers - 2))
    pinned = set(rng.sample(sorted(resident), 2))
    protected_only = rng.random() < 0.3
    fallback = protected_only or rng.random() < 0.3
    at = rng.choice((-1, layer))
    n = 1 if fallback else rng.randrange(1, 4)
    a, b = copy.deepcopy(policy), copy.deepcopy(policy)

    def evictable(p: DecayLFUPolicy):
        return lambda x: x not in pinned and (not protected_only or p.protected(x))

    got = a.layer_victims(evictable(a), n, first, at, fallback)
    if at >= 0 and at != b._layer_now:
        b._reach(at)
    in_b = evictable(b)
    want = b._walk(lambda x: x[0] >= first and in_b(x), n, fallback)
    assert got == want
    assert all(x[0] >= first for x in got)
    after_a = a.prefetch_victims(lambda x: x not in pinned, 3)  # what the searches left in the list
    after_b = b.prefetch_victims(lambda x: x not in pinned, 3)
    assert after_a == after_b and not set(after_a) & set(got)
    return bool(fallback and got and a.protected(got[0]))


def test_layer_victims_are_the_walks_victims_among_the_last_layers() -> None:
    """`layer_victims` (the sink layers' search, from their residents) finds what `_walk` finds with
    the layer bound in its predicate, protected fallback included, and takes them out of the list the
    same way: the searches that follow on either copy agree too."""
    L, E = 5, 6
    rng = random.Random(11)
    policy = DecayLFUPolicy(L, E)
    resident: set[ExpertId] = set()
    checked = fallbacks = 0
    for iteration in range(50):
        policy.on_iteration(iteration)
        reqs = tuple(PrefetchRequest(ExpertId(rng.randrange(1, L), rng.randrange(E)), 0.5) for _ in range(6))
        policy.on_plan(PrefetchPlan(reqs, iteration=iteration))
        for layer in range(L):
            step = iteration * L + layer
            used = [ExpertId(layer, e) for e in sorted(rng.sample(range(E), 2))]
            policy.on_access_many([x for x in used if x in resident], step)
            kept = set(used)
            for eid in used:
                if eid in resident:
                    continue
                if len(resident) >= 20:
                    victims = policy.victims(lambda x, kept=kept: x not in kept, 1, layer)
                    if not victims:
                        continue
                    policy.on_evict(victims[0])
                    resident.discard(victims[0])
                policy.on_demand_load(eid, step)
                resident.add(eid)
            if len(resident) >= 20:
                fallbacks += _sink_search_agrees(policy, resident, rng, layer)
                checked += 1
    assert checked > 100 and fallbacks > 3
