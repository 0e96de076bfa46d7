"""Time of a decode or prefill step for the simulator: copies over the host link and compute.

A `CostModel` prices one traced layer's dense part, one expert's compute and one expert copy.
Model shapes come from their Hugging Face `config.json` (numbers below, bf16); the hardware
defaults are the H200 machine's measured figures (`shared/design/gpu-machine.md`): 54 GB/s
pinned host-to-device, ≈ 4.3 TB/s device memory, ≈ 790 TFLOP/s bf16. `layer_overhead_s` stands
for per-layer launch and Python cost that no byte count explains; it is a parameter (the
default, 100 µs, is an assumption, not a measurement of finemoe).

Mapping a trace onto another shape (geometry L_t x E_t, top-k_t onto L_s x E_s, top-k_s): the
cache is simulated in the trace's geometry at the same budget *share*; each traced layer stands
for L_s / L_t layers of the shape (its compute time scales so), and one traced expert for
(L_s k_s) / (L_t k_t) of the shape's experts (its copy and compute scale so), which keeps the
bytes a token activates equal to the shape's. Sparsity (k/E) is the trace's: record the trace on
a reference model of the shape's E and k (`finemoe reference build --geometry 60x4`) for a
closer match.
"""

from __future__ import annotations

from dataclasses import dataclass

from finemoe.errors import ConfigError
from finemoe.types import MoESpec

BF16 = 2
LINK_BPS = 54e9  # pinned host->device, 16-352 MiB copies (gpu-machine.md)
HBM_BPS = 4.3e12  # device memory (gpu-machine.md)
PEAK_FLOPS = 790e12  # bf16 dense matmul (gpu-machine.md)


@dataclass(frozen=True)
class Shape:
    """The numbers of a real MoE model that the cost model needs (from its config.json)."""

    name: str
    hidden: int
    moe_layers: int
    experts: int
    top_k: int
    expert_intermediate: int
    shared_intermediate: int  # always-resident shared expert(s), 0 if none
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    dense_layers: int = 0  # leading layers with a dense MLP instead of experts
    dense_intermediate: int = 0
    attn_params: int = 0  # override for non-standard attention (MLA)
    source: str = ""

    @property
    def expert_bytes(self) -> int:
        return 3 * self.hidden * self.expert_intermediate * BF16

    @property
    def attention_bytes(self) -> int:
        if self.attn_params:
            return self.attn_params * BF16
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return (h * q + 2 * h * kv + q * h) * BF16

    @property
    def layer_dense_bytes(self) -> int:
        """Bytes an MoE layer reads besides its routed experts: attention, shared expert, router."""
        return self.attention_bytes + (3 * self.hidden * self.shared_intermediate + self.hidden * self.experts) * BF16


SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape("mixtral-8x7b", 4096, 32, 8, 2, 14336, 0, 32, 8, 128, 32000, source="mistralai/Mixtral-8x7B-v0.1"),
        Shape("qwen1.5-moe-a2.7b", 2048, 24, 60, 4, 1408, 5632, 16, 16, 128, 151936, source="Qwen/Qwen1.5-MoE-A2.7B"),
        Shape("qwen3-30b-a3b", 2048, 48, 128, 8, 768, 0, 32, 4, 128, 151936, source="Qwen/Qwen3-30B-A3B"),
        Shape(
            "deepseek-v2-lite",
            2048,
            26,
            64,
            6,
            1408,
            2 * 1408,
            16,
            16,
            128,
            102400,
            dense_layers=1,
            dense_intermediate=10944,
            # MLA: q 2048x(16*192) + kv_a 2048x(512+64) + kv_b 512x(16*256) + o (16*128)x2048
            attn_params=2048 * 3072 + 2048 * 576 + 512 * 4096 + 2048 * 2048,
            source="deepseek-ai/DeepSeek-V2-Lite",
        ),
        Shape("olmoe-1b-7b", 2048, 16, 64, 8, 1024, 0, 16, 16, 128, 50304, source="allenai/OLMoE-1B-7B-0924"),
        Shape("phi-3.5-moe", 4096, 32, 16, 2, 6400, 0, 32, 8, 128, 32064, source="microsoft/Phi-3.5-MoE-instruct"),
    )
}


