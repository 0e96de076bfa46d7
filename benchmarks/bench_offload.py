"""Offloading benchmark on a random-weight model of a real shape (GPU machine).

Builds the model from its config straight on the GPU (bf16), times plain transformers with every
expert resident, then hands the model to finemoe (`Engine.from_model`) and times each policy at
each budget, plus a raw on-demand copy bandwidth test. Writes one JSON record.

    python benchmarks/bench_offload.py --shape olmoe --budgets 100%,50%,25% --out docs/results/x.json
    python benchmarks/bench_offload.py --plot docs/results/x.json     # PNG next to the JSON

Random weights route far more predictably than trained ones: hit rates here flatter every policy.
"""

from __future__ import annotations

import argparse
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
from finemoe.types import ExpertId  # noqa: E402

log = logging.getLogger("bench")


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def hf_generate(model, ids, n):
    return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)


def median(xs):
    return statistics.median(xs)


def plain_transformers(model, prompt, n, repeats):
    """Plain transformers, everything on the GPU: HF `generate`, and finemoe's token loop on the
    unmodified model (isolates the cost of finemoe's hooks from the cost of the loop)."""
    ids = torch.tensor([prompt], device="cuda")
    hf_generate(model, ids, 4)  # warm-up
    hf_ttft, hf_tpot, loop_ttft, loop_tpot = [], [], [], []
    params = SamplingParams(max_new_tokens=n, ignore_eos=True)
    for _ in range(repeats):
        _, t1 = timed(lambda: hf_generate(model, ids, 1))
        _, tn = timed(lambda: hf_generate(model, ids, n))
        hf_ttft.append(t1)
        hf_tpot.append((tn - t1) / (n - 1))
        c = generate_ids(model, [prompt], params, 0, set(), torch.device("cuda"))[0]
        loop_ttft.append(c.ttft_s)
        loop_tpot.append(c.tpot_s)
    return {
        "ttft_s": median(hf_ttft),
        "tpot_s": median(hf_tpot),
        "loop_ttft_s": median(loop_ttft),
        "loop_tpot_s": median(loop_tpot),
        "tpot_samples_s": hf_tpot,
        "loop_tpot_samples_s": loop_tpot,
    }


