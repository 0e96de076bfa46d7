"""Baseline predictors on scripted routing, stale-plan handling, the persistent map store (round
trip and every refusal) and the engine's use of it (warm start, async search stays lossless)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import asdict

import pytest
import torch

from finemoe import Engine, SamplingParams
from finemoe import map_store_file as msf
from finemoe.baselines import MoEInfinityPredictor, RequestMatrixStore, SpeculativeGatePredictor
from finemoe.predictor import PredictorDeps
from finemoe.types import ExpertId, IterationContext, PrefetchPlan, PrefetchRequest, RoutingEvent

from tests.test_cache import SPEC as SPEC1
from tests.test_prefetch import setup

SPEC = dataclasses.replace(SPEC1, top_k=2)  # L=2, E=4, k=2
SPEC3 = dataclasses.replace(SPEC, moe_layers=(0, 1, 2), num_decoder_layers=3)


def ctx(iteration, n=1, prefill=False):
    return IterationContext(iteration, prefill, n, torch.arange(n), torch.arange(n))


def event(iteration, layer, ids, hidden=None):
    ids = torch.tensor(ids)
    return RoutingEvent(iteration, layer, torch.full((ids.shape[0], 4), 0.25), ids, False, hidden)


def test_speculative_gate_uses_the_target_layers_router():
    calls = []
    table = {1: [0.1, 0.6, 0.1, 0.2], 2: [0.5, 0.0, 0.3, 0.2]}

    def gate(layer, hidden):
        calls.append((layer, hidden.shape[0]))
        return torch.tensor([table[layer]] * hidden.shape[0])

    hidden = torch.zeros(3, 2)  # three positions; the context keeps two of them
    one = SpeculativeGatePredictor(PredictorDeps(SPEC3, 1, gate=gate))  # Mixtral-Offloading
    live = IterationContext(0, True, 1, torch.tensor([1, 2]), torch.tensor([0, 0]))
    one.on_iteration_start(live)
    plan = one.on_routing(event(0, 0, [[0, 1]] * 3, hidden))
    assert {(r.expert, round(r.priority, 4)) for r in plan.requests} == {(ExpertId(1, 1), 0.6), (ExpertId(1, 3), 0.2)}
    assert calls == [(1, 2)]
    two = SpeculativeGatePredictor(PredictorDeps(SPEC3, 2, gate=gate))  # ProMoE (stride 2)
    two.on_iteration_start(live)
    assert {r.expert for r in two.on_routing(event(0, 0, [[0, 1]] * 3, hidden)).requests} == {
        ExpertId(2, 0),
        ExpertId(2, 2),
    }
    assert two.on_routing(event(0, 1, [[0, 1]] * 3, hidden)) is None  # layer 3 does not exist


def test_moe_infinity_matches_request_matrices():
    store = RequestMatrixStore(3, 4, capacity=4)
    a = torch.tensor([[5.0, 5, 0, 0], [0, 0, 5, 5], [5, 0, 5, 0]])
    b = torch.tensor([[0.0, 0, 5, 5], [5, 5, 0, 0], [0, 5, 0, 5]])
    store.add(a)
    store.add(b)
    pred = MoEInfinityPredictor(PredictorDeps(SPEC3, 2, requests=store))
    assert pred.on_iteration_start(ctx(0, prefill=True)) is None
    plan = pred.on_routing(event(0, 0, [[2, 3]]))  # routes like b's layer 0
    # b's next two layers, top max(k, E/4) = 2 experts each, share x linear decay (1, then 1/2).
    got = {(r.expert, round(r.priority, 3)) for r in plan.requests}
    assert got == {(ExpertId(1, 0), 0.5), (ExpertId(1, 1), 0.5), (ExpertId(2, 1), 0.25), (ExpertId(2, 3), 0.25)}
    # cosine over the whole matrix: only layer 0 of 3 is filled so far -> 1/sqrt(3)
    assert plan.replace and pred.stats()["mean_request_match_score"] == pytest.approx(3**-0.5)


def test_moe_infinity_sits_out_an_iteration_without_live_rows():
    """A context whose every position is padding (no live row) plans nothing, with requests stored."""
    store = RequestMatrixStore(3, 4, capacity=4)
    store.add(torch.tensor([[5.0, 5, 0, 0], [0, 0, 5, 5], [5, 0, 5, 0]]))
    pred = MoEInfinityPredictor(PredictorDeps(SPEC3, 2, requests=store))
    none = torch.zeros(0, dtype=torch.long)
    assert pred.on_iteration_start(IterationContext(0, False, 1, none, none)) is None
    assert pred.on_routing(event(0, 0, [[0, 1]])) is None
    scores, rows = store.match(torch.zeros(0, 3, 4))
    assert scores.shape == rows.shape == (0,)


class Unread:
    """Router probabilities no reader may touch (a graphed step leaves them on the device)."""

    def __getattr__(self, name):
        raise AssertionError(f"router probabilities read ({name})")


def test_predictors_that_say_so_never_read_router_probs():
    """`graphed_reads_probs = False` holds: the baselines plan the same with the probabilities
    unreadable as a twin does with them readable (a graphed step then copies no router logits);
    the history recorder says it reads them."""
    from finemoe.history import HistoryRecorder, PredictorChain
    from finemoe.predictor import NonePredictor, PreviousTokenPredictor, reads_router_probs

    store = RequestMatrixStore(3, 4, capacity=4)
    store.add(torch.tensor([[5.0, 5, 0, 0], [0, 0, 5, 5], [5, 0, 5, 0]]))
    table = {1: [0.1, 0.6, 0.1, 0.2], 2: [0.5, 0.0, 0.3, 0.2]}
    spec_logits = {1: torch.tensor([table[1]])}  # a graphed step's speculative logits for layer 1

    def made():
        return [
            SpeculativeGatePredictor(PredictorDeps(SPEC3, 1, gate=lambda t, h: torch.tensor([table[t]] * h.shape[0]))),
            MoEInfinityPredictor(PredictorDeps(SPEC3, 2, requests=store)),
            PreviousTokenPredictor(PredictorDeps(SPEC3, 1)),
            NonePredictor(PredictorDeps(SPEC3, 1)),
        ]

    planned = 0
    for pred, twin in zip(made(), made(), strict=True):
        assert reads_router_probs(pred) is False
        for c in (ctx(0), ctx(1)):
            pred.on_iteration_start(c)
            twin.on_iteration_start(c)
            for layer in range(3):
                ev = event(c.iteration, layer, [[layer, 3]], torch.zeros(1, 2))  # (the gate's router input)
                if layer == 0:  # a graphed step's gate output; later layers run the gate on the input
                    ev.speculated, ev.speculated_probs = spec_logits, lambda t, x: x
                plan = pred.on_routing(dataclasses.replace(ev, probs=Unread()))  # raises if read
                seen = twin.on_routing(ev)
                assert (plan is None) == (seen is None)
                if plan is not None:
                    assert plan.requests == seen.requests
                    planned += 1
    assert planned >= 6  # the gate (layers 0, 1), moe-infinity and previous-token planned
    recorder = HistoryRecorder(PredictorDeps(SPEC3, 1))
    assert reads_router_probs(recorder) is True
    gate, infinity = made()[:2]
    assert reads_router_probs(PredictorChain([gate, recorder])) is True
    assert reads_router_probs(PredictorChain([gate, infinity])) is False
    assert reads_router_probs(object()) is True  # one that does not say is assumed to read


def test_prefetcher_drops_stale_plans():
    cache, pf, tr = setup(slots=6, inflight=8)
    pf.now(5, 0)
    pf.submit(PrefetchPlan((PrefetchRequest(ExpertId(1, 0), 1.0),), iteration=4))  # an older iteration
    pf.submit(PrefetchPlan((PrefetchRequest(ExpertId(0, 2), 1.0), PrefetchRequest(ExpertId(1, 3), 0.5)), iteration=5))
    assert pf.pump() == 1  # layer 0 is running already: only layer 1's request starts
    assert cache.is_resident(ExpertId(1, 3)) and not cache.is_resident(ExpertId(0, 2))
    assert cache.stats.prefetches_dropped == 2


# -- persistence -----------------------------------------------------------------------------------
IDENT = msf.ModelIdentity("qwen2_moe", 2, 4, 2, 3, "abc")


def contents(n=3, r=2):
    g = torch.Generator().manual_seed(n)
    return msf.MapStoreContents(torch.randn(n, 3, generator=g), torch.rand(n, 2, 4, generator=g), torch.rand(r, 2, 4))


def test_round_trip(tmp_path):
    path = tmp_path / "s.fms"
    c = contents()
    msf.save(path, IDENT, c)
    back = msf.load(path, IDENT)
    assert torch.equal(back.emb, c.emb) and torch.equal(back.maps, c.maps) and torch.equal(back.eams, c.eams)
    assert [p.name for p in tmp_path.iterdir()] == ["s.fms"]  # no temporary file left


@pytest.mark.parametrize("field,value", [("num_experts", 8), ("fingerprint", "xyz"), ("model_type", "mixtral")])
def test_refuses_other_model(tmp_path, field, value):
    path = tmp_path / "s.fms"
    msf.save(path, IDENT, contents())
    before = path.read_bytes()
    with pytest.raises(msf.MapStoreError, match=f"different model.*{field}"):
        msf.load(path, dataclasses.replace(IDENT, **{field: value}))
    assert path.read_bytes() == before


def test_refuses_corrupt_files(tmp_path):
    garbage = tmp_path / "garbage.fms"
    garbage.write_bytes(b"\x00\x01not a safetensors file at all")
    with pytest.raises(msf.MapStoreError, match="corrupt"):
        msf.load(garbage, IDENT)
    good = tmp_path / "good.fms"
    msf.save(good, IDENT, contents())
    cut = tmp_path / "cut.fms"
    cut.write_bytes(good.read_bytes()[:-40])  # truncated
    with pytest.raises(msf.MapStoreError, match="corrupt"):
        msf.load(cut, IDENT)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(msf.MapStoreError, match="not a finemoe map store"):
        msf.load(other, IDENT)


def test_refuses_another_format_version_and_leaves_the_file(tmp_path):
    """A map store written by a finemoe of another format version (here a future one) is refused by
    name, with the fix, and the file is left as it was."""
    c = contents(3)
    meta = {"format": msf.FORMAT, "version": str(int(msf.VERSION) + 1), "model": json.dumps(asdict(IDENT))}
    path = tmp_path / "future.fms"
    msf.atomic_save(path, {"emb": c.emb, "maps": c.maps, "eams": c.eams}, meta)
    before = path.read_bytes()
    with pytest.raises(
        msf.MapStoreError, match=f"version {int(msf.VERSION) + 1} map store; finemoe reads version"
    ) as e:
        msf.load(path, IDENT)
    assert "pass another --map-store path, or delete the file" in str(e.value)
    assert path.read_bytes() == before


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "s.fms"
    msf.save(path, IDENT, contents(3))
    before = path.read_bytes()

    def crash(*a, **k):
        raise KeyboardInterrupt  # e.g. the process is stopped mid-save

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        msf.save(path, IDENT, contents(7))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.fms"]
    monkeypatch.undo()
    assert msf.load(path, IDENT).emb.shape[0] == 3


# -- the engine ------------------------------------------------------------------------------------
PROMPTS = [[5, 9, 13, 2, 7, 7, 1], [3, 3, 8, 20, 11]]


def _engine(path, **kw):
    kw = {"expert_budget": 3, "device": "cpu", "progress": False, "prefetch_distance": 1, **kw}
    return Engine.from_pretrained(path, **kw)


def test_engine_warm_starts_and_saves_the_map_store(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("qwen3_moe")
    store = tmp_path / "maps.fms"
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    with _engine(path, policy="finemoe", map_store=str(store)) as eng:
        first = eng.generate(PROMPTS, params)
        n_maps, n_reqs = eng.maps.size, eng.requests.size
        st = eng.stats().extra
    assert n_maps == 7 + 5 + 2 * 5 and n_reqs == 2  # prefill rows + 5 decode iterations per prompt
    assert st["map_store_size"] == n_maps and st["mean_trajectory_score"] is not None
    assert store.exists()
    with _engine(path, policy="finemoe", map_store=str(store), map_store_learn=False) as eng:
        assert eng.maps.size == n_maps and eng.requests.size == 2
        again = eng.generate(PROMPTS, params)
        assert eng.maps.size == n_maps  # frozen: offline mode
        assert eng.stats().extra["mean_semantic_score"] == pytest.approx(1.0, abs=1e-5)  # seen prompts
    assert [o.token_ids for o in again] == [o.token_ids for o in first]
    before = store.read_bytes()
    with pytest.raises(msf.MapStoreError, match="different model"):
        _engine(tiny_checkpoint("mixtral"), policy="finemoe", map_store=str(store))
    assert store.read_bytes() == before


def test_async_search_is_lossless_and_prefetches(tiny_checkpoint, reference_model):
    path = tiny_checkpoint("qwen2_moe")
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    with _engine(path, policy="finemoe", search="sync", expert_budget="50%") as eng:
        eng.generate(PROMPTS, params)  # fills the store online
        sync = eng.generate(PROMPTS[0], params)[0]
        assert eng.search_mode == "sync" and eng.stats().cache.prefetches_issued > 0
    with _engine(path, policy="finemoe", search="async", expert_budget="50%") as eng:
        eng.generate(PROMPTS, params)
        out = eng.generate(PROMPTS[0], params)[0]
        st = eng.stats()
        assert eng.search_mode == "async" and "contexts_dropped" in st.extra
        # Plans arrive from the searcher thread (on this 2-layer toy most come too late to start).
        assert st.cache.prefetches_issued + st.cache.prefetches_dropped > 0 and st.extra["map_store_size"] > 0
    assert out.token_ids == sync.token_ids


def test_process_search_is_lossless_learns_and_saves(tiny_checkpoint, tmp_path):
    """Search in a worker process: same tokens as the synchronous search, plans arrive from the
    worker, and the maps it learned come back into the saved map store."""
    path = tiny_checkpoint("qwen2_moe")
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    with _engine(path, policy="finemoe", search="sync", expert_budget="50%") as eng:
        eng.generate(PROMPTS, params)
        sync = eng.generate(PROMPTS[0], params)[0]
        sync_maps = eng.maps.size
    store = tmp_path / "maps.fmms"
    with _engine(path, policy="finemoe", search="process", expert_budget="50%", map_store=str(store)) as eng:
        eng.generate(PROMPTS, params)
        out = eng.generate(PROMPTS[0], params)[0]
        st = eng.stats()
        assert eng.search_mode == "process" and "contexts_dropped" in st.extra
        assert "search_error" not in st.extra
        # the worker's store learned every iteration it was sent (the engine's own copy did not);
        # on a loaded machine it falls behind and the engine skips iterations rather than wait
        learned = st.extra["map_store_size"]
        assert eng.maps.size == 0
        if st.extra["contexts_dropped"] == 0:
            assert learned == sync_maps
        else:
            assert 0 < learned <= sync_maps
        assert st.extra["search_process_s"] > 0
        assert st.cache.prefetches_issued + st.cache.prefetches_dropped > 0
        eng.reconfigure(expert_budget="60%")  # a new worker starts from what the old one learned
        assert eng.stats().extra["map_store_size"] == learned
        identity = eng.identity()
    assert out.token_ids == sync.token_ids
    assert msf.load(str(store), identity).maps.shape[0] == learned


def test_process_search_worker_death_is_reported_and_loses_nothing(tiny_checkpoint, tmp_path):
    """A search process that dies mid-run is reported in the stats, the engine keeps generating
    the same tokens without its plans, and the map-store file is not overwritten with the
    engine's stale copy of the stores."""
    from finemoe.process_search import ProcessPredictor

    path = tiny_checkpoint("qwen2_moe")
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    store = tmp_path / "maps.fmms"
    with _engine(path, policy="finemoe", search="process", expert_budget="50%", map_store=str(store)) as eng:
        want = eng.generate(PROMPTS[0], params)[0].token_ids
    before = store.read_bytes()
    with _engine(path, policy="finemoe", search="process", expert_budget="50%", map_store=str(store)) as eng:
        (remote,) = [p for p in eng.async_predictors if isinstance(p, ProcessPredictor)]
        remote._proc.kill()
        remote._proc.wait(timeout=10)
        got = eng.generate(PROMPTS[0], params)[0].token_ids
        st = eng.stats()
        assert "search_error" in st.extra
    assert got == want
    assert store.read_bytes() == before  # not replaced by the engine's never-updated copy


