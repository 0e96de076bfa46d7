"""Prefetch path: in-flight limit, priority order, pause on a miss, and the simple predictors."""

from __future__ import annotations

import pytest
import torch

from finemoe.cache import ExpertCache
from finemoe.policy import LRUPolicy
from finemoe.pool import SlotPool
from finemoe.predictor import NonePredictor, PredictorDeps, PreviousTokenPredictor
from finemoe.prefetcher import LinkWindow, Prefetcher
from finemoe.store import ExpertStore
from finemoe.types import ExpertId, IterationContext, PrefetchPlan, PrefetchRequest, RoutingEvent

from tests.test_cache import SPEC


class ManualTransfer:
    """Copies at once, but reports each copy as running until `finish()` (a stand-in for a link)."""

    def __init__(self, pool):
        self.pool, self.running, self.log = pool, set(), []

    def load(self, slot, src, demand):
        for dst, part in zip(self.pool.slot(slot), src, strict=True):
            dst.copy_(part)
        self.running.add(slot)
        self.log.append(("demand" if demand else "prefetch", slot))

    def is_done(self, slot):
        return slot not in self.running

    def landed(self, slot):
        return slot not in self.running

    def finish(self):
        self.running.clear()

    def before_compute(self, slots):
        pass

    def after_compute(self, slots):
        pass

    def demand_seconds(self):
        return 0.0

    def synchronize(self):
        self.running.clear()


def setup(slots=6, inflight=2):
    store = ExpertStore(SPEC, pin=False)
    pool = SlotPool(SPEC, slots, torch.device("cpu"))
    tr = ManualTransfer(pool)
    cache = ExpertCache(SPEC, pool, store, tr, LRUPolicy())
    return cache, Prefetcher(cache, max_inflight=inflight), tr


def plan(*items, replace=False):
    return PrefetchPlan(tuple(PrefetchRequest(ExpertId(layer, e), p) for layer, e, p in items), replace)


def test_inflight_limit_and_priority_order():
    cache, pf, tr = setup(inflight=2)
    pf.submit(plan((1, 0, 0.1), (1, 1, 0.9), (1, 2, 0.5), (1, 3, 0.7)))
    assert pf.pump() == 2
    assert [cache.owner[s] for _, s in tr.log] == [ExpertId(1, 1), ExpertId(1, 3)]  # highest first
    assert pf.pump() == 0  # both still in flight
    tr.finish()
    assert pf.pump() == 2
    assert cache.stats.prefetches_issued == 4


def test_idle_is_true_only_while_nothing_is_queued():
    """`Prefetcher.idle` lets the stepper skip a `pump` that would return at once: it may lag
    (False while empty, until a pump sees it) but is never True with a request queued or posted."""
    cache, pf, tr = setup(inflight=1)
    assert pf.idle and pf.pump() == 0 and pf.idle
    pf.submit(plan((1, 0, 0.5), (1, 1, 0.4)))
    assert not pf.idle
    assert pf.pump() == 1 and not pf.idle and pf.pending() == 1
    tr.finish()
    assert pf.pump() == 1 and pf.pending() == 0 and not pf.idle  # drained: still False until a pump sees it
    assert pf.pump() == 0 and pf.idle
    pf.post(plan((0, 2, 0.3)))  # from another thread
    assert not pf.idle
    tr.finish()
    assert pf.pump() == 1 and cache.is_resident(ExpertId(0, 2))
    pf.submit(None)
    pf.submit(plan())  # an empty plan queues nothing
    assert pf.pump() == 0 and pf.idle


def test_replace_drops_queued_requests():
    cache, pf, tr = setup(inflight=1)
    pf.submit(plan((1, 0, 0.5), (1, 1, 0.4)))
    pf.submit(plan((0, 3, 0.1), replace=True))
    assert pf.pump() == 1 and pf.pending() == 0
    assert cache.is_resident(ExpertId(0, 3)) and not cache.is_resident(ExpertId(1, 0))


