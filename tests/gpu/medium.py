"""The bf16 random checkpoints and prompts the GPU tests share: a few MoE families at a medium
size (4 layers, hidden 256), big enough for real kernels, small enough to build in seconds."""

from __future__ import annotations

import torch

from finemoe.synthetic import build_random_checkpoint, make_config

MEDIUM = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
)
# per family: the expert geometry on top of MEDIUM
EXTRA = {
    "qwen2_moe": dict(
        num_experts=16, num_experts_per_tok=4, moe_intermediate_size=128, shared_expert_intermediate_size=256
    ),
    "qwen3_moe": dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=128),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "deepseek_v3": dict(
        n_routed_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=128,
        n_group=4,
        topk_group=2,
        num_key_value_heads=4,
    ),
}


def medium_checkpoint(model_type: str, tmp_path_factory):
    """Path of a bf16 random checkpoint of `model_type` at the medium size (seed 3)."""
    cfg = make_config(model_type, **{**MEDIUM, **EXTRA[model_type]})
    return build_random_checkpoint(tmp_path_factory.mktemp(model_type), cfg, seed=3, dtype=torch.bfloat16)


def medium_prompts(n: int = 3, vocab: int = 500) -> list[list[int]]:
    """`n` (at most 3) random prompts of 17, 40 and 9 tokens (seed 1)."""
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for length in (17, 40, 9)][:n]
