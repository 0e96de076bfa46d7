"""Offloading benchmark on a random-weight model of a real shape (run on the GPU machine).

Builds the model from its config straight on the device (bf16), keeps an untouched twin as the
plain-transformers reference, hands the other copy to finemoe (`Engine.from_model`) and then, for
`--repeats` rounds, runs every configuration in turn (interleaved, so host-side noise hits all of
them alike): transformers `generate`, finemoe's token loop on the plain model, and the engine for
each policy at each budget. TPOT is the median per-token step time over all rounds. Also times
raw on-demand copies. Writes one JSON record.

    python benchmarks/bench_offload.py --shape olmoe --out docs/results/offload_olmoe.json
    python benchmarks/bench_offload.py --plot docs/results/offload_olmoe.json   # PNG next to the JSON
    python benchmarks/bench_offload.py --shape olmoe --layers 2 --device cpu --dtype float32   # smoke test
    python benchmarks/bench_offload.py --shape qwen15moe --trace q60x4.fmt   # replay a trained model's routing

Random weights route far more predictably than trained ones: hit rates here flatter every policy.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import offload_runs  # noqa: E402
from common import run_meta, shape_config  # noqa: E402
from finemoe import Engine, SamplingParams  # noqa: E402
from finemoe.trace import load_trace  # noqa: E402
from finemoe.trace_routing import TraceRouting  # noqa: E402
from offload_report import plot, print_table  # noqa: E402
from offload_runs import (  # noqa: E402
    accelerate_runs,
    copy_bandwidth,
    engine_profile,
    engine_request,
    engine_run,
    hf_generate,
    hf_run,
    loop_run,
    poisson_arrivals,
    serving_run,
    summarize,
    trace_work,
)

log = logging.getLogger("bench")


def parse_args(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="olmoe")
    ap.add_argument("--layers", type=int, help="default: full depth")
    ap.add_argument("--budgets", default="50%,25%", help="offloaded budgets (100%% all-gpu is always measured)")
    ap.add_argument(
        "--policies",
        default="lru,lfu,previous-token",
        help="comma-separated; an entry may set engine knobs: finemoe+map_min_score=0.8",
    )
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=4, help="interleaved rounds")
    ap.add_argument(
        "--warm-requests",
        type=int,
        default=0,
        help="untimed requests (the work items in turn) after each engine reconfiguration, before the "
        "timed ones: e.g. past the adaptive prediction duty's first probe, as a long-running engine is",
    )
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default="bench_offload.json")
    ap.add_argument("--plot", help="only plot an existing JSON record")
    ap.add_argument(
        "--trace",
        help="replay the routing of this trace (finemoe trace record; same experts and top-k as the shape): "
        "benchmark-only, labelled routing=trace in the record; prompts are the trace's prompt tokens",
    )
    ap.add_argument("--trace-requests", type=int, default=4, help="trace requests per round (their lengths)")
    ap.add_argument(
        "--history",
        help="with --trace: a trace of other prompts replayed first through finemoe to fill the history "
        "stores (expert maps, request matrices); the stores are then frozen (the paper's offline setup)",
    )
    ap.add_argument("--history-requests", type=int, default=32)
    ap.add_argument(
        "--own-routing",
        action="store_true",
        help="with --trace: also every configuration with the model's own routers (random weights, one "
        "random prompt of --prompt-len tokens, --new-tokens), before the trace routing is installed; "
        "the record's own_routing_runs, shown as the table's 'own' columns",
    )
    ap.add_argument("--skip-loop", action="store_true", help="skip the plain model in finemoe's token loop")
    ap.add_argument("--accelerate", action="store_true", help="also Accelerate offloading per budget (at the end)")
    ap.add_argument("--accelerate-tokens", type=int, default=8, help="new tokens per Accelerate request")
    ap.add_argument("--accelerate-requests", type=int, default=1)
    ap.add_argument("--accelerate-budgets", help="default: --budgets")
    ap.add_argument(
        "--accelerate-only",
        action="store_true",
        help="only transformers generate (all on GPU) and Accelerate offloading, no engine (fits one call)",
    )
    ap.add_argument("--serve-requests", type=int, default=0, help="online serving run: requests per policy (0: none)")
    ap.add_argument(
        "--serve-rate",
        default="auto",
        help="Poisson arrival rate (req/s), or auto = 0.5 / the all-gpu engine's median request time",
    )
    ap.add_argument("--serve-budget", default="25%")
    ap.add_argument("--serve-policies", help="default: --policies")
    ap.add_argument(
        "--gc-freeze",
        action="store_true",
        help="gc.collect() + gc.freeze() before each timed engine request of the rounds (what exists then is "
        "never scanned by the cyclic garbage collector during it; not the serving run or profiles); the gc ms "
        "column shows collection time either way",
    )
    ap.add_argument(
        "--profile",
        help="comma-separated policy entries: after the timed rounds, one request of each under cProfile "
        "at the last budget (text tables next to --out)",
    )
    ap.add_argument(
        "--profile-tokens",
        type=int,
        help="new tokens of the profiled request (default: the request's own; 1 profiles its prefill alone)",
    )
    return ap.parse_args(argv)


def policy_settings(tokens: list[str]) -> dict[str, dict]:
    """`--policies` entries -> engine settings: "finemoe+map_min_score=0.8+gate_refine=False" is
    the finemoe policy with those EngineConfig fields; every knob any entry sets is reset to its
    default for the others (reconfigure keeps unnamed settings)."""
    import ast

    from finemoe.config import EngineConfig

    parsed = {}
    for tok in tokens:
        name, *kvs = tok.split("+")
        parsed[tok] = {"policy": name} | {k: ast.literal_eval(v) for k, v in (kv.split("=", 1) for kv in kvs)}
    defaults = EngineConfig()
    knobs = {k for d in parsed.values() for k in d if k != "policy"}
    return {tok: {k: getattr(defaults, k) for k in knobs} | d for tok, d in parsed.items()}


def build(args, device, dtype):
    """The plain model and an engine over its twin (built from the config, random weights)."""
    from transformers import AutoModelForCausalLM

    cfg = shape_config(args.shape, args.layers)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with device:
        plain = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    plain.generation_config.eos_token_id = None
    twin = copy.deepcopy(plain)
    log.info(
        "built %s (%d layers) twice on %s in %.1fs", args.shape, cfg.num_hidden_layers, device, time.perf_counter() - t0
    )
    t0 = time.perf_counter()
    eng = Engine.from_model(twin, policy="all-gpu", progress=False)
    return cfg, plain, eng, time.perf_counter() - t0


def warm_history(eng, path, requests, budget):
    """Replay `requests` requests of the history trace at `path` through finemoe so that its
    recorder fills the expert-map and request-matrix stores."""
    hist = load_trace(path)
    rp = TraceRouting(eng.model, hist)
    eng.speculative_gate = rp.gate if hist.spec_probs else None
    # (record_requests: moe-infinity's history too, auto keeping none here: finemoe reads none, no file;
    # the runs after it are frozen, so the knob left on records nothing more)
    eng.reconfigure(policy="finemoe", expert_budget=budget, map_store_learn=True, record_requests=True)
    n = min(requests, hist.num_requests)
    t0 = time.perf_counter()
    for r in range(n):
        rp.start(r)
        eng.generate(rp.prompt_ids(r), SamplingParams(max_new_tokens=rp.output_len(r), ignore_eos=True))
    rp.remove()
    log.info(
        "history: %d requests of %s in %.1fs; %d expert maps and %d request matrices stored",
        n,
        path,
        time.perf_counter() - t0,
        eng.maps.size,
        eng.requests.size,
    )
    return {"trace": path, "requests": n, "expert_maps": eng.maps.size, "request_matrices": eng.requests.size}


def accelerate_only(args, device, dtype) -> int:
    """transformers generate with every weight on the GPU, then Accelerate offloading at each
    budget, on the same model and requests; GPU caps = non-expert bytes + the budget's share of
    expert bytes (the same caps the full run uses)."""
    from transformers import AutoModelForCausalLM

    from finemoe.loader import build_spec
    from finemoe.models import get_adapter

    cfg = shape_config(args.shape, args.layers)
    torch.manual_seed(0)
    with device:
        plain = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    plain.generation_config.eos_token_id = None
    spec = build_spec(plain, get_adapter(cfg.model_type), dtype)
    total = sum(p.numel() * p.element_size() for p in plain.parameters())
    dense = total - spec.total_expert_bytes
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    work, replays = [(prompt, args.new_tokens, lambda: None)], []
    if args.trace:
        trace = load_trace(args.trace)
        replays = [TraceRouting(plain, trace)]
        work = [
            (replays[0].prompt_ids(r), replays[0].output_len(r), lambda r=r: replays[0].start(r))
            for r in range(min(args.accelerate_requests, trace.num_requests))
        ]
    work[0][2]()
    hf_generate(plain, torch.tensor([work[0][0]], device=device), 4)  # warm-up
    ref = [hf_run(plain, p, n, device, before) for p, n, before in work]
    budgets = (args.accelerate_budgets or args.budgets).split(",")
    caps = {b: int(dense + float(b.rstrip("%")) / 100 * spec.total_expert_bytes) for b in budgets}
    record = {
        "meta": run_meta(),
        "config": vars(args) | {"batch": 1, "routing": f"trace ({args.trace})" if args.trace else "the model's own"},
        "spec": {"total_expert_bytes": spec.total_expert_bytes, "dense_bytes": dense},
        "runs": [summarize(ref) | {"policy": "transformers-generate", "budget": None}],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    if device.type != "cuda":
        log.warning("Accelerate offloading needs a CUDA device; only the reference was measured")
        print_table(record)
        return 0
    acc = accelerate_runs(plain, caps, work, device, args.accelerate_tokens)
    record["runs"] += [summarize(v) | {"policy": "accelerate", "budget": b} for b, v in acc.items()]
    out.write_text(json.dumps(record, indent=1))
    print_table(record)
    return 0


def main():
    args = parse_args()
    if args.plot:
        return plot(Path(args.plot))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.accelerate_only:
        return accelerate_only(args, device, dtype)
    offload_runs.GC_FREEZE = args.gc_freeze
    cfg, plain, eng, offload_s = build(args, device, dtype)
    budgets = args.budgets.split(",")
    configs = [("transformers-generate", None), ("transformers+finemoe-loop", None), ("all-gpu", "100%")]
    if args.skip_loop:
        configs.pop(1)
    # one settings table for every reconfigure, so that knobs an entry sets never leak into another
    serve_names = (args.serve_policies or args.policies).split(",")
    prof_names = args.profile.split(",") if args.profile else []
    settings = policy_settings(sorted(set(args.policies.split(",") + serve_names + prof_names + ["all-gpu", "lru"])))
    configs += [(p, b) for b in budgets for p in args.policies.split(",")]
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    hf_generate(plain, torch.tensor([prompt], device=device), 4)  # warm-up
    history, learn = None, True
    if args.history:
        if not args.trace:
            raise SystemExit("--history needs --trace")
        history, learn = warm_history(eng, args.history, args.history_requests, budgets[-1]), False
    own = own_routing_rounds(args, eng, plain, configs, settings, learn, device, prompt) if args.own_routing else None
    # (prompt, new tokens, before-hook) per measured request: one random prompt with the model's own
    # routing, or the trace's requests (their prompt tokens, lengths and routing).
    work = [(prompt, args.new_tokens, lambda: None)]
    replays = []
    if args.trace:
        trace = load_trace(args.trace)
        replays = [TraceRouting(plain, trace), TraceRouting(eng.model, trace)]
        # speculative gates (mixtral-offloading, promoe, finemoe's refinement) replay the traced
        # model's routers on the current router input, as the simulator does
        eng.speculative_gate = replays[1].gate if trace.spec_probs else None
        log.info("trace routing: %s (%d requests), %s", args.trace, trace.num_requests, replays[0].layer_map)
        work = trace_work(replays, args.trace_requests)
    runs = rounds(args, eng, plain, configs, settings, learn, device, work, "round")
    print_table({"config": vars(args), "meta": {"device": str(device)}, "runs": runs, "own_routing_runs": own})
    routing = f"trace ({args.trace}; {replays[0].layer_map})" if args.trace else "the model's own (random weights)"
    serving = None
    if args.serve_requests:
        try:
            serving = serve(args, eng, work, runs, learn, settings)
        except Exception:
            log.exception("serving run failed")
    record = {
        "meta": run_meta(),
        "config": vars(args)
        | {
            "batch": 1,
            "routing": routing,
            "tpot": "median per-token step over all rounds (generate: per-call mean)",
            "speculative_gates": "replayed from the trace (its spec1/spec2 router outputs)"
            if args.trace and replays and replays[1].trace.spec_probs
            else "the model's own routers",
            "warm_up": "each measured request follows 8 tokens of the previous request (its cache state; "
            "the request itself when only one is measured)",
        },
        "history": history,
        "own_routing_runs": own,
        "spec": {
            "experts": eng.spec.num_total_experts,
            "expert_bytes": eng.spec.expert_bytes,
            "total_expert_bytes": eng.spec.total_expert_bytes,
            "dense_bytes": eng.dense_bytes,
        },
        "offload_s": offload_s,
        "plain_model_bytes": sum(p.numel() * p.element_size() for p in plain.parameters()),
        "peak_gpu_note": "peak_gpu_bytes includes the plain twin model (plain_model_bytes) kept for reference",
        "runs": runs,
        "serving": serving,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))  # saved now: the extras below may fail or time out
    for name in prof_names:
        try:
            eng.reconfigure(**settings[name], expert_budget=budgets[-1], map_store_learn=learn)
            item = work[0] if args.profile_tokens is None else (work[0][0], args.profile_tokens, work[0][2])
            text = engine_profile(eng, item, work[-1])
        except Exception:
            log.exception("profile of %s failed", name)
            continue
        path = Path(args.out).with_suffix(f".profile-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        log.info("profile of %s at %s written to %s", name, budgets[-1], path)
    if device.type == "cuda":
        try:
            eng.reconfigure(**settings["lru"], expert_budget="25%")
            copy_bandwidth(eng, 16)  # warm-up
            record["copy_bandwidth"] = copy_bandwidth(eng, 128)
        except Exception:
            log.exception("copy bandwidth run failed")
    acc_budgets = (args.accelerate_budgets or args.budgets).split(",")
    caps = {b: int(eng.dense_bytes + float(b.rstrip("%")) / 100 * eng.spec.total_expert_bytes) for b in acc_budgets}
    eng.close()
    del eng
    if args.accelerate and device.type == "cuda":
        acc_work = work[: args.accelerate_requests]
        out.write_text(json.dumps(record, indent=1))
        try:
            acc = accelerate_runs(plain, caps, acc_work, device, args.accelerate_tokens)
            record["runs"] += [summarize(v) | {"policy": "accelerate", "budget": b} for b, v in acc.items()]
        except Exception:
            log.exception("Accelerate run failed")
    out.write_text(json.dumps(record, indent=1))
    print_table(record)
    return 0


def own_routing_rounds(args, eng, plain, configs, settings, learn, device, prompt):
    """Every configuration with the models' own routers (issue 7's second column): one random
    prompt, `--repeats` interleaved rounds, before any trace hook is on the routers (the engine's
    graphs are captured per configuration, so the trace rounds after it capture their own).
    Random weights route far from a trained model: these rows say what the engine does with that
    routing, not what a real model would get. Returns summarized runs marked routing='own'."""
    if not args.trace:
        raise SystemExit("--own-routing goes with --trace (without one every run uses the model's own routing)")
    gate, eng.speculative_gate = eng.speculative_gate, None  # the model's own next-layer routers
    work = [(prompt, args.new_tokens, lambda: None)]
    runs = rounds(args, eng, plain, configs, settings, learn, device, work, "own-routing round")
    eng.speculative_gate = gate
    return [r | {"routing": "own"} for r in runs]


def rounds(args, eng, plain, configs, settings, learn, device, work, label):
    """`--repeats` interleaved rounds of every (name, budget) in `configs` over the `work` items
    (prompt, new tokens, before-hook); each engine request follows 8 tokens of the previous item
    (the item itself when there is one). Returns the summarized runs."""
    samples: dict[tuple, list] = {c: [] for c in configs}
    for rnd in range(args.repeats):
        for name, budget in configs:
            if budget:
                eng.reconfigure(**settings.get(name, {"policy": name}), expert_budget=budget, map_store_learn=learn)
                for w in range(args.warm_requests):
                    engine_request(eng, work[w % len(work)])
            for i, item in enumerate(work):
                p, n, before = item
                if name == "transformers-generate":
                    r = hf_run(plain, p, n, device, before)
                elif name == "transformers+finemoe-loop":
                    r = loop_run(plain, p, n, device, before)
                else:
                    r = engine_run(eng, item, work[i - 1])
                samples[(name, budget)].append(r)
        log.info("%s %d/%d done", label, rnd + 1, args.repeats)
    return [summarize(v) | {"policy": k[0], "budget": k[1]} for k, v in samples.items()]


def serve(args, eng, work, runs, learn, settings):
    """The online serving run per policy at `--serve-budget` (see `offload_runs.serving_run`)."""
    if args.serve_rate == "auto":
        base = next(r for r in runs if r["policy"] == "all-gpu")["e2e_s"]
        rate = 0.5 / base
    else:
        rate = float(args.serve_rate)
    arrivals = poisson_arrivals(args.serve_requests, rate, seed=0)
    out = {"rate_rps": rate, "budget": args.serve_budget, "requests": args.serve_requests, "policies": {}}
    for name in (args.serve_policies or args.policies).split(","):
        eng.reconfigure(**settings[name], expert_budget=args.serve_budget, map_store_learn=learn)
        res = serving_run(eng, work, arrivals)
        out["policies"][name] = res
        log.info(
            "serving %s at %.2f req/s: latency p50 %.2fs p90 %.2fs, utilisation %.2f",
            name,
            rate,
            res["latency_p50_s"],
            res["latency_p90_s"],
            res["utilisation"],
        )
    return out


if __name__ == "__main__":
    raise SystemExit(main())
