"""`cuda_graphs`: single prompts over a static KV cache. Without CUDA every step runs eagerly over
the static cache (the graphs themselves are checked in tests/gpu/test_graphs.py); the tokens must
be those of the engine's usual dynamic-cache path, for every family and policy kind."""

from __future__ import annotations

import pytest
import torch

from finemoe import Engine, SamplingParams
from finemoe.errors import ConfigError
from finemoe.graphs import run_hooks

PARAMS = SamplingParams(max_new_tokens=10, ignore_eos=True)


@pytest.mark.parametrize("model_type", ["qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v3"])
def test_static_cache_path_gives_the_dynamic_cache_tokens(tiny_checkpoint, model_type):
    path = tiny_checkpoint(model_type)
    prompts = [[5, 7, 9, 11], [3, 4]]
    for policy, budget in (("all-gpu", "100%"), ("lru", "50%"), ("finemoe", "50%")):
        with Engine.from_pretrained(path, policy=policy, expert_budget=budget, progress=False) as eng:
            want = [eng.generate(p, PARAMS)[0].token_ids for p in prompts]
        with Engine.from_pretrained(path, policy=policy, expert_budget=budget, progress=False, cuda_graphs=True) as eng:
            got = [eng.generate(p, PARAMS)[0].token_ids for p in prompts]
            st = eng.stats().extra
            batch = [o.token_ids for o in eng.generate(prompts, PARAMS)]  # batches keep the dynamic path
        assert got == want, (policy, budget)
        assert batch == want
        assert st["static_cache_tokens"] == 512 and st["cuda_graphs"] is False  # no CUDA: eager steps


def test_static_cache_grows_for_long_requests(tiny_checkpoint):
    path = tiny_checkpoint("qwen2_moe")
    with Engine.from_pretrained(path, policy="lru", expert_budget="50%", progress=False, cuda_graphs=True) as eng:
        short = eng.generate([1, 2, 3], PARAMS)[0].token_ids
        long = eng.generate([1, 2, 3], SamplingParams(max_new_tokens=510, ignore_eos=True))[0].token_ids
        assert eng.stats().extra["static_cache_tokens"] == 1024
        assert long[:10] == short
        static = eng.static
        every = tuple(range(eng.model.config.vocab_size))  # stops after the first token
        eng.generate([1, 2], SamplingParams(max_new_tokens=8200, stop_token_ids=every))
        assert static.max_len == 1024  # longer than MAX_CACHE_TOKENS: the dynamic cache, no new static one
        eng.reconfigure(cuda_graphs=False)
        assert eng.static is None and eng.stats().extra["cuda_graphs"] is False


class _Router:
    """A stand-in module with forward hooks, as `run_hooks` sees a router."""

    def __init__(self):
        import torch

        self.m = torch.nn.Linear(2, 2)

    def hook(self, fn):
        return self.m.register_forward_hook(fn)


def test_run_hooks_copies_replacement_outputs_into_the_static_ones():
    import torch

    r = _Router()
    seen = []
    r.hook(lambda mod, args, out: (out[0] + 1, out[1] * 2))  # replaces both outputs
    r.hook(lambda mod, args, out: seen.append((out[0].clone(), out[1].clone())))  # sees the replacement
    a, b = torch.zeros(2), torch.ones(2)
    static = (a, b)
    run_hooks(r.m, (torch.zeros(2),), static)
    assert torch.equal(a, torch.ones(2)) and torch.equal(b, torch.full((2,), 2.0))  # written in place
    assert torch.equal(seen[0][0], a) and torch.equal(seen[0][1], b)
    r.m.register_forward_pre_hook(lambda mod, args: None)
    with pytest.raises(ConfigError, match="pre-hooks"):
        run_hooks(r.m, (torch.zeros(2),), static)


def test_sliding_window_models_keep_the_dynamic_path(tiny_checkpoint):
    """A static cache with sliding-window layers tracks its length in a Python int (a graph would
    freeze it): such models decode on the dynamic path, with the same tokens."""
    from finemoe.graphs import static_decode_supported

    with Engine.from_pretrained(tiny_checkpoint("mixtral"), policy="lru", progress=False) as eng:
        assert static_decode_supported(eng.model)
    path = tiny_checkpoint("mixtral", sliding_window=4)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    with Engine.from_pretrained(path, policy="lru", expert_budget="50%", progress=False) as eng:
        want = eng.generate([5, 7, 9, 11, 13, 2], params)[0].token_ids
    with Engine.from_pretrained(path, policy="lru", expert_budget="50%", progress=False, cuda_graphs=True) as eng:
        got = eng.generate([5, 7, 9, 11, 13, 2], params)[0].token_ids
        assert not eng.static.supported and eng.static.max_len == 0  # no static cache was made
        assert not static_decode_supported(eng.model)  # (so the CUDA defaults treat its steps as eager)
        assert eng.stats().extra["cuda_graphs"] is False
    assert got == want


