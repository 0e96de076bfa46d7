"""Build a model skeleton, its `MoESpec`, and load the non-expert (always resident) weights.

The skeleton is built by transformers on the meta device (parameters only; buffers such as rotary
frequencies are computed for real), so transformers' modeling code stays the reference. Expert
parameters stay on meta: the expert store and slot pool replace them.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from finemoe.checkpoint import Checkpoint
from finemoe.errors import CheckpointError, UnsupportedModelError
from finemoe.models import FamilyAdapter, get_adapter, supported_families
from finemoe.types import ExpertId, ExpertPart, MoESpec

log = logging.getLogger(__name__)


@dataclass
class MoELayerRef:
    """The modules of one MoE layer: decoder index, block, router and experts module."""

    layer: int  # MoE-layer ordinal
    decoder_index: int
    block: nn.Module
    router: nn.Module
    experts: nn.Module


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(f"{type(model).__name__} has no `model.layers`; finemoe cannot walk it")
    return layers


def _experts_of(block: nn.Module | None) -> nn.Module | None:
    experts = getattr(block, "experts", None) if block is not None else None
    w = getattr(experts, "gate_up_proj", None) if experts is not None else None
    return experts if isinstance(w, torch.Tensor) and w.dim() == 3 else None


def find_moe_layers(model: nn.Module, adapter: FamilyAdapter) -> list[MoELayerRef]:
    """Every decoder layer whose block holds fused routed experts, in order."""
    refs: list[MoELayerRef] = []
    for i, layer in enumerate(decoder_layers(model)):
        block = getattr(layer, adapter.block_attr, None)
        experts = _experts_of(block)
        if experts is None:
            continue
        router = getattr(block, adapter.router_attr)
        refs.append(MoELayerRef(len(refs), i, block, router, experts))
    return refs


def _has_any_experts(model: nn.Module) -> bool:
    return any(_experts_of(m) is not None for m in model.modules())


def build_skeleton(ckpt: Checkpoint, dtype: torch.dtype) -> tuple[nn.Module, FamilyAdapter]:
    """The transformers model with parameters on meta and real buffers; checks the family."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(ckpt.path))
    except (ValueError, KeyError, OSError) as e:
        raise UnsupportedModelError(f"transformers cannot read {ckpt.path}/config.json: {e}") from e
    model_type = getattr(config, "model_type", "?")
    with init_empty_weights(include_buffers=False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except (ValueError, KeyError) as e:
            raise UnsupportedModelError(
                f"{ckpt.path}: model_type {model_type!r} has no causal-LM class in transformers ({e}); "
                f"supported MoE families: {supported_families()}"
            ) from e
    try:
        adapter = get_adapter(model_type)
    except UnsupportedModelError:
        if _has_any_experts(model):
            raise
        raise UnsupportedModelError(
            f"{ckpt.path} holds a {model_type!r} model, which is not a Mixture-of-Experts model (no routed "
            f"experts): finemoe offloads experts of MoE models only; supported: {supported_families()}"
        ) from None
    if not find_moe_layers(model, adapter):
        raise UnsupportedModelError(
            f"{ckpt.path} is a {model_type!r} config without MoE layers (num_experts is 0 or every "
            f"layer is dense): nothing to offload"
        )
    model.eval()
    return model, adapter


def build_spec(model: nn.Module, adapter: FamilyAdapter, dtype: torch.dtype) -> MoESpec:
    """Read the expert geometry from the skeleton (first MoE layer; all must agree)."""
    refs = find_moe_layers(model, adapter)
    first = refs[0].experts
    parts = tuple(
        ExpertPart(name, tuple(p.shape[1:]))
        for name, p in first.named_parameters(recurse=False)
        if p.dim() >= 2 and p.shape[0] == first.num_experts
    )
    for ref in refs[1:]:
        other = tuple(
            ExpertPart(n, tuple(p.shape[1:]))
            for n, p in ref.experts.named_parameters(recurse=False)
            if p.dim() >= 2 and p.shape[0] == ref.experts.num_experts
        )
        if other != parts:
            raise UnsupportedModelError("MoE layers with different expert shapes are not supported")
    cfg = model.config
    shared = 0
    for attr in adapter.shared_size_attrs:
        if "*" in attr:
            a, b = attr.split("*")
            shared += int(getattr(cfg, a, 0) or 0) * int(getattr(cfg, b, 0) or 0)
        else:
            shared += int(getattr(cfg, attr, 0) or 0)
    gate_up = dict((p.name, p.shape) for p in parts)["gate_up_proj"]
    inter = (gate_up[1] if getattr(first, "is_transposed", False) else gate_up[0]) // 2
    return MoESpec(
        model_type=adapter.model_type,
        moe_layers=tuple(r.decoder_index for r in refs),
        num_experts=int(first.num_experts),
        top_k=int(refs[0].router.top_k),
        hidden_size=int(cfg.hidden_size),
        intermediate_size=int(inter),
        parts=parts,
        dtype=dtype,
        num_decoder_layers=len(decoder_layers(model)),
        shared_expert_intermediate_size=shared,
    )


class CheckpointExperts:
    """Reads experts one by one from a checkpoint, in the experts module's layout."""

    def __init__(self, ckpt: Checkpoint, adapter: FamilyAdapter, spec: MoESpec) -> None:
        self.ckpt, self.adapter, self.spec = ckpt, adapter, spec
        self.plan: dict[str, list[list[tuple[str, int | None]]]] = {}
        self.consumed: set[str] = set()
        for layer, dec in enumerate(spec.moe_layers):
            for e in range(spec.num_experts):
                for part in spec.parts:
                    src = self._resolve(dec, e, part)
                    self.plan[f"{layer}.{e}.{part.name}"] = [src]
                    self.consumed.update(k for k, _ in src)

    def _resolve(self, dec: int, e: int, part: ExpertPart) -> list[tuple[str, int | None]]:
        cands = self.adapter.expert_key_candidates(dec, e, part.name)
        for cand in cands:
            if all(k in self.ckpt.tensors for k, _ in cand):
                return cand
        tried = " or ".join("+".join(k for k, _ in c) for c in cands)
        raise CheckpointError(
            f"checkpoint {self.ckpt.path} has no weights for expert {e} of decoder layer {dec} "
            f"({part.name}; looked for {tried}); it is incomplete or not a {self.adapter.display_name} checkpoint"
        )

    def read_into(self, eid: ExpertId, parts: list[torch.Tensor]) -> None:
        """Fill `parts` (views shaped like `spec.parts`) with expert `eid`'s weights."""
        for part, out in zip(self.spec.parts, parts, strict=True):
            (src,) = self.plan[f"{eid.layer}.{eid.expert}.{part.name}"]
            if len(src) == 1:
                key, row = src[0]
                self.ckpt.read(key, out, index=row)
                continue
            offset = 0
            for key, row in src:  # concatenated along dim 0 (e.g. gate rows then up rows)
                rows = self.ckpt.tensors[key].shape[0]
                self.ckpt.read(key, out[offset : offset + rows], index=row)
                offset += rows
            if offset != out.shape[0]:
                raise CheckpointError(f"expert {eid} {part.name}: checkpoint rows {offset} != {out.shape[0]}")


class ModuleExperts:
    """Reads experts from an already materialised transformers model's fused parameters."""

    def __init__(self, refs: list[MoELayerRef], spec: MoESpec) -> None:
        self.refs, self.spec = refs, spec

    def read_into(self, eid: ExpertId, parts: list[torch.Tensor]) -> None:
        experts = self.refs[eid.layer].experts
        for part, out in zip(self.spec.parts, parts, strict=True):
            out.copy_(getattr(experts, part.name)[eid.expert])


def _named_slots(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, bool]]:
    for mod_name, mod in model.named_modules():
        for name in mod._parameters:
            yield (f"{mod_name}.{name}" if mod_name else name), mod, name, True
        for name in mod._buffers:
            if name not in mod._non_persistent_buffers_set:
                yield (f"{mod_name}.{name}" if mod_name else name), mod, name, False


