"""Benchmark-only trace routing: a random-weight model replays a recorded trace's expert choices."""

from __future__ import annotations

import pytest
import torch

from finemoe import Engine, SamplingParams
from finemoe.errors import ConfigError
from finemoe.synthetic import make_config, random_model
from finemoe.trace import TraceError, record
from finemoe.trace_routing import TraceRouting


class Probe:
    """Records the routing every MoE layer reports to the predictors: (layer, top-k ids [T, k])."""

    name = "probe"

    def __init__(self) -> None:
        self.seen: list[tuple[int, torch.Tensor]] = []

    def on_iteration_start(self, ctx):
        return None

    def on_routing(self, event):
        self.seen.append((event.layer, event.topk_ids.clone()))
        return None

    def end_requests(self) -> None:
        pass

    def stats(self) -> dict:
        return {}


@pytest.fixture(scope="module")
def trace(tiny_checkpoint):
    path = tiny_checkpoint("qwen2_moe", num_experts=8, num_experts_per_tok=2, num_hidden_layers=3)
    with Engine.from_pretrained(path, expert_budget="100%", policy="all-gpu", device="cpu", progress=False) as eng:
        return record(eng, [[5, 9, 12, 7], [3, 3, 8, 1, 2]], 5, dtype=torch.float32)


def test_a_different_model_routes_as_the_trace(trace):
    cfg = make_config("qwen2_moe", num_experts=8, num_experts_per_tok=2, num_hidden_layers=4)
    eng = Engine.from_model(random_model(cfg, seed=7), expert_budget="50%", policy="lru", progress=False)
    with eng:
        replay = TraceRouting(eng.model, trace)
        assert replay.layer_map == "model MoE layer l replays trace layer l mod 3"
        probe = Probe()
        eng.add_predictor(probe)
        for r in range(trace.num_requests):
            replay.start(r)
            probe.seen.clear()
            prompt = list(range(10, 10 + replay.prompt_len(r)))
            out = eng.generate(prompt, SamplingParams(max_new_tokens=replay.output_len(r), ignore_eos=True))[0]
            assert len(out.token_ids) == replay.output_len(r)
            assert len(probe.seen) == replay.output_len(r) * 4
            for i, (layer, ids) in enumerate(probe.seen):
                it = i // 4
                a, b = trace.rows(r, it)
                want = trace.topk[a:b, layer % 3].long()
                assert torch.equal(ids.sort(dim=1).values, want.sort(dim=1).values), (r, it, layer)
        st = eng.stats().cache
        assert st.hits + st.misses > 0
        with pytest.raises(ConfigError, match="batch-1"):
            replay.start(0)
            eng.generate([1, 2], SamplingParams(max_new_tokens=1))  # not the recorded prompt length
        replay.remove()
        eng.generate([1, 2], SamplingParams(max_new_tokens=2))  # hooks gone: the model's own routing


def test_geometry_must_match(trace):
    cfg = make_config("qwen2_moe", num_experts=4, num_experts_per_tok=2, num_hidden_layers=3)
    with pytest.raises(ConfigError, match="same experts and top-k"):
        TraceRouting(random_model(cfg), trace)


def test_with_layers_matches_the_replay_map_and_prompt_ids(trace):
    deep = trace.with_layers(5)  # layers 0,1,2,0,1 of the 3-layer trace
    assert deep.spec.num_layers == 5 and deep.num_requests == trace.num_requests
    for l_model, l_trace in enumerate([0, 1, 2, 0, 1]):
        assert torch.equal(deep.topk[:, l_model], trace.topk[:, l_trace])
        assert torch.equal(deep.probs[:, l_model], trace.probs[:, l_trace])
    assert trace.with_layers(2).probs.shape[1] == 2
    with pytest.raises(TraceError, match="requests 0..1"):
        trace.subset([0, 2])
    cfg = make_config("qwen2_moe", num_experts=8, num_experts_per_tok=2, num_hidden_layers=3)
    replay = TraceRouting(random_model(cfg), trace)
    assert replay.prompt_ids(0) == [5, 9, 12, 7] and replay.prompt_ids(1) == [3, 3, 8, 1, 2]
    replay.remove()
    tiny_vocab = make_config("qwen2_moe", num_experts=8, num_experts_per_tok=2, vocab_size=8)
    small = TraceRouting(random_model(tiny_vocab), trace)
    assert small.prompt_ids(0) == [5, 1, 4, 7]  # folded into a smaller vocabulary (Mixtral's 32k < traced ids)
    small.remove()


def test_speculative_gate_replays_the_traces_speculative_outputs(trace):
    assert 1 in trace.spec_probs and 2 in trace.spec_probs
    cfg = make_config("qwen2_moe", num_experts=8, num_experts_per_tok=2, num_hidden_layers=3)
    eng = Engine.from_model(random_model(cfg, seed=3), expert_budget="50%", policy="lru", progress=False)
    with eng:
        replay = TraceRouting(eng.model, trace)
        seen = []

        def gate(target, hidden):
            seen.append((replay._routed, target, replay.gate(target, hidden)))
            return seen[-1][2]

        eng.speculative_gate = gate
        eng.reconfigure(policy="mixtral-offloading")  # its predictor asks layer l+1's gate at layer l
        replay.start(0)
        eng.generate(replay.prompt_ids(0), SamplingParams(max_new_tokens=3, ignore_eos=True))
        assert len(seen) == 3 * 2  # layers 0 and 1 of every iteration (layer 2 has no next layer)
        for (layer, a, b), target, probs in seen:
            assert target == layer + 1
            assert torch.equal(probs, trace.spec_probs[1][a:b, layer].float())
        assert replay.gate(5, torch.zeros(1, 4)) is None  # past the trace's last layer: no plan
        replay.remove()
