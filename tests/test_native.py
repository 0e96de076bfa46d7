"""The opt-in compiled build of the hot modules (setup.py, `finemoe._native`): a stale or switched
off build never runs, and compiled and source modules make the same decisions.

The build is made once here, in a copy of the package (~1-2 min on 2 cores), whatever the installed
tree holds; each case runs in a fresh interpreter (which modules run is decided once, at import).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import finemoe
from finemoe import _native

from tests.test_simulator import ONLINE

PKG = Path(finemoe.__file__).parent
ROOT = Path(__file__).resolve().parents[1]
NOT_BUILT = ("__pycache__", "data", "*.so", "*.pyd", _native.BUILD_MANIFEST)


def _copy_package(dest: Path, src: Path = PKG, ignore: tuple[str, ...] = ("__pycache__", "data")) -> Path:
    """`src` (a finemoe package folder) copied to dest/finemoe, its data folder linked; returns dest."""
    shutil.copytree(src, dest / "finemoe", ignore=shutil.ignore_patterns(*ignore))
    (dest / "finemoe" / "data").symlink_to(PKG / "data")
    return dest


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A project copy (setup.py, pyproject.toml, src/finemoe) whose hot modules `FINEMOE_NATIVE=1
    python setup.py build_ext --inplace` compiled; returns its src folder."""
    pytest.importorskip("Cython", reason="the compiled build needs Cython (the dev extra)")
    root = tmp_path_factory.mktemp("native")
    for f in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, root / f)
    _copy_package(root / "src", ignore=NOT_BUILT)
    env = os.environ | {"FINEMOE_NATIVE": "1"}
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--inplace", "-j", str(os.cpu_count() or 1)]
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    if "pure-Python modules only" in out.stdout:  # setup.py's own refusal (e.g. a Cython older than it needs)
        pytest.skip(out.stdout.strip())
    built = json.loads((root / "src" / "finemoe" / _native.BUILD_MANIFEST).read_text())["modules"]
    if not built:  # every optional compile failed: no working C compiler here
        pytest.skip("no module compiled (no working C compiler?): " + out.stderr[-500:])
    assert sorted(built) == sorted(_native.NATIVE_MODULES), out.stderr[-3000:]
    return root / "src"


def test_a_module_that_fails_to_compile_stays_source_and_leaves_the_rest(built, tmp_path):
    """A source edited after a build whose compile then fails (here: no C compiler) leaves the other
    modules built and its own earlier binary in place, but out of the manifest: it runs as source."""
    root = tmp_path / "proj"
    shutil.copytree(built.parent, root, symlinks=True)
    src = root / "src" / "finemoe" / "cache.py"
    src.write_text(src.read_text() + "\nEDITED_AFTER_THE_BUILD = True\n")
    env = os.environ | {"FINEMOE_NATIVE": "1", "CC": "/bin/false", "LDSHARED": "/bin/false"}
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--inplace", "-j", "1"]
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]  # (an optional extension: a warning, not a failure)
    manifest = json.loads((root / "src" / "finemoe" / _native.BUILD_MANIFEST).read_text())["modules"]
    assert "cache" not in manifest and len(manifest) == len(_native.NATIVE_MODULES) - 1
    info, err = _probe(root / "src")
    assert info["cache"] == str(src) and info["status"]["cache"] == "pure: stale build"
    assert not info["decay_lfu"].endswith(".py")


PROBE = (
    "import json, finemoe, finemoe._native as n, finemoe.cache as c, finemoe.decay_lfu as d; "
    "print(json.dumps({'summary': n.summary(), 'status': n.STATUS, 'cache': c.__file__, 'decay_lfu': d.__file__}))"
)


def _probe(pythonpath: Path, pure: bool = False) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if k != _native.PURE_ENV}
    env["PYTHONPATH"] = str(pythonpath)
    if pure:
        env[_native.PURE_ENV] = "1"
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True, cwd="/")
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


@pytest.fixture
def package_copy(built, tmp_path) -> Path:
    """A copy of the built package (sources, extension modules, manifest) under tmp_path."""
    return _copy_package(tmp_path, built / "finemoe")


def test_a_fresh_build_runs_compiled_and_the_switch_turns_it_off(package_copy):
    info, _ = _probe(package_copy)
    n = len(_native.NATIVE_MODULES)
    assert info["summary"] == f"compiled {n}/{n}"
    assert not info["cache"].endswith(".py") and str(package_copy) in info["cache"]
    info, _ = _probe(package_copy, pure=True)
    assert info["cache"].endswith("cache.py") and info["decay_lfu"].endswith("decay_lfu.py")
    assert set(info["status"].values()) == {f"pure: {_native.PURE_ENV}"}


