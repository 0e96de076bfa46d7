"""The opt-in compiled build of the host's hot modules (everything else is in pyproject.toml).

With FINEMOE_NATIVE=1, Cython (>= 3.3.1) compiles the plain `.py` modules that
`src/finemoe/_native.py` names (pure-Python mode, no annotation typing: the same semantics) into
extension modules beside their sources, and writes the manifest `_native.py` checks at import time
(a source edited after the build runs as source, never the stale binary). Without the variable,
without Cython or without a C compiler, the package installs and runs as pure Python, the default.
Measured (docs/results/simulator.md, "Session 39"): the replay of finemoe ~1.2x faster on the 2-core
CPU machine (Python 3.11), ~1.0-1.1x on the H200 machine's host (3.12); the GPU decode step unchanged.

    make native                                                    # in place, in the venv
    FINEMOE_NATIVE=1 pip install .                                 # a wheel with them
    FINEMOE_NATIVE=1 python setup.py build_ext --inplace -j 8      # the same by hand
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
# Cython 3.3.0's build of these modules crashed (segfault) in the replay on Python 3.12; 3.3.1's did not
# (session 39, this machine and the GPU machine's image); the dev extra in pyproject.toml asks for >= 3.3.1.
MIN_CYTHON = (3, 3, 1)
PKG = HERE / "src" / "finemoe"


def native_modules() -> tuple[str, ...]:
    """`NATIVE_MODULES` of `_native.py`, read as text (the package's dependencies may be missing)."""
    for node in ast.parse((PKG / "_native.py").read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "NATIVE_MODULES":
            return ast.literal_eval(node.value)
    raise RuntimeError("src/finemoe/_native.py names no NATIVE_MODULES")


def extensions() -> list[Extension]:
    if os.environ.get("FINEMOE_NATIVE", "") in ("", "0"):  # opt-in
        return []
    try:
        import Cython
        from Cython.Build import cythonize
    except ImportError:
        print("finemoe: Cython not found, installing the pure-Python modules only")  # noqa: T201
        return []
    version = tuple(int(p) for p in Cython.__version__.split(".")[:3] if p.isdigit())
    if version < MIN_CYTHON:
        least = ".".join(map(str, MIN_CYTHON))
        print(f"finemoe: Cython {Cython.__version__} < {least}, installing the pure-Python modules only")  # noqa: T201
        return []
    exts = cythonize(
        [Extension(f"finemoe.{m}", [f"src/finemoe/{m}.py"]) for m in native_modules()],
        build_dir="build/cython",
        compiler_directives={"language_level": 3, "annotation_typing": False},
        nthreads=os.cpu_count() or 1,
        quiet=True,
    )
    for ext in exts:  # (set on cythonize's output: it makes new Extension objects)
        ext.optional = True  # a module that fails to compile stays pure Python
    return exts


class BuildNative(build_ext):
    """build_ext that compiles in parallel and writes `_native_build.json` beside the modules: the
    SHA-256 of the source of each extension built (or found up to date) in this run. One that failed
    is left out, so a binary an earlier build left in place never passes for the current source."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1
        self._built: dict[str, str] = {}

    def build_extension(self, ext: Extension) -> None:
        super().build_extension(ext)  # (raises on a failed compile: setuptools warns for an optional one)
        name = ext.name.rsplit(".", 1)[1]
        self._built[name] = hashlib.sha256((PKG / f"{name}.py").read_bytes()).hexdigest()

    def run(self) -> None:
        super().run()
        if not self.extensions:
            return
        import Cython

        out_dir = Path(self.get_ext_fullpath(self.extensions[0].name)).parent
        manifest = {"cython": Cython.__version__, "modules": dict(sorted(self._built.items()))}
        (out_dir / "_native_build.json").write_text(json.dumps(manifest, indent=1))


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildNative})
