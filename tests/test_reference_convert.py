"""The dense -> MoE conversion is lossless as a partition, and the fitting math is transformers'."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, Qwen2MoeForCausalLM

from finemoe.reference.convert import LayerFit, convert_state_dict, moe_config
from finemoe.reference.fit import FitSettings, Geometry, fit_layer, fit_model, moe_ffn


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        tie_word_embeddings=True,
    )
    return AutoModelForCausalLM.from_config(cfg).eval()


def random_fits(model, geo: Geometry, seed=0) -> list[LayerFit]:
    g = torch.Generator().manual_seed(seed)
    fits = []
    for _ in model.model.layers:
        perm = torch.randperm(96, generator=g)
        shared, routed = perm[: geo.shared], perm[geo.shared :]
        fits.append(
            LayerFit(
                shared.sort().values,
                routed.view(geo.experts, -1),
                torch.randn(geo.experts, 64, generator=g),
                torch.rand(geo.experts, generator=g) + 0.5,
            )
        )
    return fits


def to_moe(dense, fits, geo):
    cfg = moe_config(dense.config, geo.experts, geo.top_k, fits[0].experts.shape[1], fits[0].shared.numel())
    moe = Qwen2MoeForCausalLM(cfg).eval()
    sd = convert_state_dict(dense.state_dict(), fits, torch.float32)
    missing, unexpected = moe.load_state_dict(_fused(sd), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    moe.tie_weights()
    return moe


def _fused(sd):
    """Per-expert checkpoint keys -> the fused in-memory layout (what from_pretrained does)."""
    out, experts = {}, {}
    for k, v in sd.items():
        if ".experts." in k:
            pre, rest = k.split(".experts.")
            e, name = rest.split(".", 1)
            experts.setdefault(pre, {}).setdefault(int(e), {})[name] = v
        else:
            out[k] = v
    for pre, by_e in experts.items():
        ids = sorted(by_e)
        out[pre + ".experts.gate_up_proj"] = torch.stack(
            [torch.cat([by_e[e]["gate_proj.weight"], by_e[e]["up_proj.weight"]]) for e in ids]
        )
        out[pre + ".experts.down_proj"] = torch.stack([by_e[e]["down_proj.weight"] for e in ids])
    return out


@pytest.mark.parametrize("geo", [Geometry(4, 1, 32), Geometry(8, 2, 0), Geometry(16, 4, 64)])
def test_partition_is_lossless(dense, geo):
    fits = random_fits(dense, geo)
    moe = to_moe(dense, fits, geo)
    x = torch.randn(10, 64)
    with torch.no_grad():
        for layer, mlayer, fit in zip(dense.model.layers, moe.model.layers, fits, strict=True):
            block = mlayer.mlp
            total = torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
            ex = block.experts
            for e in range(geo.experts):  # every expert, unweighted (undo its output scale)
                gate, up = (x @ ex.gate_up_proj[e].T).chunk(2, dim=-1)
                total += (ex.act_fn(gate) * up) @ ex.down_proj[e].T / fit.scale[e]
            assert torch.allclose(total, layer.mlp(x), atol=1e-5)


def test_fit_math_equals_transformers_block(dense):
    geo = Geometry(8, 2, 32)
    fits = random_fits(dense, geo, seed=1)
    moe = to_moe(dense, fits, geo)
    x = torch.randn(1, 12, 64)
    with torch.no_grad():
        for layer, mlayer, fit in zip(dense.model.layers, moe.model.layers, fits, strict=True):
            assert torch.allclose(moe_ffn(layer.mlp, fit, geo.top_k)(x), mlayer.mlp(x), atol=1e-5)


def test_fit_layer_and_model_run_and_balance(dense):
    geo = Geometry(8, 2, 32)
    torch.manual_seed(0)
    x = torch.randn(2000, 64)
    mlp = dense.model.layers[0].mlp
    fit, diag = fit_layer(
        x,
        mlp.gate_proj.weight,
        mlp.up_proj.weight,
        mlp.down_proj.weight,
        geo,
        FitSettings(steps=60),
        torch.Generator().manual_seed(0),
    )
    assert sorted(torch.cat([fit.shared, fit.experts.flatten()]).tolist()) == list(range(96))  # a partition
    assert fit.router.shape == (8, 64) and (fit.scale > 0).all()
    assert diag["oracle_overlap"] > 2 / 8  # better than chance
    calib = [torch.randint(0, 128, (40,)).tolist() for _ in range(20)]
    fits, info = fit_model(dense, calib, geo, FitSettings(tokens=600, steps=20), progress=False)
    assert len(fits) == 2 and len(info) == 2


def test_geometry_parsing():
    assert Geometry.parse("16x4+1024") == Geometry(16, 4, 1024)
    assert Geometry.parse("8x2") == Geometry(8, 2, 0)
    assert str(Geometry(60, 4, 256)) == "60x4+256"
    with pytest.raises(ValueError, match="EXPERTSxTOPK"):
        Geometry.parse("lots")
    with pytest.raises(ValueError, match="split evenly"):
        Geometry(7, 2, 0).check(96)
