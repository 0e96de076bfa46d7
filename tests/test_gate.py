"""The speculative gate: host copies of linear routers give the module's probabilities."""

from __future__ import annotations

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
