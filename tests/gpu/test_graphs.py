"""Graphed decode (`cuda_graphs`): decode steps replayed from CUDA graphs cut at the routers give
the tokens of the same static-cache steps run eagerly, and of the usual dynamic-cache path, for
all-resident, offloaded and speculative policies; the graphs are captured once and replayed."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from finemoe import Engine, SamplingParams
from finemoe.runtime import HIGHEST_STREAM_PRIORITY

from tests.gpu.medium import EXTRA, medium_checkpoint, medium_prompts


@pytest.fixture(scope="module", params=list(EXTRA))
def ckpt(request, tmp_path_factory):
    return medium_checkpoint(request.param, tmp_path_factory)


@contextmanager
def first_router_hook(eng, hook):
    """`hook` as a forward hook of the engine's first MoE router for the block, removed after it."""
    from finemoe.loader import find_moe_layers

    handle = find_moe_layers(eng.model, eng.adapter)[0].router.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@pytest.mark.parametrize(
    "policy,budget",
    [("all-gpu", "100%"), ("lru", "25%"), ("finemoe", "25%"), ("mixtral-offloading", "25%"), ("lru", "top-k")],
)
def test_graphed_decode_tokens(ckpt, policy, budget):
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    prompts = medium_prompts()
    with Engine.from_pretrained(
        ckpt, policy=policy, expert_budget="25%", device="cuda", progress=False, cuda_graphs=False
    ) as eng:
        if budget == "top-k":
            budget = eng.spec.top_k
        eng.reconfigure(expert_budget=budget)
        dynamic = [eng.generate(p, params)[0].token_ids for p in prompts]
        eng.reconfigure(cuda_graphs=True)
        graphed = [eng.generate(p, params)[0].token_ids for p in prompts]
        st = eng.stats()
        extra = st.extra
        assert extra["decode_graph_error"] is None
        assert extra["cuda_graphs"] and extra["decode_graph_captures"] == 1  # captured once, reused
        assert extra["decode_graph_replays"] == 3 * 23 - 1  # every decode step but the warm-up
        assert extra["decode_graphs"] == (1 if policy == "all-gpu" else eng.spec.num_layers + 1)
        if policy != "all-gpu":
            assert st.cache.misses > 0
            # the layers' serve timed in three spans around each segment's launch (host seconds)
            rt = eng.runtime
            assert rt.serve_decode_s > 0 and rt.launch_decode_s > 0 and rt.post_launch_decode_s > 0
            assert rt.serve_decode_s <= rt.prelaunch_decode_s  # the serve starts after the routing sync
            assert 0 < rt.table_decode_s <= rt.serve_decode_s  # the slot-table rows: part of the serve
            assert eng.cache.table_rows_copied > 0 and extra["table_rows_copied"] == eng.cache.table_rows_copied
        eng.static.use_graphs = False  # the same static cache, every step eager
        eager = [eng.generate(p, params)[0].token_ids for p in prompts]
    assert graphed == eager
    assert graphed == dynamic


def test_graphed_decode_with_trace_routing(ckpt, tmp_path):
    """Router hooks that replace outputs (benchmark routing replay) run between replays and their
    outputs reach the graphs: graphed tokens equal the eager ones under the same replayed routing."""
    from finemoe.trace import record
    from finemoe.trace_routing import TraceRouting

    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    prompts = medium_prompts()[:2]
    with Engine.from_pretrained(ckpt, policy="all-gpu", device="cpu", progress=False) as cpu:
        trace = record(cpu, prompts, params.max_new_tokens)  # recorded as the CLI does, on the CPU
    with Engine.from_pretrained(ckpt, policy="all-gpu", device="cuda", progress=False) as eng:
        out = {}
        for graphs in (False, True):
            # (a cold pool both ways: graphed decode's default would fill it at set-up)
            eng.reconfigure(policy="lru", expert_budget="50%", cuda_graphs=graphs, warm_pool=False)
            replay = TraceRouting(eng.model, trace)
            try:
                toks = []
                for r in range(2):
                    replay.start(r)
                    toks.append(eng.generate(replay.prompt_ids(r), params)[0].token_ids)
                out[graphs] = (toks, eng.stats().cache.hits, eng.stats().cache.misses)
            finally:
                replay.remove()
        assert eng.stats().extra["decode_graph_replays"] > 0
    assert out[True] == out[False]


