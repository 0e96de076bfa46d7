"""Expert cache: scripted access sequences with exact victims, and invariants under random use."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch

from finemoe import victims as victims_mod
from finemoe.cache import ExpertCache
from finemoe.decay_lfu import DecayLFUPolicy
from finemoe.policy import LFUPolicy, LRUPolicy
from finemoe.pool import SlotPool
from finemoe.store import ExpertStore
from finemoe.transfer import SyncTransfer
from finemoe.types import ExpertId, ExpertPart, MoESpec

SPEC = MoESpec(
    model_type="test",
    moe_layers=(0, 1),
    num_experts=4,
    top_k=1,
    hidden_size=2,
    intermediate_size=1,
    parts=(ExpertPart("gate_up_proj", (2, 2)), ExpertPart("down_proj", (2, 1))),
    dtype=torch.float32,
    num_decoder_layers=2,
)


def filled_store(spec) -> ExpertStore:
    """A host store whose every slab is recognisable (`ExpertStore` allocates uninitialised memory,
    which may hold NaNs: `holds` would then fail at random)."""
    store = ExpertStore(spec, pin=False)
    for layer in range(spec.num_layers):
        for e in range(spec.num_experts):
            store.slab(ExpertId(layer, e)).fill_(100 * layer + e)
    return store


def make_cache(slots: int, policy, keep_whole: bool = False) -> ExpertCache:
    pool = SlotPool(SPEC, slots, torch.device("cpu"))
    return ExpertCache(SPEC, pool, filled_store(SPEC), SyncTransfer(pool), policy, keep_whole=keep_whole)


def holds(c: ExpertCache, slot: int, eid: ExpertId) -> bool:
    return all(torch.equal(a, b) for a, b in zip(c.pool.slot(slot), c.store.parts(eid), strict=True))


def use(cache: ExpertCache, layer: int, experts: list[int]) -> list[int]:
    cache.access(layer, experts)
    got = cache.acquire(layer, experts)
    cache.release(layer, got)
    return got


def evicted_by(cache: ExpertCache, layer: int, expert: int) -> ExpertId | None:
    before = set(cache.resident())
    use(cache, layer, [expert])
    gone = before - set(cache.resident())
    assert len(gone) <= 1
    return gone.pop() if gone else None


def test_lru_exact_victims():
    c = make_cache(2, LRUPolicy())
    assert evicted_by(c, 0, 0) is None
    assert evicted_by(c, 0, 1) is None
    assert evicted_by(c, 0, 0) is None  # hit, refreshes expert 0
    assert evicted_by(c, 0, 2) == ExpertId(0, 1)  # least recently used
    assert evicted_by(c, 1, 3) == ExpertId(0, 0)
    assert evicted_by(c, 0, 2) is None
    assert evicted_by(c, 0, 1) == ExpertId(1, 3)
    assert (c.stats.hits, c.stats.misses, c.stats.evictions) == (2, 5, 3)


def test_lfu_exact_victims_and_lru_tiebreak():
    c = make_cache(2, LFUPolicy())
    for e in (0, 0, 0, 1):
        use(c, 0, [e])
    assert evicted_by(c, 0, 2) == ExpertId(0, 1)  # count 0 (after insert) vs 2
    assert evicted_by(c, 0, 3) == ExpertId(0, 2)  # the newcomer has the lowest count
    use(c, 0, [3])
    assert evicted_by(c, 1, 0) == ExpertId(0, 3)  # counts reset on eviction: 1 vs 2
    c2 = make_cache(2, LFUPolicy())
    use(c2, 0, [0])
    use(c2, 0, [1])
    assert evicted_by(c2, 0, 2) == ExpertId(0, 0)  # equal counts: least recently used goes


def test_pool_holds_the_right_weights():
    c = make_cache(3, LRUPolicy())
    for layer, e in [(0, 1), (1, 2), (0, 3), (1, 0), (0, 1)]:
        use(c, layer, [e])
        slot = c.slot_of[layer][e]
        assert holds(c, slot, ExpertId(layer, e))
        assert int(c.device_table(layer)[e]) == slot
    for layer in range(2):
        for e in range(4):
            if not c.is_resident(ExpertId(layer, e)):
                assert int(c.device_table(layer)[e]) == c.num_slots  # sentinel: not resident


def test_acquired_expert_is_never_evicted():
    c = make_cache(2, LRUPolicy())
    c.access(0, [0, 1])
    assert c.acquire(0, [0, 1]) == [0, 1]
    assert not c.try_prefetch(ExpertId(1, 0))  # every slot pinned
    assert c.acquire(1, [2]) == []  # nothing can be freed yet
    c.release(0, [0])
    assert c.acquire(1, [2]) == [2]
    assert c.is_resident(ExpertId(0, 1)) and not c.is_resident(ExpertId(0, 0))


def _keeping_decay_lfu() -> DecayLFUPolicy:
    return DecayLFUPolicy(SPEC.num_layers, SPEC.num_experts)


_keeping_decay_lfu.keep_whole = True  # (make the cache with `keep_whole`, one slot short of all: 7)


@pytest.mark.parametrize("policy", [LRUPolicy, LFUPolicy, _keeping_decay_lfu])
@pytest.mark.parametrize("seed", range(5))
def test_invariants_under_random_use(policy, seed):
    rng = random.Random(seed)
    keep = getattr(policy, "keep_whole", False)
    slots = 7 if keep else rng.randint(2, 5)
    c = make_cache(slots, policy(), keep_whole=keep)
    assert c.keep_whole == keep
    pinned: dict[ExpertId, int] = {}
    accesses = 0
    for _ in range(400):
        op = rng.random()
        layer = rng.randrange(2)
        if op < 0.5:
            want = rng.sample(range(4), rng.randint(1, 3))
            c.access(layer, want)
            accesses += len(want)
            for e in c.acquire(layer, want):
                pinned[ExpertId(layer, e)] = c.slot_of[layer][e]
        elif op < 0.8 and pinned:
            eid = rng.choice(list(pinned))
            c.release(eid.layer, [eid.expert])
            del pinned[eid]
        else:
            c.try_prefetch(ExpertId(layer, rng.randrange(4)))
        assert c.resident_count() <= slots
        assert len(set(c.resident())) == c.resident_count()
        for eid, slot in pinned.items():  # acquired experts stay where they are
            assert c.slot_of[eid.layer][eid.expert] == slot and c.owner[slot] == eid
        for slot, eid in enumerate(c.owner):
            if eid is not None:
                assert c.slot_of[eid.layer][eid.expert] == slot
                assert holds(c, slot, eid)
        assert c.stats.hits + c.stats.misses == accesses
        assert sum(c.stats.layer_hits) + sum(c.stats.layer_misses) == accesses


def test_slot_windows_cover_and_bound():
    from finemoe.pair_kernels import slot_windows

    assert slot_windows([3, 9], 16, 16) == [(0, 16)]
    assert slot_windows([700, 5, 1500, 40], 2048, 512) == [(5, 36), (700, 1), (1500, 1)]
    rng = random.Random(0)
    for _ in range(50):
        slots = rng.sample(range(3000), rng.randint(1, 40))
        wins = slot_windows(slots, 3000, 256)
        assert all(size <= 256 for _, size in wins)
        assert all(any(b <= s < b + n for b, n in wins) for s in slots)


def _gated_experts(S: int, H: int, I_: int, seed: int):
    """A stand-in fused experts module (gated SiLU, no bias) and random slot parts for S experts:
    (experts, parts {name: [S, ...]}, the generator for further inputs)."""
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(seed)
    parts = {"gate_up_proj": torch.randn(S, 2 * I_, H, generator=g), "down_proj": torch.randn(S, H, I_, generator=g)}
    experts = SimpleNamespace(has_bias=False, is_transposed=False, has_gate=True, act_fn=torch.nn.functional.silu)
    experts._apply_gate = lambda x: torch.nn.functional.silu(x[..., :I_]) * x[..., I_:]
    return experts, parts, g


def test_grouped_pairs_exact_with_many_slots():
    """Group offsets must be exact for pools of thousands of slots (float histc is not)."""
    from finemoe.pair_kernels import grouped_pairs

    S, H, I_ = 6144, 8, 4
    experts, parts, g = _gated_experts(S, H, I_, seed=0)
    hidden = torch.randn(3, H, generator=g)
    idx = torch.tensor([[S - 2, S - 1], [S - 2, 5], [S, 4100]])  # S = skip
    w = torch.rand(3, 2, generator=g)
    got = grouped_pairs(experts, parts, hidden, idx, w, S).view(3, 2, H)
    for t in range(3):
        for j in range(2):
            s = int(idx[t, j])
            if s == S:
                assert torch.equal(got[t, j], torch.zeros(H))
                continue
            gate, up = (hidden[t] @ parts["gate_up_proj"][s].T).split(I_)
            want = (torch.nn.functional.silu(gate) * up) @ parts["down_proj"][s].T * w[t, j]
            assert torch.allclose(got[t, j], want, atol=1e-5)


def test_grouped_pairs_without_masking_is_bitwise_the_same():
    """`may_skip=False` (no pair can be skipped) leaves the masking out and changes no value."""
    from finemoe.pair_kernels import grouped_pairs

    S, H, I_ = 16, 8, 4
    experts, parts, g = _gated_experts(S, H, I_, seed=1)
    hidden = torch.randn(5, H, generator=g)
    idx = torch.tensor([[3, 7], [7, 0], [15, 3], [2, 9], [9, 2]])
    w = torch.rand(5, 2, generator=g)
    masked = grouped_pairs(experts, parts, hidden, idx, w, S)
    plain = grouped_pairs(experts, parts, hidden, idx, w, S, may_skip=False)
    assert torch.equal(masked, plain)
    assert masked.abs().sum() > 0


def test_batched_pairs_equal_the_grouped_call():
    """The decode-size path (gathered weights, two bmm) computes what the grouped call computes."""
    from finemoe.pair_kernels import batched_pairs, grouped_pairs

    S, H, I_ = 16, 8, 4
    experts, parts, g = _gated_experts(S, H, I_, seed=2)
    hidden = torch.randn(3, H, generator=g)
    idx = torch.tensor([[3, 7], [7, 0], [15, 3]])
    w = torch.rand(3, 2, generator=g)
    want = grouped_pairs(experts, parts, hidden, idx, w, S)
    got = batched_pairs(experts, parts, hidden, idx, w)
    assert got.shape == want.shape == (6, H)
    assert torch.allclose(got, want, atol=1e-5)


def test_batched_uses_equal_one_call_per_use():
    """`on_access_many` (one call per layer) leaves a policy exactly as `on_access` per expert."""
    import random

    from finemoe.policy import DecayLFUPolicy, LRUPolicy

    rng = random.Random(3)
    L, E = 4, 8
    seq = [(layer, sorted(rng.sample(range(E), 3))) for layer in [0, 1, 2, 3] * 5]
    one, many = DecayLFUPolicy(L, E), DecayLFUPolicy(L, E)
    lru1, lru2 = LRUPolicy(), LRUPolicy()
    for p in (one, many, lru1, lru2):
        for layer in range(L):
            for e in range(E):
                p.on_insert(ExpertId(layer, e), 0)
    for step, (layer, experts) in enumerate(seq, start=1):
        eids = [ExpertId(layer, e) for e in experts]
        for eid in eids:
            one.on_access(eid, step)
            lru1.on_access(eid, step)
        many.on_access_many(eids, step)
        lru2.on_access_many(eids, step)
    assert one.count == many.count and one.last == many.last
    assert one._layer_now == many._layer_now
    assert list(lru1._order) == list(lru2._order)
    assert one.victims(lambda eid: True, 5, 3) == many.victims(lambda eid: True, 5, 3)


def test_batched_loads_equal_one_call_per_load():
    """`on_prefetch_loads` / `on_demand_loads` (a batch of evictions, then of loads) leave decayed
    LFU as the interleaved `on_evict` + `on_insert` (`on_demand_load`) calls: the same counts, keys
    and residents, and the same victims in the same order afterwards, protection included."""
    import random

    from finemoe.policy import DecayLFUPolicy
    from finemoe.types import PrefetchPlan, PrefetchRequest

    rng = random.Random(5)
    L, E = 4, 8
    one, many = DecayLFUPolicy(L, E), DecayLFUPolicy(L, E)
    resident: set[ExpertId] = set()
    for p in (one, many):
        for layer in range(L):
            for e in range(0, E, 2):
                p.on_insert(ExpertId(layer, e), 0)
    resident = {ExpertId(layer, e) for layer in range(L) for e in range(0, E, 2)}
    for step in range(1, 60):
        layer = step % L
        plan = PrefetchPlan(tuple(PrefetchRequest(ExpertId(L - 1, e), 0.5) for e in range(2)), iteration=step // L)
        one.on_plan(plan)
        many.on_plan(plan)
        absent = sorted({ExpertId(lay, e) for lay in range(L) for e in range(E)} - resident)
        n = rng.randint(1, 3)
        loaded = sorted(rng.sample(absent, n))
        gone = sorted(rng.sample(sorted(resident), n))
        demand = rng.random() < 0.5
        if demand:  # one layer's misses
            loaded = [ExpertId(layer, e.expert) for e in loaded]
            loaded = sorted(set(loaded) - resident)
            gone = gone[: len(loaded)]
        for victim, eid in zip(gone, loaded, strict=False):
            one.on_evict(victim)
            (one.on_demand_load if demand else one.on_insert)(eid, step)
        (many.on_demand_loads if demand else many.on_prefetch_loads)(gone, loaded, step)
        resident = (resident - set(gone)) | set(loaded)
        assert one.count == many.count and one.last == many.last
        assert one._layer_now == many._layer_now
        assert one.prefetch_victims(lambda eid: True, 6) == many.prefetch_victims(lambda eid: True, 6)


def _routed(policy, iteration: int, layer: int, probs: list[float]) -> None:
    from finemoe.types import RoutingEvent

    p = torch.tensor([probs])  # [1, E]
    policy.on_routing(RoutingEvent(iteration, layer, p, p.topk(1).indices, False))


def test_router_ema_victims_equal_a_full_sort_under_random_operations():
    """router-ema's victim search (partial sorts of the lowest keys first) returns exactly what
    sorting every resident expert by (average, last use, flat id) returns, under a random mix of
    routing, inserts, evictions, uses, plans, pinned experts and tied averages."""
    from finemoe.router_ema import RouterEMAPolicy
    from finemoe.types import PrefetchPlan, PrefetchRequest

    rng = random.Random(7)
    L, E = 3, 5
    pol = RouterEMAPolicy(L, E)
    resident: dict[int, int] = {}  # flat -> last use
    planned: set[int] = set()
    step, iteration, layer_now = 0, 0, -1
    checks = 0
    for _ in range(3000):
        op = rng.random()
        flat = rng.randrange(L * E)
        eid = ExpertId(flat // E, flat % E)
        if op < 0.25:
            layer = rng.randrange(L)
            # experts 0 and 1 (and 2 and 3) of a layer always get the same probability: their keys tie
            # and the last use decides
            a, b = rng.choice([0.0, 0.5, rng.random()]), rng.choice([0.0, 0.5, rng.random()])
            probs = [a, a, b, b, rng.random()]
            _routed(pol, iteration, layer, probs)
            if rng.random() < 0.3:
                iteration += 1
                pol.on_iteration(iteration)
                planned.clear()
                layer_now = -1
        elif op < 0.45 and flat not in resident:
            step += 1
            pol.on_insert(eid, step)
            resident[flat] = step
        elif op < 0.55 and flat in resident:
            pol.on_evict(eid)
            del resident[flat]
        elif op < 0.75 and resident:
            step += 1
            layer = rng.randrange(L)
            used = [f for f in resident if f // E == layer][:2]
            pol.on_access_many([ExpertId(f // E, f % E) for f in used], step)
            for f in used:
                resident[f] = step
            if used:
                layer_now = layer
        elif op < 0.77:  # a burst of evictions and inserts with no search: stale entries pile up, compaction
            for _ in range(60):
                f = rng.randrange(L * E)
                if f in resident:
                    pol.on_evict(ExpertId(f // E, f % E))
                    del resident[f]
                else:
                    step += 1
                    pol.on_insert(ExpertId(f // E, f % E), step)
                    resident[f] = step
        elif op < 0.8:
            pick = rng.sample(range(L * E), 2)
            pol.on_plan(PrefetchPlan(tuple(PrefetchRequest(ExpertId(f // E, f % E), 1.0) for f in pick), iteration))
            planned.update(pick)
        else:
            n = rng.randrange(1, 5)
            pinned = set(rng.sample(sorted(resident), min(2, len(resident))))
            ok = lambda e, pinned=pinned: e.layer * E + e.expert not in pinned  # noqa: E731
            keys = pol.keys
            order = sorted(resident, key=lambda f: (keys[f], resident[f], f))
            free = [f for f in order if f not in pinned]
            unprot = [f for f in free if not (f // E > layer_now and f in planned)]
            prot = [f for f in free if f // E > layer_now and f in planned]
            want = [ExpertId(f // E, f % E) for f in unprot[:n]]
            assert pol.prefetch_victims(ok, n) == want
            want_one = (unprot + prot)[:1]
            assert pol.victim(ok) == (ExpertId(want_one[0] // E, want_one[0] % E) if want_one else None)
            if rng.random() < 0.5:  # the forward pass at `layer`: its plans (and earlier ones) stop protecting
                layer_now = max(layer_now, rng.randrange(L))
                unprot = [f for f in free if not (f // E > layer_now and f in planned)]
                assert pol.victims(ok, n, layer_now) == [ExpertId(f // E, f % E) for f in unprot[:n]]
            checks += 1
    assert checks > 100
    # an `evictable` that raises loses nothing
    everything = lambda eid: True  # noqa: E731

    def boom(eid):
        raise RuntimeError("predicate failed")

    with pytest.raises(RuntimeError):
        pol.prefetch_victims(boom, 3)
    assert len(pol.prefetch_victims(everything, len(resident))) == len(resident)


def test_router_ema_evicts_the_lowest_average_router_probability():
    """Hand-computed averages (alpha = 0.3): an expert's mean router probability over iterations,
    newest weighted alpha, the one before alpha (1 - alpha), and so on; near misses count, the
    average survives eviction, ties go to the least recently used, plans protect."""
    from finemoe.router_ema import RouterEMAPolicy
    from finemoe.types import PrefetchPlan, PrefetchRequest

    pol = RouterEMAPolicy(2, 4)
    assert pol.alpha == 0.3
    for e in range(4):
        pol.on_insert(ExpertId(0, e), e)
    # iteration 0: [0.5, 0.0, 0.2, 0.3]; iteration 1: [0.0, 0.3, 0.2, 0.5]
    _routed(pol, 0, 0, [0.5, 0.0, 0.2, 0.3])
    _routed(pol, 1, 0, [0.0, 0.3, 0.2, 0.5])
    # averages: e0 0.7*0.3*0.5 = 0.105, e1 0.3*0.3 = 0.09, e2 0.3*0.2 + 0.21*0.2 = 0.102,
    # e3 0.3*0.5 + 0.21*0.3 = 0.213: order e1, e2, e0, e3 (e1 was routed most recently, yet goes first)
    want = [0.105, 0.09, 0.102, 0.213]
    got = np.exp(pol.keys[:4] - pol.rate * 1)  # the average at iteration 1 (t = 1)
    assert np.allclose(got, want)
    anything = lambda eid: True  # noqa: E731
    assert pol.victims(anything, 4, 0) == [ExpertId(0, 1), ExpertId(0, 2), ExpertId(0, 0), ExpertId(0, 3)]
    # never-routed experts (layer 1) go before any routed one; among equals the least recent first
    pol.on_insert(ExpertId(1, 2), 10)
    pol.on_insert(ExpertId(1, 0), 11)
    assert pol.victim(anything) == ExpertId(1, 2)
    # eviction keeps the average: e1 evicted and re-inserted is still the first routed one
    pol.on_evict(ExpertId(0, 1))
    pol.on_insert(ExpertId(0, 1), 12)
    assert pol.victims(anything, 3, 0)[2] == ExpertId(0, 1)
    # a pending plan for layer 1 (not reached) protects (1, 2) and (1, 0): passed over while
    # anything else can go, taken only by the fallback of `victim`
    plan = PrefetchPlan((PrefetchRequest(ExpertId(1, 2), 1.0), PrefetchRequest(ExpertId(1, 0), 1.0)), iteration=2)
    pol.on_plan(plan)
    assert pol.protected(ExpertId(1, 2)) and not pol.protected(ExpertId(0, 2))
    assert pol.prefetch_victims(anything, 1) == [ExpertId(0, 1)]
    assert pol.victim(lambda eid: eid.layer == 1) == ExpertId(1, 2)
    assert pol.prefetch_victims(lambda eid: eid.layer == 1, 2) == []


SPEC3 = dataclasses.replace(SPEC, moe_layers=(0, 1, 2), num_decoder_layers=3)  # 3 layers x 4 experts


def _sweep_cache(policy, sweep: bool) -> ExpertCache:
    pool = SlotPool(SPEC3, 6, torch.device("cpu"))
    return ExpertCache(SPEC3, pool, ExpertStore(SPEC3, pin=False), SyncTransfer(pool), policy, prefill_sweep=sweep)


def _enter(c: ExpertCache, layer: int, experts: list[int]) -> None:
    c.now = (c.now[0], layer)
    got, slots = c.enter(layer, experts)
    c.release(layer, got, slots)


@pytest.mark.parametrize("sweep", [False, True])
def test_prefill_sweep_evicts_served_layers_first(sweep):
    """6 slots, 3 layers x 4 experts. A decode step leaves layer 2's experts 0, 1 resident; then a
    prefill uses all of layer 0 (4 misses, 4 free slots) and layer 1's experts 0, 1 (2 misses). LRU
    evicts layer 2's (least recent), so the prefill misses them again at layer 2; the sweep evicts
    from layer 0 (served), experts in id order, and layer 2 hits."""
    c = _sweep_cache(LRUPolicy(), sweep)
    c.begin_iteration(False)
    _enter(c, 2, [0, 1])
    c.begin_iteration(True)
    _enter(c, 0, [0, 1, 2, 3])
    _enter(c, 1, [0, 1])
    gone = {ExpertId(0, 0), ExpertId(0, 1)} if sweep else {ExpertId(2, 0), ExpertId(2, 1)}
    assert not gone & set(c.resident()) and len(c.resident()) == 6
    _enter(c, 2, [0, 1])
    assert (c.stats.hits, c.stats.misses) == ((2, 8) if sweep else (0, 10))


def test_prefill_sweep_follows_the_policy_order_among_served_layers():
    """Decayed LFU offers `victims_behind`: among the served layers its lowest keys go first. Layer
    0's experts 0, 1 were used in the decode step too (count 2), experts 2, 3 only in the prefill
    (count 1): the sweep takes 2, 3 (the id-order scan would take 0, 1); without the sweep layer
    2's go. A decode iteration after the sweep is back to the plain order (layer 2's expert 0)."""
    from finemoe.policy import DecayLFUPolicy

    for sweep, gone in ((False, {ExpertId(2, 0), ExpertId(2, 1)}), (True, {ExpertId(0, 2), ExpertId(0, 3)})):
        c = _sweep_cache(DecayLFUPolicy(3, 4), sweep)
        c.begin_iteration(False)
        c.policy.on_iteration(0)
        _enter(c, 2, [0, 1])
        _enter(c, 0, [0, 1])
        c.begin_iteration(True)
        c.policy.on_iteration(1)
        _enter(c, 0, [0, 1, 2, 3])
        _enter(c, 1, [0, 1])
        assert not gone & set(c.resident()), (sweep, c.resident())
        assert len(c.resident()) == 6
    c.begin_iteration(False)  # decode (sweeping cache): the plain order again, the oldest count-1 expert
    c.policy.on_iteration(2)
    _enter(c, 1, [2])
    assert set(c.resident()) == {
        ExpertId(0, 0),
        ExpertId(0, 1),
        ExpertId(1, 0),
        ExpertId(1, 1),
        ExpertId(1, 2),
        ExpertId(2, 1),
    }


def test_cuda_transfer_forgets_a_finished_copy():
    """`CudaTransfer.is_done`/`landed`: a slot whose copy is still running stays unfinished and keeps
    its event; once the event has completed, the slot drops it (no later wait, no later query).
    The transfer's bookkeeping alone, with stand-in events (its streams need a GPU)."""
    from finemoe.transfer import CudaTransfer

    class Event:
        def __init__(self):
            self.finished, self.queries = False, 0

        def query(self):
            self.queries += 1
            return self.finished

    tr = object.__new__(CudaTransfer)
    ev = Event()
    tr.copy_done, tr.unwaited = [ev, ev, None], [True, True, False]
    tr._queued, tr._queued_slots = [], set()
    assert not tr.is_done(0) and not tr.landed(1)
    assert tr.copy_done == [ev, ev, None] and tr.unwaited == [True, True, False]
    ev.finished = True
    assert tr.is_done(0) and tr.copy_done[0] is None and not tr.unwaited[0]
    assert tr.is_done(0) and ev.queries == 3  # forgotten: not asked again
    tr._queued_slots = {1}
    assert not tr.landed(1)  # a queued copy into the slot has not landed, whatever the old event says
    tr._queued_slots = set()
    assert tr.landed(1) and tr.copy_done[1] is None and not tr.unwaited[1] and ev.queries == 4
    assert tr.is_done(2) and ev.queries == 4