def test_a_store_grown_in_inference_mode_takes_rows_outside_it():
    """The store grows while generate runs (inference mode); rows loaded later, outside it (a
    saved store, a search process's rows pulled back at reconfigure), must still be writable."""
    from finemoe.expert_map import ExpertMapStore, StoreGeometry

    store = ExpertMapStore(StoreGeometry(2, 4, 3), capacity=100, distance=1)
    with torch.inference_mode():
        store.add(torch.ones(70, 3), torch.full((70, 2, 4), 0.25))  # grows past its first 64 rows
    store.load_rows(torch.ones(5, 3), torch.full((5, 2, 4), 0.5))
    assert store.size == 5 and float(store.maps[4, 1, 2]) == 0.5
    store.add(torch.zeros(1, 3) + 2, torch.full((1, 2, 4), 0.1))  # and outside it, too
    assert store.size == 6


def test_finemoe_without_request_matrices_decides_the_same(tiny_checkpoint, tmp_path, caplog):
    """finemoe reads no request matrices: skipping them (auto, no map-store file) changes neither
    tokens nor cache decisions; a file saved anyway says so in the log and holds none."""
    path = tiny_checkpoint("qwen3_moe")
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    runs = {}
    for keep in (True, None):
        with _engine(path, policy="finemoe", record_requests=keep) as eng:
            outs = eng.generate(PROMPTS, params)
            st = eng.stats()
            runs[keep] = ([o.token_ids for o in outs], st.cache.hits, st.cache.misses, st.cache.prefetches_issued)
            assert eng.requests.size == (2 if keep else 0) and eng.maps.size == 7 + 5 + 2 * 5
            if keep is None:
                with caplog.at_level(logging.INFO, logger="finemoe.engine"):
                    eng.save_map_store(tmp_path / "maps.fms")
                assert "records no past requests" in caplog.text
                saved = msf.load(tmp_path / "maps.fms", eng.identity())
    assert runs[True] == runs[None]
    assert saved.maps.shape[0] == 7 + 5 + 2 * 5 and saved.eams.shape[0] == 0


def test_a_search_process_records_request_matrices_as_configured(tiny_checkpoint, tmp_path):
    """The worker process builds its recorder from the engine's configuration: with a map-store file
    (auto) the saved file holds request matrices; with `record_requests=False` none, maps either way."""
    path = tiny_checkpoint("qwen2_moe")
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    saved = {}
    for keep in (None, False):
        store = tmp_path / f"{keep}.fms"
        kw = dict(policy="finemoe", search="process", expert_budget="50%", map_store=str(store), record_requests=keep)
        with _engine(path, **kw) as eng:
            eng.generate(PROMPTS, params)
            assert eng.search_mode == "process"
            identity = eng.identity()
        saved[keep] = msf.load(str(store), identity)
    assert saved[None].eams.shape[0] > 0 and saved[False].eams.shape[0] == 0
    assert saved[None].maps.shape[0] > 0 and saved[False].maps.shape[0] > 0
