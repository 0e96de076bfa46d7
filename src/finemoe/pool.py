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
        self._views: list[list[torch.Tensor] | None] = [None] * slots

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.parts.values())

    def slot(self, s: int) -> list[torch.Tensor]:
        """The part tensors of slot `s`, in `spec.parts` order (views made once per slot)."""
        views = self._views[s]
        if views is None:
            views = self._views[s] = [t[s] for t in self.parts.values()]
        return views

    def window(self, base: int, size: int) -> dict[str, torch.Tensor]:
        return {n: t[base : base + size] for n, t in self.parts.items()}

    def release(self) -> None:
        self.parts = {}
        self._views = []
        self.num_slots = 0


class SlotGather:
    """A contiguous scratch copy of a few pool slots, for a layer whose experts sit further apart
    in the pool than one grouped kernel call may span (CUDA caps its groups).

    `take` gathers the named slots into scratch rows [0, n) with one `index_select` per part and
    returns them with the layer's local table [E] (expert -> scratch row; n = not gathered). The
    index rows are written on the host (pinned on CUDA) and copied without a synchronisation; a
    layer's row is rewritten only after its previous copy finished. Device memory: `capacity`
    experts.
    """

    def __init__(self, pool: SlotPool, num_layers: int, num_experts: int, capacity: int) -> None:
        dev = pool.device
        self.pool, self.capacity, self.num_experts = pool, capacity, num_experts
        self.scratch = {
            n: torch.empty((capacity, *t.shape[1:]), dtype=t.dtype, device=dev) for n, t in pool.parts.items()
        }
        pin = dev.type == "cuda"
        # per layer: `capacity` slot ids, then the [E] local table
        self._host = torch.zeros((num_layers, capacity + num_experts), dtype=torch.int32, pin_memory=pin)
        self._rows = self._host.numpy()
        self._dev = self._host.to(dev) if pin else self._host
        self._copied: list[torch.cuda.Event | None] = [None] * num_layers

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.scratch.values())

    def take(self, layer: int, experts: list[int], slots: list[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Gather `slots` (of `experts`, same order; at most `capacity`) into scratch rows [0, n):
        returns the part views [n, ...] and the local table [E] (int32 on the device)."""
        n, cap = len(slots), self.capacity
        if n > cap:
            raise ValueError(f"{n} experts do not fit a gather scratch of {cap}")
        ev = self._copied[layer]
        if ev is not None:
            ev.synchronize()  # issued a layer or more ago: returns at once in practice
        row = self._rows[layer]
        row[:n] = slots
        row[cap:] = n
        row[[cap + e for e in experts]] = range(n)
        if self._dev is not self._host:
            self._dev[layer].copy_(self._host[layer], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self._dev.device))
            self._copied[layer] = ev
        idx = self._dev[layer, :n]
        parts = {}
        for name, src in self.pool.parts.items():
            dst = self.scratch[name][:n]
            torch.index_select(src, 0, idx, out=dst)
            parts[name] = dst
        return parts, self._dev[layer, cap:]
