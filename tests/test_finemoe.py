"""FineMoE mechanisms with hand-computed expectations: the map store, semantic and trajectory
matching, δ selection, priority order, batch merging, map-aware eviction and the predictor."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from finemoe.config import EngineConfig
from finemoe.errors import ConfigError
from finemoe.expert_map import ExpertMapStore, StoreGeometry, TrajectoryQuery
from finemoe.fine_predictor import FineMoEPredictor
from finemoe.history import HistoryRecorder, PredictorChain
from finemoe.policy import MapAwarePolicy
from finemoe.predictor import PredictorDeps, merge_rows, plan_for_layer, select_by_delta, select_one
from finemoe.types import ExpertId, IterationContext, PrefetchPlan, PrefetchRequest, RoutingEvent

from tests.test_cache import SPEC as SPEC1

SPEC = dataclasses.replace(SPEC1, top_k=2)  # 2 MoE layers, 4 experts, top-2


def store(capacity=4, distance=1, layers=2, experts=2, dim=2):
    return ExpertMapStore(StoreGeometry(layers, experts, dim), capacity, distance)


def test_store_appends_then_replaces_most_redundant_row():
    s = store(capacity=2, distance=1)  # L=2, d=1: RDY = 0.5 cos(emb) + 0.5 cos(map)
    a_map = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b_map = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert s.add(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.stack([a_map, b_map])) == [0, 1]
    assert s.size == 2 and s.replacements == 0
    # c: embedding like b's, map like a's -> RDY vs a = 0.5*0 + 0.5*1, vs b = 0.5*1 + 0.5*0: a tie
    # broken to the first row; d: embedding and map both like b's -> replaces b (RDY 1 vs 0).
    c = (torch.tensor([[0.0, 2.0]]), a_map.unsqueeze(0))
    rdy = s.redundancy(*c)
    assert torch.allclose(rdy, torch.tensor([[0.5, 0.5]]))
    d_map = torch.tensor([[0.0, 3.0], [0.0, 1.0]])
    rows = s.add(torch.tensor([[0.0, 1.0]]), d_map.unsqueeze(0))
    assert rows == [1] and s.replacements == 1
    assert torch.equal(s.maps[1], d_map) and torch.equal(s.maps[0], a_map)
    # Prefix norms follow the written row: layer 0 -> 9, layers 0..1 -> 10.
    assert s.prefix_sq[1].tolist() == [9.0, 10.0]


def test_sequential_replacement_sees_earlier_inserts():
    s = store(capacity=2, distance=1)
    s.add(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[[1.0, 0.0]] * 2, [[0.0, 1.0]] * 2]))
    # Two identical new rows, both most like row 0. The first lands in row 0; the second is then
    # most redundant with that new row (RDY 1) and replaces it again, never row 1.
    x = torch.tensor([[1.0, 0.1], [1.0, 0.1]])
    m = torch.tensor([[[1.0, 0.1]] * 2] * 2)
    assert s.add(x, m) == [0, 0]
    assert torch.equal(s.maps[1], torch.tensor([[0.0, 1.0]] * 2))


def test_store_memory_grows_with_use_and_keeps_rows():
    g = torch.Generator().manual_seed(1)
    s = ExpertMapStore(StoreGeometry(3, 4, 5), capacity=100)
    assert s.allocated == 0 and s.nbytes() == 0
    emb, maps = torch.randn(90, 5, generator=g), torch.rand(90, 3, 4, generator=g)
    for i in range(0, 90, 30):  # 30, 60 (first allocation: 64 rows), 90 (grown to 100 = capacity)
        s.add(emb[i : i + 30], maps[i : i + 30])
    assert s.size == 90 and s.allocated == 100
    assert torch.equal(s.maps[:90], maps) and torch.equal(s.by_layer[:, :90], maps.transpose(0, 1))
    q = TrajectoryQuery(s, 1)
    score, row = q.best(0, maps[7, 0])
    assert row == 7 and score == pytest.approx(1.0, abs=1e-6)


def test_redundancy_equals_its_formula_after_growth_and_replacements():
    """`redundancy` reads the stored maps' unit rows kept per write (`maps_unit`): after the store
    grew (rows copied to a larger allocation) and replaced rows, the same numbers, bit for bit, as
    normalising every stored map again (the formula of spec §3.2)."""
    g = torch.Generator().manual_seed(2)
    s = ExpertMapStore(StoreGeometry(3, 4, 5), capacity=100, distance=1)
    emb, maps = torch.randn(130, 5, generator=g), torch.rand(130, 3, 4, generator=g)
    for i in range(0, 130, 10):  # grows 64 -> 100, then 30 replacements
        s.add(emb[i : i + 10], maps[i : i + 10])
    assert s.size == 100 and s.replacements == 30
    q_emb, q_maps = torch.randn(3, 5, generator=g), torch.rand(3, 3, 4, generator=g)
    unit = q_emb / q_emb.norm(dim=1, keepdim=True).clamp_min(1e-12)
    flat = q_maps.reshape(3, -1)
    flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    stored = s.maps.reshape(100, -1) / s.prefix_sq[:, -1:].sqrt().clamp_min(1e-12)
    w = 1 / 3
    want = w * (unit @ s.emb_unit.T) + (1 - w) * (flat @ stored.T)
    assert torch.equal(s.redundancy(q_emb, q_maps), want)


def test_semantic_match_is_cosine_argmax():
    s = store(dim=3)
    s.add(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [1.0, 1.0, 0]]), torch.rand(3, 2, 2))
    scores, rows = s.semantic_match(torch.tensor([[2.0, 0.1, 0], [0, 0, 5.0], [3.0, 3.0, 0.0]]))
    assert rows.tolist()[0] == 0 and rows.tolist()[2] == 2
    assert scores[1].item() == pytest.approx(0.0, abs=1e-6)
    assert scores[2].item() == pytest.approx(1.0, abs=1e-6)
    assert scores[0].item() == pytest.approx(2.0 / math.sqrt(4.01), rel=1e-5)


def test_single_query_semantic_matches_are_remembered_across_writes():
    """A recurring embedding (one query row) is matched once: an added or replaced row updates the
    remembered match (a better new row wins), loaded rows make the next match search again."""
    s = store(dim=3)
    s.add(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]), torch.rand(2, 2, 2))
    q = torch.tensor([[1.0, 1.0, 0.1]])
    first = s.semantic_match(q)
    assert first[1].item() in (0, 1) and s.semantic_match(q)[1].item() == first[1].item()
    assert len(s._semantic) == 1  # the second call was answered from memory
    s.add(torch.tensor([[1.0, 1.0, 0.0]]), torch.rand(1, 2, 2))  # a better match arrives
    scores, rows = s.semantic_match(q)
    assert rows.item() == 2 and scores.item() == pytest.approx(2.0 / math.sqrt(2.01 * 2), rel=1e-5)
    s.load_rows(torch.tensor([[0.0, 0.0, 1.0]]), torch.rand(1, 2, 2))
    assert s.semantic_match(q)[1].item() == 0 and s.semantic_match(q)[0].item() == pytest.approx(
        0.1 / math.sqrt(2.01), rel=1e-5
    )


def test_remembered_semantic_matches_equal_fresh_searches_while_the_store_learns():
    """A learning store (appends, then replacements; recurring and tied embeddings, a remembered
    best row rewritten, more writes than a catch-up takes) answers every single-row match exactly
    as a full search over the current rows does: the same row and the same score, bit for bit."""
    from finemoe.expert_map import SEMANTIC_CATCH_UP, _mv

    gen = torch.Generator().manual_seed(5)
    D = 24
    s = ExpertMapStore(StoreGeometry(3, 4, D), capacity=40)
    pool = torch.randn(12, D, generator=gen)  # recurring token embeddings
    pool[3] = pool[2] * 2.0  # same direction: tied cosines, the first row must win
    checked = caught_up = 0
    for step in range(400):
        if step % 97 == 96:  # a long gap: more writes than a catch-up takes
            for _ in range(SEMANTIC_CATCH_UP + 1):
                s.add(torch.randn(1, D, generator=gen), torch.rand(1, 3, 4, generator=gen))
        pick = int(torch.randint(0, 12, (1,), generator=gen))
        emb = pool[pick : pick + 1]
        if s.size:
            q = emb[0].numpy()
            remembered = q.tobytes() in s._semantic and s._semantic[q.tobytes()][2] != s.version
            score, row = s.semantic_match_one(emb[0])
            sim = _mv(s._emb_unit_np[: s.size], q)
            want = int(sim.argmax())
            want_score = float(np.float32(float(sim[want]) / max(float(np.sqrt(q @ q)), 1e-12)))
            assert (row, score) == (want, want_score), step
            checked += 1
            caught_up += remembered
        new = emb if step % 3 else torch.randn(1, D, generator=gen)  # the token itself, or another
        s.add(new, torch.rand(1, 3, 4, generator=gen))
    assert checked > 390 and caught_up > 100 and s.replacements > 300
    # wider than NumPy's buffer (einsum sums a lone row in chunks) and NaN embeddings: searched again
    for D2, nan in ((np.getbufsize() + 100, False), (8, True)):
        w = ExpertMapStore(StoreGeometry(1, 2, D2), capacity=4)
        w.add(torch.randn(1, D2, generator=gen), torch.rand(1, 1, 2, generator=gen))
        q2 = torch.randn(D2, generator=gen)
        for _ in range(12):
            w.semantic_match_one(q2)
            row = torch.randn(1, D2, generator=gen)
            if nan:
                row[0, 0] = float("nan")
            w.add(row, torch.rand(1, 1, 2, generator=gen))
            got = w.semantic_match_one(q2)  # (remembered: caught up or searched again)
            remembered, w._semantic = w._semantic, {}
            fresh = w.semantic_match_one(q2)
            w._semantic = remembered
            assert got[1] == fresh[1] and (got[0] == fresh[0] or (got[0] != got[0] and fresh[0] != fresh[0]))
    # a tie written at a lower row than the remembered best: the first maximum wins, as in argmax
    t = ExpertMapStore(StoreGeometry(1, 2, 2), capacity=2)
    t.add(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.rand(2, 1, 2, generator=gen))
    assert t.semantic_match_one(torch.tensor([3.0, 0.0]))[1] == 1
    t._write(0, torch.tensor([2.0, 0.0]), torch.rand(1, 2, generator=gen))  # (a replacement's write)
    assert t.semantic_match_one(torch.tensor([3.0, 0.0]))[1] == 0


def test_an_insert_with_its_semantic_part_made_early_replaces_the_same_rows():
    """`add` with the embedding's share of the redundancy made before (`semantic_part`, a decode
    step's start) replaces the rows a plain `add` does, bit for bit; a part made before another
    write is not used (it would score against rows that changed)."""
    gen = torch.Generator().manual_seed(9)
    a = ExpertMapStore(StoreGeometry(4, 6, 12), capacity=30, distance=2)
    b = ExpertMapStore(StoreGeometry(4, 6, 12), capacity=30, distance=2)
    a.add(torch.randn(30, 12, generator=gen), torch.rand(30, 4, 6, generator=gen))
    b.load_rows(a.state()["emb"], a.state()["maps"])
    for step in range(60):
        emb, maps = torch.randn(1, 12, generator=gen), torch.rand(1, 4, 6, generator=gen)
        early = b.semantic_part(emb)
        if step % 7 == 0:  # another write in between: the early part is stale
            other = torch.randn(1, 12, generator=gen), torch.rand(1, 4, 6, generator=gen)
            a.add(*other)
            b.add(*other)
        assert torch.equal(a.redundancy(emb, maps), b.redundancy(emb, maps, early))
        assert a.add(emb, maps) == b.add(emb, maps, early)
    assert torch.equal(a.maps, b.maps) and torch.equal(a.emb, b.emb) and a.replacements > 60
    # a part made under another semantic weight (the distance changed by a reconfigure) is not used
    emb, maps = torch.randn(1, 12, generator=gen), torch.rand(1, 4, 6, generator=gen)
    early = b.semantic_part(emb)
    b.distance = a.distance = 3
    assert torch.equal(a.redundancy(emb, maps), b.redundancy(emb, maps, early))


def test_an_insert_held_back_lands_before_the_next_read_as_an_add_would():
    """`add_later` (a graphed step's map, or a reader of it) leaves the store as it is until any method
    reads or writes it; from there on the store equals one that added the row at once, read after read
    (replacements included), a reader called once, and `apply_pending` with nothing held back does
    nothing."""
    gen = torch.Generator().manual_seed(13)
    L, E, D, C = 3, 4, 10, 12
    now, later = ExpertMapStore(StoreGeometry(L, E, D), C), ExpertMapStore(StoreGeometry(L, E, D), C)
    # each read given a query embedding and the row the held-back map lands in
    reads = [
        lambda s, q, row: s.semantic_match_one(q[0]),
        lambda s, q, row: list(s.ranked(1, row).order),
        lambda s, q, row: s.rows_written_since(0),
        lambda s, q, row: TrajectoryQuery(s, 1).extend(0, q[:, :E].softmax(-1)).tolist(),
        lambda s, q, row: s.redundancy(q, torch.rand(1, L, E)).shape,
        lambda s, q, row: {k: v.sum().item() for k, v in s.state().items()},
        lambda s, q, row: s.add(q, torch.full((1, L, E), 0.25)),
    ]
    for step in range(40):
        emb, maps = torch.randn(1, D, generator=gen), torch.rand(1, L, E, generator=gen)
        semantic = now.semantic_part(emb) if now.size >= C else None
        (row,) = now.add(emb, maps, semantic)
        size, version = later.size, later.version
        # every third map given as a reader (a graphed step's record, `StepRecord.later`): called once, at the insert
        calls = []
        given = maps if step % 3 else (lambda m=maps, c=calls: c.append(1) or m.clone())
        later.add_later(emb, given, later.semantic_part(emb) if later.size >= C else None)
        assert (later.size, later.version, calls) == (size, version, [])  # held back, the reader not called
        q = emb if step % 2 else torch.randn(1, D, generator=gen)  # (the held-back row is the best match)
        read = reads[step % len(reads)]
        assert read(later, q, row) == read(now, q, row), step
        assert calls == ([] if step % 3 else [1])
    later.apply_pending()
    later.apply_pending()
    for name in ("emb", "emb_unit", "maps", "prefix_sq", "by_layer", "prefix_norm", "maps_unit"):
        assert torch.equal(getattr(now, name), getattr(later, name)), name
    assert now.replacements == later.replacements > 20


def test_trajectory_incremental_equals_from_scratch():
    g = torch.Generator().manual_seed(0)
    L, E, C, N = 5, 6, 40, 3
    s = ExpertMapStore(StoreGeometry(L, E, 4), capacity=C)
    s.add(torch.randn(C, 4, generator=g), torch.softmax(torch.randn(C, L, E, generator=g), dim=-1))
    traj = torch.softmax(torch.randn(N, L, E, generator=g), dim=-1)
    q = TrajectoryQuery(s, N)
    for m in range(L):
        inc = q.extend(m, traj[:, m])
        ref = s.trajectory_scores_from_scratch(traj[:, : m + 1])
        assert torch.allclose(inc, ref, atol=1e-6)
    with pytest.raises(ValueError, match="in order"):
        TrajectoryQuery(s, N).extend(1, traj[:, 1])
    one = TrajectoryQuery(s, 1)  # the lean single-row path returns the same best match
    for m in range(L):
        score, row = one.best(m, traj[0, m])
        ref = s.trajectory_scores_from_scratch(traj[:1, : m + 1])[0]
        assert row == int(ref.argmax()) and score == pytest.approx(float(ref.max()), abs=1e-6)


def test_pruned_trajectory_follows_the_leading_rows_from_scratch():
    g = torch.Generator().manual_seed(3)
    L, E, C, K = 9, 6, 50, 5
    s = ExpertMapStore(StoreGeometry(L, E, 3), capacity=C)
    s.add(torch.randn(C, 3, generator=g), torch.softmax(torch.randn(C, L, E, generator=g), dim=-1))
    traj = torch.softmax(torch.randn(1, L, E, generator=g), dim=-1)
    pruned, full = TrajectoryQuery(s, 1, candidates=K), TrajectoryQuery(s, 1, candidates=C)
    assert full.candidates == 0  # K >= the store: nothing to prune
    leaders = None
    for m in range(L):
        ref = s.trajectory_scores_from_scratch(traj[:, : m + 1])[0]  # [C]
        score, row = pruned.best(m, traj[0, m])
        if m < pruned.prune_at:  # the full search, until the leaders are picked
            assert row == int(ref.argmax())
            leaders = set(torch.topk(ref, K).indices.tolist())
        else:  # the best of the rows leading after layer prune_at - 1, scored over every layer so far
            want = max(leaders, key=lambda c: float(ref[c]))
            assert row == want and score == pytest.approx(float(ref[want]), abs=1e-5)
        assert full.best(m, traj[0, m])[1] == int(ref.argmax())


@pytest.mark.parametrize("window", [1, 3])
def test_windowed_trajectory_equals_from_scratch(window):
    g = torch.Generator().manual_seed(2)
    L, E, C = 6, 5, 30
    s = ExpertMapStore(StoreGeometry(L, E, 3), capacity=C)
    s.add(torch.randn(C, 3, generator=g), torch.softmax(torch.randn(C, L, E, generator=g), dim=-1))
    traj = torch.softmax(torch.randn(2, L, E, generator=g), dim=-1)
    many, one = TrajectoryQuery(s, 2, window), TrajectoryQuery(s, 1, window)
    for m in range(L):
        lo = max(0, m - window + 1)
        ref = s.trajectory_scores_from_scratch(traj[:, lo : m + 1], start=lo)
        assert torch.allclose(many.extend(m, traj[:, m]), ref, atol=1e-5)
        score, row = one.best(m, traj[0, m])
        assert row == int(ref[0].argmax()) and score == pytest.approx(float(ref[0].max()), abs=1e-5)


@pytest.mark.parametrize(
    "score,rule,want",
    [
        (1.0, "paper", {0}),  # δ = 0: only top-k (k = 1)
        (1.5, "paper", {0}),  # clipped to δ = 0
        (0.5, "paper", {0, 1}),  # δ = 0.5: 0.4 < 0.5, include the crossing expert 1 (cum 0.7)
        (0.5, "demo", {0}),  # demo: cumsum <= 0.5 holds for expert 0 only
        (0.0, "paper", {0, 1, 2, 3}),  # δ = 1 needs every expert (0.4 + 0.3 + 0.2 + 0.1)
        (-1.0, "paper", {0, 1, 2, 3}),  # clipped to δ = 1
        (0.35, "paper", {0, 1}),  # δ = 0.65: 0.4 < 0.65 -> crossing expert 1
    ],
)
def test_delta_selection_boundaries(score, rule, want):
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    mask = select_by_delta(probs, torch.tensor([score]), top_k=1, rule=rule)
    assert set(torch.nonzero(mask[0]).view(-1).tolist()) == want


def test_delta_selection_exact_boundary_and_minimum_k():
    probs = torch.tensor([[0.5, 0.25, 0.25, 0.0]])
    # δ = 0.5 exactly: paper takes experts while cum < δ (none) plus the crossing one -> 1; then k=2.
    mask = select_by_delta(probs, torch.tensor([0.5]), top_k=2, rule="paper")
    assert mask.sum().item() == 2 and mask[0, 0] and (mask[0, 1] or mask[0, 2])
    assert select_by_delta(probs, torch.tensor([0.5]), top_k=1, rule="paper").sum().item() == 1
    assert select_by_delta(probs, torch.tensor([0.5]), top_k=1, rule="demo").sum().item() == 1


@pytest.mark.parametrize("rule", ["paper", "demo"])
def test_single_row_selection_equals_the_batched_rule(rule):
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(40, 8, generator=g) * 2, dim=-1)
    scores = torch.linspace(-0.2, 1.2, 40)
    masks = select_by_delta(probs, scores, top_k=2, rule=rule)
    for i in range(40):
        one = select_one(probs[i].tolist(), float(scores[i]), 2, rule)
        assert set(one) == set(torch.nonzero(masks[i]).view(-1).tolist())


def test_priority_is_probability_over_distance():
    reqs = plan_for_layer(5, 2, {0: 0.9, 3: 0.3})
    assert [(r.expert, r.priority) for r in reqs] == [(ExpertId(5, 0), 0.3), (ExpertId(5, 3), pytest.approx(0.1))]
    # Nearer layers first at equal probability; before layer 0 the distance is l + 1.
    near, far = plan_for_layer(0, -1, {1: 0.5})[0], plan_for_layer(2, -1, {1: 0.5})[0]
    assert near.priority == 0.5 and far.priority == pytest.approx(0.5 / 3)


def test_batch_merge_is_union_with_max_probability():
    probs = torch.tensor([[0.6, 0.3, 0.1, 0.0], [0.2, 0.1, 0.0, 0.7]])
    mask = torch.tensor([[True, True, False, False], [True, False, False, True]])
    merged = merge_rows(probs, mask)
    assert merged == {0: pytest.approx(0.6), 1: pytest.approx(0.3), 3: pytest.approx(0.7)}


def test_map_aware_eviction_order_and_protection():
    pol = MapAwarePolicy(num_layers=1, num_experts=4)
    for e in range(4):
        pol.on_insert(ExpertId(0, e), step=e)
    for _ in range(3):
        pol.on_access(ExpertId(0, 1), 10)  # freq 4
    pol.on_plan(PrefetchPlan((), iteration=0, layer_probs=((0, torch.tensor([0.1, 0.1, 0.5, 0.3])),)))
    # scores p * freq: e0 0.1*1, e1 0.1*4, e2 0.5*1, e3 0.3*1 -> order e0, e3, e1, e2
    order, evicted = [], set()
    for _ in range(4):
        v = pol.victim(lambda eid: eid not in evicted)
        order.append(v.expert)
        evicted.add(v)
    assert order == [0, 3, 1, 2]
    # A pending plan for a layer not reached yet protects its experts; a demand still may take them.
    pol2 = MapAwarePolicy(num_layers=2, num_experts=4)
    pol2.on_insert(ExpertId(1, 0), 0)
    pol2.on_insert(ExpertId(1, 1), 1)
    pol2.on_plan(PrefetchPlan((PrefetchRequest(ExpertId(1, 0), 1.0),), iteration=3))
    assert pol2.protected(ExpertId(1, 0)) and not pol2.protected(ExpertId(1, 1))
    assert pol2.victim(lambda eid: True) == ExpertId(1, 1)  # unprotected first, though equal score
    assert pol2.victim(lambda eid: eid != ExpertId(1, 1)) == ExpertId(1, 0)  # then protected
    pol2.on_access(ExpertId(1, 1), 5)  # layer 1 runs: its plan is served, protection ends
    assert not pol2.protected(ExpertId(1, 0))


def _ctx(iteration, emb, prefill=False):
    n = emb.shape[0]
    return IterationContext(iteration, prefill, n, torch.arange(n), torch.arange(n), emb)


def _ev(iteration, layer, probs):
    probs = torch.tensor(probs)
    return RoutingEvent(iteration, layer, probs, torch.topk(probs, 2, dim=1).indices, False)


def test_finemoe_predictor_semantic_then_trajectory():
    # SPEC: L=2, E=4, k=2. Distance 1: semantic plans layer 0; layer 0's trajectory plans layer 1.
    maps = ExpertMapStore(StoreGeometry(2, 4, 2), capacity=8, distance=1)
    row_a = torch.tensor([[0.7, 0.2, 0.05, 0.05], [0.05, 0.05, 0.2, 0.7]])
    row_b = torch.tensor([[0.05, 0.05, 0.2, 0.7], [0.7, 0.2, 0.05, 0.05]])
    maps.add(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.stack([row_a, row_b]))
    pred = FineMoEPredictor(PredictorDeps(SPEC, 1, maps))
    start = pred.on_iteration_start(_ctx(0, torch.tensor([[1.0, 0.0]])))  # matches row a exactly
    assert start.replace and start.iteration == 0
    # score 1 -> δ 0 -> top-2 of row a's layer 0, priority p / (0 - -1)
    assert {(r.expert, round(r.priority, 3)) for r in start.requests} == {(ExpertId(0, 0), 0.7), (ExpertId(0, 1), 0.2)}
    assert torch.equal(dict(start.layer_probs)[1], row_a[1])
    # Layer 0 routes like row b's layer 0: the trajectory switches to row b for layer 1.
    plan = pred.on_routing(_ev(0, 0, [[0.05, 0.05, 0.2, 0.7]]))
    assert {r.expert for r in plan.requests} == {ExpertId(1, 0), ExpertId(1, 1)}
    assert pred.on_routing(_ev(0, 1, [[0.7, 0.2, 0.05, 0.05]])) is None  # last layer: no target
    st = pred.stats()
    assert st["mean_semantic_score"] == pytest.approx(1.0) and st["mean_trajectory_score"] == pytest.approx(1.0)


def test_trajectory_lag_plans_from_the_match_one_layer_behind():
    """`trajectory_lag=1` (what a match computed on the GPU beside the next layer delivers): after
    layer 0 routes like row b, the plan for layer 1 still comes from the match before it, the
    semantic one (row a: its layer 1 ranks experts 3, 2), where lag 0 follows row b (experts 0, 1)."""
    maps = ExpertMapStore(StoreGeometry(2, 4, 2), capacity=8, distance=1)
    row_a = torch.tensor([[0.7, 0.2, 0.05, 0.05], [0.05, 0.05, 0.2, 0.7]])
    row_b = torch.tensor([[0.05, 0.05, 0.2, 0.7], [0.7, 0.2, 0.05, 0.05]])
    maps.add(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.stack([row_a, row_b]))
    with pytest.raises(ConfigError, match="trajectory_lag"):
        EngineConfig(trajectory_lag=2)
    for lag, want in ((0, {0, 1}), (1, {3, 2})):
        pred = FineMoEPredictor(PredictorDeps(SPEC, 1, maps, trajectory_lag=lag))
        pred.on_iteration_start(_ctx(0, torch.tensor([[1.0, 0.0]])))  # semantic: row a
        plan = pred.on_routing(_ev(0, 0, [[0.05, 0.05, 0.2, 0.7]]))  # trajectory: row b
        assert {r.expert for r in plan.requests} == {ExpertId(1, e) for e in want}
        assert pred.on_routing(_ev(0, 1, [[0.7, 0.2, 0.05, 0.05]])) is None  # last layer: no target
    pred.on_iteration_start(
        IterationContext(1, False, 1, torch.arange(1), torch.arange(1), None)
    )  # no embedding: nothing to plan layer 1 from at layer 0
    assert pred.on_routing(_ev(1, 0, [[0.05, 0.05, 0.2, 0.7]])) is None


def test_finemoe_weak_match_prefetches_more_and_out_of_step_events_are_ignored():
    maps = ExpertMapStore(StoreGeometry(2, 4, 2), capacity=8, distance=1)
    maps.add(torch.tensor([[1.0, 0.0]]), torch.tensor([[[0.4, 0.3, 0.2, 0.1]] * 2]))
    pred = FineMoEPredictor(PredictorDeps(SPEC, 1, maps))
    emb = torch.tensor([[1.0, 1.0]])  # cosine 0.707 -> δ 0.293 -> still 2 (k); 0.4 crosses it
    assert len(pred.on_iteration_start(_ctx(0, emb)).requests) == 2
    emb = torch.tensor([[-1.0, 0.2]])  # cosine < 0 -> δ 1 -> all four experts
    assert len(pred.on_iteration_start(_ctx(1, emb)).requests) == 4
    assert pred.on_routing(_ev(0, 0, [[0.25] * 4])) is None  # an event of an older iteration


def test_map_min_score_plans_only_from_confident_matches():
    maps = ExpertMapStore(StoreGeometry(2, 4, 2), capacity=8, distance=1)
    maps.add(torch.tensor([[1.0, 0.0]]), torch.tensor([[[0.4, 0.3, 0.2, 0.1]] * 2]))
    pred = FineMoEPredictor(PredictorDeps(SPEC, 1, maps, map_min_score=0.8))
    assert len(pred.on_iteration_start(_ctx(0, torch.tensor([[1.0, 0.0]]))).requests) == 2  # cosine 1
    # layer 0 routes [0.1, 0.2, 0.3, 0.4]: trajectory cosine 0.667 < 0.8 -> no requests for layer 1
    plan = pred.on_routing(_ev(0, 0, [[0.1, 0.2, 0.3, 0.4]]))
    assert plan is not None and plan.requests == ()
    assert len(pred.on_iteration_start(_ctx(1, torch.tensor([[1.0, 1.0]]))).requests) == 0  # cosine 0.707
    # batched rows: only the confident row plans (row 0 matches exactly, row 1 is orthogonal)
    two = _ctx(2, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert {r.expert for r in pred.on_iteration_start(two).requests} == {ExpertId(0, 0), ExpertId(0, 1)}


def test_map_plans_are_withheld_while_their_measured_precision_is_low():
    from finemoe import fine_predictor

    # The store says experts 0, 1 for both layers; the router keeps choosing 2, 3 instead.
    maps = ExpertMapStore(StoreGeometry(2, 4, 2), capacity=8, distance=1)
    maps.add(torch.tensor([[1.0, 0.0]]), torch.tensor([[[0.6, 0.3, 0.05, 0.05]] * 2]))
    pred = FineMoEPredictor(PredictorDeps(SPEC, 1, maps, map_min_precision=0.4))
    wrong = [[0.05, 0.05, 0.3, 0.6]]
    issued = []
    for it in range(40):  # each decode iteration plans 2 experts for each layer: 4 measured
        start = pred.on_iteration_start(_ctx(it, torch.tensor([[1.0, 0.0]])))
        plan = pred.on_routing(_ev(it, 0, wrong))
        issued.append(len(start.requests) + len(plan.requests))
        pred.on_routing(_ev(it, 1, wrong))
    warm_iterations = math.ceil(fine_predictor.PRECISION_WARMUP / 4)
    assert issued[:warm_iterations] == [4] * warm_iterations  # measured, but not enough yet
    assert issued[-1] == 0 and pred.stats()["map_plans_withheld"] > 0
    assert pred.stats()["map_plan_precision"] == 0.0
    assert pred.on_iteration_start(_ctx(40, torch.tensor([[1.0, 0.0]]))).layer_probs  # hints stay
    # the same sequence with the router agreeing: precision 1, nothing withheld
    pred = FineMoEPredictor(PredictorDeps(SPEC, 1, maps, map_min_precision=0.4))
    right = [[0.6, 0.3, 0.05, 0.05]]
    for it in range(40):
        pred.on_iteration_start(_ctx(it, torch.tensor([[1.0, 0.0]])))
        assert len(pred.on_routing(_ev(it, 0, right)).requests) == 2
        pred.on_routing(_ev(it, 1, right))
    assert pred.stats()["map_plan_precision"] == pytest.approx(1.0) and pred.stats()["map_plans_withheld"] == 0


def test_history_recorder_inserts_after_the_search_of_the_last_layer():
    maps = ExpertMapStore(StoreGeometry(2, 4, 2), capacity=8, distance=1)
    from finemoe.baselines import RequestMatrixStore

    reqs = RequestMatrixStore(2, 4, capacity=4)
    deps = PredictorDeps(SPEC, 1, maps, reqs)
    chain = PredictorChain([FineMoEPredictor(deps), HistoryRecorder(deps)])
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    ctx = IterationContext(0, True, 1, torch.arange(2), torch.zeros(2, dtype=torch.long), emb)
    assert chain.on_iteration_start(ctx) is None  # empty store: nothing to match yet
    chain.on_routing(_ev(0, 0, [[0.7, 0.2, 0.05, 0.05], [0.1, 0.05, 0.15, 0.7]]))
    assert maps.size == 0  # not before the iteration's last layer
    chain.on_routing(_ev(0, 1, [[0.05, 0.05, 0.2, 0.7], [0.7, 0.05, 0.15, 0.1]]))
    assert maps.size == 2  # one row per prompt token (prefill)
    assert torch.allclose(maps.maps[1, 1], torch.tensor([0.7, 0.05, 0.15, 0.1]))
    chain.end_requests()
    # The request's activation matrix: top-2 counts of both tokens per layer.
    assert reqs.size == 1 and reqs.mats[0].tolist() == [[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 2.0, 1.0]]
    # store_rows="last": of a prefill only each prompt's last token becomes a row.
    maps2 = ExpertMapStore(StoreGeometry(2, 4, 2), capacity=8, distance=1)
    rec = HistoryRecorder(PredictorDeps(SPEC, 1, maps2, store_rows="last"))
    ctx2 = IterationContext(0, True, 2, torch.arange(3), torch.tensor([0, 0, 1]), torch.eye(3, 2))
    rec.on_iteration_start(ctx2)
    rec.on_routing(_ev(0, 0, [[0.7, 0.2, 0.05, 0.05]] * 3))
    rec.on_routing(_ev(0, 1, [[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.3, 0.2]]))
    assert maps2.size == 2 and torch.allclose(
        maps2.maps[:2, 1], torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.3, 0.2]])
    )


def test_ranked_selection_equals_select_one():
    """The store's ranked rows (`select_ranked`) pick exactly what `select_one` picks, ties and
    δ boundaries included; hand case: p = [0.1, 0.4, 0.1, 0.4], score 0.2 -> δ 0.8 -> experts 1, 3
    reach 0.8 ("paper" takes the crossing expert, here none more), top-1 floor."""
    import numpy as np

    from finemoe.predictor import ranked_row, select_one, select_ranked

    p = np.array([0.1, 0.4, 0.1, 0.4], dtype=np.float32)
    assert list(select_ranked(ranked_row(p), 0.2, 1)) == [1, 3]
    assert list(select_ranked(ranked_row(p), 0.95, 1)) == [1]
    assert list(select_ranked(ranked_row(p), 0.1, 1)) == [1, 3, 0]  # δ 0.9: the crossing expert 0 (lower id first)
    gen = np.random.default_rng(0)
    for _ in range(300):
        row = gen.dirichlet(np.ones(8) * 0.5).astype(np.float32)
        if gen.random() < 0.3:
            row = np.round(row * 4) / 4  # ties
        score = float(gen.choice([gen.random(), 0.0, 1.0, 1.0 - float(np.sort(row)[::-1][:2].sum())]))
        for rule in ("paper", "demo", "topk"):
            assert select_ranked(ranked_row(row), score, 2, rule) == select_one(row, score, 2, rule)


def test_ranked_row_requests_are_the_plan_of_its_selection():
    """`RankedRow.requests(layer, dist, n)` is `plan_for_layer` of the first n ranked experts,
    whatever order the prefixes are asked in (the kept prefix grows, later calls slice it)."""
    import numpy as np

    from finemoe.predictor import plan_for_layer, ranked_row, select_ranked

    gen = np.random.default_rng(1)
    row = ranked_row(gen.dirichlet(np.ones(8)).astype(np.float32))
    for score, dist in ((0.9, 3), (0.1, 3), (0.5, 3), (0.5, 1), (0.0, 2)):
        n = row.count(score, 2)
        want = plan_for_layer(5, 5 - dist, select_ranked(row, score, 2))
        assert list(row.requests(5, dist, n)) == want and len(want) == n
    assert row.rank()[row.order[0]] == 0 and sorted(row.rank()) == list(range(8))


def test_single_semantic_match_equals_the_batched_one():
    """`semantic_match_one` (plain numbers, remembered per embedding) picks the row the batched
    tensor search picks, with the same float32 score."""
    import torch

    from finemoe.expert_map import ExpertMapStore, StoreGeometry

    gen = torch.Generator().manual_seed(2)
    store = ExpertMapStore(StoreGeometry(2, 4, 16), capacity=50)
    store.add(torch.randn(50, 16, generator=gen), torch.rand(50, 2, 4, generator=gen))
    queries = torch.randn(20, 16, generator=gen)
    scores, rows = store.semantic_match(queries)  # N > 1: the tensor path
    for i in range(20):
        for _ in range(2):  # computed, then remembered
            score, row = store.semantic_match_one(queries[i])
            assert row == int(rows[i]) and abs(score - float(scores[i])) <= 1e-6
            assert score == float(torch.tensor([score]))  # float32, as the tensor holds it


def test_ranked_rows_follow_rewrites():
    import torch

    from finemoe.expert_map import ExpertMapStore, StoreGeometry
    from finemoe.predictor import ranked_row

    store = ExpertMapStore(StoreGeometry(2, 4, 3), capacity=1)
    store.add(torch.ones(1, 3), torch.tensor([[[0.7, 0.1, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4]]]))
    assert store.ranked(1, 0).order == [3, 2, 1, 0]
    assert store.ranked(1, 0).rank() == [3, 2, 1, 0]
    store.add(torch.ones(1, 3), torch.tensor([[[0.1, 0.1, 0.1, 0.7], [0.4, 0.3, 0.2, 0.1]]]))  # replaces row 0
    assert store.ranked(1, 0).order == [0, 1, 2, 3]
    assert store.ranked(1, 0).rank() == [0, 1, 2, 3]
    fresh, kept = ranked_row(store.by_layer[0, 0].numpy()), store.ranked(0, 0)
    assert (kept.order, kept.probs, kept.cum) == (fresh.order, fresh.probs, fresh.cum)


def test_prefill_plans_modes_of_the_map_predictor_and_the_refining_gate():
    """finemoe's prefill: "maps" plans from the maps, "gate" leaves prefill to the refining gate,
    "none" plans nothing; decode iterations are planned alike in every mode."""
    from finemoe.baselines import SpeculativeGatePredictor

    maps = ExpertMapStore(StoreGeometry(2, 4, 2), capacity=8, distance=1)
    maps.add(torch.tensor([[1.0, 0.0]]), torch.tensor([[[0.7, 0.2, 0.05, 0.05], [0.05, 0.05, 0.2, 0.7]]]))
    emb = torch.tensor([[1.0, 0.0]])
    prefill_ev = RoutingEvent(0, 0, torch.tensor([[0.7, 0.2, 0.05, 0.05]]), torch.tensor([[0, 1]]), True)
    for mode in ("maps", "gate", "none"):
        pred = FineMoEPredictor(PredictorDeps(SPEC, 1, maps, prefill_plans=mode))
        start = pred.on_iteration_start(_ctx(0, emb, prefill=True))
        after = pred.on_routing(prefill_ev)
        if mode == "maps":
            assert {r.expert for r in start.requests} == {ExpertId(0, 0), ExpertId(0, 1)}
            assert {r.expert for r in after.requests} == {ExpertId(1, 3), ExpertId(1, 2)}
        else:
            assert start is None and after is None
        decode = pred.on_iteration_start(_ctx(1, emb))  # decode: planned in every mode
        assert {r.expert for r in decode.requests} == {ExpertId(0, 0), ExpertId(0, 1)}

    def gate(layer, hidden):
        return torch.tensor([[0.1, 0.6, 0.1, 0.2]] * hidden.shape[0])

    hidden = torch.zeros(1, 2)
    pre = RoutingEvent(0, 0, torch.full((1, 4), 0.25), torch.tensor([[0, 1]]), True, hidden)
    dec = RoutingEvent(1, 0, torch.full((1, 4), 0.25), torch.tensor([[0, 1]]), False, hidden)
    for mode, plans_prefill in (("maps", True), ("gate", True), ("none", False)):
        g = SpeculativeGatePredictor(PredictorDeps(SPEC, 1, gate=gate, prefill_plans=mode))
        g.on_iteration_start(_ctx(0, emb, prefill=True))
        assert (g.on_routing(pre) is not None) == plans_prefill
        g.on_iteration_start(_ctx(1, emb))
        assert {r.expert for r in g.on_routing(dec).requests} == {ExpertId(1, 1), ExpertId(1, 3)}


def test_prefill_plans_resolution_is_finemoe_only():
    from finemoe.config import EngineConfig
    from finemoe.errors import ConfigError
    from finemoe.presets import get_preset, predictor_members, prefill_plans

    assert prefill_plans(get_preset("finemoe"), "auto") == "gate"
    assert prefill_plans(get_preset("finemoe-paper"), "auto") == "maps"
    assert prefill_plans(get_preset("finemoe"), "none") == "none"
    assert prefill_plans(get_preset("promoe"), "none") == "maps"  # baselines stay as published
    with pytest.raises(ConfigError, match="prefill_plans"):
        EngineConfig(prefill_plans="some")

    maps = ExpertMapStore(StoreGeometry(2, 4, 2), capacity=8, distance=1)
    deps = PredictorDeps(SPEC, 1, maps, gate=lambda layer, h: torch.full((h.shape[0], 4), 0.25))
    fm = predictor_members(get_preset("finemoe"), EngineConfig(), deps, False)
    assert [type(m).__name__ for m in fm] == ["FineMoEPredictor", "SpeculativeGatePredictor", "HistoryRecorder"]
    assert not fm[0].in_prefill and fm[1].in_prefill  # auto: the gate plans prefill, the maps do not
    pm = predictor_members(get_preset("promoe"), EngineConfig(prefill_plans="none"), deps, False)
    assert pm[0].in_prefill


@pytest.mark.parametrize("experts", [16, 128])
def test_batch1_gate_top_k_orders_ties_by_expert_id(experts):
    """The speculative gate's batch-1 top-k (plain Python below `NUMPY_TOPK_MIN_E` experts, NumPy's
    stable argsort from there): descending probability, equal probabilities by expert id, for a
    torch row (the engine) and a NumPy row (the simulator) alike."""
    import numpy as np

    from finemoe.baselines import NUMPY_TOPK_MIN_E, SpeculativeGatePredictor

    spec = dataclasses.replace(SPEC, num_experts=experts, top_k=4)
    row = torch.full((experts,), 0.5 / (experts - 3))
    row[[2, 9, 11]] = 0.125  # three tied leaders, then many tied followers (ids 0, 1, 3, ... by id)
    row[5] = 0.25
    want = [5, 2, 9, 11]
    for as_numpy in (False, True):

        def gate(layer, hidden, as_numpy=as_numpy):
            return row[None].numpy() if as_numpy else row[None].clone()

        g = SpeculativeGatePredictor(PredictorDeps(spec, 1, gate=gate))
        g.on_iteration_start(_ctx(1, torch.zeros(1, 2)))
        plan = g.on_routing(
            RoutingEvent(1, 0, torch.full((1, experts), 1.0 / experts), torch.zeros(1, 4), False, torch.zeros(1, 2))
        )
        assert [r.expert.expert for r in plan.requests] == want
        assert [r.priority for r in plan.requests] == [float(np.float32(row[e])) for e in want]
    assert (experts >= NUMPY_TOPK_MIN_E) == (experts == 128)  # both paths are covered
    # the followers' ties too: top-6 continues with the lowest ids
    spec6 = dataclasses.replace(spec, top_k=6)
    g = SpeculativeGatePredictor(PredictorDeps(spec6, 1, gate=lambda layer, h: row[None].clone()))
    g.on_iteration_start(_ctx(1, torch.zeros(1, 2)))
    plan = g.on_routing(
        RoutingEvent(1, 0, torch.full((1, experts), 1.0 / experts), torch.zeros(1, 6), False, torch.zeros(1, 2))
    )
    assert [r.expert.expert for r in plan.requests] == [*want, 0, 1]


def test_past_requests_are_recorded_only_where_read_or_saved():
    """`record_requests` auto: the recorder keeps request activation matrices for a policy that
    reads them (moe-infinity) or for a map-store file, and skips their per-layer counts otherwise;
    the maps are recorded either way."""
    from finemoe.baselines import RequestMatrixStore
    from finemoe.config import EngineConfig
    from finemoe.errors import ConfigError
    from finemoe.presets import get_preset, predictor_members, records_requests

    fine, mi = get_preset("finemoe"), get_preset("moe-infinity")
    assert not records_requests(fine, EngineConfig())
    assert records_requests(fine, EngineConfig(map_store="/tmp/x.fms"))
    assert records_requests(mi, EngineConfig())
    assert records_requests(fine, EngineConfig(record_requests=True))
    assert not records_requests(mi, EngineConfig(record_requests=False))
    for bad in ("yes", 1):
        with pytest.raises(ConfigError, match="record_requests"):
            EngineConfig(record_requests=bad)

    def recorder(cfg):
        maps = ExpertMapStore(StoreGeometry(2, 4, 2), capacity=8, distance=1)
        deps = PredictorDeps(SPEC, 1, maps, RequestMatrixStore(2, 4, 8), gate=lambda layer, h: None)
        rec = predictor_members(fine, cfg, deps, False)[-1]
        assert isinstance(rec, HistoryRecorder)
        return rec

    for cfg, keeps in ((EngineConfig(), False), (EngineConfig(record_requests=True), True)):
        rec = recorder(cfg)
        assert (rec.requests is not None) is keeps and (rec.running is not None) is keeps
        emb = torch.tensor([[1.0, 0.0]])
        for it in range(2):
            rec.on_iteration_start(_ctx(it, emb))
            for layer in range(2):
                rec.on_routing(_ev(it, layer, [[0.7, 0.1, 0.1, 0.1]]))
        rec.end_requests()
        assert rec.maps.size == 2 and rec.maps_added == 2
        assert rec.requests_added == (1 if keeps else 0)
