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
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import run_meta, shape_config  # noqa: E402
from finemoe import Engine, SamplingParams  # noqa: E402
from finemoe.generation import generate_ids  # noqa: E402
from finemoe.trace import load_trace  # noqa: E402
from finemoe.trace_routing import TraceRouting  # noqa: E402
from finemoe.types import ExpertId  # noqa: E402

log = logging.getLogger("bench")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def steps(times):
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def hf_generate(model, ids, n):
    return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)


def hf_run(model, prompt, n, device, before=lambda: None):
    """transformers generate: TTFT from a 1-token call, TPOT from an n-token call (mean per step).
    `before()` runs before each call (trace routing restarts its request there)."""
    ids = torch.tensor([prompt], device=device)
    sync(device)
    before()
    t0 = time.perf_counter()
    hf_generate(model, ids, 1)
    sync(device)
    before()
    t1 = time.perf_counter()
    hf_generate(model, ids, n)
    sync(device)
    tn = time.perf_counter()
    ttft = t1 - t0
    return {"ttft_s": ttft, "steps_s": [(tn - t1 - ttft) / (n - 1)] * (n - 1)}


def loop_run(model, prompt, n, device, before=lambda: None):
    before()
    c = generate_ids(model, [prompt], SamplingParams(max_new_tokens=n, ignore_eos=True), 0, set(), device)[0]
    return {"ttft_s": c.ttft_s, "steps_s": steps(c.token_times_s)}


def engine_run(eng, prompt, n, before=lambda: None):
    before()
    eng.generate(prompt, SamplingParams(max_new_tokens=min(8, n), ignore_eos=True))  # warm the cache
    if eng.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before()
    out = eng.generate(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True))[0]
    c = out.cache
    peak = torch.cuda.max_memory_allocated() if eng.device.type == "cuda" else 0
    return {
        "ttft_s": out.ttft_s,
        "steps_s": steps(out.token_times_s),
        "hit_rate": c.hit_rate,
        "hits": c.hits,
        "misses": c.misses,
        "bytes_copied": c.bytes_copied,
        "stall_s": c.stall_s,
        "demand_bytes": c.demand_bytes,
        "prefetches_issued": c.prefetches_issued,
        "prefetches_used": c.prefetches_used,
        "peak_gpu_bytes": peak,
    }