def test_side_graph_gates_are_needed_unless_every_layer_through_their_targets_is_whole():
    """`SideGraphs.gates_needed` (a layer run ahead): 4 layers x 2 experts, gates of strides 1 and 2
    (layer 0 targets 1 and 2, layer 2 targets 3). With layers 1 and 2 whole, layer 0's gate rows are
    never read (its targets are launched before any routing is read); a hole in layer 2 (a target) or
    in layer 1 (on the way to target 2) makes them needed; a layer with no gate needs none."""
    from finemoe.side_graphs import SideGraphs

    sides = object.__new__(SideGraphs)  # (the predicate only: no CUDA stream)
    sides.speculated = [({1: None, 2: None}, True, {}), ({}, True, {}), ({3: None}, True, {}), ({}, True, {})]
    whole = [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert not sides.gates_needed(0, whole)
    assert not sides.gates_needed(2, whole)
    assert not sides.gates_needed(1, whole)  # no gate targets
    hole_in_target = [[0, 1], [2, 3], [4, -1], [6, 7]]
    assert sides.gates_needed(0, hole_in_target)
    assert not sides.gates_needed(2, hole_in_target)  # layer 3 is whole
    hole_between = [[0, 1], [-1, 3], [4, 5], [6, 7]]
    assert sides.gates_needed(0, hole_between)
    assert sides.gates_needed(2, [[0, 1], [2, 3], [4, 5], [-1, 7]])


def test_side_graph_match_is_needed_unless_its_readers_targets_are_whole():
    """`SideGraphs.match_needed` (6 layers x 2 experts, prefetch distance 2): layer l's match is read
    by layer l + 1's plan for target l + 3, unless every layer from l + 1 through l + 3 is whole (the
    reader then runs ahead and its target is launched when it is read). Not deferrable without the
    fused catch-up or when the predictor reads every layer's match (map-aware hints)."""
    from types import SimpleNamespace

    from finemoe.side_graphs import SideGraphs

    matches = SimpleNamespace(distance=2, reads_every_layer=False)
    sides = object.__new__(SideGraphs)  # (the predicate only: no CUDA stream)
    sides.rt, sides.layers, sides.fused = SimpleNamespace(device_matches=matches), 6, True
    whole = [[2 * i, 2 * i + 1] for i in range(6)]
    assert not any(sides.match_needed(layer, whole) for layer in range(6))
    sink = [row[:] for row in whole]
    sink[5][1] = -1  # the last layer holds the absent expert
    assert [sides.match_needed(layer, sink) for layer in range(6)] == [False, False, True, True, True, False]
    early = [row[:] for row in whole]
    early[1][0] = -1  # layer 1 syncs: layer 0's reader is layer 1 itself
    assert [sides.match_needed(layer, early) for layer in range(6)] == [True, False, False, False, False, False]
    sides.fused = False
    assert sides.match_needed(0, whole)
    sides.fused, matches.reads_every_layer = True, True
    assert sides.match_needed(0, whole)


def test_a_side_graph_step_starts_at_its_first_side_launch_after_the_point_it_began(monkeypatch):
    """`SideGraphs.begin_step` / `_open` (the lazy side start, with stand-ins for the streams, events and
    graphs): nothing runs at `begin_step` but recording where the compute stream is; the first side
    launch waits on that record (not on the compute stream as it is then, with later segments queued),
    runs the store sync once, then the graph; a later launch runs no second start. The next step's
    `before_step` makes the compute stream wait for the side stream only if a side graph ran."""
    import contextlib

    from finemoe.side_graphs import SideGraphs

    log: list = []

    class Rec:
        def __init__(self, name):
            self.name = name

        def record(self, stream=None):
            log.append((self.name, "record", getattr(stream, "name", None)))

        def wait_event(self, event):
            log.append((self.name, "wait_event", event.name))

        def wait_stream(self, other):
            log.append((self.name, "wait_stream", other.name))

        def replay(self):
            log.append((self.name, "replay"))

    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "set_stream", lambda s: log.append(("current", s.name)))
    sides = object.__new__(SideGraphs)  # (the bookkeeping only: no CUDA)
    sides.layers, sides.stream, sides._begun, sides.fused = 3, Rec("side"), Rec("begun"), False
    sides._last_done, sides.wait_last = None, True
    sides.variants = [{(False, True): Rec("g0")}, {}, {(False, True): Rec("g2")}]
    sides.index_variants()
    sides.done = [Rec("done0"), None, Rec("done2")]
    sides.gates_skipped = sides.matches_deferred = sides.late_matches = 0
    sides._pending, sides._unopened, sides._opening, sides.step = False, False, None, 0
    compute = Rec("compute")
    sides.before_step(compute)
    sides.begin_step(compute, lambda: log.append(("store", "sync")))
    assert log == [("begun", "record", "compute")]  # the point S_0 reached; no side work yet
    log.clear()
    sides.launch(0, gates=True, match=False)
    assert log == [
        ("side", "wait_event", "begun"),
        ("current", "side"),  # the store sync and the graph run on the side stream ...
        ("store", "sync"),
        ("current", "compute"),  # ... and the step's compute stream is current again after each
        ("current", "side"),
        ("g0", "replay"),
        ("current", "compute"),
        ("done0", "record", "side"),
    ]
    log.clear()
    sides.launch(2, gates=True, match=False)
    assert log == [("current", "side"), ("g2", "replay"), ("current", "compute"), ("done2", "record", "side")]
    log.clear()
    sides.before_step(compute)  # the next step: this one ran side work
    assert log == [("compute", "wait_event", "done2")]  # the step's last side graph's event
    log.clear()
    sides.begin_step(compute, lambda: log.append(("store", "sync")))
    sides.launch(0, gates=False, match=False)  # nothing to run: the step launches no side work
    sides.before_step(compute)
    assert log == [("begun", "record", "compute")]  # no store sync, no graph, no wait on the side stream