def test_a_planned_expert_evicted_before_its_turn_is_copied_back():
    """A plan's request for an expert resident when the plan arrives stays queued: if a demand
    load evicts that expert before the request's turn, the prefetch brings it back."""
    cache, pf, tr = setup(slots=2, inflight=1)
    for e in (0, 1):  # (1, 0) and (1, 1) resident, (1, 0) the least recently used
        cache.access(1, [e])
        cache.acquire(1, [e])
        cache.release(1, [e])
    tr.finish()
    pf.submit(plan((1, 0, 0.9), (0, 2, 0.5)))  # (1, 0) is resident now
    cache.access(0, [3])
    cache.acquire(0, [3])  # a miss: evicts the LRU (1, 0) and pauses prefetching
    cache.release(0, [3])
    assert not cache.is_resident(ExpertId(1, 0))
    tr.finish()
    assert pf.pump() == 1  # the queued request for (1, 0) comes first
    assert cache.is_resident(ExpertId(1, 0)) and cache.stats.prefetches_issued == 1


def test_miss_pauses_prefetching_until_demand_copy_done():
    cache, pf, tr = setup(inflight=4)
    pf.submit(plan((1, 0, 0.5), (1, 1, 0.4)))
    cache.access(0, [2])
    assert cache.acquire(0, [2]) == [2]  # a miss: on-demand copy, prefetching paused
    assert tr.log == [("demand", cache.slot_of[0][2])]
    assert pf.pump() == 0  # the demand copy is still running: nothing else starts
    tr.finish()
    assert pf.pump() == 2
    assert [kind for kind, _ in tr.log] == ["demand", "prefetch", "prefetch"]


def test_late_and_wasted_prefetch_accounting():
    cache, pf, tr = setup(slots=2, inflight=4)
    pf.submit(plan((0, 0, 0.9), (0, 1, 0.8)))
    pf.pump()
    cache.access(0, [0])  # copy still running: a late prefetch, counted as a miss
    assert cache.stats.prefetches_late == 1 and cache.stats.misses == 1
    tr.finish()
    cache.acquire(0, [0])
    cache.release(0, [0])
    cache.access(1, [3])
    cache.acquire(1, [3])  # evicts the never-used prefetch of (0, 1)
    assert cache.stats.prefetches_wasted == 1 and cache.stats.prefetches_used == 1


def test_demand_load_prefers_a_landed_victim_over_a_copy_in_flight():
    cache, pf, tr = setup(slots=2, inflight=4)
    pf.submit(plan((0, 0, 0.9)))
    pf.pump()  # (0, 0) prefetched first: LRU's first victim, but its copy is still running
    tr.running.clear()
    cache.acquire(1, [1])
    cache.release(1, [1])
    tr.running = {cache.slot_of[0][0]}  # (1, 1) landed, more recently used
    cache.acquire(1, [2])  # a miss with the pool full: evict (1, 1), not the in-flight (0, 0)
    assert cache.is_resident(ExpertId(0, 0)) and not cache.is_resident(ExpertId(1, 1))
    cache.release(1, [2])
    tr.running = {cache.slot_of[0][0], cache.slot_of[1][2]}
    cache.acquire(0, [3])  # nothing landed: LRU order again, the in-flight (0, 0) goes
    assert not cache.is_resident(ExpertId(0, 0)) and cache.is_resident(ExpertId(1, 2))


def test_demand_load_takes_unprotected_in_flight_before_protected():
    from finemoe.policy import DecayLFUPolicy

    store = ExpertStore(SPEC, pin=False)
    pool = SlotPool(SPEC, 3, torch.device("cpu"))
    tr = ManualTransfer(pool)
    cache = ExpertCache(SPEC, pool, store, tr, DecayLFUPolicy(SPEC.num_layers, SPEC.num_experts))
    pf = Prefetcher(cache, max_inflight=4)
    pf.now(0, -1)
    pf.submit(PrefetchPlan((PrefetchRequest(ExpertId(0, 1), 0.5), PrefetchRequest(ExpertId(1, 2), 0.5)), iteration=0))
    cache.acquire(0, [0])  # the pass reaches layer 0; (0, 0) stays pinned
    tr.running.clear()
    assert pf.pump() == 2
    tr.running = {cache.slot_of[0][1]}  # (0, 1) in flight and unprotected now; (1, 2) landed, planned
    cache.acquire(0, [3])  # the in-flight unprotected one goes before the protected one
    assert cache.is_resident(ExpertId(1, 2)) and not cache.is_resident(ExpertId(0, 1))