def accelerate_runs(plain, eng, budgets, work, device, repeats):
    """Hugging Face Accelerate offloading of the plain model, what transformers users do today:
    `device_map` from `infer_auto_device_map` with the GPU capped at dense bytes + the budget's
    share of expert bytes (whole decoder layers stay or stream: `_no_split_modules`). Runs after
    the interleaved rounds (the plain model moves to the host for it). {budget: [samples]}."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.hooks import remove_hook_from_module

    out: dict[str, list] = {}
    plain.to("cpu")
    torch.cuda.empty_cache()
    for budget in budgets:
        share = float(budget.rstrip("%")) / 100
        cap = int(eng.dense_bytes + share * eng.spec.total_expert_bytes)
        dmap = infer_auto_device_map(
            plain,
            max_memory={device.index or 0: cap, "cpu": 10**13},
            no_split_module_classes=list(getattr(plain, "_no_split_modules", None) or []),
            dtype=next(plain.parameters()).dtype,
        )
        dispatch_model(plain, device_map=dmap)
        on_gpu = sum(1 for v in dmap.values() if v not in ("cpu", "disk"))
        log.info("accelerate %s: GPU cap %.2f GiB, %d of %d map entries on it", budget, cap / 2**30, on_gpu, len(dmap))
        out[budget] = []
        for _ in range(repeats):
            for p, n, before in work:
                out[budget].append(hf_run(plain, p, n, device, before))
        remove_hook_from_module(plain, recurse=True)
        plain.to("cpu")
        torch.cuda.empty_cache()
    return out


def summarize(samples):
    """Merge the rounds of one configuration: medians of TTFT and of all per-token steps."""
    out = {"ttft_s": statistics.median(s["ttft_s"] for s in samples)}
    all_steps = [x for s in samples for x in s["steps_s"]]
    out["tpot_s"] = statistics.median(all_steps)
    out["tpot_mean_s"] = statistics.fmean(all_steps)
    out["tpot_round_means_s"] = [statistics.fmean(s["steps_s"]) for s in samples]
    for key in ("hits", "misses", "bytes_copied", "stall_s", "demand_bytes", "prefetches_issued", "prefetches_used"):
        if key in samples[0]:
            out[key] = sum(s[key] for s in samples)
    if "hits" in out:
        acc = out["hits"] + out["misses"]
        out["hit_rate"] = out["hits"] / acc if acc else 0.0
        out["demand_bandwidth_gbps"] = out["demand_bytes"] / out["stall_s"] / 1e9 if out["stall_s"] else 0.0
        out["prefetch_precision"] = (
            out["prefetches_used"] / out["prefetches_issued"] if out["prefetches_issued"] else 0.0
        )
        out["peak_gpu_bytes"] = max(s["peak_gpu_bytes"] for s in samples)
    return out


def copy_bandwidth(eng, count):
    """On-demand copies of `count` distinct experts into rotating slots, timed by CUDA events."""
    cache, spec = eng.cache, eng.spec
    tr = cache.transfer
    torch.cuda.synchronize()
    before = tr.demand_seconds()
    for i in range(count):
        eid = ExpertId(i % spec.num_layers, (i // spec.num_layers) % spec.num_experts)
        tr.load(i % cache.num_slots, eng.store.parts(eid), demand=True)
    torch.cuda.synchronize()
    secs = tr.demand_seconds() - before
    return {
        "experts": count,
        "expert_bytes": spec.expert_bytes,
        "seconds": secs,
        "gbps": count * spec.expert_bytes / secs / 1e9,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="olmoe")
    ap.add_argument("--layers", type=int, help="default: full depth")
    ap.add_argument("--budgets", default="50%,25%", help="offloaded budgets (100%% is always measured)")
    ap.add_argument("--policies", default="lru,lfu,previous-token")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=4, help="interleaved rounds")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default="bench_offload.json")
    ap.add_argument("--plot", help="only plot an existing JSON record")
    ap.add_argument(
        "--trace",
        help="replay the routing of this trace (finemoe trace record; same experts and top-k as the shape): "
        "benchmark-only, labelled routing=trace in the record",
    )
    ap.add_argument("--trace-requests", type=int, default=4, help="trace requests per round (their lengths)")
    ap.add_argument("--accelerate", action="store_true", help="also Accelerate offloading per budget (after rounds)")
    args = ap.parse_args()
    if args.plot:
        return plot(Path(args.plot))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from transformers import AutoModelForCausalLM

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
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
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    t0 = time.perf_counter()
    eng = Engine.from_model(twin, policy="all-gpu", progress=False)
    offload_s = time.perf_counter() - t0
    configs = [
        ("transformers-generate", None),
        ("transformers+finemoe-loop", None),
        ("all-gpu", "100%"),
        ("previous-token", "100%"),
    ]
    configs += [(p, b) for b in args.budgets.split(",") for p in args.policies.split(",")]
    hf_generate(plain, torch.tensor([prompt], device=device), 4)  # warm-up
    # (prompt, new tokens, before-hook) per measured request: one random prompt with the model's own
    # routing, or the trace's requests with their recorded lengths and routing.
    work = [(prompt, args.new_tokens, lambda: None)]
    replays = []
    if args.trace:
        trace = load_trace(args.trace)
        replays = [TraceRouting(plain, trace), TraceRouting(eng.model, trace)]
        log.info("trace routing: %s (%d requests), %s", args.trace, trace.num_requests, replays[0].layer_map)
        g = torch.Generator().manual_seed(1)
        work = []
        for r in range(min(args.trace_requests, trace.num_requests)):
            ids = torch.randint(0, cfg.vocab_size, (replays[0].prompt_len(r),), generator=g).tolist()

            def before(r=r):
                for rp in replays:
                    rp.start(r)

            work.append((ids, replays[0].output_len(r), before))
    samples: dict[tuple, list] = {c: [] for c in configs}
    for rnd in range(args.repeats):
        for name, budget in configs:
            if name != "transformers-generate" and name != "transformers+finemoe-loop":
                eng.reconfigure(policy=name, expert_budget=budget)
            for p, n, before in work:
                if name == "transformers-generate":
                    r = hf_run(plain, p, n, device, before)
                elif name == "transformers+finemoe-loop":
                    r = loop_run(plain, p, n, device, before)
                else:
                    r = engine_run(eng, p, n, before)
                samples[(name, budget)].append(r)
        log.info("round %d/%d done", rnd + 1, args.repeats)
    routing_label = "the model's own (random weights)"
    if args.trace:
        routing_label = f"trace ({args.trace}; {replays[0].layer_map})"
    record = {
        "meta": run_meta(),
        "config": vars(args)
        | {
            "batch": 1,
            "routing": routing_label,
            "tpot": "median per-token step over all rounds (generate: per-call mean)",
        },
        "spec": {
            "experts": eng.spec.num_total_experts,
            "expert_bytes": eng.spec.expert_bytes,
            "total_expert_bytes": eng.spec.total_expert_bytes,
            "dense_bytes": eng.dense_bytes,
        },
        "offload_s": offload_s,
        "plain_model_bytes": sum(p.numel() * p.element_size() for p in plain.parameters()),
        "peak_gpu_note": "peak_gpu_bytes includes the plain twin model (plain_model_bytes) kept for reference",
        "runs": [summarize(v) | {"policy": k[0], "budget": k[1]} for k, v in samples.items()],
    }
    if args.accelerate and device.type == "cuda":
        acc = accelerate_runs(plain, eng, args.budgets.split(","), work, device, args.repeats)
        record["runs"] += [summarize(v) | {"policy": "accelerate", "budget": b} for b, v in acc.items()]
    if device.type == "cuda":
        eng.reconfigure(policy="lru", expert_budget="25%")
        copy_bandwidth(eng, 16)  # warm-up
        record["copy_bandwidth"] = copy_bandwidth(eng, 128)
    eng.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print_table(record)
    return 0


def reference(rec, name):
    return next(r for r in rec["runs"] if r["policy"] == name)


def print_table(rec):
    gen = reference(rec, "transformers-generate")["tpot_s"]
    loop = reference(rec, "transformers+finemoe-loop")["tpot_s"]
    print(
        f"\n{rec['config']['shape']} ({rec['config']['dtype']}) on {rec['meta']['device']}, "
        f"{rec['config']['repeats']} interleaved rounds"
    )
    print(
        f"{'config':<26} {'budget':>6} {'ttft ms':>8} {'tpot ms':>8} {'x gen':>6} {'x loop':>6} {'hit':>6} {'GB/s':>6}"
    )
    for r in rec["runs"]:
        hit = f"{r['hit_rate']:6.3f}" if "hit_rate" in r else "     -"
        bw = f"{r['demand_bandwidth_gbps']:6.1f}" if "hit_rate" in r else "     -"
        print(
            f"{r['policy']:<26} {r['budget'] or '-':>6} {r['ttft_s'] * 1e3:8.1f} {r['tpot_s'] * 1e3:8.2f} "
            f"{r['tpot_s'] / gen:6.2f} {r['tpot_s'] / loop:6.2f} {hit} {bw}"
        )
    if "copy_bandwidth" in rec:
        cb = rec["copy_bandwidth"]
        print(
            f"raw on-demand copies: {cb['gbps']:.1f} GB/s "
            f"({cb['experts']} experts of {cb['expert_bytes'] / 1e6:.1f} MB)"
        )


def plot(path: Path) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec = json.loads(path.read_text())
    runs = [r for r in rec["runs"] if r["budget"]]
    labels = [f"{r['policy']}\n{r['budget']}" for r in runs]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax1.bar(labels, [r["tpot_s"] * 1e3 for r in runs], color="#4c72b0")
    ax1.axhline(
        reference(rec, "transformers-generate")["tpot_s"] * 1e3,
        color="k",
        ls="--",
        label="transformers generate, all on GPU",
    )
    ax1.axhline(
        reference(rec, "transformers+finemoe-loop")["tpot_s"] * 1e3,
        color="gray",
        ls=":",
        label="plain model, finemoe's token loop",
    )
    ax1.set_ylabel("TPOT, median step (ms)")
    ax1.set_title(f"{rec['config']['shape']} {rec['config']['dtype']}, batch 1 — {rec['meta']['device']}")
    ax1.legend(fontsize=8)
    ax2.bar(labels, [r["hit_rate"] for r in runs], color="#55a868")
    ax2.set_ylabel("expert hit rate")
    ax2.set_ylim(0, 1.05)
    ax2.set_title("hit rate (random weights: optimistic)")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    png = path.with_suffix(".png")
    fig.savefig(png, dpi=120)
    print(png)
    print_table(rec)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
