"""Engine behaviour beyond parity: budgets in every unit, memory bounds, chat, sampling, close()."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from finemoe import Engine, ExpertBudget, SamplingParams
from finemoe.config import BudgetPlan


def test_budget_parsing():
    assert ExpertBudget.parse("25%") == ExpertBudget("fraction", 0.25)
    assert ExpertBudget.parse("8GiB") == ExpertBudget("bytes", 8 * 2**30)
    assert ExpertBudget.parse("512 MB") == ExpertBudget("bytes", 512e6)
    assert ExpertBudget.parse("96") == ExpertBudget("slots", 96)
    assert ExpertBudget.parse(12) == ExpertBudget("slots", 12)
    assert ExpertBudget.parse(0.5) == ExpertBudget("fraction", 0.5)


@pytest.mark.parametrize("budget", ["25%", "5", "300KiB"])
def test_device_expert_bytes_never_exceed_budget(tiny_checkpoint, budget):
    path = tiny_checkpoint("mixtral")
    eng = Engine.from_pretrained(path, expert_budget=budget, policy="previous-token", device="cpu", progress=False)
    try:
        b = ExpertBudget.parse(budget)
        limit = {
            "fraction": b.value * eng.spec.total_expert_bytes,
            "bytes": b.value,
            "slots": b.value * eng.spec.expert_bytes,
        }[b.kind]
        assert eng.cache.pool.nbytes <= limit
        # No expert weights live anywhere else on the device: the fused parameters stay on meta.
        for layer in eng.model.model.layers:
            for p in layer.mlp.experts.parameters():
                assert p.is_meta
        peak = 0

        def watch(event):
            nonlocal peak
            peak = max(peak, eng.cache.resident_count())

        eng.runtime.observers.append(watch)
        eng.generate([[5, 6, 7, 8], [9, 10]], SamplingParams(max_new_tokens=16, ignore_eos=True))
        assert 0 < peak <= eng.plan.slots
        assert eng.stats().cache.misses > 0
    finally:
        eng.close()


def test_plan_fraction_rounds_down(tiny_checkpoint):
    eng = Engine.from_pretrained(tiny_checkpoint("olmoe"), expert_budget="30%", device="cpu", progress=False)
    try:
        assert eng.plan == BudgetPlan(int(0.3 * 16), eng.spec.expert_bytes, 16, False)
    finally:
        eng.close()


def test_close_undoes_everything(tiny_checkpoint, reference_model):
    path = tiny_checkpoint("qwen3_moe")
    eng = Engine.from_pretrained(path, expert_budget=3, device="cpu", progress=False)
    model = eng.model
    routers = [layer.mlp.gate for layer in model.model.layers]
    assert all(len(r._forward_hooks) == 1 for r in routers)
    assert "finemoe" in ALL_EXPERTS_FUNCTIONS
    eng.close()
    assert all(len(r._forward_hooks) == 0 for r in routers)
    assert "finemoe" not in ALL_EXPERTS_FUNCTIONS
    assert model.config._experts_implementation != "finemoe"
    assert not any(hasattr(layer.mlp.experts, "_finemoe_binding") for layer in model.model.layers)
    eng.close()  # idempotent


def test_two_engines_share_the_registry(tiny_checkpoint):
    a = Engine.from_pretrained(tiny_checkpoint("qwen3_moe"), expert_budget=3, device="cpu", progress=False)
    b = Engine.from_pretrained(tiny_checkpoint("olmoe"), expert_budget=3, device="cpu", progress=False)
    a.close()
    assert "finemoe" in ALL_EXPERTS_FUNCTIONS
    assert len(b.generate([1, 2, 3], SamplingParams(max_new_tokens=3))[0].token_ids) >= 1
    b.close()
    assert "finemoe" not in ALL_EXPERTS_FUNCTIONS


def test_chat_template_and_text(tiny_checkpoint):
    path = tiny_checkpoint("qwen2_moe", tokenizer=True, vocab_size=260)
    eng = Engine.from_pretrained(path, expert_budget=4, device="cpu", progress=False)
    try:
        msgs = [{"role": "user", "content": "hi"}]
        ids = eng.encode(msgs)
        assert ids == eng.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)["input_ids"]
        assert eng.encode("hi") == ids  # text goes through the chat template when there is one
        assert eng.encode("hi", chat=False) == [104, 105]
        out = eng.generate("hi", SamplingParams(max_new_tokens=5, ignore_eos=True))[0]
        assert out.prompt_token_ids == ids and len(out.token_ids) == 5
        assert out.text == eng.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    finally:
        eng.close()


def test_sampling_is_seeded_and_stops_on_eos(tiny_checkpoint):
    eng = Engine.from_pretrained(tiny_checkpoint("olmoe"), expert_budget=4, device="cpu", progress=False)
    try:
        p = SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
        a = eng.generate([3, 4, 5], p)[0].token_ids
        b = eng.generate([3, 4, 5], p)[0].token_ids
        c = eng.generate([3, 4, 5], SamplingParams(**{**p.__dict__, "seed": 8}))[0].token_ids
        assert a == b and a != c
        greedy = eng.generate([3, 4, 5], SamplingParams(max_new_tokens=8, ignore_eos=True))[0].token_ids
        stop = greedy[3]
        out = eng.generate([3, 4, 5], SamplingParams(max_new_tokens=8, stop_token_ids=(stop,)))[0]
        assert out.token_ids == greedy[: greedy.index(stop) + 1] and out.finish_reason == "stop"
    finally:
        eng.close()


def test_from_model_matches_reference(tiny_checkpoint, reference_model):
    from transformers import AutoModelForCausalLM

    path = tiny_checkpoint("deepseek_v3")
    ref = reference_model(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    eng = Engine.from_model(model, expert_budget=3, policy="lfu", progress=False)
    try:
        ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
        with torch.no_grad():
            assert torch.allclose(ref(ids).logits, eng.model(ids).logits, atol=1e-5, rtol=0)
        assert eng.stats().cache.misses > 0
    finally:
        eng.close()


def test_reconfigure_keeps_store_and_stays_exact(tiny_checkpoint, reference_model):
    path = tiny_checkpoint("mixtral")
    ref = reference_model(path)
    eng = Engine.from_pretrained(path, expert_budget=3, policy="lru", device="cpu", progress=False)
    try:
        store = eng.store
        ids = torch.tensor([[7, 3, 9, 1, 2]])
        for kw in (
            {"policy": "lfu", "expert_budget": "50%"},
            {"policy": "all-gpu"},
            {"policy": "lru", "expert_budget": 2},
        ):
            eng.reconfigure(**kw)
            assert eng.store is store
            with torch.no_grad():
                assert (ref(ids).logits - eng.model(ids).logits).abs().max() <= 1e-5
        assert eng.preset.name == "lru" and eng.plan.slots == 2
        with pytest.raises(Exception, match="top-k"):
            eng.reconfigure(policy="lru", expert_budget=1)
        assert eng.plan.slots == 2  # a refused change leaves the engine as it was
        assert len(eng.generate([1, 2], SamplingParams(max_new_tokens=2))[0].token_ids) >= 1
    finally:
        eng.close()


def test_prefetch_window_wiring(tiny_checkpoint):
    """Prefetching policies get the link-aware window (fixed on request, never without prefetch);
    on the CPU copies finish when issued, so the limit stays the configured maximum."""
    path = tiny_checkpoint("mixtral")
    eng = Engine.from_pretrained(path, expert_budget="50%", policy="finemoe", device="cpu", progress=False)
    try:
        eng.generate([1, 2, 3], SamplingParams(max_new_tokens=3))
        st = eng.stats().extra
        assert st["prefetch_window"] == "link" and st["prefetch_window_limit"] == 4
        assert st["window_layer_ms"] > 0 and st["window_copy_ms"] == 0.0
        eng.reconfigure(policy="lru")
        assert eng.stats().extra["prefetch_window"] == "fixed"
        # eager decode on a CPU: the graphed serve's host-time spans stay empty, the syncs are timed
        host = {k: v for k, v in eng.stats().extra.items() if k.startswith("decode_") and k.endswith("_s")}
        graphed_spans = {"decode_serve_s", "decode_table_s", "decode_launch_s", "decode_post_launch_s"}
        assert set(host) == {"decode_sync_s", *graphed_spans}
        assert all(host[k] == 0.0 for k in graphed_spans)
        assert host["decode_sync_s"] >= 0.0
        eng.reconfigure(policy="finemoe", prefetch_window="fixed", max_inflight_prefetches=2)
        st = eng.stats().extra
        assert st["prefetch_window"] == "fixed" and st["prefetch_window_limit"] == 2
    finally:
        eng.close()


def test_prefill_plans_are_lossless_and_none_prefetches_nothing_in_prefill(tiny_checkpoint):
    """finemoe's prefill modes change only what is prefetched while the prompt runs: the tokens
    are the same, and with "none" a one-token generation (a prefill alone) prefetches nothing."""
    path = tiny_checkpoint("qwen2_moe")
    prompts = [[5, 7, 9, 11, 13, 15, 17], [2, 4, 6, 8, 10]]
    issued, tokens = {}, {}
    with Engine.from_pretrained(path, policy="finemoe", expert_budget="50%", progress=False) as eng:
        eng.generate(prompts, SamplingParams(max_new_tokens=8, ignore_eos=True))  # the store learns maps
        eng.reconfigure(map_store_learn=False)  # frozen: every mode sees the same maps
        for mode in ("maps", "gate", "none"):
            eng.reconfigure(prefill_plans=mode)
            one = eng.generate([prompts[0]], SamplingParams(max_new_tokens=1, ignore_eos=True))[0]
            issued[mode] = one.cache.prefetches_issued
            tokens[mode] = [
                o.token_ids for o in eng.generate(prompts, SamplingParams(max_new_tokens=12, ignore_eos=True))
            ]
    assert tokens["maps"] == tokens["gate"] == tokens["none"]
    assert issued["none"] == 0 and issued["maps"] > 0 and issued["gate"] > 0


@pytest.mark.parametrize("temperature", [5e-324, 1e-40, 1e-6])
def test_a_tiny_temperature_samples_the_argmax_instead_of_failing(temperature):
    """A temperature float32 rounds to 0 (or one that sends logits past its range) made softmax
    NaN and the request fail (found by the server fuzz test); it now picks the top token."""
    from finemoe.config import SamplingParams
    from finemoe.generation import sample_tokens

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 30
    for extra in ({}, {"top_k": 5}, {"top_p": 0.3}):
        params = SamplingParams(temperature=temperature, seed=1, **extra)
        got = sample_tokens(logits, params, torch.Generator().manual_seed(1))
        assert torch.equal(got, logits.argmax(dim=-1))


@pytest.mark.parametrize("policy", ["lru", "finemoe"])
def test_routing_sync_wait_is_split_by_layer(tiny_checkpoint, policy):
    """`sync_wait_by_layer` holds one entry per MoE layer, each non-negative, summing to the decode
    sync time of `host_time_stats`; only decode iterations count (0 after a prefill alone)."""
    with Engine.from_pretrained(
        tiny_checkpoint("olmoe"), policy=policy, expert_budget="50%", device="cpu", progress=False
    ) as eng:
        L = eng.spec.num_layers
        eng.generate([3, 4, 5], SamplingParams(max_new_tokens=1, ignore_eos=True))  # prefill only
        assert eng.sync_wait_by_layer() == [0.0] * L
        eng.generate([3, 4, 5, 6], SamplingParams(max_new_tokens=5, ignore_eos=True))
        waits = eng.sync_wait_by_layer()
        assert len(waits) == L and all(w >= 0.0 for w in waits)
        assert sum(waits) == pytest.approx(eng.host_time_stats()["decode_sync_s"], rel=1e-9, abs=1e-12)
        assert eng.host_time_stats()["decode_sync_s"] > 0.0


def test_a_warm_pool_starts_full_whole_layers_first_and_stays_exact(tiny_checkpoint, reference_model):
    """`warm_pool`: the free slots are filled when the engine is set up, layer by layer, so a budget
    one slot short of every expert has all layers but the last whole, counted as no traffic; the
    logits stay the reference model's and the first pass misses less than from an empty pool."""
    path = tiny_checkpoint("mixtral")
    ref = reference_model(path)
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    misses = {}
    for warm in (False, True):
        eng = Engine.from_pretrained(path, expert_budget="25%", policy="lru", device="cpu", progress=False)
        try:
            L, E = eng.spec.num_layers, eng.spec.num_experts
            eng.reconfigure(expert_budget=L * E - 1, warm_pool=warm)
            if warm:
                assert eng.cache.resident_count() == L * E - 1
                assert all(min(eng.cache.slot_of[layer]) >= 0 for layer in range(L - 1))
                assert sum(s < 0 for s in eng.cache.slot_of[L - 1]) == 1
                assert eng.stats().cache.bytes_copied == 0
            else:
                assert eng.cache.resident_count() == 0
            with torch.no_grad():
                assert torch.allclose(ref(ids).logits, eng.model(ids).logits, atol=1e-5, rtol=0)
            misses[warm] = eng.stats().cache.misses
        finally:
            eng.close()
    assert misses[True] < misses[False]