def test_a_pinned_whole_layer_is_counted_as_enter_would_and_unpinned():
    """`pin_layer` pins a layer only when every expert of it is resident; while pinned none of them
    is a victim; `account_pinned` counts the routed uses and tells the policy exactly as `enter` +
    `release` (same hits, same victims afterwards) and leaves no pin; `unpin` drops pins uncounted."""
    a, b = make_cache(5, LRUPolicy()), make_cache(5, LRUPolicy())
    for c in (a, b):
        use(c, 0, [0, 1])
        use(c, 0, [2, 3])
        use(c, 1, [0])
    assert a.pin_layer(1) is None and a.refcount == [0] * 5  # layer 1 has one expert of four
    pinned = a.pin_layer(0)
    assert pinned is not None and sorted(pinned) == sorted(a.slot_of[0])
    assert all(a.refcount[s] == 1 for s in pinned)
    # while pinned, layer 0's experts are safe: a miss in layer 1 evicts layer 1's resident expert
    use(a, 1, [1])
    assert a.slot_of[1][0] < 0 and min(a.slot_of[0]) >= 0
    use(b, 1, [1])  # (b: the same miss; LRU's victim there is layer 0's oldest, expert 0)
    assert b.slot_of[0][0] < 0
    a.unpin(pinned)
    assert a.refcount == [0] * 5 and a.stats.hits == b.stats.hits  # nothing counted
    b2 = make_cache(5, LRUPolicy())
    c2 = make_cache(5, LRUPolicy())
    for c in (b2, c2):
        use(c, 0, [0, 1])
        use(c, 0, [2, 3])
        use(c, 1, [0])
    p = c2.pin_layer(0)
    use(b2, 0, [1, 3])  # the synced path's access + acquire + release
    c2.account_pinned(0, [1, 3], p)
    assert c2.refcount == [0] * 5
    assert dataclasses.asdict(c2.stats) == dataclasses.asdict(b2.stats)
    for c in (b2, c2):  # the policy heard the same uses: the same victims follow
        use(c, 1, [2])
        use(c, 1, [3])
    assert c2.slot_of == b2.slot_of


