"""Speculative gating: run MoE layer l's router on some other layer's router input (the
speculative predictors and finemoe's one-layer-ahead refinement).

A router input on the compute device runs through the router module itself (hooks bypassed). A
router input on the host (decode-sized ones copied there with the layer's routing,
`execution.LayerBinding.on_router`, or a CPU model's of at most `CPU_HOST_ROWS` tokens) runs on a
float32 host copy of the router's linear weight, so no predictor launches device work or waits
for the device, and none runs the module's own top-k. Routers that are not a plain linear map (no
`weight` [E, H]), or whose host result disagrees with the module on the first use, keep using the
module.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from finemoe.models import FamilyAdapter

log = logging.getLogger(__name__)

HOST_GATE_TOLERANCE = 2e-2  # max |Δp| accepted between the host copy and the module (bf16 matmuls)
# A CPU router's input of at most this many tokens (decode) takes the host copy; a prompt's goes
# through the module, whose matmul uses every core where the host copy's einsum uses one
CPU_HOST_ROWS = 64


def _host_logits(hidden: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """`hidden` [T, H] @ `w` [E, H].T (+ `b` [E]) -> logits [T, E] float32, on the calling thread
    only (einsum's own loop: CPU BLAS would spread these tiny products over every core)."""
    out = torch.from_numpy(np.einsum("th,eh->te", hidden.float().numpy(), w.numpy()))
    return out if b is None else out + b


class RouterGate:
    """`gate(layer, hidden [T, H]) -> probabilities [T, E]` float32 on the CPU."""

    def __init__(self, routers: list[nn.Module], adapter: FamilyAdapter, num_experts: int) -> None:
        self.routers, self.adapter, self.num_experts = routers, adapter, num_experts
        self._host: list[tuple[torch.Tensor, torch.Tensor | None] | None] = [None] * len(routers)
        self._checked = [False] * len(routers)
        self._on_cpu = [self._device(r).type == "cpu" for r in routers]
        self._linear: dict[int, tuple[torch.Tensor, torch.Tensor | None] | None] = {}  # `device_linear`

    def __call__(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        router = self.routers[layer]
        on_cpu = self._on_cpu[layer]
        if hidden.device.type == "cpu" and (not on_cpu or hidden.shape[0] <= CPU_HOST_ROWS):
            # a CPU router's decode-sized input too: the module's forward would also pick and
            # weigh its top-k (~0.1 ms of a 30-layer CPU decode step's predictor time per layer)
            host = self._host_weights(layer, hidden)
            if host is not None:
                return self.adapter.router_probs(router, _host_logits(hidden, *host)).float()
            if not on_cpu:
                hidden = hidden.to(self._device(router))
        return self._module_probs(router, hidden)

    def device_linear(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The router's own (weight [E, H], bias [E] or None) on its device, for a graphed decode
        step to compute this layer's speculative logits itself (`torch.nn.functional.linear`), or
        None when the router's logits are not that linear map. Checked once per router on a random
        input against the module's forward; not while a CUDA graph is being captured (it syncs)."""
        if layer in self._linear:
            return self._linear[layer]
        router = self.routers[layer]
        w, b = getattr(router, "weight", None), getattr(router, "bias", None)
        found = None
        linear = isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] == self.num_experts
        if linear and (b is None or (isinstance(b, torch.Tensor) and b.shape == (self.num_experts,))):
            w, b = w.detach(), None if b is None else b.detach()
            gen = torch.Generator(device="cpu").manual_seed(layer)
            sample = torch.randn(2, w.shape[1], generator=gen).to(w.device, w.dtype)  # [2, H]
            with torch.no_grad():
                ref = router.forward(sample)[self.adapter.router_logits_at].reshape(-1, self.num_experts)
                mine = torch.nn.functional.linear(sample, w, b)
            if ref.shape == mine.shape and torch.allclose(mine.float(), ref.float(), rtol=1e-2, atol=1e-3):
                found = (w, b)
        self._linear[layer] = found
        return found

    def probs_of(self, layer: int, logits: torch.Tensor) -> torch.Tensor:
        """Router `layer`'s probabilities [T, E] float32 from its logits [T, E] on the CPU (those
        `device_linear` gave a graphed step): the family's routing math, on the calling thread."""
        return self.adapter.router_probs(self.routers[layer], logits).float()

    def _module_probs(self, router: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = router.forward(hidden)[self.adapter.router_logits_at]
            return self.adapter.router_probs(router, logits.reshape(-1, self.num_experts)).float().cpu()

    @staticmethod
    def _device(router: nn.Module) -> torch.device:
        return next(router.parameters()).device

    def _host_weights(self, layer: int, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Host copies (weight [E, H], bias [E] or None) of a linear router, checked once against
        the module on `sample`; None when the router is not (exactly enough) a linear map."""
        if self._checked[layer]:
            return self._host[layer]
        self._checked[layer] = True
        router = self.routers[layer]
        w = getattr(router, "weight", None)
        b = getattr(router, "bias", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.shape[0] != self.num_experts:
            return None
        if b is not None and (not isinstance(b, torch.Tensor) or b.shape != (self.num_experts,)):
            return None
        host = (w.detach().float().cpu(), None if b is None else b.detach().float().cpu())
        logits = _host_logits(sample, *host)
        mine = self.adapter.router_probs(router, logits).float()
        ref = self._module_probs(router, sample.to(self._device(router)))
        err = float((mine - ref).abs().max()) if mine.shape == ref.shape else float("inf")
        if err > HOST_GATE_TOLERANCE:
            log.info("router of MoE layer %d: host gate differs by %.3g; speculating on the device", layer, err)
            return None
        self._host[layer] = host
        return host