def test_a_held_back_predictor_start_runs_once_or_is_dropped(tiny_checkpoint, monkeypatch):
    """A replayed decode step holds its predictors' start back (`start_iteration` with `defer_begin`)
    until `begin_deferred`; `drop_deferred` (a failed step) forgets it, so nothing starts then."""
    path = tiny_checkpoint("mixtral")
    with Engine.from_pretrained(path, policy="finemoe", expert_budget="50%", progress=False) as eng:
        rt, started = eng.runtime, []
        monkeypatch.setattr(rt, "_begin_predictors", lambda *a, **k: started.append(a[0]))
        ids, live = torch.tensor([[5]]), torch.ones((1, 1), dtype=torch.bool)
        rt.defer_begin = True
        rt.start_iteration(7, False, ids, live)
        assert started == []  # held back
        rt.begin_deferred()
        rt.begin_deferred()
        assert started == [7]  # once
        rt.start_iteration(8, False, ids, live)
        rt.drop_deferred()
        rt.begin_deferred()
        assert started == [7]


def test_a_pinned_stream_is_taken_once_not_per_iteration(tiny_checkpoint, monkeypatch):
    """`OffloadRuntime.pin_stream` (the static decoder's running context): the transfer takes the
    compute stream when it is pinned, and iterations skip the lookup until it is unpinned."""
    path = tiny_checkpoint("mixtral")
    with Engine.from_pretrained(path, policy="lru", expert_budget="50%", progress=False) as eng:
        rt, looked = eng.runtime, []
        monkeypatch.setattr(eng.cache.transfer, "refresh_stream", lambda: looked.append(1), raising=False)
        ids, live = torch.tensor([[5]]), torch.ones((1, 1), dtype=torch.bool)
        rt.start_iteration(1, False, ids, live)
        assert len(looked) == 1  # unpinned: every iteration looks it up
        rt.pin_stream(object())
        assert len(looked) == 2  # taken once when pinned
        rt.start_iteration(2, False, ids, live)
        rt.start_iteration(3, False, ids, live)
        assert len(looked) == 2
        rt.pin_stream(None)
        rt.start_iteration(4, False, ids, live)
        assert len(looked) == 3