@pytest.mark.parametrize("how", ["demand", "prefetch"])
def test_victims_spare_whole_layers_within_the_window(monkeypatch, how):
    """One expert short of all (7 slots, 2 layers x 4): layer 0 is whole, layer 1 misses expert 3.
    Decayed LFU's order is layer 0's experts (used first), then layer 1's. Loading (1, 3) evicts
    (0, 0), the policy's first, and breaks layer 0; with `keep_whole` it takes (1, 0), layer 1's
    coldest (5th in the order), so layer 0 stays whole, but only while that one is within the
    policy's next WHOLE_WINDOW candidates."""

    def victim(keep: bool, window: int) -> ExpertId:
        monkeypatch.setattr(victims_mod, "WHOLE_WINDOW", window)
        c = make_cache(7, DecayLFUPolicy(SPEC.num_layers, SPEC.num_experts), keep_whole=keep)
        assert c.keep_whole == keep
        use(c, 0, [0, 1, 2, 3])
        use(c, 1, [0, 1, 2])
        before = set(c.resident())
        if how == "demand":
            use(c, 1, [3])
        else:
            assert c.try_prefetch(ExpertId(1, 3), 0)
        (gone,) = before - set(c.resident())
        assert c.is_resident(ExpertId(1, 3))
        return gone

    assert victim(False, 16) == ExpertId(0, 0)
    assert victim(True, 16) == ExpertId(1, 0)
    assert victim(True, 4) == ExpertId(1, 0)  # 1 + 4 candidates reach layer 1's first
    assert victim(True, 3) == ExpertId(0, 0)  # 1 + 3 are all in layer 0: the policy's own


