"""Tables and plots of `bench_offload.py` records (one JSON record -> a printed table, a PNG)."""

from __future__ import annotations

import json
from pathlib import Path


def reference(rec, name):
    return next(r for r in rec["runs"] if r["policy"] == name)


def _own_columns(r) -> str:
    if r is None:
        return f" {'-':>8} {'-':>7}"
    hit = f"{r['hit_rate']:7.3f}" if "hit_rate" in r else f"{'-':>7}"
    return f" {r['tpot_s'] * 1e3:8.2f} {hit}"


def print_table(rec):
    gen = reference(rec, "transformers-generate")["tpot_s"]
    loop = next((r["tpot_s"] for r in rec["runs"] if r["policy"] == "transformers+finemoe-loop"), float("nan"))
    # the same configurations with the model's own routing (bench_offload --own-routing), by (policy, budget)
    own = {(r["policy"], r["budget"]): r for r in rec.get("own_routing_runs") or []}
    print(
        f"\n{rec['config']['shape']} ({rec['config']['dtype']}) on {rec['meta']['device']}, "
        f"{rec['config']['repeats']} interleaved rounds, routing: {rec['config'].get('routing', '?')}"
    )
    print(
        f"{'config':<26} {'budget':>6} {'ttft ms':>8} {'tpot ms':>8} {'e2e s':>6} {'x gen':>6} {'x loop':>6} "
        f"{'hit':>6} {'prec':>5} {'stall/tok ms':>12} {'peak GiB':>8} {'GB/s':>6} {'late':>6} {'pred ms':>7} "
        f"{'sync ms':>7} {'gc ms':>5} {'win':>3} {'pf pred':>7} {'pf sync':>7}"
        + (f" {'own tpot':>8} {'own hit':>7}" if own else "")
    )
    for r in rec["runs"]:
        eng = "hit_rate" in r
        extra = (
            f"{r['hit_rate']:6.3f} {r['prefetch_precision']:5.2f} {r.get('stall_per_token_s', 0) * 1e3:12.2f} "
            f"{r['peak_gpu_bytes'] / 2**30:8.1f} {r['demand_bandwidth_gbps']:6.1f} "
            f"{r.get('prefetches_late', 0):6d} {r.get('predictor_ms_per_decode_step') or 0:7.2f} "
            f"{r.get('sync_ms_per_decode_step') or 0:7.2f} {r.get('gc_ms_per_token', float('nan')):5.2f} "
            f"{r.get('window', {}).get('prefetch_window_limit', '-'):>3} "
            f"{r.get('predictor_ms_per_prefill', float('nan')):7.1f} {r.get('sync_ms_per_prefill', float('nan')):7.1f}"
            if eng
            else f"{'-':>6} {'-':>5} {'-':>12} {r.get('peak_gpu_bytes', 0) / 2**30:8.1f} {'-':>6}"
        )
        print(
            f"{r['policy']:<26} {r['budget'] or '-':>6} {r['ttft_s'] * 1e3:8.1f} {r['tpot_s'] * 1e3:8.2f} "
            f"{r.get('e2e_s', 0):6.2f} {r['tpot_s'] / gen:6.2f} {r['tpot_s'] / loop:6.2f} {extra}"
            + (_own_columns(own.get((r["policy"], r["budget"]))) if own else "")
        )
    if "copy_bandwidth" in rec:
        cb = rec["copy_bandwidth"]
        print(
            f"raw on-demand copies: {cb['gbps']:.1f} GB/s "
            f"({cb['experts']} experts of {cb['expert_bytes'] / 1e6:.1f} MB)"
        )
    sv = rec.get("serving")
    if sv:
        print(
            f"online serving, batch 1 FCFS, Poisson {sv['rate_rps']:.3f} req/s, "
            f"{sv['requests']} requests, {sv['budget']}"
        )
        print(f"{'policy':<20} {'p50 s':>7} {'p90 s':>7} {'max s':>7} {'mean TTFT s':>11} {'service s':>9} {'util':>5}")
        for name, r in sv["policies"].items():
            print(
                f"{name:<20} {r['latency_p50_s']:7.2f} {r['latency_p90_s']:7.2f} {r['latency_max_s']:7.2f} "
                f"{r['ttft_mean_s']:11.2f} {r['service_mean_s']:9.2f} {r['utilisation']:5.2f}"
            )


def plot(path: Path) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec = json.loads(path.read_text())
    runs = [r for r in rec["runs"] if r["budget"]]
    eng_runs = [r for r in runs if "hit_rate" in r]
    sv = rec.get("serving")
    ncols = 4 if sv else 3
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4.8))
    ax1, ax2, ax4 = axes[0], axes[1], axes[2]
    ax1.bar([f"{r['policy']}\n{r['budget']}" for r in runs], [r["tpot_s"] * 1e3 for r in runs], color="#4c72b0")
    ax1.axhline(
        reference(rec, "transformers-generate")["tpot_s"] * 1e3, color="k", ls="--", label="transformers, all on GPU"
    )
    if any(r["policy"] == "accelerate" for r in runs):
        ax1.set_yscale("log")
    ax1.set_ylabel("TPOT, median step (ms)")
    ax1.set_title(f"{rec['config']['shape']} {rec['config']['dtype']}, batch 1 — {rec['meta']['device']}", fontsize=9)
    ax1.legend(fontsize=8)
    ax2.bar([f"{r['policy']}\n{r['budget']}" for r in eng_runs], [r["hit_rate"] for r in eng_runs], color="#55a868")
    ax2.set_ylabel("expert hit rate")
    ax2.set_ylim(0, 1.05)
    trace = str(rec["config"].get("routing", "")).startswith("trace")
    ax2.set_title("hit rate (" + ("trace routing" if trace else "random weights: optimistic") + ")", fontsize=9)
    ax4.bar([f"{r['policy']}\n{r['budget']}" for r in runs], [r["ttft_s"] * 1e3 for r in runs], color="#c44e52")
    ax4.set_ylabel("TTFT (ms)")
    ax4.set_title("time to first token (prefill)", fontsize=9)
    for ax in (ax1, ax2, ax4):
        ax.tick_params(axis="x", labelsize=7, rotation=90)
    if sv:
        ax3 = axes[3]
        for name, r in sv["policies"].items():
            lat = sorted(q["latency_s"] for q in r["requests"])
            ax3.step(lat, [(i + 1) / len(lat) for i in range(len(lat))], where="post", label=name)
        ax3.set_xlabel("request latency (s)")
        ax3.set_ylabel("CDF")
        ax3.set_title(f"online, Poisson {sv['rate_rps']:.2f} req/s, {sv['budget']} budget", fontsize=9)
        ax3.legend(fontsize=8)
    fig.tight_layout()
    png = path.with_suffix(".png")
    fig.savefig(png, dpi=120)
    print(png)
    print_table(rec)
    return 0
