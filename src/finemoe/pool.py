"""The device slot pool: one tensor per expert part, each [S, *part_shape], allocated once.

A slot of every part tensor holds one expert in exactly the layout of transformers' fused
parameters (e.g. `gate_up_proj[s]` is (2I, H) contiguous), so any window of slots is a valid
stock experts tensor for the grouped kernel.
"""

from __future__ import annotations

import torch

from finemoe.types import MoESpec


class SlotPool:
    def __init__(self, spec: MoESpec, slots: int, device: torch.device) -> None:
        self.num_slots = slots
        self.device = torch.device(device)
        self.parts: dict[str, torch.Tensor] = {
            p.name: torch.empty((slots, *p.shape), dtype=spec.dtype, device=device) for p in spec.parts
        }

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.parts.values())

    def slot(self, s: int) -> list[torch.Tensor]:
        """The part tensors of slot `s`, in `spec.parts` order."""
        return [t[s] for t in self.parts.values()]

    def window(self, base: int, size: int) -> dict[str, torch.Tensor]:
        return {n: t[base : base + size] for n, t in self.parts.items()}

    def release(self) -> None:
        self.parts = {}
        self.num_slots = 0