def test_capture_is_untouched_by_pinned_copies_another_thread_frees(ckpt):
    """Pinned host copies made on the decode stream and freed by another thread while the step is
    captured (the searcher thread's pattern with search="async"): torch's host allocator records
    an event on the copy's stream at the free, so the graphs are captured on a stream of their own.
    On the copies' stream the event joined the graph and the next pinned copy failed ("CUDA error:
    invalid argument"). Graphed tokens equal the eager ones."""
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    prompt = medium_prompts()[0]
    held: list[torch.Tensor] = []
    freed_during_capture: list[int] = []
    with Engine.from_pretrained(
        ckpt, policy="lru", expert_budget="25%", device="cuda", progress=False, cuda_graphs=False
    ) as eng:
        at = eng.adapter.router_logits_at

        def hook(module, args, output):
            if torch.cuda.is_current_stream_capturing():
                if held:  # another thread drops the last references, now, mid-capture
                    box = [held[:]]
                    freed_during_capture.append(len(held))
                    held.clear()
                    worker = threading.Thread(target=box.clear)
                    worker.start()
                    worker.join()
            else:
                held.append(output[at].detach().to("cpu", non_blocking=True))  # pinned, on the current stream

        with first_router_hook(eng, hook):
            eager = eng.generate(prompt, params)[0].token_ids
            eng.reconfigure(cuda_graphs=True)
            graphed = eng.generate(prompt, params)[0].token_ids
            again = eng.generate(prompt, params)[0].token_ids
        extra = eng.stats().extra
    assert freed_during_capture and freed_during_capture[0] > 0
    assert extra["decode_graph_error"] is None and extra["decode_graph_replays"] > 0
    assert graphed == eager and again == eager


def test_a_capture_that_fails_leaves_eager_steps_and_no_open_capture(ckpt):
    """A router hook that syncs with the host while the step is being captured makes the capture
    fail. The decoder ends the capture on the stream it began on (so the allocator stops routing
    into the graph pool and no stream stays capturing), says why, and decodes eagerly: the tokens
    of the eager path, for that request and the next."""
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    prompt = medium_prompts()[0]
    with Engine.from_pretrained(
        ckpt, policy="lru", expert_budget="25%", device="cuda", progress=False, cuda_graphs=False
    ) as eng:
        eager = eng.generate(prompt, params)[0].token_ids
        at = eng.adapter.router_logits_at

        def hook(module, args, output):
            if torch.cuda.is_current_stream_capturing():
                output[at].sum().item()  # a host sync: not allowed in a capture

        with first_router_hook(eng, hook):
            eng.reconfigure(cuda_graphs=True)
            first = eng.generate(prompt, params)[0].token_ids
            second = eng.generate(prompt, params)[0].token_ids
        extra = eng.stats().extra
        assert not torch.cuda.is_current_stream_capturing()
        torch.cuda.synchronize()
    assert extra["decode_graph_error"] is not None and extra["decode_graph_replays"] == 0
    assert first == eager and second == eager


def test_generation_leaves_the_callers_stream_current(ckpt):
    """Graphed generation runs on a side stream; afterwards (copies issued at the end of the
    requests included) the caller's stream is current again."""
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    with Engine.from_pretrained(ckpt, policy="finemoe", expert_budget="25%", device="cuda", progress=False) as eng:
        for p in medium_prompts():
            eng.generate(p, params)
            assert torch.cuda.current_stream() == torch.cuda.default_stream()
        assert eng.stats().extra["decode_graph_replays"] > 0


class _Inputs:
    """A predictor that never plans and reads router inputs: keeps the decode events it sees."""

    name = "inputs"
    wants_hidden = True
    wants_embeddings = False

    def __init__(self):
        self.events = []

    def on_iteration_start(self, ctx):
        return None

    def on_routing(self, event):
        if not event.is_prefill:
            self.events.append(event)
            if event.speculated is not None:  # read now, as a gate does (the rows are rewritten every step)
                event.resolved = {t: event.speculated_probs(t, p) for t, p in event.speculated.items()}
        return None

    def end_requests(self):
        pass

    def stats(self):
        return {}


class _Embeddings(_Inputs):
    """A predictor that never plans: keeps the host embeddings of every decode iteration's start."""

    name = "embeddings"
    wants_hidden = False
    wants_embeddings = True

    def on_iteration_start(self, ctx):
        if not ctx.is_prefill:
            self.embeddings.append(ctx.host_embeddings().clone())  # [N, D] float32
        return None

    def __init__(self):
        super().__init__()
        self.embeddings = []


