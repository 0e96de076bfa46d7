"""Which of the host's hot modules run compiled, and the guard that keeps a stale build out.

The optional compiled build (`setup.py`, Cython in pure-Python mode: the same `.py` sources, no
annotations turned into C types) compiles the modules named in `NATIVE_MODULES` into extension
modules beside their sources, and writes `BUILD_MANIFEST` there: the SHA-256 of each source it
compiled. Python's import system prefers an extension module over a `.py` of the same name, so
without a guard a source edited after the build would silently not run. `select()`, called first
thing when the package is imported, therefore routes each such module to its source when:

- the environment sets `FINEMOE_PURE_PYTHON=1` (profiling with py-spy, debugging), or
- its compiled file has no manifest entry, or the entry's hash differs from the source's (stale).

The compiled and the pure modules make the same decisions (tests/test_native.py replays both);
only the host time differs. This module is never compiled itself.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

# The modules of the replay's and the decode loop's host path: cache, eviction, prefetch, predictors.
# setup.py reads this tuple (as text: it cannot import the package) to know what to compile. Never a
# module with Triton kernels (fused_match: Triton reads its kernels' source) or other source inspection.
NATIVE_MODULES = (
    "baselines",
    "cache",
    "decay_lfu",
    "expert_map",
    "fine_predictor",
    "pair_kernels",
    "plan_policy",
    "policy",
    "predictor",
    "prefetch_copies",
    "prefetcher",
    "replay_rows",
    "residency",
    "simlink",
    "simulator",
    "stepper",
    "transfer",
    "types",
    "victims",
)
BUILD_MANIFEST = "_native_build.json"  # {"cython": version, "modules": {name: sha256 of its .py}}
PURE_ENV = "FINEMOE_PURE_PYTHON"

# module name -> "compiled" | "pure: no build" | "pure: FINEMOE_PURE_PYTHON" | "pure: stale build";
# filled by `select()`
STATUS: dict[str, str] = {}


def source_digest(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes: what the build manifest records per source."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _compiled_file(pkg_dir: Path, name: str) -> Path | None:
    """The extension module this interpreter would import for `name`, if one is there."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = pkg_dir / (name + suffix)
        if path.exists():
            return path
    return None


class _PackageFinder(importlib.machinery.FileFinder):
    """The finder of the package's own directory: the modules in `pure` from their `.py`, every
    other module as Python's default finder would find it (an extension module first)."""

    def __init__(self, path: str, pure: set[str]) -> None:
        m = importlib.machinery
        super().__init__(
            path,
            (m.ExtensionFileLoader, m.EXTENSION_SUFFIXES),
            (m.SourceFileLoader, m.SOURCE_SUFFIXES),
            (m.SourcelessFileLoader, m.BYTECODE_SUFFIXES),
        )
        self.pure = pure

    def find_spec(self, fullname: str, target: object = None) -> importlib.machinery.ModuleSpec | None:
        name = fullname.rpartition(".")[2]
        if name in self.pure:
            return importlib.util.spec_from_file_location(fullname, os.path.join(self.path, name + ".py"))
        return super().find_spec(fullname, target)


def select(package_path: list[str]) -> dict[str, str]:
    """Decide, per name in `NATIVE_MODULES`, whether the compiled or the source module runs, and
    route the latter to its `.py` before anything imports it (a finder for the package's directory,
    `package_path` being the package's `__path__`: nothing outside the package is affected).
    Returns (and keeps in `STATUS`) the decision per module; logs one warning naming stale ones."""
    pkg_dir = Path(package_path[0])
    if not pkg_dir.is_dir():  # (e.g. imported from a zip: no extension modules there)
        STATUS.update(dict.fromkeys(NATIVE_MODULES, "pure: no build"))
        return dict(STATUS)
    force_pure = os.environ.get(PURE_ENV, "") not in ("", "0")
    try:
        built = json.loads((pkg_dir / BUILD_MANIFEST).read_text())["modules"]
    except (OSError, ValueError, KeyError, TypeError):
        built = {}
    stale: list[str] = []
    pure: set[str] = set()
    for name in NATIVE_MODULES:
        source = pkg_dir / f"{name}.py"
        if _compiled_file(pkg_dir, name) is None:
            STATUS[name] = "pure: no build"
            continue
        if force_pure:
            STATUS[name] = f"pure: {PURE_ENV}"
        elif built.get(name) != source_digest(source):
            STATUS[name] = "pure: stale build"
            stale.append(name)
        else:
            STATUS[name] = "compiled"
            continue
        pure.add(name)
    for path in pkg_dir.iterdir():  # an extension module left from an older build of another list
        name = path.name.partition(".")[0]
        compiled = path.name.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
        if compiled and name not in STATUS and (pkg_dir / f"{name}.py").exists():
            pure.add(name)
    if pure:
        sys.path_importer_cache[package_path[0]] = _PackageFinder(package_path[0], pure)
    if stale:
        logger.warning(
            "the compiled build of %s is older than the source: running the source (slower host path). "
            "Rebuild with `make native` (or `FINEMOE_NATIVE=1 pip install -e .`).",
            ", ".join(stale),
        )
    return dict(STATUS)


def summary() -> str:
    """One line: how many hot modules run compiled, e.g. 'compiled 19/19' or 'pure (no build)'."""
    n = sum(1 for s in STATUS.values() if s == "compiled")
    if n == len(NATIVE_MODULES):
        return f"compiled {n}/{n}"
    if n == 0:
        reasons = sorted({s.removeprefix("pure: ") for s in STATUS.values()})
        return f"pure ({', '.join(reasons) or 'not selected'})"
    return f"compiled {n}/{len(NATIVE_MODULES)} ({', '.join(k for k, s in STATUS.items() if s != 'compiled')} pure)"
