"""A short distillation of the fitted routers and expert scales (developer command, CPU or GPU).

Only the router weights and the per-expert output scales are trained; every expert weight stays
exactly the dense model's. The student is the converted model computed as Qwen2-MoE does
(softmax -> top-k -> renormalised weights); the loss is KL(dense || MoE) over next-token
distributions of calibration sequences. Gradients reach the routers through the selected experts'
weights, as when MoEs are trained.
"""

from __future__ import annotations

import logging
import random

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from finemoe.reference.convert import LayerFit

log = logging.getLogger(__name__)


class TrainableMoE(nn.Module):
    """The converted FFN of one layer with trainable router and log-scales; experts frozen."""

    def __init__(self, mlp: nn.Module, fit: LayerFit, top_k: int) -> None:
        super().__init__()
        wg, wu, wd = mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach()
        self.top_k = top_k
        self.shared = fit.shared
        self.experts = fit.experts  # [E, n]
        self.wg, self.wu, self.wd = wg, wu, wd
        self.wd_experts = torch.stack([wd[:, g] for g in fit.experts], dim=1)  # [H, E, n]
        self.router = nn.Parameter(fit.router.clone())
        self.log_scale = nn.Parameter(fit.scale.clamp_min(1e-6).log().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [T, H]
        act = F.silu(x2 @ self.wg.T) * (x2 @ self.wu.T)  # [T, I]
        out = act[:, self.shared] @ self.wd[:, self.shared].T
        per_expert = torch.einsum("tek,hek->teh", act[:, self.experts], self.wd_experts)  # [T, E, H]
        logits = x2 @ self.router.T
        p = logits.float().softmax(-1)
        top = logits.topk(self.top_k, dim=-1).indices
        w = p.gather(1, top)
        w = w / w.sum(-1, keepdim=True) * self.log_scale.exp()[top]
        c = torch.zeros_like(p).scatter(1, top, w)  # [T, E]
        return (out + (c.unsqueeze(-1) * per_expert).sum(1)).view(shape)

    def export(self, fit: LayerFit) -> LayerFit:
        return LayerFit(fit.shared, fit.experts, self.router.detach().clone(), self.log_scale.exp().detach().clone())


def distill(
    model: nn.Module,
    fits: list[LayerFit],
    top_k: int,
    seqs: list[list[int]],
    steps: int,
    lr: float = 3e-3,
    batch: int = 6,
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[LayerFit], list[float]]:
    """Train routers and scales; returns the new fits and the loss curve (mean KL per token)."""
    for p in model.parameters():
        p.requires_grad_(False)
    layers = model.model.layers
    dense = [layer.mlp for layer in layers]
    student = [TrainableMoE(layer.mlp, fit, top_k) for layer, fit in zip(layers, fits, strict=True)]
    params = [p for s in student for p in (s.router, s.log_scale)]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    rng = random.Random(seed)
    curve: list[float] = []

    def use(mods):
        for layer, m in zip(layers, mods, strict=True):
            layer.mlp = m

    try:
        for _ in tqdm(range(steps), desc="distilling routers", unit="step", disable=not progress):
            opt.zero_grad()
            total, tokens = 0.0, 0
            for ids in rng.sample(seqs, min(batch, len(seqs))):
                x = torch.tensor([ids])
                use(dense)
                with torch.no_grad():
                    teacher = model(x).logits.float().log_softmax(-1)
                use(student)
                pupil = model(x).logits.float().log_softmax(-1)
                kl = F.kl_div(pupil, teacher, log_target=True, reduction="sum")
                (kl / (batch * len(ids))).backward()
                total, tokens = total + kl.item(), tokens + len(ids)
            opt.step()
            sched.step()
            curve.append(total / tokens)
    finally:
        use(dense)
    return [s.export(f) for s, f in zip(student, fits, strict=True)], curve