def test_keeping_whole_layers_is_off_unless_fewer_experts_than_layers_are_absent():
    """Whole layers must exist only when fewer experts than layers are absent: 7 of 8 slots (1
    absent, 2 layers) keeps them; 6 (2 absent) leaves the policy's order alone, and so does a
    policy without `candidates` (LRU)."""
    assert make_cache(7, _keeping_decay_lfu(), keep_whole=True).keep_whole
    assert not make_cache(6, _keeping_decay_lfu(), keep_whole=True).keep_whole
    assert not make_cache(7, LRUPolicy(), keep_whole=True).keep_whole


def test_decay_lfu_candidates_leave_its_victims_unchanged():
    """`candidates` lists the next victims in order without taking them: the victims found after it
    are those found without it."""

    def run(look: bool) -> list[ExpertId]:
        rng = random.Random(3)
        p = DecayLFUPolicy(SPEC.num_layers, SPEC.num_experts)
        resident: list[ExpertId] = []
        for step in range(1, 60):
            eid = ExpertId(rng.randrange(2), rng.randrange(4))
            if eid in resident:
                p.on_access(eid, step)
            else:
                p.on_insert(eid, step)
                resident.append(eid)
        if look:
            seen = p.candidates(lambda e: True, 3, -1)
            assert len(seen) == 3 and len(set(seen)) == 3
        out = []
        for _ in range(len(resident)):
            v = p.victim(lambda e: True)
            out.append(v)
            p.on_evict(v)
        return out

    with_look, without = run(True), run(False)
    assert with_look == without and len(without) == len(set(without))


