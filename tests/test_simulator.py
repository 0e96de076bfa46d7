"""The trace format, the trace-driven simulator and its oracles.

Hand-computable traces (2 layers x 4 experts) check hits, stalls and link ordering; a trace
recorded from a real (tiny, random) transformers model checks that the simulator, replaying
through the same objects, makes exactly the engine's decisions.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from finemoe import Engine, SamplingParams
from finemoe.config import EngineConfig, ExpertBudget
from finemoe.costmodel import SHAPES, CostModel, make_cost_model
from finemoe.map_store_file import ModelIdentity
from finemoe.sim_history import empty_history, record_history
from finemoe.simlink import Clock, TimedLink
from finemoe.simulator import simulate
from finemoe.trace import Trace, TraceError, load_trace, record

from tests.test_cache import SPEC as SPEC1

ONLINE = [
    "lru",
    "lfu",
    "on-demand",
    "previous-token",
    "finemoe",
    "finemoe-paper",
    "mixtral-offloading",
    "promoe",
    "moe-infinity",
]


def scripted(requests: list[list[list[list[int]]]], spec=SPEC1, dim: int = 4) -> Trace:
    """A trace from scripted routing: requests -> iterations -> layers -> experts (one token per
    iteration, the prompt being one token). Probabilities put mass 1/k on the chosen experts."""
    L, E, k = spec.num_layers, spec.num_experts, spec.top_k
    rows_topk, rows_probs, tokens = [], [], []
    for req in requests:
        for it in req:
            topk = torch.tensor([sorted(x) for x in it], dtype=torch.long)  # [L, k]
            probs = torch.zeros(L, E)
            probs.scatter_(1, topk, 1.0 / k)
            rows_topk.append(topk)
            rows_probs.append(probs)
            tokens.append(len(tokens) % 7)
    n = torch.tensor([len(r) for r in requests], dtype=torch.int32)
    starts = torch.zeros(len(requests) + 1, dtype=torch.int64)
    starts[1:] = n.long().cumsum(0)
    uniq = torch.unique(torch.tensor(tokens, dtype=torch.int32))
    gen = torch.Generator().manual_seed(0)
    probs = torch.stack(rows_probs)  # [N, L, E]
    spec_probs = {}
    for s in (1, 2):  # a perfect speculative gate: layer l+s's own routing
        sp = torch.zeros_like(probs)
        sp[:, : max(L - s, 0)] = probs[:, s:]
        spec_probs[s] = sp
    return Trace(
        spec,
        ModelIdentity(spec.model_type, L, E, k, dim, "scripted"),
        torch.ones(len(requests), dtype=torch.int32),
        n,
        starts,
        torch.tensor(tokens, dtype=torch.int32),
        probs,
        torch.stack(rows_topk),
        torch.randn(uniq.numel(), dim, generator=gen),
        uniq.int(),
        spec_probs,
    )


def cfg(policy: str, budget="2", **kw) -> EngineConfig:
    """A replay's configuration; a cold pool unless `warm_pool` is given (the default, auto, fills it
    in a graphed replay, and most tests here compare a graphed replay with an eager one)."""
    kw.setdefault("warm_pool", False)
    return EngineConfig(expert_budget=ExpertBudget.parse(budget), policy=policy, search="sync", **kw)


def unit_cost(copy_s=1.0, layer_s=0.5, expert_s=0.25) -> CostModel:
    return CostModel("unit", copy_s, layer_s, 0.0, expert_s, 0.0, 0.0, 1)


# counters the engine (deterministic mode: CPU, inline search) and the simulator must agree on
PARITY_KEYS = (
    "hits",
    "misses",
    "evictions",
    "prefetches_issued",
    "prefetches_used",
    "prefetches_wasted",
    "gathered",
    "layer_hit_rate",
)


def engine_and_simulator(recorded, config: EngineConfig, inspect=None) -> tuple[dict, dict]:
    """The recorded prompts through the engine and the trace through the simulator under `config`:
    (engine's, simulator's) cache counters of PARITY_KEYS. `inspect(engine)` runs once the prompts
    are served, before the engine closes."""
    path, prompts, f = recorded
    tr = load_trace(f)
    with Engine.from_pretrained(path, config=config, device="cpu", progress=False) as eng:
        for p in prompts:
            eng.generate(p, SamplingParams(max_new_tokens=6, ignore_eos=True))
        want = eng.stats().cache.to_dict()
        if inspect is not None:
            inspect(eng)
    got = simulate(tr, config, None, "instant", empty_history(tr, config.map_store_capacity)).stats
    return {k: want[k] for k in PARITY_KEYS}, {k: got[k] for k in PARITY_KEYS}


# layer 0 cycles experts 0, 1, 2; layer 1 always uses expert 3 (top-1)
CYCLE = [[[[0], [3]], [[1], [3]], [[2], [3]], [[0], [3]], [[1], [3]], [[2], [3]]]]


def spec_top1():
    import dataclasses

    return dataclasses.replace(SPEC1, top_k=1)


def test_lru_thrashes_a_cycle_belady_does_not():
    tr = scripted(CYCLE, spec_top1())
    lru = simulate(tr, cfg("lru", "3"), link="instant")
    bel = simulate(tr, cfg("belady", "3"), link="instant")
    # LRU: every layer-0 access misses (a 3-cycle in 2 free slots); layer 1: one cold miss
    assert (lru.stats["hits"], lru.stats["misses"]) == (5, 7)
    # Belady: layer 0 keeps the expert used soonest -> hits at iterations 3 and 5
    assert (bel.stats["hits"], bel.stats["misses"]) == (7, 5)


def test_a_warm_pool_starts_the_replay_full_and_landed():
    """`warm_pool`: the free slots hold layer 0's experts 0-2 before the first request, landed and
    not counted as traffic. LRU on the cycle (hand-computed): step 1's layer-0 use hits and layer
    1's expert 3 evicts (0, 1); from then on every layer-0 use misses (a 3-cycle in the 2 slots
    layer 1 leaves) and layer 1 hits: 6 hits, 6 misses, 6 evictions (cold: 5 hits, 7 misses, 4
    evictions). On a timed link the fill costs no link time."""
    tr = scripted(CYCLE, spec_top1())
    cold = simulate(tr, cfg("lru", "3"), link="instant").stats
    warm = simulate(tr, dataclasses.replace(cfg("lru", "3"), warm_pool=True), link="instant").stats
    assert (cold["hits"], cold["misses"], cold["evictions"]) == (5, 7, 4)
    assert (warm["hits"], warm["misses"], warm["evictions"]) == (6, 6, 6)
    assert warm["bytes_copied"] == 6 * SPEC1.expert_bytes
    timed = simulate(tr, dataclasses.replace(cfg("lru", "3"), warm_pool=True), unit_cost(), "timed")
    assert timed.stats["hits"] == 6 and timed.stats["misses"] == 6
    assert timed.link_busy_s == 6.0  # the 6 misses' copies (1 s each), not the fill's 3
    # the default (None, auto) fills the pool in a graphed replay only, as the engine where its decode
    # steps are graphed (CUDA)
    auto = dataclasses.replace(cfg("lru", "3"), warm_pool=None)
    assert simulate(tr, auto, link="instant").stats == cold
    assert simulate(tr, auto, link="instant", graphed=True).stats["hits"] == 6


def test_on_demand_stalls_one_copy_per_miss():
    tr = scripted(CYCLE, spec_top1())
    r = simulate(tr, cfg("lru", "3"), unit_cost(), link="timed")
    assert r.stats["misses"] == 7
    assert r.stall_s == pytest.approx(7.0)  # each miss waits for its own copy (1 s)
    # 6 iterations x 2 layers x (0.5 dense + 0.25 expert) + the stalls
    assert r.total_s == pytest.approx(6 * 2 * 0.75 + 7.0)


def test_late_prefetch_is_a_miss_and_stalls_only_for_the_rest_of_its_copy():
    tr = scripted([[[[0], [1]]]], spec_top1())
    r = simulate(tr, cfg("oracle", "3", prefetch_distance=1), unit_cost(), link="timed")
    # t=0 plan layer 0 (copy 0..1); t=0.5 layer 0 routes (plans layer 1: copy 1..2), its expert is
    # still in flight -> miss, stall 0.5, compute to 1.25; layer 1 at 1.75, copy done at 2 -> stall 0.25
    assert r.stats["hits"] == 0 and r.stats["prefetches_late"] == 2
    assert r.stall_s == pytest.approx(0.75)
    assert r.total_s == pytest.approx(2.25)


def test_timely_prefetch_is_a_hit():
    tr = scripted([[[[0], [1]]]], spec_top1())
    r = simulate(tr, cfg("oracle", "3", prefetch_distance=1), unit_cost(copy_s=0.1), link="timed")
    assert r.stats["hits"] == 2 and r.stall_s == 0.0
    assert r.total_s == pytest.approx(2 * 0.75)


def test_fifo_link_makes_a_demand_copy_wait_for_every_prefetch_issued_before_it():
    clock = Clock()
    link = TimedLink(clock, 4, copy_s=1.0)  # the default order, as measured on the H200
    link.load(0, [], demand=False)  # 0..1
    link.load(1, [], demand=False)  # 1..2
    link.load(2, [], demand=False)  # 2..3
    clock.t = 0.5
    link.load(3, [], demand=True)  # behind all three: 3..4
    assert link.done == [1.0, 2.0, 3.0, 4.0]
    link.before_compute([3])
    assert clock.t == 4.0 and link.stall_s == pytest.approx(3.5)
    with pytest.raises(ValueError, match="link order"):
        TimedLink(clock, 4, copy_s=1.0, order="lifo")


def test_demand_first_link_puts_a_demand_copy_before_queued_prefetches_but_not_the_running_one():
    clock = Clock()
    link = TimedLink(clock, 4, copy_s=1.0, order="demand-first")
    link.load(0, [], demand=False)  # 0..1
    link.load(1, [], demand=False)  # 1..2
    link.load(2, [], demand=False)  # 2..3
    clock.t = 0.5
    link.load(3, [], demand=True)  # after the running copy: 1..2; queued prefetches move back
    assert link.done == [1.0, 3.0, 4.0, 2.0]
    link.before_compute([3])
    assert clock.t == 2.0 and link.stall_s == pytest.approx(1.5)
    assert link.is_done(0) and link.is_done(3) and not link.is_done(1)


def random_trace(seed=0, requests=4, iters=12, spec=SPEC1, skew=True) -> Trace:
    gen = torch.Generator().manual_seed(seed)
    L, E, k = spec.num_layers, spec.num_experts, spec.top_k
    weights = torch.tensor([4.0, 2.0, 1.0, 1.0]) if skew else torch.ones(E)
    reqs = []
    for _ in range(requests):
        reqs.append([[torch.multinomial(weights, k, generator=gen).tolist() for _ in range(L)] for _ in range(iters)])
    return scripted(reqs, spec)


@pytest.mark.parametrize("link", ["instant", "timed"])
def test_oracle_is_never_beaten(link):
    for seed in range(3):
        tr = random_trace(seed)
        hist = empty_history(tr, 64, 1)
        record_history(random_trace(seed + 10), hist)
        cost = unit_cost(copy_s=0.6)
        for budget in ("2", "4"):
            best = simulate(tr, cfg("oracle", budget, prefetch_distance=1), cost, link)
            bel = simulate(tr, cfg("belady", budget), cost, link)
            for policy in ONLINE:
                r = simulate(tr, cfg(policy, budget, prefetch_distance=1), cost, link, hist)
                assert r.hit_rate <= best.hit_rate + 1e-12, (policy, budget, seed)
                if policy in ("lru", "lfu", "on-demand"):
                    assert r.hit_rate <= bel.hit_rate + 1e-12, (policy, budget, seed)


def test_same_inputs_same_result():
    tr = random_trace(3)
    hist = empty_history(tr, 64, 1)
    record_history(random_trace(4), hist)
    a = simulate(tr, cfg("finemoe", "3"), unit_cost(0.3), "timed", hist)
    b = simulate(tr, cfg("finemoe", "3"), unit_cost(0.3), "timed", hist)
    drop = ("wall_s", "layer_steps_per_s")
    assert {k: v for k, v in a.to_dict().items() if k not in drop} == {
        k: v for k, v in b.to_dict().items() if k not in drop
    }


def test_batches_union_their_experts():
    tr = scripted([[[[0], [1]]], [[[2], [1]]]], spec_top1())
    r = simulate(tr, cfg("lru", "3"), link="instant", batch_size=2)
    assert r.stats["misses"] == 3 and r.stats["hits"] == 0  # (0,0), (0,2), (1,1): one access each
    assert r.layer_steps == 2 * 2


# -- the engine and the simulator agree ----------------------------------------------------------
@pytest.fixture(scope="module")
def recorded(tiny_checkpoint, tmp_path_factory):
    path = tiny_checkpoint("qwen2_moe", num_experts=8, num_experts_per_tok=2, num_hidden_layers=3)
    prompts = [[5, 9, 12, 7], [3, 3, 8], [20, 1, 2, 9, 4], [11, 6]]
    with Engine.from_pretrained(path, expert_budget="100%", policy="all-gpu", device="cpu", progress=False) as eng:
        tr = record(eng, prompts, 6, dtype=torch.float32)
    f = tmp_path_factory.mktemp("trace") / "t.fmt"
    tr.save(f)
    return path, prompts, f


def test_trace_round_trip(recorded):
    _, prompts, f = recorded
    tr = load_trace(f)
    assert tr.num_requests == len(prompts)
    assert tr.prompt_len.tolist() == [len(p) for p in prompts] and tr.output_len.tolist() == [6] * 4
    assert tr.num_rows == sum(len(p) + 5 for p in prompts)
    assert sorted(tr.spec_probs) == [1, 2]
    a, b = tr.rows(1, 0)
    assert tr.token_ids[a:b].tolist() == prompts[1]
    head = tr.head(2)
    assert head.num_requests == 2 and head.prompt_len.tolist() == [len(p) for p in prompts[:2]]
    assert tr.head(99).num_requests == len(prompts)
    assert torch.allclose(tr.probs.sum(-1), torch.ones(tr.num_rows, tr.spec.num_layers), atol=1e-5)


@pytest.mark.parametrize("policy", ONLINE)
def test_simulator_equals_the_engine_in_deterministic_mode(recorded, policy):
    want, got = engine_and_simulator(recorded, cfg(policy, "25%", map_store_capacity=64))
    assert got == want


@pytest.mark.parametrize("policy", ["lru", "finemoe"])
@pytest.mark.parametrize("budget", ["25%", "23"])
def test_a_warm_pool_is_the_same_in_the_simulator_and_the_engine(recorded, policy, budget):
    """The engine fills its free slots at set-up (`warm_pool`); the simulator starts its replay from
    the same fill: the same decisions on the same prompts (23 of the 24 experts: nearly all hit)."""
    want, got = engine_and_simulator(recorded, cfg(policy, budget, map_store_capacity=64, warm_pool=True))
    assert got == want
    cold, _ = engine_and_simulator(recorded, cfg(policy, budget, map_store_capacity=64))
    assert want["misses"] < cold["misses"]


@pytest.mark.parametrize("policy", ["lru", "finemoe"])
@pytest.mark.parametrize("budget", ["22", "23"])
def test_gathering_the_absent_experts_is_the_same_in_the_simulator_and_the_engine(recorded, policy, budget):
    """`gather_absent` one or two experts short of all (3 layers x 8): the engine's iteration start
    copies back what the prefill's sweep or a prefetch took from an earlier layer, as the replay does:
    the same decisions on the same prompts. At the end the absent experts are all the last layer's;
    without gathering, finemoe's leave layer 0 short (checked on the replay)."""
    from finemoe.simulator import Simulator

    config = cfg(policy, budget, map_store_capacity=64, warm_pool=True, gather_absent=True)
    want, got = engine_and_simulator(recorded, config)
    assert got == want
    _, _, f = recorded
    tr = load_trace(f)
    absent = {}
    for gather in (False, True):
        sim = Simulator(
            tr.spec,
            dataclasses.replace(config, gather_absent=gather),
            None,
            "instant",
            empty_history(tr, 64),
            tr.spec_probs,
        )
        sim.run(tr)
        assert sim.cache.sink == (2 if gather else -1)
        absent[gather] = [row.count(-1) for row in sim.cache.slot_of]
    # the default (None, auto): gathered in a graphed replay only, as the engine gathers where its
    # decode steps are graphed (CUDA); the CPU engine above, eager, gathers only when told
    auto = dataclasses.replace(config, gather_absent=None)
    for graphed in (False, True):
        sim = Simulator(tr.spec, auto, None, "instant", empty_history(tr, 64), tr.spec_probs, graphed=graphed)
        assert sim.cache.sink == (2 if graphed else -1)
    eager, replay = engine_and_simulator(recorded, auto)
    assert eager == replay and eager["gathered"] == 0
    assert absent[True] == [0, 0, 24 - int(budget)]
    if policy == "finemoe":
        assert absent[False][0] > 0
        assert want["gathered"] > 0  # the engine copied back what its sweep took


