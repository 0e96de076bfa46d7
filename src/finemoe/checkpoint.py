"""A local Hugging Face checkpoint directory: config, shards and a reader of single tensors.

Headers are parsed here (8-byte little-endian length, then JSON) so that a missing or truncated
shard is refused up front with its name, and tensors are read with `readinto` straight into the
caller's buffer: no mmap, no second copy.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from finemoe.errors import CheckpointError

# safetensors dtype tags -> torch dtypes we can compute in or convert from.
_ST_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_FLOAT_TAGS = ("F32", "F16", "BF16", "F64")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype tag, shape and absolute byte range in the file."""

    file: Path
    dtype_tag: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def dtype(self) -> torch.dtype:
        if self.dtype_tag not in _ST_DTYPES:
            raise CheckpointError(
                f"tensor in {self.file.name} has dtype {self.dtype_tag}, which finemoe cannot load; "
                f"supported: {', '.join(_ST_DTYPES)} (quantized checkpoints such as MXFP4/FP8 are not "
                f"supported: use a bf16/fp16/fp32 export of the model)"
            )
        return _ST_DTYPES[self.dtype_tag]


def _read_header(path: Path) -> dict[str, TensorInfo]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"shard {path} is truncated ({size} bytes): re-download or re-save it")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100 * 2**20:
                raise CheckpointError(f"shard {path} has a corrupt safetensors header (length {n}, file {size})")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read safetensors shard {path}: {e}; re-download or re-save it") from e
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            start, end = meta["data_offsets"]
            info = TensorInfo(path, meta["dtype"], tuple(meta["shape"]), base + start, base + end)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"shard {path} has a corrupt header entry for {key!r}") from e
        if info.end > size:
            raise CheckpointError(
                f"shard {path} is truncated: tensor {key!r} ends at byte {info.end} but the file has "
                f"{size} bytes; re-download or re-save the checkpoint"
            )
        out[key] = info
    return out


class Checkpoint:
    """A validated checkpoint directory. `tensors` maps every key to its `TensorInfo`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise CheckpointError(f"model directory {self.path} does not exist; pass a local checkpoint directory")
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path} is not a directory; pass the checkpoint directory, not a file")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{self.path} has no config.json: it is not a Hugging Face checkpoint directory")
        try:
            self.config_dict = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{config_path} is not valid JSON: {e}") from e
        self.tensors: dict[str, TensorInfo] = {}
        for shard in self._shards():
            self.tensors.update(_read_header(shard))
        self._files: dict[Path, object] = {}

    def _shards(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is corrupt ({e}); re-download or re-save the checkpoint") from e
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (self.path / n).is_file()]
            if missing:
                raise CheckpointError(
                    f"checkpoint {self.path} is incomplete: shard(s) {', '.join(missing)} named in "
                    f"{index.name} are missing; re-download them"
                )
            return [self.path / n for n in names]
        single = self.path / "model.safetensors"
        if single.is_file():
            return [single]
        found = sorted(self.path.glob("*.safetensors"))
        if found:
            return found
        if list(self.path.glob("*.bin")) or list(self.path.glob("*.pt")):
            raise CheckpointError(
                f"{self.path} holds PyTorch .bin weights only; finemoe reads safetensors: re-save with "
                f"model.save_pretrained(dir) (safetensors is the default)"
            )
        raise CheckpointError(f"{self.path} has no *.safetensors weights")

    def floating_dtype(self) -> torch.dtype:
        """The dtype most floating-point tensors are stored in; refuses quantized checkpoints."""
        counts: dict[str, int] = {}
        for info in self.tensors.values():
            counts[info.dtype_tag] = counts.get(info.dtype_tag, 0) + 1
        odd = sorted(t for t in counts if t not in _ST_DTYPES)
        if odd:
            raise CheckpointError(
                f"checkpoint {self.path} stores tensors as {', '.join(odd)}, which finemoe cannot load; "
                f"supported dtypes: float32, float16, bfloat16"
            )
        floats = {t: c for t, c in counts.items() if t in _FLOAT_TAGS}
        if not floats:
            raise CheckpointError(f"checkpoint {self.path} has no floating-point weights")
        return _ST_DTYPES[max(floats, key=floats.__getitem__)]

    def _handle(self, file: Path):
        f = self._files.get(file)
        if f is None:
            f = open(file, "rb")  # noqa: SIM115 - kept open for the life of the loader
            self._files[file] = f
        return f

    def read(self, key: str, out: torch.Tensor | None = None, index: int | None = None) -> torch.Tensor:
        """Read tensor `key` (or its row `index` along dim 0) into `out` (converted to out's dtype).

        Without `out`, returns a new CPU tensor in the stored dtype. Raises CheckpointError if the
        key is missing or the bytes cannot be read.
        """
        info = self.tensors.get(key)
        if info is None:
            raise CheckpointError(f"checkpoint {self.path} has no tensor {key!r}; it is incomplete or corrupt")
        dtype = info.dtype
        shape, start = info.shape, info.start
        if index is not None:
            if not 0 <= index < shape[0]:
                raise CheckpointError(
                    f"tensor {key!r} in {info.file.name} has {shape[0]} rows, expert {index} is out of range: "
                    f"the checkpoint does not match its config.json"
                )
            row = (info.end - info.start) // shape[0]
            start, shape = start + index * row, shape[1:]
        numel = 1
        for s in shape:
            numel *= s
        if out is not None and out.numel() != numel:
            raise CheckpointError(
                f"tensor {key!r} has shape {tuple(shape)} in {info.file.name}, expected {tuple(out.shape)}; "
                f"the checkpoint does not match its config.json"
            )
        direct = out is not None and out.dtype == dtype and out.is_contiguous() and out.device.type == "cpu"
        buf = out if direct else torch.empty(shape, dtype=dtype)
        if buf.numel() != numel:
            raise CheckpointError(
                f"tensor {key!r} has shape {tuple(shape)} in {info.file.name}, expected {tuple(buf.shape)}; "
                f"the checkpoint does not match its config.json"
            )
        view = memoryview(buf.view(-1).view(torch.uint8).numpy())
        f = self._handle(info.file)
        try:
            f.seek(start)
            got = f.readinto(view)
        except OSError as e:
            raise CheckpointError(f"cannot read {key!r} from {info.file}: {e}") from e
        if got != len(view):
            raise CheckpointError(f"shard {info.file} is truncated while reading {key!r}; re-download it")
        if out is not None and not direct:
            out.copy_(buf.view(out.shape))
            return out
        return buf.view(shape) if out is None else out

    def close(self) -> None:
        for f in self._files.values():
            f.close()  # type: ignore[attr-defined]
        self._files.clear()
