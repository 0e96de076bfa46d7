"""Shared fixtures: tiny random checkpoints of every supported family, built once per session."""

from __future__ import annotations

import logging
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
logging.getLogger("transformers").setLevel(logging.ERROR)

FAMILIES = [
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
    "phimoe",
    "gpt_oss",
    "granitemoe",
]


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpts")


@pytest.fixture(scope="session")
def tiny_checkpoint(ckpt_root):
    """`tiny_checkpoint(model_type, **config_overrides)` -> path of a saved random model (cached)."""
    from finemoe.synthetic import build_random_checkpoint, make_config

    cache: dict[str, object] = {}

    def make(model_type: str, tokenizer: bool = False, **overrides):
        key = f"{model_type}-{tokenizer}-{sorted(overrides.items())}"
        if key not in cache:
            path = ckpt_root / f"{model_type}-{len(cache)}"
            cache[key] = build_random_checkpoint(
                path, make_config(model_type, **overrides), seed=1, tokenizer=tokenizer
            )
        return cache[key]

    return make


@pytest.fixture(scope="session")
def reference_model():
    """`reference_model(path)` -> the unmodified transformers model (fp32, CPU), cached."""
    from transformers import AutoModelForCausalLM

    cache: dict[str, object] = {}

    def load(path):
        if str(path) not in cache:
            cache[str(path)] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return cache[str(path)]

    return load
