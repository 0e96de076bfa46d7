"""The persistent history file behind `--map-store PATH`: the FineMoE expert map store and the
past-request matrices of the MoE-Infinity baseline, for one model.

Format (version 1): a safetensors file with tensors `emb` [n, D], `maps` [n, L, E] (float32) and
`eams` [r, L, E] (float32), and string metadata `format` = "finemoe-map-store", `version` = "1",
`model` = JSON of `ModelIdentity`. A file whose identity differs from the running model's, or
that cannot be parsed, is refused with an error and left untouched. Saving writes a temporary
file in the same directory, fsyncs it and renames it over the old one, so a crash mid-save
leaves the previous file intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from finemoe.errors import FineMoEError

FORMAT = "finemoe-map-store"
VERSION = "1"


class MapStoreError(FineMoEError):
    """A map-store file that cannot be used for this model."""


@dataclass(frozen=True)
class ModelIdentity:
    """What a map store is only valid for: the model (by name and a fingerprint of its embedding
    weights) and its expert geometry."""

    model_type: str
    num_layers: int
    num_experts: int
    top_k: int
    embedding_dim: int
    fingerprint: str


def embedding_fingerprint(weight: torch.Tensor) -> str:
    """A short hash of an embedding matrix [V, D] (a strided sample of its rows, as float32)."""
    import hashlib

    step = max(1, weight.shape[0] // 512)
    sample = weight[::step].detach().float().cpu().contiguous()
    return hashlib.sha256(sample.numpy().tobytes()).hexdigest()[:16]


@dataclass
class MapStoreContents:
    emb: torch.Tensor  # [n, D]
    maps: torch.Tensor  # [n, L, E]
    eams: torch.Tensor  # [r, L, E]


def save(path: str | os.PathLike, identity: ModelIdentity, contents: MapStoreContents) -> None:
    """Write atomically (`atomic_save`)."""
    meta = {"format": FORMAT, "version": VERSION, "model": json.dumps(asdict(identity))}
    tensors = {
        "emb": contents.emb.float().contiguous(),
        "maps": contents.maps.float().contiguous(),
        "eams": contents.eams.float().contiguous(),
    }
    atomic_save(path, tensors, meta)


def atomic_save(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file so a crash leaves any previous file intact: a temporary file in
    the same directory, fsync, rename over `path`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | os.PathLike, identity: ModelIdentity) -> MapStoreContents:
    """Read a map store written for `identity`; raises `MapStoreError` (file untouched) if the file
    is not a map store, is corrupt, or belongs to another model or geometry."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    hint = "pass another --map-store path, or delete the file to start an empty store"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise MapStoreError(f"{path} is not a finemoe map store ({hint})")
            if meta.get("version") != VERSION:
                raise MapStoreError(
                    f"{path} is a version {meta.get('version')} map store; finemoe reads version {VERSION} ({hint})"
                )
            stored = json.loads(meta.get("model", "{}"))
            tensors = {k: f.get_tensor(k) for k in ("emb", "maps", "eams")}
    except MapStoreError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        raise MapStoreError(f"{path} is corrupt or unreadable ({e}); {hint}") from e
    want = asdict(identity)
    diff = [f"{k}: file {stored.get(k)!r}, model {v!r}" for k, v in want.items() if stored.get(k) != v]
    if diff:
        raise MapStoreError(f"{path} was recorded for a different model ({'; '.join(diff)}); {hint}")
    emb, maps, eams = tensors["emb"], tensors["maps"], tensors["eams"]
    L, E, D = identity.num_layers, identity.num_experts, identity.embedding_dim
    shapes_ok = (
        emb.dim() == 2
        and emb.shape[1] == D
        and maps.shape[1:] == (L, E)
        and maps.shape[0] == emb.shape[0]
        and eams.dim() == 3
        and eams.shape[1:] == (L, E)
    )
    if not shapes_ok:
        raise MapStoreError(f"{path} is corrupt: tensor shapes do not match its header; {hint}")
    if not (torch.isfinite(emb).all() and torch.isfinite(maps).all() and torch.isfinite(eams).all()):
        raise MapStoreError(f"{path} is corrupt: non-finite values; {hint}")
    return MapStoreContents(emb, maps, eams)
