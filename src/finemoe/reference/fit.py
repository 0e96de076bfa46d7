"""Fitting the conversion of the dense SwiGLU FFNs into routed experts (a developer command).

Per layer, in order, on calibration tokens that have passed through the layers converted so far
(so each router and scale also absorbs the error upstream):

1. activations a = silu(W_g x) * (W_u x) of every neuron; the `shared` neurons with the highest
   output energy E[a_i^2] |W_d[:, i]|^2 form the always-on shared expert;
2. the other neurons are split into E equal experts by balanced k-means on their normalised
   |a_i| |W_d[:, i]| profiles over tokens (neurons that fire together share an expert);
3. the router [E, H] and per-expert output scales are fitted through the architecture's own
   weighting (softmax -> top-k -> renormalised, as Qwen2-MoE computes it) to reconstruct the
   routed part of the dense output, with a cross-entropy term towards the oracle top-k (experts
   with the largest output norm) and a Switch-style load-balance term.

The least-squares algebra runs on per-token Gram matrices of the expert outputs ([N, E, E]), so a
step costs O(N E^2) whatever H is. Deterministic for a given seed and calibration set.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from finemoe.reference.convert import LayerFit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Geometry:
    """E routed experts per layer, top-k, and the number of neurons in the shared expert."""

    experts: int = 16
    top_k: int = 4
    shared: int = 1024

    @classmethod
    def parse(cls, text: str) -> Geometry:
        """'16x4+1024' -> 16 experts, top-4, 1024 shared neurons ('8x2' has no shared expert)."""
        try:
            main, _, shared = text.partition("+")
            e, k = main.lower().split("x")
            return cls(int(e), int(k), int(shared or 0))
        except ValueError:
            raise ValueError(f"geometry {text!r} is not of the form EXPERTSxTOPK[+SHARED], e.g. 16x4+1024") from None

    def __str__(self) -> str:
        return f"{self.experts}x{self.top_k}" + (f"+{self.shared}" if self.shared else "")

    def check(self, neurons: int) -> None:
        routed = neurons - self.shared
        if not (0 <= self.shared < neurons) or routed % self.experts or not 1 <= self.top_k <= self.experts:
            raise ValueError(
                f"geometry {self}: the {routed} routed neurons of {neurons} must split evenly into {self.experts} "
                f"experts, with 1 <= top_k <= experts"
            )


@dataclass(frozen=True)
class FitSettings:
    tokens: int = 16000  # calibration tokens
    steps: int = 250  # optimiser steps per layer
    lr: float = 2e-2
    ce_weight: float = 0.5
    balance_weight: float = 0.01
    seed: int = 0


def _balanced_kmeans(feat: torch.Tensor, k: int, gen: torch.Generator, iters: int = 15) -> torch.Tensor:
    """Rows of `feat` (unit vectors) into k clusters of equal size; greedy by similarity."""
    n = feat.shape[0]
    size = n // k
    cent = feat[torch.randperm(n, generator=gen)[:k]].clone()
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        order = torch.argsort((feat @ cent.T).flatten(), descending=True).tolist()
        owner, count = [-1] * n, [0] * k
        for flat in order:
            i, c = divmod(flat, k)
            if owner[i] < 0 and count[c] < size:
                owner[i], count[c] = c, count[c] + 1
        assign = torch.tensor(owner)
        for c in range(k):
            v = feat[assign == c].mean(0)
            cent[c] = v / (v.norm() + 1e-8)
    return assign


def fit_layer(
    x: torch.Tensor,  # [N, H] FFN inputs
    wg: torch.Tensor,  # [I, H]
    wu: torch.Tensor,  # [I, H]
    wd: torch.Tensor,  # [H, I]
    geo: Geometry,
    st: FitSettings,
    gen: torch.Generator,
) -> tuple[LayerFit, dict]:
    E, k = geo.experts, geo.top_k
    x, wg, wu, wd = x.detach(), wg.detach(), wu.detach(), wd.detach()
    act = F.silu(x @ wg.T) * (x @ wu.T)  # [N, I]
    dnorm = wd.norm(dim=0)  # [I]
    energy = act.pow(2).mean(0) * dnorm.pow(2)
    shared = torch.argsort(energy, descending=True)[: geo.shared]
    mask = torch.ones(wg.shape[0], dtype=torch.bool)
    mask[shared] = False
    routed = mask.nonzero().view(-1)
    profile = (act.abs() * dnorm)[: min(4096, x.shape[0]), routed].T  # [R, n]
    profile = profile / (profile.norm(dim=1, keepdim=True) + 1e-8)
    assign = _balanced_kmeans(profile, E, gen)
    groups = torch.stack([routed[assign == e] for e in range(E)])  # [E, R/E]
    outs = torch.stack([act[:, g] @ wd[:, g].T for g in groups])  # [E, N, H]
    target = outs.sum(0)  # [N, H] routed part of the dense output
    oracle = outs.norm(dim=-1).T.topk(k, dim=-1).indices  # [N, k]
    gram = torch.einsum("enh,fnh->nef", outs, outs)  # [N, E, E]
    cross = torch.einsum("enh,nh->ne", outs, target)  # [N, E]
    y2 = target.pow(2).sum(-1)  # [N]
    del outs, act
    router = torch.zeros(E, x.shape[1], requires_grad=True)
    log_scale = torch.zeros(E, requires_grad=True)
    opt = torch.optim.Adam([router, log_scale], lr=st.lr)
    soft_target = torch.zeros(x.shape[0], E).scatter_(1, oracle, 1.0 / k)
    for _ in range(st.steps):
        logits = x @ router.T  # [N, E]
        p = logits.softmax(-1)
        top = logits.topk(k, dim=-1).indices
        w = p.gather(1, top)
        w = w / w.sum(-1, keepdim=True)  # Qwen2-MoE with norm_topk_prob
        c = torch.zeros_like(p).scatter(1, top, w * log_scale.exp()[top] * k)  # [N, E] effective weights
        rec = (torch.einsum("ne,nef,nf->n", c, gram, c) - 2 * (c * cross).sum(-1) + y2).mean() / y2.mean()
        ce = -(soft_target * p.clamp_min(1e-9).log()).sum(-1).mean()
        load = F.one_hot(top, E).float().sum(1).mean(0) / k
        loss = rec + st.ce_weight * ce + st.balance_weight * E * (load * p.mean(0)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        top = (x @ router.T).topk(k, dim=-1).indices
        overlap = (F.one_hot(top, E).sum(1) * F.one_hot(oracle, E).sum(1)).sum(-1).float().mean() / k
    fit = LayerFit(shared.sort().values, groups.sort(dim=1).values, router.detach(), (log_scale.exp() * k).detach())
    return fit, {"reconstruction_error": rec.item(), "oracle_overlap": overlap.item()}


def moe_ffn(mlp: torch.nn.Module, fit: LayerFit, top_k: int):
    """A torch function computing the converted FFN exactly as Qwen2-MoE will (for the fit loop)."""
    wg, wu, wd = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight

    def forward(x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        act = F.silu(x2 @ wg.T) * (x2 @ wu.T)
        out = act[:, fit.shared] @ wd[:, fit.shared].T
        logits = x2 @ fit.router.T
        p = logits.float().softmax(-1)
        top = logits.topk(top_k, dim=-1).indices
        w = p.gather(1, top)
        w = (w / w.sum(-1, keepdim=True)) * fit.scale[top]
        for j in range(top_k):
            for e in top[:, j].unique().tolist():
                rows = (top[:, j] == e).nonzero().view(-1)
                g = fit.experts[e]
                out[rows] += (act[rows][:, g] @ wd[:, g].T) * w[rows, j : j + 1]
        return out.view(shape)

    return forward


@torch.no_grad()
def fit_model(model, calib: list[list[int]], geo: Geometry, st: FitSettings, progress: bool = True):
    """Convert every layer in order; returns the fits and per-layer diagnostics."""
    torch.manual_seed(st.seed)
    gen = torch.Generator().manual_seed(st.seed)
    layers = model.model.layers
    geo.check(layers[0].mlp.gate_proj.weight.shape[0])
    seqs, n = [], 0
    for ids in calib:
        seqs.append(ids)
        n += len(ids)
        if n >= st.tokens:
            break
    hidden = [model.model.embed_tokens(torch.tensor([ids]))[0] for ids in seqs]
    positions = [torch.arange(h.shape[0])[None] for h in hidden]
    rope = [model.model.rotary_emb(h[None], p) for h, p in zip(hidden, positions, strict=True)]
    fits, info = [], []
    for layer in tqdm(layers, desc=f"fitting {geo}", unit="layer", disable=not progress):
        mlp = layer.mlp
        captured: list[torch.Tensor] = []
        original = mlp.forward
        mlp.forward = lambda x, sink=captured: (sink.append(x[0]), torch.zeros_like(x))[1]  # attention only
        try:
            mids = [
                layer(h[None], attention_mask=None, position_ids=p, position_embeddings=r)[0]
                for h, p, r in zip(hidden, positions, rope, strict=True)
            ]
        finally:
            mlp.forward = original
        x = torch.cat(captured)
        with torch.enable_grad():
            fit, diag = fit_layer(x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, geo, st, gen)
        fits.append(fit)
        info.append(diag)
        ffn = moe_ffn(mlp, fit, geo.top_k)
        hidden = [(m[0] if m.dim() == 3 else m) + ffn(c) for m, c in zip(mids, captured, strict=True)]
    return fits, info


def save_fits(path: Path, fits: list[LayerFit], geo: Geometry, meta: dict) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for i, f in enumerate(fits):
        tensors[f"{i}.shared"] = f.shared.to(torch.int16)
        tensors[f"{i}.experts"] = f.experts.to(torch.int16)
        tensors[f"{i}.router"] = f.router.to(torch.float32).contiguous()
        tensors[f"{i}.scale"] = f.scale.to(torch.float32)
    meta = {"geometry": str(geo), "layers": str(len(fits)), "meta": json.dumps(meta)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)


def load_fits(path: Path) -> tuple[list[LayerFit], Geometry, dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        md = f.metadata()
        n = int(md["layers"])
        fits = [
            LayerFit(
                f.get_tensor(f"{i}.shared").long(),
                f.get_tensor(f"{i}.experts").long(),
                f.get_tensor(f"{i}.router"),
                f.get_tensor(f"{i}.scale"),
            )
            for i in range(n)
        ]
    return fits, Geometry.parse(md["geometry"]), json.loads(md["meta"])