def test_the_prefill_sweep_spares_whole_layers_too():
    """3 layers x 4 experts in 10 slots (2 absent, fewer than the layers). A decode step loads
    layer 0's experts 0-2, layer 1's four and layer 2's 0-2: layers 0 and 2 miss expert 3, layer 1
    is whole. A prefill then uses layer 0's three again, only expert 0 of layer 1, and misses (2, 3):
    the sweep's victim comes from the layers behind. In decayed LFU's order layer 1's experts 1-3
    (used once) go before layer 0's (twice), so without `keep_whole` (1, 1) goes and breaks layer 1;
    with it (0, 0), the first of layer 0's, which is short an expert already."""
    from finemoe.policy import DecayLFUPolicy

    gone = {}
    for keep in (False, True):
        pool = SlotPool(SPEC3, 10, torch.device("cpu"))
        policy = DecayLFUPolicy(3, 4)
        c = ExpertCache(SPEC3, pool, ExpertStore(SPEC3, pin=False), SyncTransfer(pool), policy, True, keep_whole=keep)
        assert c.keep_whole == keep
        c.begin_iteration(False)
        policy.on_iteration(0)
        _enter(c, 0, [0, 1, 2])
        _enter(c, 1, [0, 1, 2, 3])
        _enter(c, 2, [0, 1, 2])
        before = set(c.resident())
        c.begin_iteration(True)
        policy.on_iteration(1)
        _enter(c, 0, [0, 1, 2])
        _enter(c, 1, [0])
        _enter(c, 2, [3])
        (gone[keep],) = before - set(c.resident())
    assert gone == {False: ExpertId(1, 1), True: ExpertId(0, 0)}


