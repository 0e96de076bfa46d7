"""The device planner (`device_plans.DevicePlanner`) against hand-computed cases and the host
objects it mirrors (`TrajectoryQuery.best` over every stored row, `select_ranked`), on CPU tensors."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from finemoe.device_plans import DevicePlanner
from finemoe.errors import ConfigError
from finemoe.expert_map import ExpertMapStore, StoreGeometry, TrajectoryQuery
from finemoe.predictor import select_ranked


def small_store() -> ExpertMapStore:
    """3 rows, L = 2, E = 4 (embeddings unused here)."""
    s = ExpertMapStore(StoreGeometry(2, 4, 2), capacity=8)
    maps = torch.tensor(
        [
            [[1.0, 0, 0, 0], [0, 1.0, 0, 0]],
            [[0.5, 0.5, 0, 0], [0, 0, 1.0, 0]],
            [[0, 0, 0, 1.0], [0.25, 0.25, 0.25, 0.25]],
        ]
    )
    s.add(torch.ones(3, 2), maps)
    return s


def test_hand_computed_match_selection_and_residency_filter():
    """Layer 0 query p = [0.6, 0.4, 0, 0]: dots 0.6 / 0.5 / 0 over norms 1 / sqrt(0.5) / 1 -> row 1,
    score sqrt(0.5) / sqrt(0.52). Its layer-1 map [0, 0, 1, 0] reaches δ = 1 - score with expert 2
    alone; the top-2 floor adds expert 0 (the lower id among the equal zeros). Expert 2 is resident
    (slot 3): only expert 0 is needed."""
    s = small_store()
    dp = DevicePlanner(s.geometry, capacity=8, top_k=2)
    dp.load(s)
    dp.begin()
    dp.step(0, torch.tensor([0.6, 0.4, 0.0, 0.0]))
    dp.plan(1, torch.tensor([-1, 5, 3, -1]))
    got = dp.read()
    assert got.row == 1
    assert got.score == pytest.approx(math.sqrt(0.5) / math.sqrt(0.52), rel=1e-6)
    assert got.planned == [0, 2] and got.needed == [0]
    assert got.probs == [0.0, 0.0, 1.0, 0.0]
    dp.plan(1)  # no slot table: every planned expert is needed
    assert dp.read().needed == [0, 2]


def test_rows_past_the_store_size_never_match_and_begin_restarts():
    s = small_store()
    dp = DevicePlanner(s.geometry, capacity=8, top_k=1)
    dp.load(s)
    dp.begin()
    dp.step(0, torch.zeros(4))  # every valid ratio is 0; the five empty rows must not win
    assert dp.read().row == 0
    dp.begin()
    dp.step(0, torch.tensor([0.0, 0.0, 0.0, 1.0]))
    assert dp.read().row == 2 and dp.read().score == pytest.approx(1.0)


@pytest.mark.parametrize("rule", ["paper", "demo", "topk"])
def test_device_plans_equal_the_host_search_and_selection(rule):
    """Random stores and trajectories: each layer's best row and score equal `TrajectoryQuery.best`
    with every row followed, and the δ selection at target = layer + d equals `select_ranked` on
    the store's ranked row, whenever the best score is not tied and no running sum sits within
    1e-5 of δ (float32 against float64 sums)."""
    g = torch.Generator().manual_seed(5)
    L, E, C, k, d = 7, 8, 60, 2, 2
    compared = 0
    for trial in range(6):
        s = ExpertMapStore(StoreGeometry(L, E, 3), capacity=C)
        n = C if trial % 2 == 0 else C // 2  # a full store and a half-full one
        s.add(torch.randn(n, 3, generator=g), torch.softmax(2 * torch.randn(n, L, E, generator=g), dim=-1))
        dp = DevicePlanner(s.geometry, capacity=C, top_k=k, rule=rule)
        dp.load(s)
        for _ in range(3):
            traj = torch.softmax(2 * torch.randn(L, E, generator=g), dim=-1)
            host = TrajectoryQuery(s, 1, candidates=0)
            dp.begin()
            for layer in range(L - d):
                score, row = host.best(layer, traj[layer])
                dp.step(layer, traj[layer])
                ref = s.trajectory_scores_from_scratch(traj[None, : layer + 1])[0]  # [n]
                top2 = torch.topk(ref, 2).values
                if float(top2[0] - top2[1]) < 1e-5:
                    continue  # an exact tie may go either way in float32
                dp.plan(layer + d)
                got = dp.read()
                assert got.row == row
                assert got.score == pytest.approx(score, abs=1e-5)
                ranked = s.ranked(layer + d, row)
                delta = min(max(1.0 - score, 0.0), 1.0)
                if any(abs(c - delta) < 1e-5 for c in ranked.cum):
                    continue
                assert got.planned == sorted(select_ranked(ranked, score, k, rule))
                assert got.probs == pytest.approx(s.maps[row, layer + d].tolist())
                compared += 1
    assert compared > 60  # most layers were compared, not skipped


def test_min_score_plans_nothing_below_it():
    s = small_store()
    dp = DevicePlanner(s.geometry, capacity=8, top_k=2, min_score=0.99)
    dp.load(s)
    dp.begin()
    dp.step(0, torch.tensor([0.6, 0.4, 0.0, 0.0]))  # score 0.98
    dp.plan(1)
    assert dp.read().planned == [] and dp.read().needed == []
    dp.begin()
    dp.step(0, torch.tensor([1.0, 0.0, 0.0, 0.0]))  # row 0, score 1
    dp.plan(1)
    assert dp.read().planned == [0, 1]


def test_load_tracks_the_store_version_and_refuses_mismatches():
    s = small_store()
    dp = DevicePlanner(s.geometry, capacity=8, top_k=2)
    dp.load(s)
    assert dp.version == s.version and dp.size == 3
    assert dp.nbytes() >= (2 * 8 * 4 + 2 * 8) * 4  # at least the maps and the norms, float32
    s.add(torch.ones(1, 2), torch.full((1, 2, 4), 0.25))
    assert dp.version != s.version  # a write since the copy: the caller reloads
    dp.load(s)
    assert dp.size == 4 and np.allclose(dp.maps[:, 3].numpy(), 0.25)
    with pytest.raises(ConfigError, match="geometry"):
        DevicePlanner(StoreGeometry(3, 4, 2), capacity=8, top_k=2).load(s)
    with pytest.raises(ConfigError, match="capacity"):
        DevicePlanner(s.geometry, capacity=2, top_k=2).load(s)
    with pytest.raises(ConfigError, match="delta rule"):
        DevicePlanner(s.geometry, capacity=8, top_k=2, rule="nope")


def test_sync_copies_only_the_rows_written_since_and_equals_a_full_load():
    g = torch.Generator().manual_seed(2)
    L, E, C = 4, 6, 20
    s = ExpertMapStore(StoreGeometry(L, E, 3), capacity=C)
    s.add(torch.randn(8, 3, generator=g), torch.softmax(torch.randn(8, L, E, generator=g), dim=-1))
    dp = DevicePlanner(s.geometry, capacity=C, top_k=2)
    assert dp.sync(s) == 8  # the first sync loads everything
    assert dp.sync(s) == 0
    s.add(torch.randn(2, 3, generator=g), torch.softmax(torch.randn(2, L, E, generator=g), dim=-1))
    assert s.rows_written_since(dp.version) == [8, 9]
    assert dp.sync(s) == 2 and dp.size == 10
    s.add(torch.randn(20, 3, generator=g), torch.softmax(torch.randn(20, L, E, generator=g), dim=-1))  # fills, replaces
    dp.sync(s)
    full = DevicePlanner(s.geometry, capacity=C, top_k=2)
    full.load(s)
    for name in ("maps", "norms"):
        assert torch.equal(getattr(dp, name), getattr(full, name)), name
    assert s.rows_written_since(-1) is None  # (a copy that never loaded takes everything)


def test_predictor_with_device_matches_plans_as_the_host_search_one_layer_late():
    """A FineMoE predictor fed its matches by `DeviceMatches` (filled here eagerly, layer by layer,
    in the order a graphed step fills them) plans exactly what the host search with every map
    followed and `trajectory_lag=1` plans."""
    from finemoe.device_plans import DeviceMatches
    from finemoe.fine_predictor import FineMoEPredictor
    from finemoe.predictor import PredictorDeps, reads_router_probs
    from finemoe.types import IterationContext, RoutingEvent

    from tests.test_cache import SPEC as SPEC1
    from tests.test_map_store import Unread

    g = torch.Generator().manual_seed(9)
    L, E, C, k, d = 6, 8, 40, 2, 2
    spec = dataclasses.replace(SPEC1, moe_layers=tuple(range(L)), num_experts=E, top_k=k, num_decoder_layers=L)
    s = ExpertMapStore(StoreGeometry(L, E, 3), capacity=C, distance=d)
    s.add(torch.randn(C, 3, generator=g), torch.softmax(2 * torch.randn(C, L, E, generator=g), dim=-1))
    host = FineMoEPredictor(PredictorDeps(spec, d, s, trajectory_candidates=0, trajectory_lag=1))
    dev = FineMoEPredictor(PredictorDeps(spec, d, s))
    dev.device = matches = DeviceMatches(DevicePlanner(s.geometry, C, k), s, d)
    assert [matches.wants(m) for m in range(L)] == [m <= L - 2 - d for m in range(L)]
    compared = 0
    for it in range(4):
        if it:  # online learning between iterations: rows replaced (the store is full); the copy follows
            s.add(torch.randn(2, 3, generator=g), torch.softmax(2 * torch.randn(2, L, E, generator=g), dim=-1))
        emb = torch.randn(1, 3, generator=g)
        ctx = IterationContext(it, False, 1, torch.arange(1), torch.arange(1), emb)
        a, b = host.on_iteration_start(ctx), dev.on_iteration_start(ctx)
        assert a.requests == b.requests
        matches.before_step(it)
        for layer in range(L):
            probs = torch.softmax(2 * torch.randn(1, E, generator=g), dim=-1)
            event = RoutingEvent(it, layer, probs, torch.topk(probs, k, dim=1).indices, False)
            if matches.wants(layer):
                matches.capture_layer(layer, probs)  # (the graph computes it beside the next segment)
            # the device-matched predictor never reads the probabilities (a graphed step leaves them on the GPU)
            pa, pb = host.on_routing(event), dev.on_routing(dataclasses.replace(event, probs=Unread()))
            assert (pa is None) == (pb is None)
            if pa is not None:
                assert pa.requests == pb.requests
                compared += 1
        matches.after_step()
    assert compared == 4 * (L - d)
    assert reads_router_probs(host) and not reads_router_probs(dev)
    assert dev.device_matched == 4 * (L - d - 1)  # every layer after the first planned from a device match
    assert matches.steps == 4 and matches.rows_copied == 6  # 2 rows before each of the last three
    assert host.stats()["mean_trajectory_score"] == pytest.approx(dev.stats()["mean_trajectory_score"], rel=1e-5)


def test_engine_without_cuda_graphs_searches_inline_and_says_why(tiny_checkpoint, caplog):
    from finemoe import Engine, SamplingParams

    path = tiny_checkpoint("qwen2_moe")
    outs = {}
    for search in ("sync", "device"):
        with caplog.at_level("WARNING", logger="finemoe.engine"):
            eng = Engine.from_pretrained(
                path, expert_budget="50%", policy="finemoe", search=search, device="cpu", progress=False
            )
        try:
            outs[search] = eng.generate([[5, 9, 2, 7]], SamplingParams(max_new_tokens=6, ignore_eos=True))[0].token_ids
            assert eng.search_mode == "sync" and eng.runtime.device_matches is None
            assert "device_match_steps" not in eng.predictor_stats()
        finally:
            eng.close()
    assert "search='device' unavailable" in caplog.text and "CUDA graphs" in caplog.text
    assert outs["device"] == outs["sync"]  # (lossless either way: the fallback is what the asserts above check)


def test_sync_applies_an_insert_the_store_held_back():
    """A graphed step's map held back (`ExpertMapStore.add_later`) reaches the copy at the next sync
    as one staged row; asking whether a full load is due does not apply it."""
    g = torch.Generator().manual_seed(4)
    L, E, C = 3, 5, 6
    s = ExpertMapStore(StoreGeometry(L, E, 3), capacity=C)
    s.add(torch.randn(C, 3, generator=g), torch.softmax(torch.randn(C, L, E, generator=g), dim=-1))
    dp = DevicePlanner(s.geometry, capacity=C, top_k=2)
    dp.sync(s)
    s.add_later(torch.randn(1, 3, generator=g), torch.softmax(torch.randn(1, L, E, generator=g), dim=-1))
    version = s.version
    assert not dp.full_load_due(s) and s.version == version  # (still held back)
    assert dp.sync(s) == 1 and s.version == version + 1 and dp.version == s.version
    s.add(torch.randn(1, 3, generator=g), torch.softmax(torch.randn(1, L, E, generator=g), dim=-1))  # the copy lags
    s.add_later(torch.randn(1, 3, generator=g), torch.softmax(torch.randn(1, L, E, generator=g), dim=-1))
    version = s.version
    assert not dp.full_load_due(s) and s.version == version  # (asked before a step's launch: still held back)
    assert dp.sync(s) == 2 and dp.version == s.version == version + 1
    full = DevicePlanner(s.geometry, capacity=C, top_k=2)
    full.load(s)
    assert torch.equal(dp.maps, full.maps) and torch.equal(dp.norms, full.norms)


def test_sync_reloads_when_the_log_is_short_the_rows_many_or_the_store_shrank(monkeypatch):
    from collections import deque

    from finemoe import device_plans

    g = torch.Generator().manual_seed(4)
    L, E, C = 3, 4, 30

    def rows(n):
        return torch.randn(n, 2, generator=g), torch.softmax(torch.randn(n, L, E, generator=g), dim=-1)

    s = ExpertMapStore(StoreGeometry(L, E, 2), capacity=C)
    s.add(*rows(6))
    dp = DevicePlanner(s.geometry, capacity=C, top_k=2)
    assert dp.full_load_due(s)  # (what a graphed step asks before it moves the sync beside S_0)
    dp.sync(s)
    assert not dp.full_load_due(s)  # nothing to copy
    s._written = deque(s._written, maxlen=3)  # a short write log: 5 writes overflow it
    s.add(*rows(5))
    assert s.rows_written_since(dp.version) is None and dp.full_load_due(s)
    assert dp.sync(s) == 11  # the whole store
    monkeypatch.setattr(device_plans, "STAGED_ROWS", 2)
    s._written = deque(maxlen=4096)
    s.add(*rows(2))
    assert not dp.full_load_due(s)  # two rows: staged
    assert dp.sync(s) == 2
    s.add(*rows(3))  # more rows than the staging holds
    assert dp.full_load_due(s)
    assert dp.sync(s) == 16
    s.load_rows(*[t[:4] for t in rows(4)])  # the store shrank to 4 rows
    assert dp.full_load_due(s)
    assert dp.sync(s) == 4 and dp.size == 4
    assert torch.isinf(dp.norms[:, 4:]).all() and torch.equal(dp.maps[:, 4:], torch.zeros(L, C - 4, E))
    dp.begin()
    dp.step(0, torch.full((E,), 0.25))
    assert dp.read().row < 4  # no stale row wins


def test_sync_stages_rows_inside_inference_mode_and_after_it():
    """The staging buffers are made during generate (inference mode) and written by later syncs
    in or out of it."""
    g = torch.Generator().manual_seed(6)
    s = ExpertMapStore(StoreGeometry(2, 4, 2), capacity=10)
    s.add(torch.randn(3, 2, generator=g), torch.softmax(torch.randn(3, 2, 4, generator=g), dim=-1))
    dp = DevicePlanner(s.geometry, capacity=10, top_k=2)
    dp.sync(s)
    with torch.inference_mode():
        s.add(torch.randn(1, 2, generator=g), torch.softmax(torch.randn(1, 2, 4, generator=g), dim=-1))
        assert dp.sync(s) == 1
    s.add(torch.randn(1, 2, generator=g), torch.softmax(torch.randn(1, 2, 4, generator=g), dim=-1))
    assert dp.sync(s) == 1 and dp.size == 5
    assert torch.allclose(dp.maps[:, 4], s.maps[4])


def test_a_device_matched_predictor_skips_only_the_plans_for_launched_layers():
    """Routings read after a graphed step ran ahead carry `launched`: the device-matched predictor
    makes no plan for a target up to it (and reads no match for it), and every later plan is the one
    it makes without the skips (nothing it keeps between layers depends on them); with map-aware
    eviction reading the plans' probabilities (`hints`) it still plans."""
    from finemoe.device_plans import DeviceMatches
    from finemoe.fine_predictor import FineMoEPredictor
    from finemoe.predictor import PredictorDeps
    from finemoe.types import IterationContext, RoutingEvent

    from tests.test_cache import SPEC as SPEC1

    g = torch.Generator().manual_seed(4)
    L, E, C, k, d = 6, 8, 40, 2, 2
    spec = dataclasses.replace(SPEC1, moe_layers=tuple(range(L)), num_experts=E, top_k=k, num_decoder_layers=L)
    s = ExpertMapStore(StoreGeometry(L, E, 3), capacity=C, distance=d)
    s.add(torch.randn(C, 3, generator=g), torch.softmax(2 * torch.randn(C, L, E, generator=g), dim=-1))
    emb = torch.randn(1, 3, generator=g)
    routed = [torch.softmax(2 * torch.randn(1, E, generator=g), dim=-1) for _ in range(L)]
    launched = 3  # layers 0-3 launched when the first layers' routings are read (targets <= 3 skipped)

    def run(skip: bool, hints: bool) -> tuple[list, int]:
        pred = FineMoEPredictor(PredictorDeps(spec, d, s, layer_probs=hints))
        pred.device = matches = DeviceMatches(DevicePlanner(s.geometry, C, k), s, d)
        pred.on_iteration_start(IterationContext(0, False, 1, torch.arange(1), torch.arange(1), emb))
        matches.before_step(0)
        plans = []
        for layer, probs in enumerate(routed):
            if matches.wants(layer):
                matches.capture_layer(layer, probs)
            ev = RoutingEvent(0, layer, probs, torch.topk(probs, k, dim=1).indices, False)
            plan = pred.on_routing(dataclasses.replace(ev, launched=launched if skip else -1))
            plans.append(None if plan is None else plan.requests)
        matches.after_step()
        return plans, pred.device_matched

    full, matched_full = run(False, False)
    skipped, matched_skipped = run(True, False)
    for layer in range(L):
        if layer + d <= launched:
            assert full[layer] is not None and skipped[layer] is None
        else:
            assert skipped[layer] == full[layer]
    assert matched_skipped == matched_full - 1  # layer 1's match (layer 0 plans from the semantic one)
    assert run(True, True)[0] == run(False, True)[0]  # hints: every plan made


def test_catch_up_refuses_a_layer_without_bound_logits():
    """The fused catch-up reads each layer's logits through an address table: a layer past the bound
    prefix (address 0) is refused before any kernel, as is a catch-up before any binding."""
    L, E = 4, 3
    dp = DevicePlanner(StoreGeometry(L, E, 2), capacity=8, top_k=1)
    with pytest.raises(RuntimeError, match="bind_logits"):
        dp.catch_up(0)
    logits = torch.zeros(L, E)
    dp.bind_logits([logits[0], logits[1], None, None])
    with pytest.raises(ValueError, match="bound through 1"):
        dp.catch_up(2)
    with pytest.raises(ValueError, match="layers given"):
        dp.bind_logits([logits[0]])
    with pytest.raises(ValueError, match="contiguous"):
        dp.bind_logits([torch.zeros(E, 2)[:, 0], None, None, None])