@pytest.mark.parametrize("policy,stride", [("finemoe", 1), ("promoe", 2)])
def test_graphed_gates_speculate_on_the_device(ckpt, policy, stride):
    """A graphed step computes the speculative gates' probabilities itself (the router's linear map
    and routing function on the router input, in a graph beside the next segment, copied into pinned
    host rows): read during the step they equal the host gate's on the same input, every layer with
    a target has them, what a reader got is its own copy (the rows are rewritten every step, and a
    read after its step raises), and the tokens stay those of the eager steps."""
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    prompt = medium_prompts()[0]
    kw = dict(policy=policy, expert_budget="50%", device="cuda", progress=False, prediction_duty="always")
    with Engine.from_pretrained(ckpt, graph_gates=True, **kw) as eng:
        eng.reconfigure(cuda_graphs=False)
        eager = eng.generate(prompt, params)[0].token_ids
        eng.reconfigure(cuda_graphs=True)
        seen = _Inputs()
        eng.add_predictor(seen)
        graphed = eng.generate(prompt, params)[0].token_ids
        L = eng.spec.num_layers
        assert eng.stats().extra["decode_graph_gates"] == L - stride
        replayed = [e for e in seen.events if e.speculated is not None]
        assert len(replayed) == L * (params.max_new_tokens - 2)  # every step but the prefill and the warm-up
        for event in replayed:
            assert sorted(event.speculated) == [t for t in [event.layer + stride] if t < L]
            for target, probs in event.resolved.items():
                host = eng.gate(target, event.hidden)  # the host gate on the copied router input
                assert isinstance(probs, np.ndarray) and probs.dtype == np.float32  # a copy of the pinned row
                torch.testing.assert_close(torch.from_numpy(probs), host, atol=2e-2, rtol=0)
        early = replayed[0]  # an earlier step's pinned rows have been rewritten since: reading them raises
        with pytest.raises(RuntimeError, match="after the step"):
            early.speculated_probs(*next(iter(early.speculated.items())))
        eng.reconfigure(graph_gates=False)  # the gates run on the host
        on_host = eng.generate(prompt, params)[0].token_ids
        assert eng.stats().extra["decode_graph_gates"] == 0 and eng.stats().extra["decode_graph_replays"] > 0
    assert graphed == eager == on_host


def test_device_search_matches_on_the_gpu_as_the_host_does_one_layer_late(ckpt):
    """search="device": graphed decode steps match the maps on the GPU, beside the next segment.
    Same tokens as the inline search; the map predictor's plan count and mean trajectory score equal
    the inline search's with every map followed, one layer late (what the GPU's match delivers), and
    online learning's new rows reach the device copy row by row."""
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    prompts = medium_prompts()
    got = {}
    for search, knobs in (("sync", {"trajectory_candidates": 0, "trajectory_lag": 1}), ("device", {})):
        with Engine.from_pretrained(
            ckpt,
            policy="finemoe",
            expert_budget="25%",
            device="cuda",
            progress=False,
            search=search,
            prediction_duty="always",
            prefetch_distance=1,  # (3-4 MoE layers: layers 1 .. L-2 plan from trajectory matches)
            **knobs,
        ) as eng:
            assert eng.search_mode == search
            L = eng.spec.num_layers
            tokens = [eng.generate(p, params)[0].token_ids for p in prompts]
            got[search] = (tokens, eng.predictor_stats(), eng.stats().extra)
    (sync_tokens, sync_stats, _), (dev_tokens, dev_stats, extra) = got["sync"], got["device"]
    assert dev_tokens == sync_tokens  # lossless (plans never change tokens); the matches are checked below
    assert extra["decode_graph_error"] is None and extra["decode_graph_replays"] > 0
    assert dev_stats["device_match_steps"] == extra["decode_graph_replays"]
    # every graphed step planned layers 1 .. L-2 from the GPU's matches (layer 0 from the semantic
    # match, the last layer plans nothing); the inline search never did
    assert dev_stats["device_matched_plans"] == (L - 2) * extra["decode_graph_replays"]
    assert sync_stats["device_matched_plans"] == 0
    assert dev_stats["device_store_rows_copied"] > 0  # the rows learned while generating
    assert dev_stats["device_store_bytes"] > 0
    assert dev_stats["plans"] == sync_stats["plans"]
    assert dev_stats["mean_trajectory_score"] == pytest.approx(sync_stats["mean_trajectory_score"], rel=1e-4)