def load_dense(
    model: nn.Module,
    ckpt: Checkpoint,
    adapter: FamilyAdapter,
    skip: set[str],
    expert_modules: set[nn.Module],
    device: torch.device,
    dtype: torch.dtype,
) -> int:
    """Load every non-expert tensor onto `device`; returns the bytes loaded.

    Raises CheckpointError naming the first missing or mis-shaped weight.
    """
    targets = {key: (mod, name, is_param) for key, mod, name, is_param in _named_slots(model)}
    keep_fp32 = list(model._get_dtype_plan(dtype).keys()) if hasattr(model, "_get_dtype_plan") else []
    loaded, unexpected, nbytes = set(), [], 0
    for key in ckpt.tensors:
        if key in skip:
            continue
        target = adapter.rename(key)
        if target not in targets:
            unexpected.append(key)
            continue
        mod, name, is_param = targets[target]
        current = mod._parameters[name] if is_param else mod._buffers[name]
        want = torch.float32 if any(p in target for p in keep_fp32) else current.dtype
        if tuple(ckpt.tensors[key].shape) != tuple(current.shape):
            raise CheckpointError(
                f"{key} has shape {ckpt.tensors[key].shape} in the checkpoint but the model expects "
                f"{tuple(current.shape)}: config.json does not match the weights"
            )
        value = ckpt.read(key).to(device=device, dtype=want if current.is_floating_point() else current.dtype)
        if is_param:
            mod._parameters[name] = nn.Parameter(value, requires_grad=False)
        else:
            mod._buffers[name] = value
        loaded.add(target)
        nbytes += value.nbytes
    if unexpected:
        log.warning("ignored %d checkpoint tensors the model does not use, e.g. %s", len(unexpected), unexpected[0])
    model.tie_weights()
    for key, mod, name, is_param in _named_slots(model):
        if mod in expert_modules:
            continue
        t = mod._parameters[name] if is_param else mod._buffers[name]
        if t is not None and t.is_meta:
            raise CheckpointError(
                f"checkpoint {ckpt.path} has no weight for {key}: it is incomplete or corrupt "
                f"(re-download it, or check that config.json belongs to these weights)"
            )
    for mod in model.modules():  # non-persistent buffers (rotary tables) to the device
        for name, buf in list(mod._buffers.items()):
            if buf is not None and not buf.is_meta and buf.device != device:
                mod._buffers[name] = buf.to(device)
    return nbytes
