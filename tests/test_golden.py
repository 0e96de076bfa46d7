"""Golden parity: the offloaded engine equals the unmodified transformers model, for every family
and policy, with a budget smaller than the working set (misses and evictions happen)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from finemoe import Engine, SamplingParams
from finemoe.presets import PRESETS

from tests.conftest import FAMILIES

POLICIES = sorted(PRESETS)
NEW_TOKENS = 32


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab - 10, (n,), generator=g).tolist() for n in (9, 14, 5)]


@pytest.fixture(scope="module")
def hf_greedy(reference_model):
    cache: dict[tuple, list[int]] = {}

    def run(path, prompt):
        key = (str(path), tuple(prompt))
        if key not in cache:
            ref = reference_model(path)
            # Never stop early: compare exactly NEW_TOKENS greedy tokens (the engine uses ignore_eos).
            ref.generation_config.eos_token_id = None
            ref.config.eos_token_id = None
            out = ref.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
            cache[key] = out[0, len(prompt) :].tolist()
        return cache[key]

    return run


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("policy", POLICIES)
def test_parity(model_type, policy, tiny_checkpoint, reference_model, hf_greedy):
    path = tiny_checkpoint(model_type)
    ref = reference_model(path)
    vocab = ref.config.vocab_size
    prompts = _prompts(vocab)
    eng = Engine.from_pretrained(path, expert_budget=3, policy=policy, device="cpu", progress=False)
    try:
        assert eng.plan.slots == (eng.spec.num_total_experts if policy == "all-gpu" else 3)
        # Logits of a left-padded batch of three prompts of different lengths.
        width = max(len(p) for p in prompts)
        ids = torch.zeros(3, width, dtype=torch.long)
        mask = torch.zeros(3, width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        with torch.no_grad():
            want = ref(ids, attention_mask=mask).logits
            got = eng.model(ids, attention_mask=mask).logits
        assert (want - got).abs().max().item() <= 1e-5
        params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
        # Batch 1, then a batch of three prompts of different lengths.
        single = eng.generate(prompts[0], params)[0]
        assert single.token_ids == hf_greedy(path, prompts[0])
        batch = eng.generate(prompts, params)
        for p, out in zip(prompts, batch, strict=True):
            assert len(out.token_ids) == NEW_TOKENS
            assert out.token_ids == hf_greedy(path, p)
        st = eng.stats().cache
        assert st.hits + st.misses > 0
        if policy == "all-gpu":
            assert st.misses == 0 and st.evictions == 0
        else:
            assert st.misses > 0 and st.evictions > 0  # the budget really was below the working set
    finally:
        eng.close()


def test_cpu_layer_calls_gather_their_experts_and_stay_exact(tiny_checkpoint, reference_model, hf_greedy):
    """On a CPU the grouped kernel walks every slot of the pool, empty or not; decode calls gather
    their few experts into scratch instead (while the copy costs less than the empty groups)."""
    path = tiny_checkpoint("qwen2_moe")
    prompts = _prompts(reference_model(path).config.vocab_size)
    with Engine.from_pretrained(path, expert_budget=12, policy="lru", device="cpu", progress=False) as eng:
        # 12 slots of tiny experts: gathering up to 5 pays (2 x 2.3 us x 12 / (copy + 2 x 2.3 us))
        assert eng.runtime.cpu_gather_max >= 2 * eng.spec.top_k
        eng.runtime.batched_max_pairs = 0  # decode calls too take the gather (batched calls skip it)
        outs = eng.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
        assert [o.token_ids for o in outs] == [hf_greedy(path, p) for p in prompts]
        assert eng.stats().extra["gather_scratch_bytes"] == 2 * eng.spec.top_k * eng.spec.expert_bytes


@pytest.mark.parametrize("gather", [None, 1])
@pytest.mark.parametrize("policy,budget", [("all-gpu", 3), ("lru", 6), ("previous-token", 5)])
def test_parity_with_narrow_group_windows(policy, budget, gather, tiny_checkpoint, reference_model, hf_greedy):
    """The CUDA kernel caps groups per call; the windowed path and the gathered scratch (both
    forced here: gather=1 leaves multi-expert calls to the windows) stay exact."""
    path = tiny_checkpoint("qwen2_moe")
    ref = reference_model(path)
    prompts = _prompts(ref.config.vocab_size)
    eng = Engine.from_pretrained(path, expert_budget=budget, policy=policy, device="cpu", progress=False)
    try:
        eng.runtime.max_groups = 3
        eng.runtime.cpu_gather_max = 0  # as on CUDA: only calls spanning several windows gather
        eng.runtime.batched_max_pairs = 0  # decode calls too take the windows or the scratch
        if gather:
            eng.runtime.gather_capacity = gather
        ids = torch.tensor([prompts[1]])
        with torch.no_grad():
            assert (ref(ids).logits - eng.model(ids).logits).abs().max().item() <= 1e-5
        outs = eng.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
        assert [o.token_ids for o in outs] == [hf_greedy(path, p) for p in prompts]
        if policy != "all-gpu":  # decode steps spanned several windows: scratch or windows ran them
            scratch = eng.stats().extra["gather_scratch_bytes"]
            assert scratch == (2 * eng.spec.top_k * eng.spec.expert_bytes if gather is None else 0)
        with torch.no_grad():  # a plain forward after generate (the scratch was made in inference mode)
            assert (ref(ids).logits - eng.model(ids).logits).abs().max().item() <= 1e-5
        eng.runtime.gather_capacity = 2 * eng.spec.top_k + 3  # a wider scratch replaces the old one
        again = eng.generate(prompts[:1], SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
        assert again[0].token_ids == outs[0].token_ids
        if policy != "all-gpu" and gather is None:
            assert eng.runtime.scratch_bytes == (2 * eng.spec.top_k + 3) * eng.spec.expert_bytes
    finally:
        eng.close()


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("policy,budget", [("all-gpu", "100%"), ("lru", "50%")])
def test_parity_with_batched_decode_calls(
    model_type, policy, budget, tiny_checkpoint, reference_model, hf_greedy, monkeypatch
):
    """The decode-size path (the pairs' weights gathered from the pool, two bmm; the default for
    up to 2 x top-k pairs) stays exact, all resident or offloaded, for every family."""
    import finemoe.execution as ex

    calls = []
    real = ex.batched_pairs
    monkeypatch.setattr(ex, "batched_pairs", lambda *a: calls.append(1) or real(*a))
    path = tiny_checkpoint(model_type)
    prompts = _prompts(reference_model(path).config.vocab_size)
    with Engine.from_pretrained(path, expert_budget=budget, policy=policy, device="cpu", progress=False) as eng:
        # the default: 2 x top-k, on a CPU only while copying an expert pays (as the gather)
        assert eng.runtime.batched_max_pairs == min(2 * eng.spec.top_k, eng.runtime.cpu_gather_max)
        eng.runtime.batched_max_pairs = 4 * eng.spec.top_k  # the test batches 3 prompts
        outs = eng.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
        assert [o.token_ids for o in outs] == [hf_greedy(path, p) for p in prompts]
        assert calls  # decode steps took the batched path


@pytest.mark.parametrize("model_type", FAMILIES)
def test_router_ema_eviction_stays_exact(model_type, tiny_checkpoint, reference_model, hf_greedy):
    """The router-probability eviction (an observer of every router) changes what is resident,
    never the tokens: batch 1 and a batch of three, finemoe's predictor running alongside."""
    path = tiny_checkpoint(model_type)
    prompts = _prompts(reference_model(path).config.vocab_size)
    with Engine.from_pretrained(
        path, expert_budget=3, policy="finemoe", eviction="router-ema", device="cpu", progress=False
    ) as eng:
        assert eng.cache.policy.name == "router-ema"
        params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
        assert eng.generate(prompts[0], params)[0].token_ids == hf_greedy(path, prompts[0])
        outs = eng.generate(prompts, params)
        assert [o.token_ids for o in outs] == [hf_greedy(path, p) for p in prompts]
        st = eng.stats().cache
        assert st.misses > 0 and st.evictions > 0
        assert eng.cache.policy._t > 0 and np.isfinite(eng.cache.policy.keys).any()