def test_graphed_steps_copy_router_logits_only_when_a_reader_wants_them(ckpt):
    """A graphed step copies a router's logits to the host only for a reader of probabilities: with
    the maps matched on the GPU, the gates computed in the graph, none is left, learning or not (a
    learning store takes each step's map from the device's record, `step_record`: one per step);
    learning where the record could not be captured copies every layer's. The tokens are those of the
    eager steps in every case."""
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    prompt = medium_prompts()[0]
    kw = dict(policy="finemoe", expert_budget="25%", device="cuda", progress=False, prediction_duty="always")
    with Engine.from_pretrained(ckpt, search="device", graph_gates=True, prefetch_distance=1, **kw) as eng:
        L = eng.spec.num_layers
        eng.reconfigure(cuda_graphs=False)
        eager = eng.generate(prompt, params)[0].token_ids  # (learns the prompt's maps)
        eng.reconfigure(cuda_graphs=True)
        learning = eng.generate(prompt, params)[0].token_ids
        extra = eng.stats().extra
        replays = extra["decode_graph_replays"]
        assert replays > 0 and extra["decode_graph_error"] is None
        # (the first replay's predictors started before its capture: that step reads each layer)
        assert extra["decode_graph_logits_copies"] == 0 and extra["decode_step_records"] == replays - 1
        eng.static.drop_graphs()
        eng.static.record.capture = lambda *a: False  # (a record that fails to capture: every layer read)
        per_layer = eng.generate(prompt, params)[0].token_ids
        extra = eng.stats().extra
        assert extra["decode_graph_logits_copies"] == L * (extra["decode_graph_replays"] - replays)
        assert extra["decode_step_records"] == replays - 1
        eng.reconfigure(map_store_learn=False)
        blind = eng.generate(prompt, params)[0].token_ids
        extra = eng.stats().extra
        assert extra["decode_graph_replays"] > 0 and extra["decode_graph_logits_copies"] == 0
        assert eng.predictor_stats()["device_matched_plans"] > 0  # the map predictor still planned
    assert learning == eager and per_layer == eager and blind == eager