def test_a_warm_fill_reports_each_copy_and_fills_layer_by_layer():
    """`fill_free(each)`: 6 free slots of 8 take layer 0's four experts then layer 1's first two,
    with one `each(1)` per copy (the engine's progress bar) and the slabs where they belong."""
    c = make_cache(6, LRUPolicy())
    ticks: list[int] = []
    assert c.fill_free(ticks.append) == 6 and ticks == [1] * 6
    assert set(c.resident()) == {ExpertId(0, e) for e in range(4)} | {ExpertId(1, 0), ExpertId(1, 1)}
    assert all(holds(c, slot, eid) for slot, eid in enumerate(c.owner))
    assert c.fill_free(ticks.append) == 0 and len(ticks) == 6  # nothing free: nothing loaded


def _gathering_cache(slots: int, policy, gather: bool = True) -> ExpertCache:
    pool = SlotPool(SPEC3, slots, torch.device("cpu"))
    return ExpertCache(SPEC3, pool, filled_store(SPEC3), SyncTransfer(pool), policy, gather_absent=gather)


@pytest.mark.parametrize("policy", [LRUPolicy, "decay-lfu"])
@pytest.mark.parametrize("how", ["demand", "prefetch"])
def test_gathered_absent_experts_take_their_victims_from_the_last_layer(policy, how):
    """`gather_absent`, 11 of 12 slots (3 layers x 4, one absent: the last layer holds it). Layers 0, 1
    and 2 used in that order, (0, 3) never: loading it evicts the policy's first choice, (0, 0)
    (least recent, and lowest decayed count as the earliest use), without gathering; with it the
    victim is the last layer's first choice in the policy's order, (2, 0), and layers 0 and 1 are whole."""
    gone = {}
    for gather in (False, True):
        c = _gathering_cache(11, policy() if policy is LRUPolicy else DecayLFUPolicy(3, 4), gather)
        assert c.sink == (2 if gather else -1)
        c.begin_iteration(False)
        _enter(c, 0, [0, 1, 2])
        _enter(c, 1, [0, 1, 2, 3])
        _enter(c, 2, [0, 1, 2, 3])
        before = set(c.resident())
        if how == "demand":
            _enter(c, 0, [3])
        else:
            assert c.try_prefetch(ExpertId(0, 3), 1)
        (gone[gather],) = before - set(c.resident())
    assert gone == {False: ExpertId(0, 0), True: ExpertId(2, 0)}