def engine_run(eng, prompt, n, repeats):
    params = SamplingParams(max_new_tokens=n, ignore_eos=True)
    eng.generate(prompt, SamplingParams(max_new_tokens=8, ignore_eos=True))  # warm-up (cache state carries)
    torch.cuda.reset_peak_memory_stats()
    outs = [eng.generate(prompt, params)[0] for _ in range(repeats)]
    mid = sorted(outs, key=lambda o: o.tpot_s)[len(outs) // 2]
    c = mid.cache
    return {
        "ttft_s": median([o.ttft_s for o in outs]),
        "tpot_s": mid.tpot_s,
        "latency_s": mid.latency_s,
        "tpot_samples_s": [o.tpot_s for o in outs],
        "hit_rate": c.hit_rate,
        "hits": c.hits,
        "misses": c.misses,
        "bytes_copied": c.bytes_copied,
        "stall_s": c.stall_s,
        "demand_bandwidth_gbps": c.demand_bandwidth_gbps,
        "prefetches_issued": c.prefetches_issued,
        "prefetch_precision": c.prefetch_precision,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(),
        "slots": eng.plan.slots,
        "pool_bytes": eng.plan.pool_bytes,
        "tokens": len(mid.token_ids),
    }


def kernel_layout_check(model, cfg, iters=200):
    """Time one layer's stock grouped_mm experts forward (decode, T=1) on the fused contiguous
    weights vs the same weights as strided views of a [E, expert_numel] byte-slab pool."""
    from transformers.integrations.moe import grouped_mm_experts_forward

    experts = next(m for m in model.modules() if hasattr(m, "gate_up_proj") and m.gate_up_proj.dim() == 3)
    E = experts.num_experts
    k = cfg.num_experts_per_tok
    h = torch.randn(1, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    idx = torch.randperm(E, device="cuda")[:k].view(1, k)
    w = torch.softmax(torch.randn(1, k, device="cuda"), -1).to(torch.bfloat16)
    gu, dn = experts.gate_up_proj.detach(), experts.down_proj.detach()
    flat = torch.cat([gu.reshape(E, -1), dn.reshape(E, -1)], dim=1)
    strided = (flat[:, : gu[0].numel()].view(gu.shape), flat[:, gu[0].numel() :].view(dn.shape))
    out = {}
    for name, (a, b) in {"contiguous": (gu, dn), "strided_slab_views": strided}.items():
        proxy = type("P", (), {})()
        proxy.gate_up_proj, proxy.down_proj, proxy.num_experts = a, b, E
        proxy.has_gate, proxy.has_bias, proxy.is_transposed = True, False, False
        proxy._apply_gate = experts._apply_gate
        for _ in range(10):
            grouped_mm_experts_forward(proxy, h, idx, w)
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(iters):
            grouped_mm_experts_forward(proxy, h, idx, w)
        e.record()
        torch.cuda.synchronize()
        out[name + "_ms"] = s.elapsed_time(e) / iters
    return out


def copy_bandwidth(eng, count=64):
    """On-demand copies of `count` distinct experts into rotating slots, timed by CUDA events."""
    cache, spec = eng.cache, eng.spec
    tr = cache.transfer
    torch.cuda.synchronize()
    before = tr.demand_seconds()
    S = cache.num_slots
    for i in range(count):
        eid = ExpertId(i % spec.num_layers, (i // spec.num_layers) % spec.num_experts)
        tr.load(i % S, eng.store.parts(eid), demand=True)
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
    ap.add_argument("--budgets", default="100%,50%,25%")
    ap.add_argument("--policies", default="lru,lfu,previous-token")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median reported)")
    ap.add_argument("--out", default="bench_offload.json")
    ap.add_argument("--plot", help="only plot an existing JSON record")
    args = ap.parse_args()
    if args.plot:
        return plot(Path(args.plot))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from transformers import AutoModelForCausalLM

    cfg = shape_config(args.shape, args.layers)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    log.info("built %s (%d layers) on GPU in %.1fs", args.shape, cfg.num_hidden_layers, time.perf_counter() - t0)
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    record = {
        "meta": run_meta(),
        "config": vars(args) | {"dtype": "bfloat16", "batch": 1, "routing": "model's own (random weights)"},
        "runs": [],
    }
    keep = {n: p.detach().clone() for n, p in model.named_parameters() if ".experts." in n}
    record["kernel_layout"] = kernel_layout_check(model, cfg)
    log.info("grouped_mm layer forward: %s", record["kernel_layout"])
    base = plain_transformers(model, prompt, args.new_tokens, args.repeats)
    log.info(
        "transformers all-GPU: ttft %.1f ms tpot %.2f ms (finemoe loop on plain model: tpot %.2f ms)",
        base["ttft_s"] * 1e3,
        base["tpot_s"] * 1e3,
        base["loop_tpot_s"] * 1e3,
    )
    t0 = time.perf_counter()
    eng = Engine.from_model(model, policy="all-gpu", progress=False)
    record["offload_s"] = time.perf_counter() - t0
    record["spec"] = {
        "experts": eng.spec.num_total_experts,
        "expert_bytes": eng.spec.expert_bytes,
        "total_expert_bytes": eng.spec.total_expert_bytes,
        "dense_bytes": eng.dense_bytes,
    }
    runs = [(p, b) for b in args.budgets.split(",") for p in args.policies.split(",") if b != "100%"]
    if "100%" in args.budgets.split(","):
        runs = [("all-gpu", "100%"), ("previous-token", "100%")] + runs
    for policy, budget in runs:
        if (policy, budget) != ("all-gpu", "100%"):
            eng.reconfigure(policy=policy, expert_budget=budget)
        r = engine_run(eng, prompt, args.new_tokens, args.repeats) | {"policy": policy, "budget": budget}
        record["runs"].append(r)
        log.info(
            "%-15s %5s ttft %7.1f ms tpot %7.2f ms hit %.3f misses %d demand %.1f GB/s",
            policy,
            budget,
            r["ttft_s"] * 1e3,
            r["tpot_s"] * 1e3,
            r["hit_rate"],
            r["misses"],
            r["demand_bandwidth_gbps"],
        )
    eng.reconfigure(policy="lru", expert_budget="25%")
    copy_bandwidth(eng, 16)  # warm-up
    record["copy_bandwidth"] = copy_bandwidth(eng, 128)
    log.info(
        "on-demand copy bandwidth: %.1f GB/s for %.1f MB experts",
        record["copy_bandwidth"]["gbps"],
        eng.spec.expert_bytes / 1e6,
    )
    eng.close()
    # Plain transformers again, after: the two measurements bracket the engine runs (drift check).
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))  # saved now too, in case the bracket run fails
    for n, t in keep.items():
        mod_name, _, attr = n.rpartition(".")
        model.get_submodule(mod_name)._parameters[attr] = torch.nn.Parameter(t, requires_grad=False)
    model.set_experts_implementation("grouped_mm")
    record["transformers_after"] = plain_transformers(model, prompt, args.new_tokens, args.repeats)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print_table(record)
    return 0


def plain_reference(rec):
    """Plain-transformers TPOT: HF generate and finemoe's loop, medians over both brackets."""
    runs = [rec["transformers"]] + ([rec["transformers_after"]] if "transformers_after" in rec else [])
    hf = median([t for r in runs for t in r.get("tpot_samples_s", [r["tpot_s"]])])
    loop = median([t for r in runs for t in r.get("loop_tpot_samples_s", [r.get("loop_tpot_s", r["tpot_s"])])])
    return hf, loop


def print_table(rec):
    hf, loop = plain_reference(rec)
    print(
        f"\n{rec['config']['shape']} on {rec['meta']['device']}: plain transformers all-GPU tpot "
        f"{hf * 1e3:.2f} ms (generate) / {loop * 1e3:.2f} ms (finemoe's loop, no hooks)"
    )
    print(
        f"{'policy':<15} {'budget':>6} {'ttft ms':>8} {'tpot ms':>8} {'x gen':>6} {'x loop':>6} {'hit':>6} {'GB/s':>6}"
    )
    for r in rec["runs"]:
        print(
            f"{r['policy']:<15} {r['budget']:>6} {r['ttft_s'] * 1e3:8.1f} {r['tpot_s'] * 1e3:8.2f} "
            f"{r['tpot_s'] / hf:6.2f} {r['tpot_s'] / loop:6.2f} {r['hit_rate']:6.3f} {r['demand_bandwidth_gbps']:6.1f}"
        )
    if "copy_bandwidth" in rec:
        print(f"raw on-demand copies: {rec['copy_bandwidth']['gbps']:.1f} GB/s")


def plot(path: Path) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec = json.loads(path.read_text())
    runs = rec["runs"]
    labels = [f"{r['policy']}\n{r['budget']}" for r in runs]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax1.bar(labels, [r["tpot_s"] * 1e3 for r in runs], color="#4c72b0")
    hf, loop = plain_reference(rec)
    ax1.axhline(hf * 1e3, color="k", ls="--", label="transformers generate, all on GPU")
    ax1.axhline(loop * 1e3, color="gray", ls=":", label="plain model, finemoe's loop")
    ax1.set_ylabel("TPOT (ms)")
    ax1.set_title(f"{rec['config']['shape']} bf16, batch 1 — {rec['meta']['device']}")
    ax1.legend()
    ax2.bar(labels, [r["hit_rate"] for r in runs], color="#55a868")
    ax2.set_ylabel("expert hit rate")
    ax2.set_ylim(0, 1)
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
