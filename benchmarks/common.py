"""Shared helpers for benchmark scripts: run metadata and real model shapes (config numbers)."""

from __future__ import annotations

import datetime as _dt
import platform
import subprocess
import sys
from pathlib import Path

import torch

# Config numbers of real MoE checkpoints (sources: each model's config.json on the Hugging Face hub).
SHAPES: dict[str, dict] = {
    # finemoe's reference MoE (SmolLM2-135M as Qwen2-MoE 16x4+1024; docs/reference-model.md)
    "reference": dict(
        model_type="qwen2_moe",
        hidden_size=576,
        intermediate_size=1536,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=1024,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        num_experts=16,
        num_experts_per_tok=4,
        vocab_size=49152,
        max_position_embeddings=8192,
        norm_topk_prob=True,
        tie_word_embeddings=True,
    ),
    # allenai/OLMoE-1B-7B-0924
    "olmoe": dict(
        model_type="olmoe",
        hidden_size=2048,
        intermediate_size=1024,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        num_experts=64,
        num_experts_per_tok=8,
        vocab_size=50304,
        max_position_embeddings=4096,
        norm_topk_prob=False,
    ),
    # Qwen/Qwen1.5-MoE-A2.7B
    "qwen15moe": dict(
        model_type="qwen2_moe",
        hidden_size=2048,
        intermediate_size=5632,
        moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        num_experts=60,
        num_experts_per_tok=4,
        vocab_size=151936,
        max_position_embeddings=8192,
        norm_topk_prob=False,
    ),
    # mistralai/Mixtral-8x7B-v0.1 (352 MB experts: a copy outlasts a layer's host work)
    "mixtral": dict(
        model_type="mixtral",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        vocab_size=32000,
        max_position_embeddings=32768,
        rope_theta=1e6,
    ),
    # Qwen/Qwen3-30B-A3B
    "qwen3_30b": dict(
        model_type="qwen3_moe",
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        vocab_size=151936,
        max_position_embeddings=32768,
        norm_topk_prob=True,
    ),
}


def shape_config(name: str, layers: int | None = None):
    from transformers import AutoConfig

    kw = dict(SHAPES[name])
    model_type = kw.pop("model_type")
    if layers:
        kw["num_hidden_layers"] = layers
    return AutoConfig.for_model(model_type, **kw)


def git_sha() -> str:
    """HEAD of the checkout, or $FINEMOE_GIT_SHA where the tree has no .git (the GPU machine's copy)."""
    import os

    if os.environ.get("FINEMOE_GIT_SHA"):
        return os.environ["FINEMOE_GIT_SHA"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _python_build() -> dict:
    """What the interpreter was built with: pure-Python replays differ ~10% between builds (a
    shared libpython without profile-guided optimisation against a distribution's static, PGO
    build: docs/results/simulator.md, "Session 24"), so speed records name theirs."""
    import sysconfig

    args = sysconfig.get_config_var("CONFIG_ARGS") or ""
    cpu = ""
    info = Path("/proc/cpuinfo")
    if info.exists():
        names = [x.split(":", 1)[1].strip() for x in info.read_text().splitlines() if x.startswith("model name")]
        cpu = names[0] if names else ""
    return {
        "executable": sys.executable,
        "shared_libpython": bool(sysconfig.get_config_var("Py_ENABLE_SHARED")),
        "configure_pgo": "--enable-optimizations" in args,
        "configure_lto": "--with-lto" in args,
        "compiler": platform.python_compiler(),
        "cpu_model": cpu,
    }


def _native_summary() -> str:
    try:
        from finemoe import _native

        return _native.summary()
    except ImportError:  # (a tree from before session 39)
        return "pure (no build)"


def run_meta() -> dict:
    import transformers

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {
        "git_sha": git_sha(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "python": platform.python_version(),
        "python_build": _python_build(),
        "numpy": __import__("numpy").__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": dev,
        "cpu_count": __import__("os").cpu_count(),
        "finemoe_modules": _native_summary(),  # compiled (setup.py's optional build) or pure Python
    }


def write_record(path: str | Path, config: dict, results: dict, meta: dict | None = None, **extra) -> dict:
    """Write a benchmark's JSON record (`meta` from `run_meta`, updated with `meta`; `config`,
    `results`, `extra` keys) to `path`, creating its folder; returns the record."""
    import json

    rec = {"meta": run_meta() | (meta or {}), "config": config, "results": results, **extra}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(rec, indent=1))
    return rec


def plot_policy_hit_rates(rows: dict, budget: str, path: str | Path, xlabel: str = "expert hit rate") -> None:
    """Bars of each policy's hit rate beside its per-layer hit rates (`rows`: policy -> a record row
    with `hit_rate` and `layer_hit_rate`), the reference model at `budget`, written to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    axes[0].barh(names, [rows[n]["hit_rate"] for n in names], color="tab:blue")
    axes[0].set_xlabel(xlabel)
    axes[0].set_xlim(0, 1)
    axes[0].invert_yaxis()
    axes[0].set_title(f"reference model, budget {budget}, test split")
    for n in names:
        axes[1].plot(rows[n]["layer_hit_rate"], label=n)
    axes[1].set_xlabel("MoE layer")
    axes[1].set_ylabel("hit rate")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
