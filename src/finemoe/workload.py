"""The multi-domain, multilingual prompt workload shipped with finemoe (JSONL, package data).

Each record: id, domain, language, source, license, split ("history" 70% / "test" 30%), prompt.
The split is fixed by a hash of the id, as in the paper's offline setup (history fills the expert
map store, test is measured). `scripts/build_workload.py` regenerates the file from PyPI packages.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from finemoe.errors import FineMoEError

FIELDS = ("id", "domain", "language", "source", "license", "split", "prompt")
SPLITS = ("history", "test")


@dataclass(frozen=True)
class WorkloadPrompt:
    id: str
    domain: str
    language: str
    source: str
    license: str
    split: str
    prompt: str


def default_path() -> Path:
    return Path(str(resources.files("finemoe") / "data" / "workload.jsonl"))


def load_workload(path: str | Path | None = None, split: str | None = None) -> list[WorkloadPrompt]:
    """Read and validate the workload; `split` keeps only "history" or "test" prompts."""
    path = Path(path) if path else default_path()
    if not path.is_file():
        raise FineMoEError(f"workload file {path} does not exist (regenerate it with scripts/build_workload.py)")
    out: list[WorkloadPrompt] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise FineMoEError(f"{path}:{n}: not valid JSON ({e})") from e
        missing = [f for f in FIELDS if not isinstance(obj.get(f), str) or not obj[f]]
        if missing:
            raise FineMoEError(f"{path}:{n}: missing or empty field(s) {', '.join(missing)}")
        if obj["split"] not in SPLITS:
            raise FineMoEError(f"{path}:{n}: split must be one of {SPLITS}, got {obj['split']!r}")
        out.append(WorkloadPrompt(**{f: obj[f] for f in FIELDS}))
    ids = Counter(p.id for p in out)
    dup = [i for i, c in ids.items() if c > 1]
    if dup:
        raise FineMoEError(f"{path}: duplicate ids, e.g. {dup[0]!r}")
    if split is not None:
        if split not in SPLITS:
            raise FineMoEError(f"unknown split {split!r}; choose one of {SPLITS}")
        out = [p for p in out if p.split == split]
    return out


def split_of(prompt_id: str, history_share: float = 0.7) -> str:
    """Deterministic history/test assignment from a hash of the id."""
    import hashlib

    h = int.from_bytes(hashlib.sha256(prompt_id.encode()).digest()[:8], "big") / 2**64
    return "history" if h < history_share else "test"


def summary(prompts: list[WorkloadPrompt]) -> dict:
    return {
        "prompts": len(prompts),
        "domains": dict(Counter(p.domain for p in prompts).most_common()),
        "languages": dict(Counter(p.language for p in prompts).most_common()),
        "splits": dict(Counter(p.split for p in prompts)),
        "sources": dict(Counter(p.source for p in prompts).most_common()),
    }