@pytest.mark.parametrize("search", ["sync", "device"])
def test_graphed_learning_stores_the_maps_eager_learning_does(ckpt, search):
    """Online learning in graphed decode (each step's map recorded on the device, `step_record`)
    stores what eager decode stores for the same tokens: the same rows in the same order, the same
    embeddings, the maps within float32 rounding (a device softmax against the host's)."""
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    prompt = medium_prompts()[1]
    kw = dict(policy="finemoe", expert_budget="25%", device="cuda", progress=False, search=search)
    with Engine.from_pretrained(ckpt, cuda_graphs=False, **kw) as eng:
        eager = eng.generate(prompt, params)[0].token_ids
        n = eng.maps.size
        eng.reconfigure(cuda_graphs=True)
        graphed = eng.generate(prompt, params)[0].token_ids
        extra = eng.stats().extra
        assert extra["decode_step_records"] == extra["decode_graph_replays"] - 1 > 0  # (not the capture's step)
        assert eng.maps.size == 2 * n and eng.maps.replacements == 0
        state = eng.maps.state()
    assert graphed == eager
    assert torch.equal(state["emb"][:n], state["emb"][n:])
    assert torch.allclose(state["maps"][:n], state["maps"][n:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("policy,budget", [("all-gpu", "100%"), ("finemoe", "25%")])
def test_greedy_token_taken_in_the_last_graph(ckpt, policy, budget):
    """A replayed step's greedy token is the argmax its last graph copies to pinned host memory
    (`StaticDecoder.graph_argmax`): the same tokens as the host's argmax of the same logits (the
    graphs captured again without it) and as eager steps; the copy holds the last step's token."""
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    prompts = medium_prompts()
    with Engine.from_pretrained(ckpt, policy=policy, expert_budget=budget, device="cuda", progress=False) as eng:
        static = eng.static
        assert static.graph_argmax  # (the default)
        in_graph = [eng.generate(p, params)[0].token_ids for p in prompts]
        assert static._argmax_captured and static.replays == len(prompts) * (params.max_new_tokens - 1) - 1
        assert static._token_ready  # (the last step's token was read from the graph's copy)
        assert int(static._token_view[0]) == in_graph[-1][-1]
        static.graph_argmax = False
        static.drop_graphs()  # (captured again at the next request's second decode step, without the argmax)
        on_host = [eng.generate(p, params)[0].token_ids for p in prompts]
        assert not static._argmax_captured and static.graphs and not static._token_ready
        static.use_graphs = False
        eager = [eng.generate(p, params)[0].token_ids for p in prompts]
    assert in_graph == on_host == eager


@pytest.mark.parametrize(
    "policy,kw", [("lru", {}), ("finemoe", {}), ("finemoe", {"search": "device", "graph_gates": True})]
)
def test_whole_layers_run_ahead_of_their_routing_sync(ckpt, policy, kw):
    """One slot short of every expert, layers with all their experts resident appear as the pool
    fills: the segment after such a layer is launched without waiting for its routing, which the host
    reads afterwards. The
    tokens are those of the eager steps and of graphed steps without it; the same accesses are
    counted (hits + misses: the same routings), the predictors still see every layer, and no pin is
    left behind. The step's held-back predictor start embeds the token on a stream of its own
    (`embed_beside`, also launched right after S_0's launch, `embed_early`): the same embeddings as on
    the compute stream. The predictors' work of the routings drained before a sync may go after that
    layer's launch (`defer_drained_plans`): still every layer, in order, and the same tokens."""
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    prompts = medium_prompts()
    kw = dict(policy=policy, expert_budget="50%", device="cuda", progress=False, prediction_duty="always", **kw)
    with Engine.from_pretrained(ckpt, **kw) as eng:
        L, E = eng.spec.num_layers, eng.spec.num_experts
        eng.reconfigure(expert_budget=L * E - 1, cuda_graphs=False)
        eager = [eng.generate(p, params)[0].token_ids for p in prompts]
        eng.reconfigure(cuda_graphs=True)
        seen, embs = _Inputs(), _Embeddings()
        eng.add_predictor(seen)
        eng.add_predictor(embs)
        got, accesses, ahead, embedded, deferred, late_sync = {}, {}, {}, {}, {}, {}
        # run ahead or not; with it, the embedding launched at the drain's start or right after S_0's
        # launch on a highest-priority stream (`embed_early`, `embed_priority`), and the drained
        # routings' predictor work after the sync layer's launch (`defer_drained_plans`)
        # and the ids of a sync after a drain copied before it (`early_routing_read`) or blocking
        for run_ahead, early, defer, read_early in (
            (False, False, "never", True),
            (True, False, "never", True),
            (True, True, "never", True),
            (True, False, "always", True),
            (True, False, "never", False),
        ):
            key = (run_ahead, early) if defer == "never" and read_early else defer if read_early else "blocking"
            eng.runtime.early_routing_read = read_early
            eng.runtime.defer_drained_plans = defer
            eng.runtime.run_ahead = run_ahead
            eng.runtime.embed_beside = run_ahead  # the held-back start's embedding beside the segments, or not
            eng.runtime.embed_early = early
            eng.runtime.embed_priority = HIGHEST_STREAM_PRIORITY if early else 0  # (the default: the highest)
            st0, seen.events, embs.embeddings = eng.stats(), [], []
            by0 = list(eng.runtime.run_ahead_by_layer)
            got[key] = [eng.generate(p, params)[0].token_ids for p in prompts]
            st = eng.stats()
            accesses[key] = st.cache.hits + st.cache.misses - st0.cache.hits - st0.cache.misses
            ahead[key] = st.extra["decode_layers_run_ahead"] - st0.extra["decode_layers_run_ahead"]
            deferred[key] = st.extra["decode_drained_plans_deferred"] - st0.extra["decode_drained_plans_deferred"]
            replays = st.extra["decode_graph_replays"] - st0.extra["decode_graph_replays"]
            by = [b - a for a, b in zip(by0, eng.runtime.run_ahead_by_layer, strict=True)]
            # some replayed step synced after layer 0: with one expert absent, the layers before it ran
            # ahead in that step, so the drain before its sync had routings to read
            late_sync[key] = any(by[j] < replays for j in range(1, L))
            assert st.extra["decode_graph_error"] is None and st.extra["decode_graph_replays"] > 0
            # every layer of every decode step reached the predictors once, in layer order, run ahead or not
            assert [e.layer for e in seen.events] == list(range(L)) * (len(prompts) * (params.max_new_tokens - 1))
            assert all(r == 0 for r in eng.cache.refcount)  # nothing left pinned
            embedded[key] = torch.cat(embs.embeddings)  # [steps, D]
            assert (eng.runtime._embed_stream is not None) == run_ahead  # the side stream's path ran
            if early:  # torch maps the out-of-range default to the device's highest priority
                assert eng.runtime._embed_stream.priority == torch.cuda.Stream.priority_range()[1]
            assert eng.runtime._early is None  # every early embedding taken
            assert eng.runtime._early_read is None  # every early routing copy taken or dropped
            reads = st.extra["decode_early_routing_reads"] - st0.extra["decode_early_routing_reads"]
            assert reads <= replays * L and (read_early or reads == 0)
    assert ahead[False, False] == 0
    # the same tokens embedded on either stream, launched early or not
    assert torch.equal(embedded[True, False], embedded[False, False])
    assert torch.equal(embedded[True, True], embedded[False, False])
    assert ahead[True, False] > 0  # (with one expert absent, at most one layer per step needs its sync)
    assert accesses[True, False] == accesses[True, True] == accesses[False, False] == accesses["always"] > 0
    assert got[True, False] == got[True, True] == got[False, False] == got["always"] == got["blocking"] == eager
    assert accesses["blocking"] == accesses[True, False]
    assert deferred[True, False] == 0
    assert (deferred["always"] > 0) == late_sync["always"]  # (the test's own predictors listen)
    assert torch.equal(embedded["always"], embedded[False, False])


@pytest.mark.parametrize("policy,kw", [("lru", {}), ("finemoe", {"search": "device", "graph_gates": True})])
def test_gathered_absent_experts_leave_one_routing_sync_per_step(ckpt, policy, kw):
    """`gather_absent` one slot short of every expert, the pool filled at set-up: the absent expert
    stays in the last layer (the prefill's sweep and the prefetches take their victims there, and each
    decode step starts by copying back what an earlier layer misses), so every replayed step runs all
    layers but the last ahead of their routing sync, and finemoe's side graphs there run without the
    gates whose targets run ahead too. The last layer's sync takes its ids copied before the drain
    (`early_routing_read`; lru every step), and the tokens are those of the eager steps and of the
    blocking copy's."""
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    prompts = medium_prompts()
    kw = dict(policy=policy, expert_budget="50%", device="cuda", progress=False, prediction_duty="always", **kw)
    with Engine.from_pretrained(ckpt, **kw) as eng:
        L, E = eng.spec.num_layers, eng.spec.num_experts
        eng.reconfigure(expert_budget=L * E - 1, cuda_graphs=False, warm_pool=True, gather_absent=True)
        assert eng.cache.sink == L - 1
        eager = [eng.generate(p, params)[0].token_ids for p in prompts]
        eng.reconfigure(cuda_graphs=True)
        st0 = eng.stats()
        got = [eng.generate(p, params)[0].token_ids for p in prompts]
        st = eng.stats()
        replays = st.extra["decode_graph_replays"] - st0.extra["decode_graph_replays"]
        ahead = st.extra["decode_layers_run_ahead"] - st0.extra["decode_layers_run_ahead"]
        assert st.extra["decode_graph_error"] is None and replays > 0
        assert ahead == (L - 1) * replays
        if policy == "finemoe":  # layers run ahead whose gate targets run ahead too: their gates are skipped
            sides = eng.static.sides
            assert sides.gates_skipped > 0
            assert sides.late_matches == 0  # no deferred match was read (`match_needed`)
        assert [row.count(-1) for row in eng.cache.slot_of] == [0] * (L - 1) + [1]
        assert all(r == 0 for r in eng.cache.refcount)
        reads = st.extra["decode_early_routing_reads"] - st0.extra["decode_early_routing_reads"]
        if policy == "lru":  # nothing else reads the routing: every step's last sync takes its early copy
            assert reads == replays
        else:  # (unless the hook copied predictor inputs: then the blocking copy waits for them too)
            assert reads <= replays
        assert eng.runtime._early_read is None
        eng.runtime.early_routing_read = False
        blocking = [eng.generate(p, params)[0].token_ids for p in prompts]
        assert eng.stats().extra["decode_early_routing_reads"] == st.extra["decode_early_routing_reads"]
    assert got == eager == blocking


def test_deferred_matches_change_no_plan(ckpt):
    """search="device" with the fused match one slot short of every expert, the absent one gathered
    in the last layer: the side graphs defer the matches no plan reads (`SideGraphs.match_needed`)
    and one launch catches the sums up where a plan reads them. Against every match launched (two
    fresh engines, the same requests): the same tokens, plans, device-matched plans and mean
    trajectory score, and no match was launched late by a read. A third engine whose rule defers
    every match (each read then launches its match late, `settle_match`) plans the same too."""
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    prompts = medium_prompts()
    got = {}
    for defer in (False, True, "late"):
        kw = dict(policy="finemoe", search="device", graph_gates=True, prediction_duty="always", prefetch_distance=1)
        with Engine.from_pretrained(ckpt, expert_budget="50%", device="cuda", progress=False, **kw) as eng:
            L, E = eng.spec.num_layers, eng.spec.num_experts
            eng.reconfigure(expert_budget=L * E - 1, warm_pool=True, gather_absent=True)
            eng.runtime.defer_matches = bool(defer)
            if defer == "late":  # (on the instance: the graphs are captured at the first request)
                eng.static.sides.match_needed = lambda layer, slot_of: False
            tokens = [eng.generate(p, params)[0].token_ids for p in prompts]
            st = eng.stats().extra
            assert st["decode_graph_error"] is None and st["decode_graph_replays"] > 0
            fused = eng.static.sides.fused  # the fused catch-up: Triton on CUDA, a softmax family
            assert fused == (eng.spec.model_type != "deepseek_v3")  # (DeepSeek-V3 routes by sigmoid)
            assert (st["decode_side_late_matches"] > 0) == (defer == "late" and fused)
            assert (st["decode_side_matches_deferred"] > 0) == (bool(defer) and fused)
            stats = eng.predictor_stats()
            got[defer] = (tokens, stats["plans"], stats["device_matched_plans"], stats["mean_trajectory_score"])
    assert got[True][:3] == got[False][:3] == got["late"][:3]
    assert got[True][2] > 0
    assert got[True][3] == pytest.approx(got[False][3], rel=1e-6)
    assert got["late"][3] == pytest.approx(got[False][3], rel=1e-6)


@pytest.mark.parametrize("policy,budget", [("all-gpu", "100%"), ("lru", "25%"), ("finemoe", "99%")])
def test_step_marks_time_replayed_steps_on_the_gpu(ckpt, policy, budget):
    """The GPU-side probe (`step_marks`): every replayed step is timed, its spans are positive, the
    split steps' two spans fit inside the host's step time, the next token is fed inside the idle gap,
    and the tokens are unchanged."""
    from finemoe.step_marks import SPANS, StepMarks

    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    prompt = medium_prompts()[0]
    with Engine.from_pretrained(ckpt, policy=policy, expert_budget=budget, device="cuda", progress=False) as eng:
        plain = eng.generate(prompt, params)[0].token_ids
        eng.runtime.step_marks = marks = StepMarks()
        r0 = eng.stats().extra["decode_graph_replays"]
        out = eng.generate(prompt, params)[0]
        steps = len(marks._steps)
        got = marks.summary()
        assert out.token_ids == plain
        assert steps == eng.stats().extra["decode_graph_replays"] - r0 == params.max_new_tokens - 1  # each replayed
        assert got["idle"] > 0.0
        assert 0.0 < got["to_fed"] <= got["idle"]  # (the token fed after the step's end, before the next start)
        t = out.token_times_s
        host_step_us = min(b - a for a, b in zip(t[1:], t[2:], strict=False)) * 1e6
        if policy == "all-gpu":  # one graph per step: no router mark
            assert got["to_router"] == 0.0 and got["tail"] == 0.0
        else:
            # (the last layer run ahead with the host ahead: its launch point can follow router L-1 at once)
            assert got["to_router"] > 0.0 and 0.0 <= got["to_last_launch"] < got["tail"]
            assert got["to_router"] + got["tail"] < 1.5 * host_step_us
        if policy != "finemoe":  # no side graphs
            assert got["side_after_end"] == 0.0
        assert marks.summary() == dict.fromkeys(SPANS, 0.0)  # cleared
