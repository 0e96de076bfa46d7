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
import json
import os
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
# Cython 3.3.0's build of these modules crashed (segfault) in the replay on Python 3.12; 3.3.1's did not
# (session 39, this machine and the GPU machine's image); pyproject.toml's build requirement says the same.
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
        print(f"finemoe: Cython {Cython.__version__} < 3.3.1, installing the pure-Python modules only")  # noqa: T201
        return []
    exts = [
        Extension(f"finemoe.{m}", [f"src/finemoe/{m}.py"], optional=True)  # a failed compile: pure Python
        for m in native_modules()
    ]
    return cythonize(
        exts,
        build_dir="build/cython",
        compiler_directives={"language_level": 3, "annotation_typing": False},
        nthreads=os.cpu_count() or 1,
        quiet=True,
    )


class BuildNative(build_ext):
    """build_ext that compiles in parallel and writes `_native_build.json` beside the modules: the
    SHA-256 of each source whose extension was built."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1

    def run(self) -> None:
        super().run()
        import hashlib

        import Cython

        built, out_dir = {}, None
        for ext in self.extensions:
            path = Path(self.get_ext_fullpath(ext.name))
            out_dir = path.parent
            if path.exists():
                name = ext.name.rsplit(".", 1)[1]
                built[name] = hashlib.sha256((PKG / f"{name}.py").read_bytes()).hexdigest()
        if out_dir is not None:
            manifest = {"cython": Cython.__version__, "modules": built}
            (out_dir / "_native_build.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildNative})
