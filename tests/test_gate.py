"""The speculative gate: host copies of linear routers give the module's probabilities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from finemoe.gate import CPU_HOST_ROWS, RouterGate, _host_logits
from finemoe.loader import find_moe_layers
from finemoe.models import get_adapter
from finemoe.synthetic import make_config, random_model


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "gpt_oss"])
def test_host_gate_matches_the_router_module(family):
    model = random_model(make_config(family), seed=3)
    adapter = get_adapter(model.config.model_type)
    refs = find_moe_layers(model, adapter)
    E = refs[0].experts.gate_up_proj.shape[0]
    gate = RouterGate([r.router for r in refs], adapter, E)
    hidden = torch.randn(3, model.config.hidden_size)
    for layer in range(len(refs)):
        host = gate._host_weights(layer, hidden)
        assert host is not None, "a linear router gets a host copy"
        ref = gate._module_probs(refs[layer].router, hidden)  # [3, E]
        mine = adapter.router_probs(refs[layer].router, _host_logits(hidden, *host))
        assert mine.shape == ref.shape == (3, E)
        torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-4)
        assert torch.allclose(gate(layer, hidden), ref, atol=1e-5)  # CPU router: the host copy too
    prompt = torch.randn(CPU_HOST_ROWS + 1, model.config.hidden_size)  # a prompt's rows: the module itself
    assert torch.equal(gate(0, prompt), gate._module_probs(refs[0].router, prompt))


def test_non_linear_router_keeps_the_module():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 4, bias=False)

        def forward(self, x):
            logits = self.proj(x) * 2
            return logits, None, logits.topk(2).indices

    adapter = get_adapter("qwen2_moe")
    gate = RouterGate([Odd()], adapter, 4)
    assert gate._host_weights(0, torch.randn(2, 8)) is None  # no `weight` [E, H]: not a plain linear map
    out = gate(0, torch.randn(2, 8))
    assert out.shape == (2, 4) and torch.allclose(out.sum(-1), torch.ones(2))


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_device_linear_logits_give_the_gates_plan(family):
    """What a graphed decode step computes for a gate (the router's own linear map on the router
    input, `device_linear`), turned into probabilities by `probs_of`, is the gate's result; a
    speculative-gate predictor reading it from the event plans what it plans from the input."""
    from finemoe.baselines import SpeculativeGatePredictor
    from finemoe.loader import build_spec
    from finemoe.predictor import PredictorDeps
    from finemoe.types import IterationContext, RoutingEvent

    model = random_model(make_config(family), seed=5)
    adapter = get_adapter(model.config.model_type)
    refs = find_moe_layers(model, adapter)
    E = refs[0].experts.gate_up_proj.shape[0]
    gate = RouterGate([r.router for r in refs], adapter, E)
    spec = build_spec(model, adapter, torch.float32)
    hidden = torch.randn(1, model.config.hidden_size)
    for layer in range(len(refs)):
        lin = gate.device_linear(layer)
        assert lin is not None and lin[0] is not None
        logits = torch.nn.functional.linear(hidden, *lin)  # [1, E]
        torch.testing.assert_close(gate.probs_of(layer, logits), gate(layer, hidden), atol=1e-5, rtol=1e-4)
    pred = SpeculativeGatePredictor(PredictorDeps(spec, 1, None, None, gate))
    ctx = IterationContext(0, False, 1, torch.arange(1), torch.zeros(1, dtype=torch.int64), None)
    pred.on_iteration_start(ctx)
    ids = torch.zeros(1, spec.top_k, dtype=torch.int64)
    probs = torch.full((1, E), 1.0 / E)
    from_hidden = pred.on_routing(RoutingEvent(0, 0, probs, ids, False, hidden))
    done = {1: torch.nn.functional.linear(hidden, *gate.device_linear(1))}
    from_logits = pred.on_routing(
        RoutingEvent(0, 0, probs, ids, False, None, speculated=done, speculated_probs=gate.probs_of)
    )
    # logits without their converter are not read (and there is no router input to fall back on)
    assert pred.on_routing(RoutingEvent(0, 0, probs, ids, False, None, speculated=done)) is None
    assert from_logits is not None and from_hidden is not None
    assert [r.expert for r in from_logits.requests] == [r.expert for r in from_hidden.requests]
    # read after running ahead: no plan for a layer whose compute is launched already (1 = the target)
    assert pred.on_routing(RoutingEvent(0, 0, probs, ids, False, hidden, launched=1)) is None
    late = pred.on_routing(RoutingEvent(0, 0, probs, ids, False, hidden, launched=0))
    assert late is not None and late.requests == from_hidden.requests


def test_graphed_gate_rows_are_read_as_numpy_copies_with_the_same_plan():
    """`settled_rows` (a graphed step's pinned gate rows): it waits for the layer's side graph, then
    returns a NumPy copy of the row itself (unchanged by the next step's rewrite) or a tensor clone
    of anything else; the gate plans the same requests, priorities included, from the NumPy copy as
    from the tensor (hand-set row: E = 6, k = 2, a tie at the second place goes to the lower id)."""
    from finemoe.baselines import SpeculativeGatePredictor
    from finemoe.execution import settled_rows
    from finemoe.predictor import PredictorDeps
    from finemoe.types import IterationContext, MoESpec, RoutingEvent

    row = torch.tensor([[0.1, 0.25, 0.05, 0.25, 0.3, 0.05]])  # [1, E] float32, the pinned row
    rows, views = {1: row}, {1: row.numpy()}
    settled: list[int] = []
    probs_of = settled_rows(settled.append, 0, rows, views)
    got = probs_of(1, row)
    assert settled == [0] and isinstance(got, np.ndarray) and got.dtype == np.float32
    assert got.tolist() == row.tolist()
    row.fill_(0.0)  # the next step rewrites the pinned row: the copy keeps the values read
    assert got.tolist() != row.tolist()
    other = torch.rand(1, 6)
    assert isinstance(probs_of(1, other), torch.Tensor) and torch.equal(probs_of(1, other), other)

    spec = MoESpec("qwen2_moe", (0, 1), 6, 2, 8, 4, (), torch.float32, 2)
    pred = SpeculativeGatePredictor(PredictorDeps(spec, 1, None, None, lambda t, h: None))
    ctx = IterationContext(0, False, 1, torch.arange(1), torch.zeros(1, dtype=torch.int64), None)
    pred.on_iteration_start(ctx)
    values = torch.tensor([[0.1, 0.25, 0.05, 0.25, 0.3, 0.05]])
    ids = torch.zeros(1, 2, dtype=torch.int64)
    plans = []
    for given in (lambda t, p: p.clone(), settled_rows(lambda layer: None, 0, {1: values}, {1: values.numpy()})):
        event = RoutingEvent(0, 0, values, ids, False, None, speculated={1: values}, speculated_probs=given)
        plans.append([(r.expert.layer, r.expert.expert, r.priority) for r in pred.on_routing(event).requests])
    assert plans[0] == plans[1] == [(1, 4, pytest.approx(0.3)), (1, 1, pytest.approx(0.25))]
    assert [type(p) for _, _, p in plans[1]] == [float, float]


def test_device_linear_refuses_a_router_that_is_not_its_weight():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 8))

        def forward(self, x):
            logits = torch.nn.functional.linear(x, self.weight) * 3  # not F.linear(x, weight)
            return logits, None, logits.topk(2).indices

    gate = RouterGate([Scaled()], get_adapter("qwen2_moe"), 4)
    assert gate.device_linear(0) is None


def test_gate_plans_of_many_rows_are_the_union_of_single_row_plans_ties_to_the_lower_id():
    """A prefill (or batched) routing's gate plan is the union of every row's top k with each
    expert's highest probability, ties at the k-th place going to the lower expert id exactly as
    a single row's plan breaks them (hand-computed: E = 6, k = 2)."""
    from finemoe.baselines import SpeculativeGatePredictor
    from finemoe.predictor import PredictorDeps
    from finemoe.types import IterationContext, MoESpec, RoutingEvent

    spec = MoESpec("qwen2_moe", (0, 1), 6, 2, 8, 4, (), torch.float32, 2)
    table = torch.tensor(
        [
            [0.1, 0.3, 0.3, 0.3, 0.0, 0.0],  # a three-way tie: experts 1 and 2
            [0.5, 0.0, 0.0, 0.2, 0.2, 0.1],  # 0, then 3 (tied with 4)
            [0.0, 0.0, 0.0, 0.0, 0.6, 0.4],  # 4 and 5
        ]
    )

    def gate(target: int, rows: torch.Tensor) -> torch.Tensor:  # rows [N, 1]: indices into `table`
        return table[rows[:, 0].long()]

    pred = SpeculativeGatePredictor(PredictorDeps(spec, 1, None, None, gate))

    def plan(rows: list[int]) -> dict[int, float]:
        n = len(rows)
        pred.on_iteration_start(IterationContext(0, True, n, torch.arange(n), torch.zeros(n, dtype=torch.int64), None))
        hidden = torch.tensor(rows, dtype=torch.float32)[:, None]  # [N, 1]
        event = RoutingEvent(0, 0, torch.zeros(n, 6), torch.zeros(n, 2, dtype=torch.int64), True, hidden)
        return {r.expert.expert: r.priority for r in pred.on_routing(event).requests}

    assert plan([0, 1, 2]) == pytest.approx({0: 0.5, 1: 0.3, 2: 0.3, 3: 0.2, 4: 0.6, 5: 0.4})
    union: dict[int, float] = {}
    for r in range(3):
        for e, p in plan([r]).items():
            union[e] = max(p, union.get(e, 0.0))
    assert plan([0, 1, 2]) == union
    assert plan([0, 1]) == pytest.approx({0: 0.5, 1: 0.3, 2: 0.3, 3: 0.2})  # 4 loses its tie with 3