def test_plans_of_a_past_iteration_protect_nothing():
    """A plan protects its experts for its own iteration only: once the next iteration starts
    (even one without plans, e.g. prediction paused), a demand load may evict them."""
    from finemoe.policy import DecayLFUPolicy

    store = ExpertStore(SPEC, pin=False)
    pool = SlotPool(SPEC, 2, torch.device("cpu"))
    tr = ManualTransfer(pool)
    policy = DecayLFUPolicy(SPEC.num_layers, SPEC.num_experts)
    cache = ExpertCache(SPEC, pool, store, tr, policy)
    pf = Prefetcher(cache, max_inflight=4)
    pf.now(0, -1)
    pf.submit(PrefetchPlan((PrefetchRequest(ExpertId(1, 2), 0.5),), iteration=0))
    assert pf.pump() == 1
    tr.finish()
    pf.now(0, 0)
    cache.release(0, cache.acquire(0, [0]))
    assert policy.protected(ExpertId(1, 2))  # layer 1 of iteration 0 not reached yet
    pf.now(1, -1)  # iteration 1 starts, no plan for it
    pf.now(1, 0)
    assert not policy.protected(ExpertId(1, 2))
    cache.release(0, cache.acquire(0, [3]))  # needs a slot: the once-planned (1, 2) may go now
    assert not cache.is_resident(ExpertId(1, 2)) and cache.is_resident(ExpertId(0, 0))


def test_a_posted_replacing_plan_keeps_the_same_iterations_plans():
    """A replacing plan posted from the searcher (thread or process) may arrive after the forward
    thread queued plans for the same iteration: it drops only earlier iterations' requests."""
    cache, pf, tr = setup(slots=6, inflight=1)
    pf.now(0, -1)
    pf.submit(PrefetchPlan((PrefetchRequest(ExpertId(1, 0), 0.9),), iteration=0))  # an old iteration's
    pf.now(1, 0)
    pf.submit(PrefetchPlan((PrefetchRequest(ExpertId(1, 1), 0.5),), iteration=1))  # the gate, direct
    pf.post(PrefetchPlan((PrefetchRequest(ExpertId(1, 2), 0.7),), replace=True, iteration=1))  # late
    assert pf.pump() == 1
    assert pf.pending() == 1  # (1, 1) kept, (1, 0) dropped
    tr.finish()
    assert pf.pump() == 1
    assert cache.is_resident(ExpertId(1, 2)) and cache.is_resident(ExpertId(1, 1))
    assert not cache.is_resident(ExpertId(1, 0))
    # submitted on the forward thread, a replacing plan still clears the whole queue
    pf.submit(PrefetchPlan((PrefetchRequest(ExpertId(1, 3), 0.1),), iteration=1))
    pf.submit(PrefetchPlan((PrefetchRequest(ExpertId(0, 3), 0.2),), replace=True, iteration=1))
    assert pf.pending() == 1


def event(layer, ids, iteration=0):
    t = torch.tensor(ids).view(-1, 1)
    return RoutingEvent(iteration, layer, torch.zeros(len(ids), 4), t, False)


def test_previous_token_predictor_plans_next_layer_from_last_iteration():
    p = PreviousTokenPredictor(PredictorDeps(SPEC, 1))
    assert p.on_routing(event(0, [1, 2])) is None  # layer 1 never ran: nothing to predict
    assert p.on_routing(event(1, [3])) is None  # last layer: the next iteration's start plans
    start = p.on_iteration_start(ctx(1))
    assert {r.expert for r in start.requests} == {ExpertId(0, 1), ExpertId(0, 2)} and start.replace
    nxt = p.on_routing(event(0, [0], iteration=1))
    assert [r.expert for r in nxt.requests] == [ExpertId(1, 3)]
    assert NonePredictor(PredictorDeps(SPEC, 1)).on_routing(event(0, [1])) is None


def ctx(iteration, n=1, is_prefill=False):
    return IterationContext(iteration, is_prefill, n, torch.arange(n), torch.arange(n))


