"""CUDA path: bf16 parity with transformers, pinned store, and stream-ordering races."""

from __future__ import annotations

import pytest
import torch

from finemoe import Engine, SamplingParams
from finemoe.pool import SlotPool
from finemoe.store import ExpertStore
from finemoe.transfer import CudaTransfer
from finemoe.types import ExpertId, ExpertPart, MoESpec

from tests.gpu.medium import medium_checkpoint, medium_prompts

# bf16 logits of the offloaded engine against transformers on the same GPU: the same kernels run
# over a permuted slot order, so differences are at most a few bf16 ulps of the logit scale.
BF16_REL_TOL = 2e-2


@pytest.fixture(scope="module", params=["qwen2_moe", "mixtral", "deepseek_v3"])
def ckpt(request, tmp_path_factory):
    return medium_checkpoint(request.param, tmp_path_factory)


def test_bf16_parity_and_tokens(ckpt):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).cuda().eval()
    ref.generation_config.eos_token_id = None
    ref.config.eos_token_id = None
    prompts = medium_prompts()
    runs = [("lru", "auto"), ("previous-token", "auto"), ("finemoe", "auto"), ("finemoe", "async")]
    runs.append(("finemoe", "process"))
    runs.append(("mixtral-offloading", "auto"))
    for policy, search in runs:
        eng = Engine.from_pretrained(
            ckpt, expert_budget="25%", policy=policy, device="cuda", progress=False, search=search
        )
        try:
            assert eng.store.pinned
            for p in prompts:
                ids = torch.tensor([p], device="cuda")
                with torch.no_grad():
                    want, got = ref(ids).logits.float(), eng.model(ids).logits.float()
                assert (want - got).abs().max().item() <= BF16_REL_TOL * want.abs().max().item()
                hf = ref.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=0)[0, len(p) :].tolist()
                out = eng.generate(p, SamplingParams(max_new_tokens=32, ignore_eos=True))[0]
                assert out.token_ids == hf
            stats = eng.stats()
            st = stats.cache
            assert st.misses > 0 and st.evictions > 0 and st.stall_s > 0
            if policy == "finemoe":  # on the GPU by default (graphed), thread or process on request; learning
                assert eng.search_mode == ("device" if search == "auto" else search)
                assert stats.extra["map_store_size"] > 0 and "search_error" not in stats.extra
                assert st.prefetches_issued + st.prefetches_dropped > 0
        finally:
            eng.close()


def test_stress_minimum_budget_batches(ckpt):
    """Budget = top-k slots: every layer call evicts experts other streams may still be reading."""
    base = Engine.from_pretrained(ckpt, policy="all-gpu", device="cuda", progress=False)
    prompts = medium_prompts()
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    want = [o.token_ids for o in base.generate(prompts, params)]
    k = base.spec.top_k
    for policy in ("lru", "previous-token", "finemoe", "promoe", "moe-infinity"):
        base.reconfigure(policy=policy, expert_budget=k, max_inflight_prefetches=8)
        for _ in range(3):
            got = [o.token_ids for o in base.generate(prompts, params)]
            assert got == want
    base.close()


def test_narrow_windows_gather_and_windows_stay_exact(ckpt):
    """Pools wider than one grouped kernel call (forced: 3 slots per call) run through the gathered
    scratch (pinned index rows, index_select) or per-window calls; tokens match all-gpu's."""
    base = Engine.from_pretrained(ckpt, policy="all-gpu", device="cuda", progress=False)
    prompts = medium_prompts()
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    want = [o.token_ids for o in base.generate(prompts, params)]
    for gather in (None, 1):
        for policy in ("lru", "finemoe"):
            base.reconfigure(policy=policy, expert_budget="50%")
            base.runtime.max_groups = 3
            base.runtime.batched_max_pairs = 0  # decode calls too take the windows or the scratch
            if gather:
                base.runtime.gather_capacity = gather
            for _ in range(2):
                assert [o.token_ids for o in base.generate(prompts, params)] == want
                assert base.generate(prompts[0], params)[0].token_ids == want[0]
            assert (base.runtime.scratch_bytes > 0) == (gather is None)
    base.close()


SPEC = MoESpec(
    "t",
    (0,),
    4,
    1,
    1024,
    1024,
    (ExpertPart("gate_up_proj", (2048, 1024)), ExpertPart("down_proj", (1024, 1024))),
    torch.float32,
    1,
)


def _transfer():
    store = ExpertStore(SPEC, pin=True)
    for e in range(4):
        store.slab(ExpertId(0, e)).fill_(float(e + 1))
    pool = SlotPool(SPEC, 1, torch.device("cuda"))
    return store, pool.parts["gate_up_proj"], CudaTransfer(pool)


@pytest.mark.parametrize("mode", ["global", "thread_local"])  # (the engine captures thread_local)
def test_a_store_collected_during_a_graph_capture_leaves_the_capture_intact(mode):
    """A pinned store collected while a CUDA graph is captured (the garbage collector runs finalizers
    wherever an allocation triggers it: an earlier engine's store during a later engine's capture) must
    not unregister its memory there (CUDA error 900, the capture invalidated): it waits for the next
    unregistration outside a capture."""
    import gc

    from finemoe import store as store_mod

    old = ExpertStore(SPEC, pin=True)
    x = torch.ones(1024, device="cuda")
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, capture_error_mode=mode):
        del old
        gc.collect()
        y = x * 2
    assert len(store_mod._deferred) == 1
    g.replay()
    torch.cuda.synchronize()
    assert float(y.sum()) == 2048.0
    store_mod.flush_deferred()  # (what the engine's capture calls when done)
    assert store_mod._deferred == []