def test_a_held_back_start_takes_the_embedding_launched_after_s0(tiny_checkpoint, monkeypatch):
    """`OffloadRuntime.embed_held` (`embed_early`): the held-back start's token embedding is launched
    once, right after S_0's launch, and `begin_deferred` takes it (waiting for it) instead of launching
    another; a dropped start forgets it. Stand-ins for the CUDA launch and wait."""
    path = tiny_checkpoint("mixtral")
    with Engine.from_pretrained(path, policy="finemoe", expert_budget="50%", progress=False) as eng:
        rt, launched, waited, contexts = eng.runtime, [], [], []
        assert rt.want_embeddings and rt.embed is not None
        emb = torch.zeros((1, 8))
        monkeypatch.setattr(rt, "_embed_launch", lambda tokens, ready: launched.append(ready) or (emb, emb))
        monkeypatch.setattr(rt, "_embed_wait", lambda: waited.append(1))
        monkeypatch.setattr(rt.stepper, "begin", lambda iteration, ctx: contexts.append(ctx))
        ids, live, ready = torch.tensor([[5]]), torch.ones((1, 1), dtype=torch.bool), object()
        rt._begin = (7, ids, live, None, (), ready)  # (what `start_iteration` holds back on CUDA)
        rt.embed_held()
        rt.embed_held()
        assert launched == [ready] and waited == []  # launched once, not waited for yet
        rt.begin_deferred()
        assert launched == [ready] and waited == [1]  # taken, not launched again
        assert contexts[-1].embeddings is emb and contexts[-1].host_embeddings() is emb
        rt._begin = (8, ids, live, None, (), ready)
        rt.embed_held()
        rt.drop_deferred()
        rt._begin = (9, torch.tensor([[6]]), live, None, (), ready)
        rt.begin_deferred()  # the dropped step's embedding is not taken: a fresh one is launched
        assert len(launched) == 3 and waited == [1, 1]


def test_drained_routings_plan_after_the_sync_layers_launch_when_the_host_is_late():
    """`RunAhead.drain` before a routing sync (stand-ins for the events, cache, prefetcher and stepper):
    every drained routing is counted in layer order; the predictors' work goes to the step's late
    events once the sync layer's router is done ("late": the first query that says so and every later
    routing), for all of them ("always"), or never; deferred events are told the sync layer is
    launched. The step's last drain (no compute stream) never defers."""
    from types import SimpleNamespace

    from finemoe.runahead import RunAhead

    class Ev:
        def __init__(self, answers=()):
            self.answers, self.log = list(answers), []

        def synchronize(self):
            pass

        def record(self, stream=None):
            self.log.append(("record", stream))

        def query(self):
            self.log.append(("query",))
            return self.answers.pop(0)

    class Binding:
        def __init__(self, layer):
            self.layer = layer

        def routing_event(self, router, logits, ids, hidden, launched=-1):
            return (self.layer, launched)

    def drain(mode, answers=(), compute="compute", tell=True):
        log: list = []
        rt = SimpleNamespace(
            defer_drained_plans=mode,
            late_events=[],
            active=[object()],
            tell_launched=tell,
            run_ahead_wait_s=0.0,
            critical_decode_s=0.0,
            drained_plans_deferred=0,
            iteration=7,
            begin_deferred=lambda: log.append("begin"),
            cache=SimpleNamespace(account_pinned=lambda layer, ids, pinned: log.append(("count", layer))),
            prefetcher=SimpleNamespace(now=lambda *a: None, resume=lambda: None, pump=lambda: None),
            stepper=SimpleNamespace(route=lambda event: log.append(("route", *event))),
        )
        ahead = object.__new__(RunAhead)  # (the bookkeeping only: no CUDA)
        ahead.rt, ahead.copied, ahead.sync_ready = rt, [Ev() for _ in range(4)], Ev(answers)
        ids = torch.tensor([[1, 0]])
        ahead.pending = [(i, Binding(i), None, None, ids, None, [0]) for i in range(3)]
        ahead.drain(2, compute)
        late = [b.routing_event(*g) for b, *g in rt.late_events]
        return log, late, ahead.sync_ready.log, rt.drained_plans_deferred

    counts = [("count", 0), ("count", 1), ("count", 2)]
    log, late, ready, n = drain("never")
    assert log == ["begin", ("count", 0), ("route", 0, 2), ("count", 1), ("route", 1, 2), ("count", 2), ("route", 2, 2)]
    assert late == [] and ready == [] and n == 0
    log, late, ready, n = drain("late", answers=(False, True))
    assert log == ["begin", ("count", 0), ("route", 0, 2), ("count", 1), ("count", 2)]
    assert late == [(1, 3), (2, 3)] and n == 2  # told the sync layer (3) is launched
    assert ready == [("record", "compute"), ("query",), ("query",)]  # no query once it said done
    log, late, ready, n = drain("always")
    assert [e for e in log if e[0] == "count"] == counts and not any(e[0] == "route" for e in log[1:])
    assert late == [(0, 3), (1, 3), (2, 3)] and ready == [] and n == 3
    log, late, ready, n = drain("always", compute=None)  # the step's last drain: nothing after it
    assert late == [] and n == 0 and ("route", 2, 2) in log
    log, late, ready, n = drain("always", tell=False)
    assert late == [(0, -1), (1, -1), (2, -1)]
    with pytest.raises(ValueError, match="defer_drained_plans"):
        drain("all")  # (a typo is refused, not taken as "late")