def test_link_window_allows_what_the_link_copies_in_one_layer():
    t = [0.0]
    copy_s = [0.0]
    w = LinkWindow(4, lambda: t[0], lambda: copy_s[0])
    assert w.limit == 4  # nothing measured yet: the configured maximum
    w.on_layer(0, 0)
    t[0] = 1.0
    copy_s[0] = 0.3
    w.on_layer(0, 1)  # layer time 1.0, copy 0.3 -> 3 copies fit
    assert w.layer_s == 1.0 and w.limit == 3
    t[0] = 3.0
    w.on_layer(0, 3)  # not the next layer: no gap measured
    assert w.layer_s == 1.0
    t[0] = 5.0  # gap 2.0 -> moving average 1.0 + 0.1 * (2.0 - 1.0)
    w.on_layer(0, 4)
    assert w.layer_s == pytest.approx(1.1) and w.limit == 3
    copy_s[0] = 5.0  # a link slower than a layer still lets one prefetch run
    t[0] += 1.0
    w.on_layer(0, 5)
    assert w.limit == 1
    copy_s[0] = 0.01  # never above the configured maximum
    t[0] += 1.0
    w.on_layer(0, 6)
    assert w.limit == 4
    t[0] += 50.0
    w.on_layer(1, 0)  # a new iteration: the gap across iterations is not a layer
    assert w.layer_s < 2.0


def test_fixed_window_and_prefetcher_follow_the_limit():
    fixed = LinkWindow(4, lambda: 0.0, lambda: 1.0, adaptive=False)
    fixed.on_layer(0, 0)
    fixed.on_layer(0, 1)
    assert fixed.limit == 4
    cache, _, tr = setup(slots=6, inflight=4)
    window = LinkWindow(4)
    window.limit = 1  # as a slow link would set it
    pf = Prefetcher(cache, 4, window)
    pf.submit(plan((0, 0, 0.9), (0, 1, 0.8), (1, 0, 0.7)))
    assert pf.pump() == 1  # one copy in flight at a time
    assert pf.pump() == 0
    tr.finish()
    assert pf.pump() == 1


def test_prefetch_window_setting_is_checked():
    from finemoe.config import EngineConfig
    from finemoe.errors import ConfigError

    with pytest.raises(ConfigError, match="prefetch_window"):
        EngineConfig(prefetch_window="wide")


class _Watcher:
    """A predictor that records, per routing it sees, the copies issued so far and plans one expert."""

    def __init__(self, tr, target):
        self.tr, self.target, self.seen = tr, target, []

    def on_iteration_start(self, ctx):
        return None

    def on_routing(self, ev):
        self.seen.append(list(self.tr.log))
        return PrefetchPlan((PrefetchRequest(self.target, 0.9),), iteration=ev.iteration)


@pytest.mark.parametrize("after_demand", [False, True])
def test_predictors_see_a_layer_before_or_after_its_demand_copies(after_demand):
    """`Stepper.serve(..., event)` hands the routing to the predictors once the layer's on-demand
    copies are issued; a `route` call before `serve` hands it over before any copy. Either way the
    plan's prefetch is issued after the demand copies (a miss pauses prefetching until they land)."""
    from finemoe.stepper import Stepper

    cache, pf, tr = setup(slots=4, inflight=2)
    watcher = _Watcher(tr, ExpertId(1, 2))
    st = Stepper(cache, pf, [watcher])
    st.begin(0, ctx(0, is_prefill=True))
    ev = event(0, [0, 1])
    if not after_demand:
        st.route(ev)
    ran = []
    st.serve(0, 0, [0, 1], lambda got, slots, whole: ran.append(list(got)), ev if after_demand else None)
    assert ran == [[0, 1]]
    assert watcher.seen == [[("demand", 0), ("demand", 1)] if after_demand else []]
    assert [kind for kind, _ in tr.log] == ["demand", "demand"]  # the plan waits for them (a miss pauses)
    tr.finish()
    assert pf.pump() == 1 and tr.log[-1] == ("prefetch", 2)
    assert st.deferred_s > 0 if after_demand else st.deferred_s == 0


def test_a_failing_deferred_predictor_leaves_nothing_pinned():
    """A predictor that raises while `serve` hands it the layer's routing (after the demand copies
    were issued) must not leave the layer's slots pinned: the request fails, the cache serves on."""
    from finemoe.stepper import Stepper

    class Failing(_Watcher):
        def on_routing(self, ev):
            raise RuntimeError("predictor failed")

    cache, pf, tr = setup(slots=4, inflight=2)
    st = Stepper(cache, pf, [Failing(tr, ExpertId(1, 2))])
    st.begin(0, ctx(0, is_prefill=True))
    with pytest.raises(RuntimeError, match="predictor failed"):
        st.serve(0, 0, [0, 1], lambda got, slots, whole: None, event(0, [0, 1]))
    assert cache.refcount == [0, 0, 0, 0]
    assert cache.is_resident(ExpertId(0, 0)) and cache.is_resident(ExpertId(0, 1))  # loaded, unpinned