@dataclass(frozen=True)
class CostModel:
    """Seconds for the pieces of a step, per *traced* layer and per *traced* expert."""

    name: str
    copy_s: float  # one traced expert over the host link
    layer_s: float  # one traced layer's dense part in a decode step (one token)
    layer_token_s: float  # extra per token beyond the first (prefill, batches)
    expert_s: float  # one traced expert's compute for one token
    expert_token_s: float  # extra per token beyond the first routed to it
    head_s: float  # embedding, final norm, LM head per step
    expert_bytes: int  # bytes one traced expert stands for
    scale_layers: float = 1.0  # shape layers per traced layer
    scale_experts: float = 1.0  # shape experts per traced expert
    # host time per traced layer in which predictors run (their plans, prefetch issue; a calibration
    # knob, 0 by default): charged where they run, before the layer's copies are issued or, with
    # `prefill_predict` after-demand in a prefill, after (overlapping them)
    predict_host_s: float = 0.0
    # host time of the eviction policy (calibration knobs, 0 by default): per victim search (before
    # the copies it frees slots for) and per layer for a policy that reads the routing (router-ema)
    victim_host_s: float = 0.0
    routing_host_s: float = 0.0
    # host time per traced layer of a graphed decode step besides the predictors (the routing sync's
    # return, serving, the launch, the policy's bookkeeping; a calibration knob, 0 by default):
    # charged on the host's timeline after the layer's segment is launched (`Simulator`, graphed)
    layer_host_s: float = 0.0
    # host time between a graphed decode step's routing sync and the next segment's launch (the wake-up,
    # the serve's bookkeeping, the launch call; a calibration knob, 0 by default): the GPU idles through
    # it at every layer that syncs, and at none run ahead (`Simulator`, graphed)
    sync_host_s: float = 0.0

    def iteration_floor_s(self, num_layers: int, tokens: int = 1) -> float:
        """A step with every expert resident (the all-GPU floor), k experts per layer."""
        return self.head_s + num_layers * (self.layer_s + (tokens - 1) * self.layer_token_s)


def make_cost_model(
    trace_spec: MoESpec,
    shape: str = "trace",
    link_bps: float = LINK_BPS,
    hbm_bps: float = HBM_BPS,
    flops: float = PEAK_FLOPS,
    layer_overhead_s: float = 100e-6,
    predict_host_s: float = 0.0,
    victim_host_s: float = 0.0,
    routing_host_s: float = 0.0,
    layer_host_s: float = 0.0,
    sync_host_s: float = 0.0,
) -> CostModel:
    """The cost model of `shape` ("trace": the traced model itself, in bf16) for a trace of
    `trace_spec`'s geometry; see the module docstring for the mapping. `predict_host_s` (per layer
    in which predictors run), `routing_host_s` (per layer), `victim_host_s` (per victim search, at
    most one per layer and per prefetch batch), `layer_host_s` (per layer of a graphed decode step)
    and `sync_host_s` (per routing sync of a graphed decode step) are host seconds of the shape,
    scaled to traced layers like the rest."""
    L_t, k_t = trace_spec.num_layers, trace_spec.top_k
    if shape == "trace":
        H, I_e = trace_spec.hidden_size, trace_spec.intermediate_size
        shp = Shape(
            "trace",
            H,
            L_t,
            trace_spec.num_experts,
            k_t,
            I_e,
            trace_spec.shared_expert_intermediate_size,
            max(H // 64, 1),
            max(H // 64, 1),
            64,
            0,
        )
    else:
        try:
            shp = SHAPES[shape]
        except KeyError:
            raise ConfigError(f"unknown shape {shape!r}; choose 'trace' or one of: {', '.join(SHAPES)}") from None
    scale_l = shp.moe_layers / L_t
    scale_e = (shp.moe_layers * shp.top_k) / (L_t * k_t)
    e_bytes = shp.expert_bytes * scale_e
    flop_per_token_expert = 2 * 3 * shp.hidden * shp.expert_intermediate * scale_e
    dense = shp.layer_dense_bytes * scale_l
    flop_per_token_layer = 2 * shp.layer_dense_bytes / BF16 * scale_l
    if shp.dense_layers:  # leading dense-MLP layers are spread over the traced layers
        extra = shp.dense_layers * (shp.attention_bytes + 3 * shp.hidden * shp.dense_intermediate * BF16) / L_t
        dense += extra
        flop_per_token_layer += 2 * extra / BF16
    head_bytes = shp.vocab * shp.hidden * BF16
    return CostModel(
        name=shp.name,
        copy_s=e_bytes / link_bps,
        layer_s=layer_overhead_s * scale_l + dense / hbm_bps,
        layer_token_s=flop_per_token_layer / flops,
        expert_s=e_bytes / hbm_bps,
        expert_token_s=flop_per_token_expert / flops,
        head_s=layer_overhead_s + head_bytes / hbm_bps,
        expert_bytes=int(e_bytes),
        scale_layers=scale_l,
        scale_experts=scale_e,
        predict_host_s=predict_host_s * scale_l,
        victim_host_s=victim_host_s * scale_l,
        routing_host_s=routing_host_s * scale_l,
        layer_host_s=layer_host_s * scale_l,
        sync_host_s=sync_host_s * scale_l,
    )