@pytest.mark.parametrize("cuda_graphs", [None, True])
def test_the_cuda_defaults_stay_off_for_eager_steps(tiny_checkpoint, cuda_graphs):
    """The CUDA defaults (session 33: `search` "auto" -> "device", `graph_gates`, `warm_pool` and
    `gather_absent` on where decode steps are graphed) resolve off on the CPU, whose steps are eager
    even with the static cache (`cuda_graphs=True`): inline search, an empty pool at set-up, no sink
    layer; an explicit warm pool still fills it."""
    path = tiny_checkpoint("mixtral")
    kw = dict(expert_budget="90%", device="cpu", progress=False, cuda_graphs=cuda_graphs)
    with Engine.from_pretrained(path, **kw) as eng:
        assert eng.config.search == "auto" and eng.config.warm_pool is None and eng.config.graph_gates is None
        assert eng.search_mode == "sync"
        assert eng.cache.resident_count() == 0 and eng.cache.sink == -1
        assert eng.runtime.gate_strides == () and eng.runtime.device_matches is None
        eng.reconfigure(warm_pool=True)
        assert eng.cache.resident_count() == eng.cache.num_slots


def test_the_device_search_is_chosen_only_where_it_can_run():
    """`Engine._device_unavailable`, which `search="auto"` resolves by (`device` where it returns None,
    else `sync`) and an explicit `search="device"` falls back by: a map predictor, a CUDA device with
    graphed decode, probability maps over the whole prefix."""
    from finemoe.config import EngineConfig

    why = Engine._device_unavailable
    cuda, cpu, fine, base = torch.device("cuda"), torch.device("cpu"), object(), EngineConfig()
    assert why(base, fine, cuda, True, "finemoe") is None
    assert "no map predictor" in why(base, None, cuda, True, "lru")
    assert "CUDA graphs" in why(base, fine, cpu, True, "finemoe")
    assert "CUDA graphs" in why(base, fine, cuda, False, "finemoe")  # eager: cuda_graphs off, sliding windows
    assert "whole prefix" in why(EngineConfig(map_values="counts"), fine, cuda, True, "finemoe")
    assert "whole prefix" in why(EngineConfig(trajectory_window=4), fine, cuda, True, "finemoe")


def test_a_bpe_tokenizer_decodes_without_the_clean_up_warning(tiny_checkpoint, tmp_path):
    """A BPE tokenizer whose config asks for the spaces clean-up (the reference model's does):
    transformers skips it for BPE anyway, with a warning at the first decode; the engine turns it
    off, so the text is the same and nothing warns."""
    import json
    import shutil

    from finemoe.engine import _load_tokenizer

    path = tmp_path / "ckpt"  # (a copy: the fixture's checkpoint is shared)
    shutil.copytree(tiny_checkpoint("qwen2_moe", tokenizer=True, vocab_size=260), path)
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["clean_up_tokenization_spaces"] = True
    cfg_path.write_text(json.dumps(cfg))
    tok = _load_tokenizer(path)
    assert tok is not None and type(tok.backend_tokenizer.model).__name__ == "BPE"
    assert tok.clean_up_tokenization_spaces is False
    ids = tok.encode("Paris , France ! Yes .")
    assert tok.decode(ids) == tok.backend_tokenizer.decode(ids) == "Paris , France ! Yes ."
