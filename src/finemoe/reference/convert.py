"""Write the reference MoE as a native transformers Qwen2-MoE checkpoint.

Each dense SwiGLU FFN (gate/up/down over N neurons) becomes: a shared expert holding the neurons
in `shared` (its sigmoid gate weight is 0, so the gate is 1/2 and the shared down projection is
scaled by 2), and E routed experts holding the neuron groups in `experts[e]`, with their down
projections scaled by `scale[e]`. The router is `router` [E, H]. Attention, norms and embeddings
are copied unchanged. So with every expert active and weight 1 the block equals the dense FFN.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class LayerFit:
    """The fitted split of one layer: neuron indices, router and per-expert output scales."""

    shared: torch.Tensor  # [S] int64 neuron indices of the shared expert
    experts: torch.Tensor  # [E, n] int64 neuron indices of each routed expert
    router: torch.Tensor  # [E, H] float32
    scale: torch.Tensor  # [E] float32

    @property
    def num_experts(self) -> int:
        return self.experts.shape[0]


def moe_config(dense_config, num_experts: int, top_k: int, expert_size: int, shared_size: int):
    from transformers import Qwen2MoeConfig

    d = dense_config
    return Qwen2MoeConfig(
        vocab_size=d.vocab_size,
        hidden_size=d.hidden_size,
        intermediate_size=d.intermediate_size,
        num_hidden_layers=d.num_hidden_layers,
        num_attention_heads=d.num_attention_heads,
        num_key_value_heads=d.num_key_value_heads,
        hidden_act=d.hidden_act,
        max_position_embeddings=d.max_position_embeddings,
        rms_norm_eps=d.rms_norm_eps,
        tie_word_embeddings=d.tie_word_embeddings,
        rope_parameters=dict(d.rope_parameters),
        use_sliding_window=False,
        qkv_bias=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=expert_size,
        shared_expert_intermediate_size=shared_size,
        norm_topk_prob=True,
        output_router_logits=False,
        bos_token_id=d.bos_token_id,
        eos_token_id=d.eos_token_id,
        pad_token_id=d.pad_token_id,
    )


def convert_state_dict(dense_sd: dict[str, torch.Tensor], fits: list[LayerFit], dtype: torch.dtype) -> dict:
    """Dense Llama state dict + fits -> Qwen2-MoE state dict in the per-expert checkpoint layout."""
    out: dict[str, torch.Tensor] = {}
    for key, value in dense_sd.items():
        if ".mlp." not in key:
            out[key] = value
    for i, fit in enumerate(fits):
        pre = f"model.layers.{i}.mlp."
        wg, wu, wd = (
            dense_sd[pre + "gate_proj.weight"],
            dense_sd[pre + "up_proj.weight"],
            dense_sd[pre + "down_proj.weight"],
        )
        s = fit.shared
        out[pre + "shared_expert.gate_proj.weight"] = wg[s]
        out[pre + "shared_expert.up_proj.weight"] = wu[s]
        out[pre + "shared_expert.down_proj.weight"] = wd[:, s] * 2.0  # sigmoid(0) = 1/2 gate
        out[pre + "shared_expert_gate.weight"] = torch.zeros(1, wg.shape[1])
        out[pre + "gate.weight"] = fit.router
        for e in range(fit.num_experts):
            idx = fit.experts[e]
            out[pre + f"experts.{e}.gate_proj.weight"] = wg[idx]
            out[pre + f"experts.{e}.up_proj.weight"] = wu[idx]
            out[pre + f"experts.{e}.down_proj.weight"] = wd[:, idx] * fit.scale[e]
    return {k: v.to(dtype).contiguous() for k, v in out.items() if not k.startswith("lm_head") or True}


def write_checkpoint(
    out_dir: Path, dense_model, tokenizer, fits: list[LayerFit], top_k: int, dtype: torch.dtype, provenance: dict
) -> Path:
    """Save config, weights (safetensors, per-expert keys), tokenizer and a provenance note."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = {f.experts.shape[1] for f in fits}
    shared = {f.shared.numel() for f in fits}
    if len(sizes) != 1 or len(shared) != 1:
        raise ValueError("every layer must have the same expert and shared sizes")
    cfg = moe_config(dense_model.config, fits[0].num_experts, top_k, sizes.pop(), shared.pop())
    cfg.dtype = str(dtype).removeprefix("torch.")
    sd = convert_state_dict(dense_model.state_dict(), fits, dtype)
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    cfg.save_pretrained(out_dir)
    save_file(sd, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out_dir)
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=1))
    (out_dir / "finemoe_reference.json").write_text(json.dumps(provenance, indent=1))
    return out_dir