@pytest.mark.parametrize("policy", ["lru", "finemoe"])
def test_router_ema_eviction_is_the_same_in_the_simulator_and_the_engine(recorded, policy):
    """The router-probability eviction reads the routers through the engine's observer and the
    simulator's routing events: the same decisions on the same prompts."""

    def reads_routing(eng):
        assert eng.runtime.policy_routes == eng.cache.policy.on_routing

    config = cfg(policy, "25%", map_store_capacity=64, eviction="router-ema")
    want, got = engine_and_simulator(recorded, config, reads_routing)
    assert got == want
    assert got["evictions"] > 0


def test_trace_file_refusals(recorded, tmp_path):
    _, _, f = recorded
    with pytest.raises(TraceError, match="does not exist"):
        load_trace(tmp_path / "nope.fmt")
    cut = tmp_path / "cut.fmt"
    cut.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(TraceError, match="truncated or corrupt"):
        load_trace(cut)
    text = tmp_path / "notes.txt"  # a file of another kind: no safetensors header
    text.write_text("# not a trace\n" * 50)
    with pytest.raises(TraceError, match="another kind of file"):
        load_trace(text)
    assert text.read_text() == "# not a trace\n" * 50  # (read only: left as it was)
    other = tmp_path / "other.fmt"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(other), metadata={"format": "something-else"})
    with pytest.raises(TraceError, match="not a finemoe trace"):
        load_trace(other)
    save_file({"x": torch.zeros(2)}, str(other), metadata={"format": "finemoe-trace", "version": "99"})
    with pytest.raises(TraceError, match="version 99"):
        load_trace(other)