def test_gather_copies_back_what_layers_before_the_last_miss():
    """A decode iteration's start (`gather`) with the pool full: layer 0 misses (0, 3); it is copied
    back (counted as gathered, not as a prefetch), the victim the last layer's coldest (LRU: (2, 0));
    a second call copies nothing. Not with free slots, nor without `gather_absent`."""
    c = _gathering_cache(11, LRUPolicy())
    c.begin_iteration(False)
    assert c.gather() == 0  # free slots: nothing gathers yet
    _enter(c, 0, [0, 1, 2])
    _enter(c, 1, [0, 1, 2, 3])
    _enter(c, 2, [0, 1, 2, 3])
    c.begin_iteration(False)
    bytes_before = c.stats.bytes_copied
    assert c.gather() == 1
    assert c.is_resident(ExpertId(0, 3)) and not c.is_resident(ExpertId(2, 0))
    assert holds(c, c.slot_of[0][3], ExpertId(0, 3))
    # residency upkeep, not a prefetch: its own counter and the bytes, no prefetch statistics
    assert c.stats.gathered == 1 and c.stats.prefetches_issued == 0 and not c.prefetched[c.slot_of[0][3]]
    assert c.stats.bytes_copied == bytes_before + c.expert_bytes
    assert c.gather() == 0
    assert [min(row) >= 0 for row in c.slot_of] == [True, True, False]
    off = _gathering_cache(11, LRUPolicy(), gather=False)
    for layer in range(3):
        _enter(off, layer, [0, 1, 2, 3] if layer else [0, 1, 2])
    assert off.gather() == 0 and not off.is_resident(ExpertId(0, 3)) and off.stats.gathered == 0