@pytest.mark.parametrize("pump_first", [True, False])
def test_a_graphed_serve_tells_the_policy_of_its_hits_after_the_launch(pump_first):
    """`serve(pump_first=False)` (a graphed step: `compute` launches the segment) holds an all-hit
    layer's uses back from the policy until `compute` returned, then tells it before any prefetch
    is issued; a layer with a miss tells it at once (its victim search needs them). Either way the
    policy sees the same uses, and the eviction that follows picks the same victim."""
    from finemoe.stepper import Stepper

    order: list[tuple] = []

    class Recording(LRUPolicy):
        def on_access_many(self, eids, step):
            order.append(("uses", tuple(eids), step))
            super().on_access_many(eids, step)

    store = ExpertStore(SPEC, pin=False)
    pool = SlotPool(SPEC, 3, torch.device("cpu"))
    tr = ManualTransfer(pool)
    cache = ExpertCache(SPEC, pool, store, tr, Recording())
    pf = Prefetcher(cache, max_inflight=2)
    st = Stepper(cache, pf, [])
    launch = lambda got, slots, whole: order.append(("launch", tuple(got)))  # noqa: E731
    st.begin(0, None)
    st.serve(0, 0, [0, 1, 2], launch, pump_first=pump_first)  # three misses: uses told before the launch
    tr.finish()
    st.serve(1, 0, [0, 2], launch, pump_first=pump_first)  # all hits
    st.serve(2, 0, [0, 3], launch, pump_first=pump_first)  # a hit and a miss: LRU evicts expert 1
    hits_at = order.index(("launch", (0, 2)))
    if pump_first:
        assert order[hits_at - 1] == ("uses", (ExpertId(0, 0), ExpertId(0, 2)), 2)
    else:
        assert order[hits_at + 1] == ("uses", (ExpertId(0, 0), ExpertId(0, 2)), 2)
    assert [o for o in order if o[0] == "uses"] == [
        ("uses", (ExpertId(0, 0), ExpertId(0, 2)), 2),
        ("uses", (ExpertId(0, 0),), 3),
    ]
    assert order[-2:] == [("uses", (ExpertId(0, 0),), 3), ("launch", (0, 3))]
    assert not cache.is_resident(ExpertId(0, 1)) and cache.is_resident(ExpertId(0, 3))
    assert cache.refcount == [0, 0, 0] and cache._deferred_uses is None


def test_a_graphed_serve_clocks_the_prefetch_window_after_the_launch():
    """`serve(pump_first=False)`: the adaptive window is told of the layer after `compute` (the
    launch) returned, with the time read when the layer was reached, so its numbers are those an
    update before the launch would give."""
    from finemoe.stepper import Stepper

    ticks = iter(range(100, 200))
    clock_reads: list[float] = []

    def clock():
        clock_reads.append(float(next(ticks)))
        return clock_reads[-1]

    store = ExpertStore(SPEC, pin=False)
    pool = SlotPool(SPEC, 4, torch.device("cpu"))
    tr = ManualTransfer(pool)
    cache = ExpertCache(SPEC, pool, store, tr, LRUPolicy())
    window = LinkWindow(4, clock, 1.0)
    pf = Prefetcher(cache, max_inflight=4, window=window)
    st = Stepper(cache, pf, [])
    seen = []
    launch = lambda got, slots, whole: seen.append(window._last)  # noqa: E731
    st.begin(0, None)
    st.serve(0, 0, [0, 1], launch, pump_first=False)  # (two misses, loaded in one chunk)
    tr.finish()
    st.serve(0, 1, [0, 1], launch, pump_first=False)
    assert seen == [None, (0, 0, 100.0)]  # at each launch the window had not seen the layer yet
    assert window._last == (0, 1, 101.0) and clock_reads == [100.0, 101.0]
    assert window.layer_s == 1.0