def test_cost_model_shapes():
    for name, shape in SHAPES.items():
        assert shape.expert_bytes > 0, name
    assert SHAPES["mixtral-8x7b"].expert_bytes == 3 * 4096 * 14336 * 2  # 352 MiB in bf16
    c = make_cost_model(SPEC1, "qwen1.5-moe-a2.7b")
    # 2 traced layers of top-1 stand for 24 Qwen layers of top-4: a traced expert = 48 Qwen experts
    assert c.expert_bytes == pytest.approx(SHAPES["qwen1.5-moe-a2.7b"].expert_bytes * 24 * 4 / (2 * 1), rel=1e-6)
    assert c.copy_s == pytest.approx(c.expert_bytes / 54e9, rel=1e-3)


def test_cli_simulate_writes_json_and_plot(recorded, tmp_path):
    _, _, f = recorded
    out, png = tmp_path / "sim.json", tmp_path / "sim.png"
    cmd = [sys.executable, "-m", "finemoe", "simulate", "--traces", str(f), "--history", str(f)]
    cmd += ["--policies", "lru,finemoe,oracle", "--budgets", "25%,50%", "--json", str(out), "--plot", str(png)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rec = json.loads(out.read_text())
    pols = {(r["policy"], r["budget"]) for r in rec["results"]}
    assert ("oracle", "25%") in pols and ("finemoe", "50%") in pols and ("all-gpu", "100%") in pols
    assert png.stat().st_size > 1000
    bad = subprocess.run(
        [sys.executable, "-m", "finemoe", "simulate", "--traces", str(tmp_path / "missing.fmt")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr
    lone = subprocess.run(
        cmd[:6] + ["--policies", "lru", "--layer-host-us", "50"], capture_output=True, text=True, timeout=120
    )
    assert lone.returncode != 0 and "--graphed-decode" in lone.stderr and "Traceback" not in lone.stderr
    lone = subprocess.run(
        cmd[:6] + ["--policies", "lru", "--no-run-ahead"], capture_output=True, text=True, timeout=120
    )
    assert lone.returncode != 0 and "--graphed-decode" in lone.stderr and "Traceback" not in lone.stderr
    lone = subprocess.run(
        cmd[:6] + ["--policies", "lru", "--sync-host-us", "45"], capture_output=True, text=True, timeout=120
    )
    assert lone.returncode != 0 and "--graphed-decode" in lone.stderr and "Traceback" not in lone.stderr


def test_cli_simulate_takes_the_near_full_budget_knobs(recorded, tmp_path, monkeypatch):
    """`--warm-pool`, `--keep-whole-layers` and `--no-run-ahead` reach the replays' configuration."""
    import finemoe.simulator as simulator_mod
    from finemoe.cli import main

    _, _, f = recorded
    seen = []
    real = simulator_mod.simulate

    def spy(trace, config, *a, **kw):
        seen.append((config.warm_pool, config.keep_whole_layers, kw.get("graphed"), kw.get("run_ahead")))
        return real(trace, config, *a, **kw)

    monkeypatch.setattr(simulator_mod, "simulate", spy)  # (the sweep imports it when it runs)
    args = [
        "simulate",
        "--traces",
        str(f),
        "--policies",
        "finemoe",
        "--budgets",
        "23",
        "--json",
        str(tmp_path / "s.json"),
    ]
    args += ["--jobs", "1"]  # (in this process: the spy sees the replays)
    assert main(args + ["--warm-pool", "--keep-whole-layers", "--graphed-decode", "--no-run-ahead"]) == 0
    assert main(args) == 0
    assert (True, True, True, False) in seen and (None, False, False, True) in seen  # (None: auto, graphed)


def _replayed(r) -> dict:
    """A replay's result without its wall-clock fields (they differ from run to run)."""
    return {k: v for k, v in r.to_dict().items() if k not in ("wall_s", "layer_steps_per_s")}


def test_replays_in_worker_processes_equal_those_run_one_at_a_time(recorded):
    """`replay_all` with 2 workers (forked) gives every replay's result as 1 does, in the order
    asked, each reported once; a replay that fails raises its error here."""
    from finemoe.errors import ConfigError
    from finemoe.simjobs import Replay, replay_all, resolve_jobs

    _, _, f = recorded
    tr = load_trace(f)
    hist = empty_history(tr, 64)
    record_history(tr, hist)
    cost = make_cost_model(tr.spec, "trace")
    jobs = [
        Replay(cfg("finemoe", "25%", map_store_capacity=64), cost, history="h"),
        Replay(cfg("lru", "50%"), cost),
        Replay(cfg("oracle", "25%"), cost, history="h"),
        Replay(cfg("moe-infinity", "25%", map_store_capacity=64), cost, history="h", batch_size=2),
        Replay(cfg("finemoe", "50%", map_store_capacity=64), cost, "instant", "h", graphed=True),
    ]
    one = replay_all(tr, jobs, {"h": hist}, workers=1)
    seen: list[int] = []
    two = replay_all(tr, jobs, {"h": hist}, workers=2, on_result=lambda i, r: seen.append(i))
    assert sorted(seen) == list(range(len(jobs)))
    assert [_replayed(r) for r in two] == [_replayed(r) for r in one]
    assert [r.policy for r in two] == ["finemoe", "lru", "oracle", "moe-infinity", "finemoe"]
    assert one[0].hit_rate > 0 and one[0].hit_rate != one[1].hit_rate  # (not a trivial equality)
    with pytest.raises(ConfigError, match="history 'other'"):
        replay_all(tr, [*jobs[:2], Replay(cfg("finemoe", "25%"), cost, history="other")], {"h": hist}, workers=2)
    with pytest.raises(ConfigError, match="--jobs must be >= 0"):
        resolve_jobs(-1, 3)
    assert resolve_jobs(5, 3) == 3 and resolve_jobs(1, 3) == 1 and 1 <= resolve_jobs(0, 2) <= 2


# one request, 2 iterations: layer 0 always expert 0, layer 1 expert 1 then expert 2 (top-1);
# the scripted speculative gate is perfect, the budget 3 slots, the link instant
TWO_STEPS = [[[[0], [1]], [[0], [2]]]]


@pytest.mark.parametrize(
    ("policy", "hits", "issued"),
    [
        ("on-demand", 1, 0),  # only (0,0) at iteration 1 hits
        ("mixtral-offloading", 3, 2),  # layer 1 is prefetched from layer 0 both times
        ("promoe", 1, 0),  # stride 2 has no target in a 2-layer model: plain LRU
        ("previous-token", 1, 0),  # plans (0,0) and (1,1): both already resident, nothing issued
        ("oracle", 4, 3),  # prefetches (0,0) at the start, (1,1) and (1,2) one layer ahead: all hit
    ],
)
def test_hand_computed_policies(policy, hits, issued):
    tr = scripted(TWO_STEPS, spec_top1())
    r = simulate(tr, cfg(policy, "3", prefetch_distance=1), link="instant")
    assert (r.stats["hits"], r.stats["misses"], r.stats["prefetches_issued"]) == (hits, 4 - hits, issued)
    if issued == 0:  # nothing prefetched: on the timed link (1 s a copy) each miss stalls one whole copy
        t = simulate(tr, cfg(policy, "3", prefetch_distance=1), unit_cost(copy_s=1.0), "timed")
        assert t.stall_s == pytest.approx(4 - hits) and t.total_s == pytest.approx(4 * 0.75 + 4 - hits)


@pytest.mark.parametrize(
    ("copy_s", "hits", "late", "stall_s", "total_s"),
    [
        # slow link (1 s a copy): iteration 0, layer 0 routes at 0.5 (dense), misses (0,0), whose copy
        # lands at 1.5 (stall 1.0); its compute ends at 1.75, when the paused gate's prefetch of (1,1)
        # starts (lands 2.75). Layer 1 routes at 2.25: (1,1) late, a miss, stall 0.5; ends at 3.0.
        # Iteration 1: (0,0) hits at 3.5 and the gate's (1,2) starts then (lands 4.5); layer 1 routes
        # at 4.25: late, stall 0.25; the replay ends at 4.75. One hit, 1.75 s of stalls.
        (1.0, 1, 2, 1.75, 4.75),
        # fast link (0.2 s): the same but every prefetch lands before its layer: only the first miss
        # stalls (0.2); 2 x 2 x 0.75 s of compute + 0.2 = 3.2 s.
        (0.2, 3, 0, 0.2, 3.2),
    ],
)
def test_hand_computed_stalls_of_a_prefetching_policy(copy_s, hits, late, stall_s, total_s):
    """mixtral-offloading (the perfect scripted gate, distance 1) on TWO_STEPS over the timed link:
    dense 0.5 s and 0.25 s per expert per layer, one copy at a time; a miss pauses prefetching until
    its copy lands."""
    tr = scripted(TWO_STEPS, spec_top1())
    r = simulate(tr, cfg("mixtral-offloading", "3", prefetch_distance=1), unit_cost(copy_s=copy_s), "timed")
    assert (r.stats["hits"], r.stats["misses"], r.stats["prefetches_issued"]) == (hits, 4 - hits, 2)
    assert r.stats["prefetches_late"] == late
    assert r.stall_s == pytest.approx(stall_s) and r.total_s == pytest.approx(total_s)


# LFU against LRU (top-1, 3 slots, no prefetch): layer 0 routes experts 0, 0, 1, 2, 0 and layer 1
# always expert 3. At iteration 3 expert (0,2) needs a slot: LRU evicts (0,0) (last used at iteration
# 1), LFU the once-used (0,1); so iteration 4's (0,0) hits under LFU only, where LRU evicts again.
LFU_VS_LRU = [[[[0], [3]], [[0], [3]], [[1], [3]], [[2], [3]], [[0], [3]]]]


@pytest.mark.parametrize(("policy", "hits", "evictions"), [("lru", 5, 2), ("on-demand", 5, 2), ("lfu", 6, 1)])
def test_hand_computed_lfu_and_lru(policy, hits, evictions):
    tr = scripted(LFU_VS_LRU, spec_top1())
    r = simulate(tr, cfg(policy, "3"), link="instant")
    assert (r.stats["hits"], r.stats["misses"], r.stats["evictions"]) == (hits, 10 - hits, evictions)
    assert r.stats["prefetches_issued"] == 0
    # on the timed link (1 s a copy, nothing else in flight) each miss stalls one whole copy: 10 layers
    # x (0.5 dense + 0.25 expert) + the misses
    t = simulate(tr, cfg(policy, "3"), unit_cost(copy_s=1.0), "timed")
    assert t.stats["misses"] == 10 - hits
    assert t.stall_s == pytest.approx(10 - hits) and t.total_s == pytest.approx(7.5 + 10 - hits)


# One request of two iterations (top-1, 3 slots, distance 1, instant link) replayed by the policies
# that read history, with a store filled from a scripted history and with an empty one:
# SHIFT routes layer 0 to expert 0 then 1 and layer 1 to expert 1 then 2; its history is the same
# request (maps: token 0 -> (0, 1), token 1 -> (1, 2); the embeddings match exactly). TWO_STEPS's
# request history always went 0 -> 2 (moe-infinity's matrix: no ties).
SHIFT = [[[[0], [1]], [[1], [2]]]]
HIST_0_2 = [[[[0], [2]], [[0], [2]]]]


@pytest.mark.parametrize(
    ("policy", "trace", "history", "with_history", "without", "stall_s"),
    [
        # (hits, misses, evictions, prefetches issued) with the history, then with an empty store;
        # stall_s: with the history on a fast timed link (0.2 s a copy; dense 0.5 s, 0.25 s an expert),
        # where every prefetch lands before its layer and every miss finds the link idle, so each
        # miss stalls one whole copy and the replay takes 4 x 0.75 s + the stalls.
        # finemoe: prefill plans from its gate only (perfect here): (1,1) prefetched, (0,0) a miss. At
        # iteration 1 the semantic match (token 1) plans layer 0's expert 1 into the free slot: a hit;
        # layer 1's (1,2), planned by the lagged match and the gate, evicts (0,0), the lowest
        # decayed-frequency key ((0,0) and (1,1) were used once each; (0,0)'s use is the older): a
        # hit. Without history layer 0 misses at iteration 1. (The store learns online: by iteration 1
        # it holds iteration 0's map, whose plans name experts already resident.)
        ("finemoe", SHIFT, SHIFT, (3, 1, 1, 3), (2, 2, 1, 2), 0.2),
        # finemoe-paper plans prefill from the maps too and has no gate: every expert prefetched in
        # time (the fourth evicts one). From an empty store nothing is issued: iteration 0 has no map
        # to match, and iteration 1's match (iteration 0's map, learned online) names (0,0) and (1,1),
        # both resident.
        ("finemoe-paper", SHIFT, SHIFT, (4, 0, 1, 4), (0, 4, 1, 0), 0.0),
        # moe-infinity: after layer 0 routes, the matched request matrix's layer-1 expert 2 is
        # prefetched (a miss at iteration 0, where layer 1 routes expert 1; a hit at iteration 1);
        # it never plans layer 0. Empty store: no request to match (the replayed one is stored when it
        # ends), so no plan; nothing is evicted and only (0,0) hits at iteration 1.
        ("moe-infinity", TWO_STEPS, HIST_0_2, (2, 2, 0, 1), (1, 3, 0, 0), 0.4),
    ],
)
def test_hand_computed_history_readers(policy, trace, history, with_history, without, stall_s):
    tr = scripted(trace, spec_top1())
    for filled, want in ((True, with_history), (False, without)):
        hist = empty_history(tr, 64, 1)
        if filled:
            record_history(scripted(history, spec_top1()), hist)
        r = simulate(tr, cfg(policy, "3", prefetch_distance=1), link="instant", history=hist)
        got = (r.stats["hits"], r.stats["misses"], r.stats["evictions"], r.stats["prefetches_issued"])
        assert got == want, (policy, filled)
        assert r.stats["prefetches_used"] == r.stats["prefetches_issued"]  # every prefetch was right
    hist = empty_history(tr, 64, 1)
    record_history(scripted(history, spec_top1()), hist)
    t = simulate(tr, cfg(policy, "3", prefetch_distance=1), unit_cost(copy_s=0.2), "timed", hist)
    assert t.stats["hits"] == with_history[0] and t.stats["prefetches_late"] == 0
    assert t.stall_s == pytest.approx(stall_s) == with_history[1] * 0.2
    assert t.total_s == pytest.approx(4 * 0.75 + stall_s)


@pytest.mark.parametrize(("policy", "distance"), [("finemoe", 2), ("finemoe", 1), ("finemoe-paper", 1)])
def test_batched_prefetch_starts_equal_one_at_a_time(policy, distance, monkeypatch):
    """`Prefetcher` finds the victims of a pump's prefetches in one policy pass; forcing the
    one-at-a-time loop (`try_prefetch` per request) must give the same counters on every budget."""
    from finemoe.cache import ExpertCache

    tr = random_trace(5, requests=3, iters=10)
    hist = empty_history(tr, 64, 1)
    record_history(random_trace(6), hist)
    runs = {}
    for batched in (True, False):
        if not batched:
            monkeypatch.setattr(ExpertCache, "batches_prefetches", property(lambda self: False))
        runs[batched] = [
            simulate(tr, cfg(policy, budget, prefetch_distance=distance), unit_cost(0.4), "timed", hist).stats
            for budget in ("2", "3", "5")
        ]
    assert runs[True] == runs[False]
    assert sum(s["prefetches_issued"] for s in runs[True]) > 0  # the batched path did start copies


def test_noisy_oracle_precision_follows_the_noise_and_replays_alike(recorded):
    """`oracle_noise` swaps planned experts for wrong ones: none of a fully noisy oracle's
    prefetches is ever used, a noiseless one equals the plain oracle, and a seeded noisy replay
    repeats exactly; with an `eviction` the oracle prefetches over it instead of Belady's."""
    _, _, f = recorded
    tr = load_trace(f)
    cost = unit_cost(copy_s=0.5)
    plain = simulate(tr, cfg("oracle", "25%"), cost).stats
    assert simulate(tr, cfg("oracle", "25%"), cost, oracle_noise=0.0).stats == plain
    wrong = simulate(tr, cfg("oracle", "25%", eviction="lru"), cost, oracle_noise=1.0).stats
    assert wrong["prefetches_issued"] > 0 and wrong["prefetches_used"] == 0
    half = [simulate(tr, cfg("oracle", "25%", eviction="lru"), cost, oracle_noise=0.5).stats for _ in range(2)]
    assert half[0] == half[1]
    assert 0 < half[0]["prefetches_used"] < half[0]["prefetches_issued"]
    perfect_lru = simulate(tr, cfg("oracle", "25%", eviction="lru"), cost).stats
    assert perfect_lru["prefetches_used"] > half[0]["prefetches_used"]
    assert perfect_lru != plain  # LRU eviction under the same perfect plans is another replay
    with pytest.raises(ValueError):
        simulate(tr, cfg("oracle", "25%"), cost, oracle_noise=1.5)


def test_eviction_host_time_is_charged_per_victim_search_and_routing_read(recorded):
    """`CostModel.victim_host_s` and `routing_host_s`: with an instant link the replay gets longer
    by exactly one charge per victim search the cache asks for and one per layer for a policy
    that reads the routing (router-ema), with the same decisions; LRU reads no routing."""
    import dataclasses

    _, _, f = recorded
    tr = load_trace(f)
    base = unit_cost()
    steps = int(tr.output_len.sum()) * tr.spec.num_layers
    for eviction, reads in (("router-ema", True), ("lru", False)):
        config = cfg("lru", "25%", eviction=eviction)
        a = simulate(tr, config, base, "instant")
        b = simulate(tr, config, dataclasses.replace(base, routing_host_s=0.5), "instant")
        assert b.stats == a.stats
        assert b.total_s - a.total_s == pytest.approx(0.5 * steps if reads else 0.0)
        c = simulate(tr, config, dataclasses.replace(base, victim_host_s=0.125), "instant")
        assert c.stats == a.stats
        searches = (c.total_s - a.total_s) / 0.125
        assert searches == pytest.approx(round(searches))  # whole searches only
        # at least one search per layer-step that evicted, at most one per eviction
        assert 0 < searches <= a.stats["evictions"]
    # near 100% with the absent experts gathered in the last layer: decayed LFU's searches there
    # (`layer_victims`) are charged too
    L, E = tr.spec.num_layers, tr.spec.num_experts
    config = cfg("lru", L * E - 1, eviction="decay-lfu", gather_absent=True, warm_pool=True)
    a = simulate(tr, config, base, "instant")
    c = simulate(tr, config, dataclasses.replace(base, victim_host_s=0.125), "instant")
    assert c.stats == a.stats and a.stats["evictions"] > 0
    searches = (c.total_s - a.total_s) / 0.125
    assert searches == pytest.approx(round(searches)) and 0 < searches <= a.stats["evictions"]


def test_predictor_host_time_is_charged_per_layer_where_predictors_run(recorded):
    """`CostModel.predict_host_s`: host seconds per layer in which a policy's predictors run; with
    an instant link the replay gets longer by exactly that per layer-step, and not at all for a
    policy without predictors."""
    import dataclasses

    _, _, f = recorded
    tr = load_trace(f)
    base = unit_cost()
    slow = dataclasses.replace(base, predict_host_s=0.25)
    steps = int(tr.output_len.sum()) * tr.spec.num_layers
    for policy, charged in (("previous-token", True), ("lru", False)):
        a = simulate(tr, cfg(policy, "25%"), base, "instant")
        b = simulate(tr, cfg(policy, "25%"), slow, "instant")
        assert b.stats == a.stats  # the same decisions
        assert b.total_s - a.total_s == pytest.approx(0.25 * steps if charged else 0.0)


@pytest.mark.parametrize("policy", ["lru", "finemoe-paper"])
def test_prefill_sweep_is_the_same_in_the_simulator_and_the_engine(recorded, policy):
    """The prefill sweep (forced on; lru takes the cache's id-order scan, finemoe-paper's map-aware
    LFU its own `victims_behind`) reaches the cache through `begin_iteration` in both drivers: the
    same decisions on the same prompts, and not those of the policy's plain order."""

    def sweeps(eng):
        assert eng.cache.prefill_sweep

    config = cfg(policy, "25%", map_store_capacity=64, prefill_eviction="sweep")
    want, got = engine_and_simulator(recorded, config, sweeps)
    assert got == want
    tr = load_trace(recorded[2])
    plain = simulate(
        tr, cfg(policy, "25%", map_store_capacity=64, prefill_eviction="policy"), None, "instant", empty_history(tr, 64)
    ).stats
    assert plain["layer_hit_rate"] != got["layer_hit_rate"]


@pytest.mark.parametrize("policy", ["mixtral-offloading", "finemoe-paper", "finemoe"])
def test_prefill_predict_after_demand_is_the_same_in_the_simulator_and_the_engine(recorded, policy):
    """`prefill_predict='after-demand'` (finemoe's default; forced on for the others): a prefill
    layer's routing reaches the predictors inside `Stepper.serve`, after its on-demand copies are
    issued, in both drivers; the same decisions on the same prompts."""

    def deferred(eng):
        assert eng.runtime.predict_after_demand
        assert eng.runtime.stepper.deferred_s > 0  # the predictors ran from `serve`

    config = cfg(policy, "25%", map_store_capacity=64, prefill_predict="after-demand")
    want, got = engine_and_simulator(recorded, config, deferred)
    assert got == want
    assert got["prefetches_issued"] > 0


def test_predictor_host_time_overlaps_the_copies_when_prefill_predicts_after_demand():
    """`predict_host_s` is charged where the predictors run: before a layer's copies are issued
    (`before`) or once they are (`after-demand`, overlapping them). One prefill of 2 layers, copy
    1 s, dense 0.5 s, expert 0.25 s, host 0.5 s: before, layer 0's copy starts at 1.0 and layer 1
    waits for its host time too (TTFT 3.5); after, the copy starts at 0.5 and the host time hides
    under it, and layer 1's host time under its late prefetch (TTFT 3.0, as with no host time)."""
    import dataclasses

    tr = scripted([[[[0], [3]], [[1], [2]]]])
    slow = dataclasses.replace(unit_cost(), predict_host_s=0.5)
    ttft = {
        (mode, cost.predict_host_s): simulate(
            tr, cfg("mixtral-offloading", "2", prefill_predict=mode), cost, "timed"
        ).ttft_s
        for mode in ("before", "after-demand")
        for cost in (unit_cost(), slow)
    }
    assert ttft == {("before", 0.0): 3.0, ("before", 0.5): 3.5, ("after-demand", 0.0): 3.0, ("after-demand", 0.5): 3.0}


class FlushingLink(TimedLink):
    """A timed link with the queueing transfer's `flush` (copies are timed when loaded either way):
    the cache then issues a layer's copies in runs and searches their victims in two passes."""

    flushes = 0

    def flush(self) -> None:
        FlushingLink.flushes += 1


@pytest.mark.parametrize(
    ("policy", "knobs"),
    [
        ("lru", {}),
        ("lru", {"prefill_eviction": "sweep"}),
        ("lfu", {}),
        ("finemoe", {}),
        ("finemoe", {"eviction": "router-ema"}),
        ("finemoe-paper", {}),
        ("moe-infinity", {}),
        ("mixtral-offloading", {}),
    ],
)
def test_copies_issued_in_runs_evict_the_same_experts(recorded, policy, knobs, monkeypatch):
    """`early_issue_misses`: a layer with that many misses finds its first copy's victim alone, issues
    the copy, then finds the rest. Every replay (prefill layers of real prompts, decode steps with
    three misses) must equal the one-pass replay, counter for counter and in simulated time."""
    import dataclasses

    from finemoe import simulator as sim_module

    spec = dataclasses.replace(SPEC1, moe_layers=(0, 1, 2), num_experts=8, top_k=3)
    gen = torch.Generator().manual_seed(7)
    w = torch.tensor([6.0, 4.0, 3.0, 2.0, 1.0, 1.0, 1.0, 1.0])
    script = [[[torch.multinomial(w, 3, generator=gen).tolist() for _ in range(3)] for _ in range(9)] for _ in range(4)]
    traces = [(load_trace(recorded[2]), "25%"), (scripted(script, spec), "4")]
    drop = ("wall_s", "layer_steps_per_s")
    for tr, budget in traces:
        hist = empty_history(tr, 64)
        record_history(tr, hist)
        config = cfg(policy, budget, map_store_learn=False, **knobs)
        plain = simulate(tr, config, unit_cost(0.4), "timed", hist).to_dict()
        with monkeypatch.context() as m:
            m.setattr(sim_module, "TimedLink", FlushingLink)
            FlushingLink.flushes = 0
            runs = simulate(tr, dataclasses.replace(config, early_issue_misses=2), unit_cost(0.4), "timed", hist)
            assert FlushingLink.flushes > 0  # the split path ran
        assert {k: v for k, v in runs.to_dict().items() if k not in drop} == {
            k: v for k, v in plain.items() if k not in drop
        }


@pytest.mark.parametrize("policy", ["finemoe", "mixtral-offloading"])
def test_planning_without_prefetch_copies(recorded, policy):
    """`prefetch_copies=False`: the predictors still plan and the plans reach the eviction policy,
    but no prefetch copy starts; the engine and the simulator agree on it."""
    seen = []

    def planned(eng):
        seen.append(eng.cache.stats.prefetches_dropped)

    config = cfg(policy, "25%", map_store_capacity=64, prefetch_copies=False)
    want, got = engine_and_simulator(recorded, config, planned)
    assert got == want
    assert got["prefetches_issued"] == 0 and seen[0] > 0  # planned, every request dropped
    with_copies = engine_and_simulator(recorded, cfg(policy, "25%", map_store_capacity=64))[1]
    assert with_copies["prefetches_issued"] > 0


def test_graphed_decode_plans_after_the_copies_and_hides_host_time_under_them():
    """`graphed=True`: a decode layer's predictors run once its segment is launched (as the graphed
    engine runs them), so `predict_host_s` overlaps the copies and the GPU's work.
    One request, a prefill then 2 decode iterations of 2 layers that each miss (2 slots, experts
    rotate), copy 1 s, dense 0.5 s, expert 0.25 s: the host time adds to the eager replay's
    decode steps and hides under the graphed replay's copies; without host time both are equal."""
    import dataclasses

    tr = scripted([[[[0], [3]], [[1], [2]], [[2], [1]]]])
    slow = dataclasses.replace(unit_cost(), predict_host_s=0.5)
    tpot = {}
    for graphed in (False, True):
        for cost in (unit_cost(), slow):
            r = simulate(tr, cfg("mixtral-offloading", "2", prefill_predict="before"), cost, "timed", graphed=graphed)
            tpot[graphed, cost.predict_host_s] = r.tpot_s
            if cost.predict_host_s == 0.0:
                assert r.stats["misses"] > 0
    assert tpot[False, 0.5] > tpot[False, 0.0]  # eager: each layer's host time before its copies
    assert tpot[True, 0.5] < tpot[False, 0.5]  # graphed: under the copies
    assert tpot[True, 0.5] >= tpot[True, 0.0]


def test_graphed_decode_runs_the_gpu_on_its_own_timeline():
    """Graphed decode, hand-computed: the host launches a layer's segment (its experts, then the
    next layer's dense part up to the router) and plans while the GPU runs it; the GPU waits for
    the segment's copies, the host for the next router. The scripted request of the test above,
    mixtral-offloading (the next layer's gate), 2 slots, copy 1 s, dense 0.5 s, expert 0.25 s.
    Decode 1 starts at 3.0 (the prefill's end, as the eager replay's): S_0 ends at 3.5; layer 0's
    expert 1 misses, copied 3.5-4.5; the segment runs 4.5-4.75 plus dense to 5.25; the gate's
    prefetch of layer 1's expert 2, issued at 3.5, queues behind it (4.5-5.5): at the 5.25 sync it
    is late, and the last segment runs 5.5-5.75. Decode 2 likewise: 5.75 -> 8.5. TPOT 2.75 (the
    eager replay: 3.0). With 2 s of predictor host time per layer, the host sets the pace: the
    decode step is 7.0 (S_0) -> 8.0 (copy) -> host 9.0 (the prefetch then lands at 10.0) -> layer 1
    at 9.0, its segment 10.0-10.25 -> host 11.0: TPOT 4.5 (eager: 6.5)."""
    import dataclasses

    tr = scripted([[[[0], [3]], [[1], [2]], [[2], [1]]]])
    got = {}
    for graphed in (False, True):
        for host in (0.0, 2.0):
            cost = dataclasses.replace(unit_cost(), predict_host_s=host)
            r = simulate(tr, cfg("mixtral-offloading", "2", prefill_predict="before"), cost, "timed", graphed=graphed)
            got[graphed, host] = r
    assert got[True, 0.0].ttft_s == got[False, 0.0].ttft_s == 3.0  # the prefill is eager in both
    assert got[True, 0.0].tpot_s == 2.75 and got[False, 0.0].tpot_s == 3.0
    assert got[True, 0.0].stats["prefetches_late"] == 3  # every prefetch still in flight when needed
    assert got[True, 2.0].ttft_s == 6.5 and got[True, 2.0].tpot_s == 4.5 and got[False, 2.0].tpot_s == 6.5
    # the host's other work per layer (`layer_host_s`) sits on the same timeline, after the launch:
    # 2 s of it paces decode as 2 s of predictor time did (4.5), and leaves the eager prefill alone
    busy = simulate(
        tr,
        cfg("mixtral-offloading", "2", prefill_predict="before"),
        dataclasses.replace(unit_cost(), layer_host_s=2.0),
        "timed",
        graphed=True,
    )
    assert busy.ttft_s == 3.0 and busy.tpot_s == 4.5
    # the LM head (1 s) runs on the GPU at the end of the last segment (7.75 -> 8.75), while the host
    # does the last layer's 2 s (6.5 -> 8.5): only 0.25 s of it shows (the eager prefill: all of it)
    headed = simulate(
        tr,
        cfg("mixtral-offloading", "2", prefill_predict="before"),
        dataclasses.replace(unit_cost(), layer_host_s=2.0, head_s=1.0),
        "timed",
        graphed=True,
    )
    assert headed.ttft_s == 4.0 and headed.tpot_s == 4.75


def test_graphed_decode_runs_whole_layers_ahead_of_their_routing_sync():
    """`run_ahead` (the engine's default): a layer whose every expert is resident is launched without
    the routing sync. Hand-computed: 2 layers x 4 experts, top-1, 5 slots filled at set-up (layer 0
    whole, layer 1 holds expert 0 only); every use hits. Dense 0.5 s, expert 0.25 s, 2 s of host
    time per synced layer after its launch (`layer_host_s`), no LM head. A decode step from t:
    synced, S_0 ends at t+0.5; layer 0 runs 0.5-0.75 and dense to 1.25 while the host spends
    0.5-2.5; layer 1 launches at 2.5, ends 2.75; the host is done at 4.5 (TPOT 4.5). Run ahead,
    layer 0 launches at once (0.5-1.25 on the GPU); the host syncs for layer 1 at 1.25, launches
    it (1.25-1.5) and is done at 3.25 (TPOT 3.25). The same uses are counted."""
    tr = scripted([[[[0], [0]], [[1], [0]], [[2], [0]]]], spec_top1())
    cost = dataclasses.replace(unit_cost(), layer_host_s=2.0)
    got = {}
    for ahead in (False, True):
        config = dataclasses.replace(cfg("lru", "5"), warm_pool=True)
        got[ahead] = simulate(tr, config, cost, "timed", graphed=True, run_ahead=ahead)
    assert got[False].ttft_s == got[True].ttft_s == 1.5  # the prefill is eager
    assert got[False].tpot_s == 4.5 and got[True].tpot_s == 3.25
    assert got[False].stats == got[True].stats and got[True].stats["misses"] == 0
    assert got[True].layers_run_ahead == 2 and got[False].layers_run_ahead == 0


def test_a_routing_sync_costs_its_host_time_before_the_launch():
    """`sync_host_s` (the host's time from a routing sync to the next launch, the GPU idle): charged at
    every layer that syncs and none run ahead. The set-up of the test above (layer 0 whole, layer 1
    holding expert 0 only, every use a hit), dense 0.5 s, expert 0.25 s, 1 s per sync. Synced, a
    decode step: S_0 to 0.5, the sync's 1 s, layer 0 1.5-1.75 and dense to 2.25, the sync's 1 s,
    layer 1 3.25-3.5 (TPOT 3.5; 1.5 without). Run ahead: layer 0 at once (0.5-1.25), layer 1's
    sync to 2.25, its expert to 2.5 (TPOT 2.5). The eager prefill pays nothing."""
    tr = scripted([[[[0], [0]], [[1], [0]], [[2], [0]]]], spec_top1())
    got = {}
    for sync in (0.0, 1.0):
        for ahead in (False, True):
            config = dataclasses.replace(cfg("lru", "5"), warm_pool=True)
            cost = dataclasses.replace(unit_cost(), sync_host_s=sync)
            got[sync, ahead] = simulate(tr, config, cost, "timed", graphed=True, run_ahead=ahead)
    assert got[0.0, False].tpot_s == got[0.0, True].tpot_s == 1.5
    assert got[1.0, False].tpot_s == 3.5 and got[1.0, True].tpot_s == 2.5
    assert {r.ttft_s for r in got.values()} == {1.5}
    assert all(r.stats == got[0.0, False].stats for r in got.values())


def test_a_layer_run_ahead_starts_no_earlier_than_its_launch():
    """A synced layer's host time, then a whole layer: the GPU runs the whole layer only once the host
    has launched it. LRU, 6 slots filled at set-up (layer 0's four, layer 1's 0 and 1), top-1. The
    prefill's miss of (1, 2) evicts (0, 1); decode 1's miss of (1, 3) evicts (0, 2): layer 1 is whole
    from decode 2 on, layer 0 never. Dense 0.5 s, expert 0.25 s, copy 1 s, 2 s of host time per
    synced layer. Decode 1 (from 2.5, both ways): S_0 to 3.0, layer 0 3.0-3.25 and dense to 3.75,
    the host to 5.0; (1, 3) copied 5.0-6.0, its expert 6.0-6.25; the host done at 7.0 (4.5 s).
    Decode 2, synced: the host at 9.5 launches layer 1 (9.5-9.75) and is done at 11.5 (4.5 s). Run
    ahead: layer 1 is launched at 9.5 without a sync and ends at 9.75, the step with it (2.75 s,
    not 2.5: the GPU, free at 8.25, waits for the launch). TPOT 4.5 and (4.5 + 2.75 + 2.75) / 3."""
    tr = scripted([[[[0], [2]], [[0], [3]], [[0], [3]], [[0], [3]]]], spec_top1())
    cost = dataclasses.replace(unit_cost(), layer_host_s=2.0)
    got = {}
    for ahead in (False, True):
        config = dataclasses.replace(cfg("lru", "6"), warm_pool=True)
        got[ahead] = simulate(tr, config, cost, "timed", graphed=True, run_ahead=ahead)
    assert got[False].ttft_s == got[True].ttft_s == 2.5
    assert got[False].tpot_s == 4.5 and got[True].tpot_s == pytest.approx(10.0 / 3)
    assert got[True].layers_run_ahead == 2 and got[True].stats == got[False].stats


def test_run_ahead_counts_the_same_uses_with_predictors(recorded):
    """finemoe one expert short of all (23 of 24), graphed: with run-ahead the uses of the layers
    run ahead are counted when the host next syncs, all hits; the accesses equal those without it
    and nothing stays pinned. (The step need not be shorter: a layer run ahead waits for every copy
    still landing in its slots, as the engine's launch does, also one its router does not pick.)"""
    from finemoe.simulator import Simulator

    _, _, f = recorded
    tr = load_trace(f)
    # (gathering off: the graphed replay's default would gather, and its copies move with the timing)
    config = dataclasses.replace(cfg("finemoe", "23", map_store_capacity=64), warm_pool=True, gather_absent=False)
    cost = dataclasses.replace(unit_cost(), layer_host_s=0.5)
    r = {}
    for ahead in (False, True):  # (one layer run ahead waits for a prefetch it does not use: +1 s)
        sim = Simulator(
            tr.spec, config, cost, "timed", empty_history(tr, 64), tr.spec_probs, graphed=True, run_ahead=ahead
        )
        r[ahead] = sim.run(tr)
        assert all(n == 0 for n in sim.cache.refcount)  # nothing left pinned
    accesses = {a: r[a].stats["hits"] + r[a].stats["misses"] for a in r}
    assert accesses[True] == accesses[False] > 0
    assert r[True].layers_run_ahead > 0 and r[False].layers_run_ahead == 0
    # the same routings served; on this trace the hits are the same too
    assert r[True].stats["hits"] == r[False].stats["hits"]


def test_gpu_timeline_copies_wait_for_the_segment_reading_their_slot():
    """`GpuTimeline` by hand: a copy of 1 s, a segment of one expert (0.25 s). The segment waits for
    its copy (the GPU stalls, the host does not); a prefetch into the slot it reads, issued at host
    time 0.5, starts only once the segment is done with the slot (1.75), and the next copy queues
    behind it."""
    from finemoe.simlink import Clock, GpuTimeline, TimedLink

    clock = Clock()
    link = TimedLink(clock, 2, copy_s=1.0)
    gpu = GpuTimeline(clock, link)
    gpu.begin(0.5)
    gpu.sync()
    assert clock.t == 0.5
    link.load(0, [], True)  # 0.5 -> 1.5
    link.defer = True
    link.before_compute([0])
    link.defer = False
    gpu.expert_s = 0.25
    gpu.launch([7], [0], True)  # 1.5 -> 1.75
    assert gpu.end == 1.75 and link.stall_s == 1.0 and clock.t == 0.5
    link.load(0, [], False)  # the link is free at 1.5, the slot at 1.75
    assert link.done[0] == 2.75
    link.load(1, [], False)
    assert link.done[1] == 3.75
    gpu.then(0.5)
    gpu.sync()
    assert clock.t == 2.25


def test_graphed_decode_changes_nothing_without_predictors_or_for_batches(recorded):
    _, _, f = recorded
    tr = load_trace(f)
    for policy, batch in (("lru", 1), ("finemoe", 2)):
        a = simulate(tr, cfg(policy, "25%"), unit_cost(), "timed", empty_history(tr, 64), batch)
        b = simulate(tr, cfg(policy, "25%"), unit_cost(), "timed", empty_history(tr, 64), batch, graphed=True)
        assert a.stats == b.stats and a.total_s == b.total_s


def test_batch_rows_single_row_inputs_equal_the_general_path():
    """A decode row of `BatchRows` (NumPy rows, shared context tensors, no tensor made) carries the
    values `iteration_tensors` makes for the same iteration; `ReplayEvent` turns them into
    tensors of the same memory only when read."""
    from finemoe.replay_rows import BatchRows, ReplayEvent, iteration_tensors

    trace = random_trace(requests=2)
    rows = BatchRows(trace, [1])
    ranges = trace.row_ranges(1)
    decode = [it for it in range(1, len(ranges))]
    assert decode, "the trace needs decode iterations"
    for it in decode:
        part = [(1, *ranges[it])]
        ctx, probs, topk, stand_in, probs_np, lists = rows.iteration(7, False, part)
        ctx2, probs2, topk2, stand_in2 = iteration_tensors(trace, 7, False, part)
        assert lists is not None  # the single-row path, not the general one
        assert torch.equal(ctx.rows, ctx2.rows) and torch.equal(ctx.request_of_row, ctx2.request_of_row)
        assert torch.equal(ctx.host_embeddings(), ctx2.host_embeddings())
        assert torch.equal(stand_in[:, 0], stand_in2[:, 0])
        for layer in range(trace.spec.num_layers):
            assert isinstance(probs[layer], np.ndarray)
            assert torch.equal(torch.from_numpy(probs_np[layer]), probs2[layer])
            assert lists[layer] == topk2[layer].tolist()
            p, t = probs[layer], topk[layer]  # (a NumPy index makes a new view: the same one to both)
            event = ReplayEvent.of(7, layer, p, t, False, None, lists[layer])
            made = ReplayEvent(7, layer, p, t, False, _host_np=p, _topk_list=lists[layer])
            assert set(event.__dict__) == {f.name for f in dataclasses.fields(ReplayEvent)}  # every field set
            assert all(event.__dict__[k] is v for k, v in made.__dict__.items())  # as the constructor sets them
            assert isinstance(event.__dict__["probs"], np.ndarray)  # nothing read yet: no tensor
            assert torch.equal(event.probs, probs2[layer]) and torch.equal(event.topk_ids, topk2[layer])
            assert event.probs.data_ptr() == probs[layer].ctypes.data  # the same memory, kept once made
            assert torch.equal(event.host_probs(), probs2[layer]) and event.topk_lists() == topk2[layer].tolist()


def test_routing_event_host_views_equal_its_tensors():
    from finemoe.types import RoutingEvent

    probs, topk = torch.rand(3, 5), torch.tensor([[4, 1], [0, 2], [3, 3]])
    event = RoutingEvent(0, 1, probs, topk, False)
    assert np.array_equal(event.host_probs_np(), probs.numpy())
    assert event.host_probs_np() is event.host_probs_np()  # made once
    assert event.topk_lists() == [[4, 1], [0, 2], [3, 3]]
