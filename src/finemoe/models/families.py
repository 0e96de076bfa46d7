"""One adapter per supported family (transformers 5.17 modeling code is the reference)."""

from __future__ import annotations

from finemoe.models.base import GATE_UP_DOWN, W1_W3_W2, FamilyAdapter, sigmoid_probs

MIXTRAL = FamilyAdapter(
    model_type="mixtral",
    display_name="Mixtral",
    block_attr="mlp",
    router_attr="gate",
    ckpt_block="block_sparse_moe",
    per_expert_keys=W1_W3_W2,
    renames=((".block_sparse_moe.", ".mlp."),),
    routing="softmax (fp32) -> top-k -> renormalised",
    example="mistralai/Mixtral-8x7B-v0.1",
)

PHIMOE = FamilyAdapter(
    model_type="phimoe",
    display_name="PhiMoE",
    block_attr="mlp",
    router_attr="router",
    ckpt_block="block_sparse_moe",
    per_expert_keys=W1_W3_W2,
    renames=((".block_sparse_moe.gate.", ".mlp.router."), (".block_sparse_moe.", ".mlp.")),
    routing="sparsemixer top-2 (maps use softmax of the logits)",
    example="microsoft/Phi-3.5-MoE-instruct",
)

QWEN2_MOE = FamilyAdapter(
    model_type="qwen2_moe",
    display_name="Qwen2-MoE / Qwen1.5-MoE",
    block_attr="mlp",
    router_attr="gate",
    ckpt_block="mlp",
    per_expert_keys=GATE_UP_DOWN,
    routing="softmax (fp32) -> top-k, renormalised if norm_topk_prob",
    shared_experts="1 shared expert x sigmoid gate, always resident",
    shared_size_attrs=("shared_expert_intermediate_size",),
    example="Qwen/Qwen1.5-MoE-A2.7B",
)

QWEN3_MOE = FamilyAdapter(
    model_type="qwen3_moe",
    display_name="Qwen3-MoE",
    block_attr="mlp",
    router_attr="gate",
    ckpt_block="mlp",
    per_expert_keys=GATE_UP_DOWN,
    routing="softmax (fp32) -> top-k, renormalised if norm_topk_prob",
    example="Qwen/Qwen3-30B-A3B",
)

OLMOE = FamilyAdapter(
    model_type="olmoe",
    display_name="OLMoE",
    block_attr="mlp",
    router_attr="gate",
    ckpt_block="mlp",
    per_expert_keys=GATE_UP_DOWN,
    routing="softmax -> top-k, renormalised if norm_topk_prob",
    example="allenai/OLMoE-1B-7B-0924",
)

DEEPSEEK_V2 = FamilyAdapter(
    model_type="deepseek_v2",
    display_name="DeepSeek-V2",
    block_attr="mlp",
    router_attr="gate",
    ckpt_block="mlp",
    per_expert_keys=GATE_UP_DOWN,
    routing="softmax (fp32) -> greedy or group-limited top-k -> x routed_scaling_factor",
    shared_experts="n_shared_experts fused MLP, always resident; first_k_dense_replace dense layers",
    shared_size_attrs=("moe_intermediate_size*n_shared_experts",),
    example="deepseek-ai/DeepSeek-V2-Lite",
)

DEEPSEEK_V3 = FamilyAdapter(
    model_type="deepseek_v3",
    display_name="DeepSeek-V3",
    block_attr="mlp",
    router_attr="gate",
    ckpt_block="mlp",
    per_expert_keys=GATE_UP_DOWN,
    router_probs=sigmoid_probs,
    routing="sigmoid (+bias for selection) -> group-limited top-k (maps: normalised sigmoid scores)",
    shared_experts="n_shared_experts fused MLP, always resident; first_k_dense_replace dense layers",
    shared_size_attrs=("moe_intermediate_size*n_shared_experts",),
    example="deepseek-ai/DeepSeek-V3",
)

GPT_OSS = FamilyAdapter(
    model_type="gpt_oss",
    display_name="GPT-OSS",
    block_attr="mlp",
    router_attr="router",
    ckpt_block="mlp",
    routing="top-k of logits -> softmax over the k (maps: softmax of all logits)",
    example="openai/gpt-oss-20b (bf16 export; MXFP4 checkpoints are refused)",
)

GRANITEMOE = FamilyAdapter(
    model_type="granitemoe",
    display_name="GraniteMoE",
    block_attr="block_sparse_moe",
    router_attr="router",
    ckpt_block="block_sparse_moe",
    fused_keys={"gate_up_proj": "input_linear.weight", "down_proj": "output_linear.weight"},
    renames=((".block_sparse_moe.router.layer.", ".block_sparse_moe.router."),),
    router_logits_at=2,  # GraniteMoE's router returns (top_k_index, top_k_weights, logits)
    router_index_at=0,
    routing="top-k of logits -> softmax over the k (maps: softmax of all logits)",
    example="ibm-granite/granite-3.0-1b-a400m-instruct",
)

ALL = (MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE, DEEPSEEK_V2, DEEPSEEK_V3, PHIMOE, GPT_OSS, GRANITEMOE)
