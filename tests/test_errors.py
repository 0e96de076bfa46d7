"""Bad input gets a clear error that says what is wrong; one test per case."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from finemoe import BudgetError, CheckpointError, ConfigError, Engine, UnsupportedModelError
from finemoe.synthetic import build_random_checkpoint, make_config


def load(path, **kw):
    return Engine.from_pretrained(path, device="cpu", progress=False, **{"expert_budget": 4, **kw})


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nope")


def test_not_a_checkpoint_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load(tmp_path)


def test_missing_shard(tmp_path):
    path = build_random_checkpoint(tmp_path / "m", make_config("qwen3_moe"), max_shard_size="100KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (path / victim).unlink()
    with pytest.raises(CheckpointError, match=f"incomplete.*{victim}.*missing"):
        load(path)


def test_truncated_shard(tmp_path):
    path = build_random_checkpoint(tmp_path / "m", make_config("mixtral"))
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load(path)


def test_garbage_shard(tmp_path):
    path = build_random_checkpoint(tmp_path / "m", make_config("mixtral"))
    (path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="corrupt"):
        load(path)


def test_missing_expert_weights(tmp_path):
    path = build_random_checkpoint(tmp_path / "m", make_config("olmoe"))
    f = path / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.experts.5.up_proj.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="no weights for expert 5 of decoder layer 1"):
        load(path)


def test_missing_dense_weight(tmp_path):
    path = build_random_checkpoint(tmp_path / "m", make_config("olmoe"))
    f = path / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.0.self_attn.q_proj.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="no weight for model.layers.0.self_attn.q_proj.weight"):
        load(path)


def test_weights_do_not_match_config(tmp_path):
    path = build_random_checkpoint(tmp_path / "m", make_config("qwen3_moe"))
    cfg = json.loads((path / "config.json").read_text())
    cfg["hidden_size"] = 128
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match"):
        load(path)


def test_not_a_moe_model(tmp_path):
    path = build_random_checkpoint(tmp_path / "llama", make_config("llama"))
    with pytest.raises(UnsupportedModelError, match="not a Mixture-of-Experts model"):
        load(path)


def test_unsupported_moe_family(tmp_path):
    cfg = make_config(
        "glm4_moe",
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        first_k_dense_replace=0,
        n_group=1,
        topk_group=1,
    )
    path = build_random_checkpoint(tmp_path / "glm", cfg)
    with pytest.raises(UnsupportedModelError, match="'glm4_moe' is not supported.*Mixtral.*Qwen3-MoE"):
        load(path)


def test_unsupported_dtype(tmp_path):
    path = build_random_checkpoint(tmp_path / "m", make_config("qwen3_moe"))
    f = path / "model.safetensors"
    tensors = {k: v.to(torch.float8_e4m3fn) for k, v in load_file(f).items()}
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="F8_E4M3.*cannot load"):
        load(path)


def test_unsupported_requested_dtype(tmp_path):
    with pytest.raises(ConfigError, match="unsupported dtype 'int8'"):
        load(tmp_path, dtype="int8")


def test_pytorch_bin_only(tmp_path):
    path = build_random_checkpoint(tmp_path / "m", make_config("qwen3_moe"))
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors"):
        load(path)


def test_budget_too_small(tiny_checkpoint):
    with pytest.raises(BudgetError, match="top-k = 2 experts.*at least 2 slots"):
        load(tiny_checkpoint("qwen3_moe"), expert_budget=1)
    with pytest.raises(BudgetError, match="holds 0 expert"):
        load(tiny_checkpoint("qwen3_moe"), expert_budget="1KB")


@pytest.mark.parametrize("text", ["lots", "-5%", "150%", "0", "1.5", "12XB"])
def test_budget_unparseable(tiny_checkpoint, text):
    with pytest.raises(BudgetError):
        load(tiny_checkpoint("qwen3_moe"), expert_budget=text)


def test_budget_larger_than_model_keeps_everything(tiny_checkpoint, caplog):
    with caplog.at_level(logging.WARNING, logger="finemoe"):
        eng = load(tiny_checkpoint("qwen3_moe"), expert_budget="1GiB")
    try:
        assert "exceeds the model" in caplog.text and "keeping every expert resident" in caplog.text
        assert eng.plan.all_resident and eng.cache.resident_count() == eng.spec.num_total_experts
        eng.generate([1, 2, 3], __import__("finemoe").SamplingParams(max_new_tokens=4))
        assert eng.stats().cache.misses == 0
    finally:
        eng.close()


def test_unknown_policy(tiny_checkpoint):
    with pytest.raises(ConfigError, match="unknown policy 'magic'"):
        load(tiny_checkpoint("qwen3_moe"), policy="magic")


def test_no_tokenizer_needs_token_ids(tiny_checkpoint):
    eng = load(tiny_checkpoint("qwen3_moe"))
    try:
        with pytest.raises(ConfigError, match="no tokenizer"):
            eng.generate("hello")
    finally:
        eng.close()


def test_token_id_outside_the_vocabulary(tiny_checkpoint):
    eng = load(tiny_checkpoint("qwen3_moe"))
    try:
        vocab = eng.vocab_size
        with pytest.raises(ConfigError, match=f"prompt 1: token id {vocab} at position 2 is outside"):
            eng.generate([[1, 2, 3], [4, 5, vocab]])
        with pytest.raises(ConfigError, match="token id -1 at position 0"):
            eng.generate([-1, 2])
        assert len(eng.generate([1, 2, vocab - 1])[0].token_ids) > 0  # the engine still works
    finally:
        eng.close()


def test_prefill_eviction_is_validated_and_resolved_per_policy():
    from finemoe.config import EngineConfig
    from finemoe.presets import get_preset, prefill_sweep

    with pytest.raises(ConfigError, match="prefill_eviction must be one of auto, sweep, policy"):
        EngineConfig(prefill_eviction="lru")
    auto, on, off = EngineConfig(), EngineConfig(prefill_eviction="sweep"), EngineConfig(prefill_eviction="policy")
    assert prefill_sweep(get_preset("finemoe"), auto) and not prefill_sweep(get_preset("finemoe"), off)
    assert not prefill_sweep(get_preset("lru"), auto) and prefill_sweep(get_preset("lru"), on)
    assert not prefill_sweep(get_preset("mixtral-offloading"), auto)  # the paper's baselines stay faithful


def test_prefill_predict_is_validated_and_resolved_per_policy():
    from finemoe.config import EngineConfig
    from finemoe.presets import get_preset, predict_after_demand

    with pytest.raises(ConfigError, match="prefill_predict must be one of auto, before, after-demand"):
        EngineConfig(prefill_predict="late")
    auto, after = EngineConfig(), EngineConfig(prefill_predict="after-demand")
    before = EngineConfig(prefill_predict="before")
    assert predict_after_demand(get_preset("finemoe"), auto) and not predict_after_demand(get_preset("finemoe"), before)
    assert not predict_after_demand(get_preset("finemoe-paper"), auto)  # as the paper's hooks run them
    assert not predict_after_demand(get_preset("mixtral-offloading"), auto)
    assert predict_after_demand(get_preset("mixtral-offloading"), after)


def test_engine_start_warns_when_torch_threads_outnumber_the_usable_cores(monkeypatch, caplog):
    """Restricting the process's cores after torch's import leaves its thread pool as large as
    before: the warning names the fix, and stays silent when the threads fit."""
    import logging

    from finemoe import threads

    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {2, 3}, raising=False)
    monkeypatch.setattr(threads, "cpu_quota", lambda: None)
    monkeypatch.setattr(threads.torch, "get_num_threads", lambda: 8)
    monkeypatch.setattr(threads, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="finemoe.threads"):
        assert threads.warn_if_oversubscribed()
        assert not threads.warn_if_oversubscribed()  # once per process
    assert "torch.set_num_threads(2)" in caplog.text and "8 CPU threads" in caplog.text
    assert caplog.text.count("CPU threads") == 1
    caplog.clear()
    monkeypatch.setattr(threads.torch, "get_num_threads", lambda: 2)
    with caplog.at_level(logging.WARNING, logger="finemoe.threads"):
        assert not threads.warn_if_oversubscribed(again=True)
    assert caplog.text == ""
