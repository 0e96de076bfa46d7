"""The experts' arithmetic over the slot pool: transformers' grouped and batched expert kernels
applied to routed (token, expert) pairs whose weights live in pool slots, and the slot windows a
grouped call may span. Pure tensor functions; `execution.LayerBinding` decides which to call."""

from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.moe import _batched_linear, _grouped_linear


def grouped_pairs(
    experts: nn.Module,
    parts: dict[str, torch.Tensor],
    hidden: torch.Tensor,  # [T, H]
    slot_idx: torch.Tensor,  # [T, k]; value S (= number of slots) means "skip this pair"
    weights: torch.Tensor,  # [T, k]
    num_slots: int,
    may_skip: bool = True,
) -> torch.Tensor:
    """Weighted outputs of every (token, k) pair, [T*k, H] in pair order; skipped pairs are 0.

    Mirrors transformers' `grouped_mm_experts_forward` step by step over the slot pool.
    `may_skip=False` promises no pair is skipped (every id < S): the masking is left out, five
    fewer kernel launches per call, the same values.
    """
    device = hidden.device
    k = slot_idx.size(-1)
    sample_weights = weights.reshape(-1)  # [T*k]
    ids = slot_idx.reshape(-1)
    ids_g, perm = torch.sort(ids)
    hidden_g = hidden[perm // k]  # [T*k, H]
    weights_g = sample_weights[perm]
    if device.type == "cuda":  # as transformers does (graph-capturable)
        per_slot = torch.histc(ids_g.int(), bins=num_slots, min=0, max=num_slots - 1)
    else:  # float histc misplaces ids above ~4096 bins; counts must be exact
        per_slot = torch.bincount(ids_g, minlength=num_slots + 1)[:num_slots]
    offsets = torch.cumsum(per_slot, dim=0, dtype=torch.int32)
    has_bias, transposed = experts.has_bias, experts.is_transposed
    up_name = "gate_up_proj" if experts.has_gate else "up_proj"
    skip = None
    if may_skip:
        skip = (ids_g >= num_slots).unsqueeze(-1)
        ids_g = ids_g.clamp(max=num_slots - 1)
        hidden_g.masked_fill_(skip, 0.0)
    bias = parts[f"{up_name}_bias"][ids_g] if has_bias else None
    proj = _grouped_linear(hidden_g, parts[up_name], offsets, bias=bias, is_transposed=transposed)
    if skip is not None:
        proj = proj.masked_fill(skip, 0.0)
    proj = experts._apply_gate(proj) if experts.has_gate else experts.act_fn(proj)
    bias = parts["down_proj_bias"][ids_g] if has_bias else None
    proj = _grouped_linear(proj, parts["down_proj"], offsets, bias=bias, is_transposed=transposed)
    if skip is not None:
        proj = proj.masked_fill(skip, 0.0)
    weighted = proj * weights_g.unsqueeze(-1)  # [T*k, H] in sorted order
    out = torch.empty_like(weighted)
    out[perm] = weighted  # back to pair order: one scatter
    return out


def batched_pairs(
    experts: nn.Module,
    parts: dict[str, torch.Tensor],
    hidden: torch.Tensor,  # [T, H]
    slot_idx: torch.Tensor,  # [T, k]; every id a slot of `parts` (no skipped pairs)
    weights: torch.Tensor,  # [T, k]
) -> torch.Tensor:
    """Weighted outputs of every (token, k) pair, [T*k, H] in pair order: the pairs' expert
    weights gathered from the slots ([T*k, ...] each) and two batched matmuls, as transformers'
    `batched_mm_experts_forward` does over a layer's experts."""
    k = slot_idx.size(-1)
    ids = slot_idx.reshape(-1)  # [T*k]
    x = hidden.repeat_interleave(k, dim=0)  # [T*k, H]
    has_bias, transposed = experts.has_bias, experts.is_transposed
    up_name = "gate_up_proj" if experts.has_gate else "up_proj"
    bias = parts[f"{up_name}_bias"][ids] if has_bias else None
    proj = _batched_linear(x, parts[up_name][ids], bias=bias, is_transposed=transposed)
    proj = experts._apply_gate(proj) if experts.has_gate else experts.act_fn(proj)
    bias = parts["down_proj_bias"][ids] if has_bias else None
    proj = _batched_linear(proj, parts["down_proj"][ids], bias=bias, is_transposed=transposed)
    return proj * weights.reshape(-1).unsqueeze(-1)


def slot_windows(slots: list[int], num_slots: int, max_groups: int) -> list[tuple[int, int]]:
    """Cover `slots` with (base, size) windows of the pool no wider than `max_groups` slots.

    The CUDA grouped_mm kernel takes a bounded number of groups; a pool that fits is one window.
    """
    if num_slots <= max_groups:
        return [(0, num_slots)]
    out: list[tuple[int, int]] = []
    ordered = sorted(slots)
    base = last = ordered[0]
    for s in ordered[1:]:
        if s - base >= max_groups:
            out.append((base, last - base + 1))
            base = s
        last = s
    out.append((base, last - base + 1))
    return out