def test_copy_waits_for_last_use_of_slot():
    """A compute kernel still reading a slot must see the old expert, not the next copy."""
    store, pool, tr = _transfer()
    tr.load(0, store.parts(ExpertId(0, 0)), demand=True)
    tr.before_compute([0])
    torch.cuda._sleep(200_000_000)  # keep the compute stream busy (~0.1 s) before it reads the slot
    seen = pool[0].sum()  # reads expert 0 (all ones)
    tr.after_compute([0])
    tr.load(0, store.parts(ExpertId(0, 1)), demand=True)  # would overwrite the slot mid-read without the event
    tr.synchronize()  # queued copies are issued at the next look at copy state, or here
    torch.cuda.synchronize()
    assert seen.item() == pytest.approx(2048 * 1024 * 1.0)
    assert pool[0, 0, 0].item() == 2.0


def test_compute_waits_for_copy_done():
    """A kernel reading a freshly loaded slot sees the new expert even if the copy is slow."""
    store, pool, tr = _transfer()
    with torch.cuda.stream(tr.prefetch_stream):
        torch.cuda._sleep(200_000_000)  # delay the copy stream
    tr.load(0, store.parts(ExpertId(0, 2)), demand=False)
    tr.before_compute([0])
    seen = pool[0].sum()
    torch.cuda.synchronize()
    assert seen.item() == pytest.approx(2048 * 1024 * 3.0)


def test_demand_copy_bandwidth_is_measured():
    store, pool, tr = _transfer()
    for e in range(4):
        tr.load(0, store.parts(ExpertId(0, e)), demand=True)
    tr.synchronize()
    secs = tr.demand_seconds()
    gbps = 4 * SPEC.expert_numel * 4 / secs / 1e9
    assert secs > 0 and gbps > 5  # pinned copies; pageable ones would be far slower


def test_copy_seconds_is_the_mean_demand_copy_time_and_the_stream_is_restored():
    store, pool, tr = _transfer()
    assert tr.copy_seconds() == 0.0  # nothing measured yet
    for e in range(4):
        tr.load(0, store.parts(ExpertId(0, e)), demand=True)
    tr.is_done(0)  # issues the queued copies on the demand stream
    assert torch.cuda.current_stream() == torch.cuda.default_stream()  # back on the compute stream
    tr.synchronize()
    total = tr.demand_seconds()
    assert total > 0 and tr.copy_seconds() == pytest.approx(total / 4)


def _one_layer_cuda_cache(num_experts: int, slots: int, top_k: int, **cache_kw):
    """An LRU `ExpertCache` of one MoE layer on the GPU: `num_experts` pinned host experts, expert e
    filled with e + 1; returns (cache, its CudaTransfer, its pool)."""
    from finemoe.cache import ExpertCache
    from finemoe.policy import LRUPolicy

    spec = MoESpec(
        "test",
        (0,),
        num_experts,
        top_k,
        64,
        32,
        (ExpertPart("gate_up_proj", (64, 64)), ExpertPart("down_proj", (64, 32))),
        torch.float32,
        1,
    )
    store = ExpertStore(spec, pin=True)
    for e in range(num_experts):
        store.slab(ExpertId(0, e)).fill_(float(e + 1))
    pool = SlotPool(spec, slots, torch.device("cuda"))
    tr = CudaTransfer(pool)
    return ExpertCache(spec, pool, store, tr, LRUPolicy(), **cache_kw), tr, pool


def _each_slot_holds_its_expert(pool, got, slots):
    for e, s in zip(got, slots, strict=True):
        assert torch.all(pool.slot(s)[0] == float(e + 1))


def test_a_layer_with_many_misses_issues_its_copies_in_growing_runs():
    """`ExpertCache.enter` with many misses: the link starts on the first copy while the loop
    queues the rest (runs of 1, 4, 16, then the remainder at compute); every slot still receives
    its own expert."""
    from finemoe.cache import EARLY_ISSUE_MISSES

    E = 40
    assert E >= EARLY_ISSUE_MISSES
    cache, tr, pool = _one_layer_cuda_cache(E, E, 2)
    got, slots = cache.enter(0, list(range(E)))
    assert got == list(range(E))
    assert len(tr._timing) == 3 and len(tr._queued) == E - 21  # runs of 1, 4, 16 issued, the rest queued
    tr.before_compute(slots)
    tr.synchronize()
    assert [n for _, _, n in tr._timing] == [1, 4, 16, E - 21]
    _each_slot_holds_its_expert(pool, got, slots)


def test_a_decode_step_issues_its_first_copy_before_finding_the_other_victims():
    """`early_issue_misses=2` with every slot taken: three misses find the first victim, issue its
    copy, then find the other two (LRU order either way) and leave their copies queued for compute;
    each slot receives its own expert and the least recent experts leave."""
    S = 4
    cache, tr, pool = _one_layer_cuda_cache(8, S, 3, early_issue_misses=2)
    for e in range(S):  # residents 0..3, expert 0 least recent
        got, slots = cache.enter(0, [e])
        tr.before_compute(slots)
        cache.release(0, got, slots)
    tr.synchronize()
    before = len(tr._timing)
    got, slots = cache.enter(0, [3, 5, 6, 7])  # a hit and three misses: victims 0, 1, 2
    assert got == [3, 5, 6, 7]
    assert len(tr._timing) == before + 1 and len(tr._queued) == 2  # the first copy issued, two queued
    assert sorted(e.expert for e in cache.resident()) == [3, 5, 6, 7]
    tr.before_compute(slots)
    tr.synchronize()
    assert [n for _, _, n in tr._timing[before:]] == [1, 2]
    _each_slot_holds_its_expert(pool, got, slots)