def test_gathering_takes_the_last_layers_that_hold_the_absent_at_a_third_of_each():
    """The sink layers: as many of the last as hold the absent experts at up to a third of each (at
    least one), while that is at most a quarter of the layers (at least one). 3 x 4: 11 slots (1
    absent) gathers in layer 2; 10 (2 absent: 2 layers), 12 (none) and more do not. The reference
    shape, 30 x 16 at 475 slots: 5 absent fit in layer 29; Qwen1.5's 24 x 60 at 95% (72 absent, 20 a
    layer): layers 20-23; Mixtral's 32 x 8 at 243 slots: 13 absent, 2 a layer, 7 layers of 8 allowed."""
    from finemoe.victims import sink_layers

    assert _gathering_cache(11, LRUPolicy()).sink == 2
    assert _gathering_cache(10, LRUPolicy()).sink == -1
    assert _gathering_cache(12, LRUPolicy()).sink == -1
    assert _gathering_cache(11, LRUPolicy(), gather=False).sink == -1
    assert sink_layers(30, 16, 475) == 29
    assert sink_layers(24, 60, 1368) == 20
    assert sink_layers(32, 8, 243) == 25
    assert sink_layers(32, 8, 239) == -1  # 17 absent: 9 layers


def test_gather_copies_back_only_in_place_of_a_sink_layers_expert():
    """When no sink-layer expert may go (all pinned), `gather` copies nothing: it never takes a victim
    from an earlier layer (that would break it and repeat every iteration)."""
    c = _gathering_cache(11, LRUPolicy())
    c.begin_iteration(False)
    _enter(c, 0, [0, 1, 2])
    _enter(c, 1, [0, 1, 2, 3])
    _enter(c, 2, [0, 1, 2, 3])
    pinned = c.pin_layer(2)
    assert pinned is not None
    before = set(c.resident())
    assert c.gather() == 0
    assert set(c.resident()) == before and c.stats.gathered == 0
    c.unpin(pinned)
    assert c.gather() == 1 and c.is_resident(ExpertId(0, 3))
