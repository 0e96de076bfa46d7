"""What finemoe needs to know about one MoE family, declared as data.

The expert geometry itself (which decoder layers hold routed experts, E, k, the per-expert tensor
shapes) is read from the model skeleton built by transformers, so an adapter only says where
things are, what the checkpoint calls them, and how the router turns logits into probabilities.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


def softmax_probs(router: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """Router logits [T, E] -> probabilities [T, E] float32 (softmax over all routed experts)."""
    return torch.softmax(logits.float(), dim=-1)


def sigmoid_probs(router: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """Sigmoid gating (DeepSeek-V3): per-expert sigmoid scores normalised to sum to 1 per token."""
    scores = logits.float().sigmoid()
    return scores / scores.sum(dim=-1, keepdim=True)


@dataclass(frozen=True)
class FamilyAdapter:
    """Locations, checkpoint names and routing math of one transformers MoE family.

    Key templates are relative to a decoder layer's checkpoint prefix `model.layers.{i}.`.
    `per_expert_keys[part]` lists the per-expert keys concatenated along dim 0 to build that part
    (e.g. gate then up for `gate_up_proj`); `fused_keys[part]` names a tensor holding all experts
    along dim 0. In-memory fused names (`<block>.experts.<part>`) are always accepted too.
    """

    model_type: str
    display_name: str
    block_attr: str  # attribute of the decoder layer holding the MoE block
    router_attr: str  # attribute of the block holding the router module
    ckpt_block: str  # the block's name in the checkpoint
    per_expert_keys: dict[str, tuple[str, ...]] = field(default_factory=dict)
    fused_keys: dict[str, str] = field(default_factory=dict)
    renames: tuple[tuple[str, str], ...] = ()  # checkpoint substring -> module substring
    router_logits_at: int = 0  # position of the logits [T, E] in the router's output tuple
    router_index_at: int = 2  # position of the top-k ids [T, k]
    router_probs: Callable[[nn.Module, torch.Tensor], torch.Tensor] = softmax_probs
    routing: str = "softmax -> top-k"
    shared_experts: str = "none"
    shared_size_attrs: tuple[str, ...] = ()  # config attributes summing to the shared expert's I
    example: str = ""

    def rename(self, key: str) -> str:
        """Checkpoint key of a non-expert tensor -> the module's state-dict key."""
        for old, new in self.renames:
            key = key.replace(old, new)
        return key

    def expert_key_candidates(self, layer: int, expert: int, part: str) -> list[list[tuple[str, int | None]]]:
        """Ways to read one part of one expert, best first: lists of (key, row-or-None) to concatenate."""
        pre = f"model.layers.{layer}."
        out: list[list[tuple[str, int | None]]] = []
        if part in self.per_expert_keys:
            out.append([(f"{pre}{self.ckpt_block}.experts.{expert}.{k}", None) for k in self.per_expert_keys[part]])
        if part in self.fused_keys:
            out.append([(f"{pre}{self.ckpt_block}.{self.fused_keys[part]}", expert)])
        out.append([(f"{pre}{self.block_attr}.experts.{part}", expert)])
        return out


GATE_UP_DOWN = {"gate_up_proj": ("gate_proj.weight", "up_proj.weight"), "down_proj": ("down_proj.weight",)}
W1_W3_W2 = {"gate_up_proj": ("w1.weight", "w3.weight"), "down_proj": ("w2.weight",)}