def test_an_edited_source_runs_as_source_with_a_warning(package_copy):
    src = package_copy / "finemoe" / "cache.py"
    src.write_text(src.read_text() + "\nEDITED_AFTER_THE_BUILD = True\n")
    info, err = _probe(package_copy)
    assert info["cache"] == str(src)  # the edit runs, not the stale binary
    assert not info["decay_lfu"].endswith(".py")  # the others stay compiled
    assert info["status"]["cache"] == "pure: stale build"
    assert "cache" in err and "make native" in err and "FINEMOE_NATIVE=1 pip install -e ." in err


def test_an_extension_module_outside_the_list_never_runs(package_copy):
    """A compiled file left by an older build of a module no longer compiled (fused_match: Triton reads
    its kernels' source) is not imported: the module runs from its `.py`."""
    pkg = package_copy / "finemoe"
    so = _native._compiled_file(pkg, "cache")
    shutil.copy(so, pkg / so.name.replace("cache", "fused_match", 1))
    probe = PROBE.replace("finemoe.decay_lfu as d", "finemoe.fused_match as d")
    env = {k: v for k, v in os.environ.items() if k != _native.PURE_ENV} | {"PYTHONPATH": str(package_copy)}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True, cwd="/")
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["decay_lfu"] == str(pkg / "fused_match.py")  # (the probe's key, the module swapped)
    assert not info["cache"].endswith(".py")


def test_a_corrupt_manifest_means_every_module_runs_as_source(package_copy):
    (package_copy / "finemoe" / _native.BUILD_MANIFEST).write_text("{not json")
    info, err = _probe(package_copy)
    assert set(info["status"].values()) == {"pure: stale build"}
    assert info["cache"].endswith("cache.py") and "older than the source" in err


def test_without_a_build_every_module_runs_as_source(tmp_path):
    _copy_package(tmp_path, ignore=NOT_BUILT)
    info, err = _probe(tmp_path)
    assert set(info["status"].values()) == {"pure: no build"} and info["summary"] == "pure (no build)"
    assert info["cache"].endswith("cache.py") and "older" not in err


REPLAYS = """
import json
from finemoe import _native
from finemoe.sim_history import empty_history, record_history
from finemoe.simulator import simulate
from tests.test_simulator import ONLINE, cfg, random_trace, unit_cost
out = {"summary": _native.summary()}
for seed in range(2):
    tr = random_trace(seed, requests=3, iters=10)
    hist = empty_history(tr, 64, 1)
    record_history(random_trace(seed + 10), hist)
    for policy in ONLINE + ["oracle", "belady"]:
        for budget in ("2", "4"):
            for link in ("instant", "timed"):
                r = simulate(tr, cfg(policy, budget, prefetch_distance=1), unit_cost(0.6), link, hist)
                d = {k: v for k, v in r.to_dict().items() if k not in ("wall_s", "layer_steps_per_s")}
                out[f"{seed}/{policy}/{budget}/{link}"] = d
print(json.dumps(out, sort_keys=True, default=str))
"""


def test_compiled_and_source_modules_make_the_same_decisions(built):
    """Every online policy, the oracles, two budgets and both links replayed by the compiled build
    and by the sources: identical results (hits, stalls, bytes, per-layer figures)."""
    runs = {}
    for pure in (False, True):
        env = {k: v for k, v in os.environ.items() if k != _native.PURE_ENV}
        env["PYTHONPATH"] = os.pathsep.join([str(built), str(ROOT)])  # (ROOT: the tests package)
        if pure:
            env[_native.PURE_ENV] = "1"
        out = subprocess.run(
            [sys.executable, "-c", REPLAYS], env=env, capture_output=True, text=True, check=True, cwd=ROOT
        )
        runs[pure] = json.loads(out.stdout.strip().splitlines()[-1])
    n = len(_native.NATIVE_MODULES)
    assert runs[False].pop("summary") == f"compiled {n}/{n}" and runs[True].pop("summary").startswith("pure")
    assert len(ONLINE) == 9  # (the replays below: 2 seeds x 11 policies, the oracles too, x 2 budgets x 2 links)
    assert len(runs[False]) == 2 * 11 * 2 * 2
    assert runs[False] == runs[True]
