"""The FineMoE predictor's cost on the forward thread, per decode iteration, against the decode
iteration time of the 100%-budget run without a predictor (issue target: <= 2%).

A random-weight model of a real shape (weights do not change the predictor's work: that depends
on L, E, the embedding width and the store size), a map store filled to capacity by recording
random prompts, then batch-1 greedy decoding. Runs on CPU and on the GPU machine:

    python benchmarks/predictor_overhead.py --shape reference --device cpu --out docs/results/overhead_cpu.json
    PYTHONPATH=src python benchmarks/predictor_overhead.py --shape reference --device cuda --dtype bfloat16 \\
        --out docs/results/overhead_gpu_reference.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import run_meta, shape_config  # noqa: E402
from finemoe import Engine, SamplingParams  # noqa: E402
from finemoe.synthetic import random_model  # noqa: E402

log = logging.getLogger("predictor_overhead")


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab - 10, (length,), generator=g).tolist() for _ in range(n)]


def decode(eng: Engine, ps: list[list[int]], new: int) -> dict:
    """Median decode-step time (ms) and the predictor's forward-thread ms per decode iteration."""
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    eng.generate(ps[0], params)  # warm-up
    rt = eng.runtime
    c0, n0 = rt.critical_decode_s, rt.decode_iterations
    steps = []
    for p in ps:
        out = eng.generate(p, params)[0]
        t = out.token_times_s
        steps += [b - a for a, b in zip(t[1:], t[2:], strict=False)]
    n = rt.decode_iterations - n0
    st = eng.stats()
    return {
        "step_ms": statistics.median(steps) * 1e3,
        "predictor_ms_per_decode_iteration": (rt.critical_decode_s - c0) / n * 1e3 if n else 0.0,
        "decode_iterations": n,
        "hit_rate": st.cache.hit_rate,
        "search": eng.search_mode,
        "search_thread_s": st.extra.get("search_thread_s"),
        "contexts_dropped": st.extra.get("contexts_dropped"),
        "map_store_size": eng.maps.size,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="reference")
    ap.add_argument("--layers", type=int, help="override the number of layers")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--history", type=int, default=40, help="random prompts recorded into the store")
    ap.add_argument("--prompts", type=int, default=4, help="prompts measured per configuration")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--out", default="docs/results/overhead.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = shape_config(args.shape, args.layers)
    model = random_model(cfg, dtype=getattr(torch, args.dtype), device=args.device)
    store = Path(tempfile.mkdtemp()) / "maps.fms"
    eng = Engine.from_model(model, expert_budget="100%", policy="finemoe", map_store=str(store), progress=False)
    hist = prompts(args.history, args.prompt_len, cfg.vocab_size, seed=1)
    eng.generate(hist, SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True))  # recording
    log.info("map store: %d maps (capacity %d)", eng.maps.size, eng.maps.capacity)
    test = prompts(args.prompts, args.prompt_len, cfg.vocab_size, seed=2)
    rec: dict = {"meta": run_meta(), "config": vars(args), "results": {}}
    runs = [
        ("all-gpu 100%", dict(policy="all-gpu", map_store_learn=False)),
        ("finemoe sync", dict(policy="finemoe", expert_budget=args.budget, search="sync", map_store_learn=False)),
        ("finemoe async", dict(policy="finemoe", expert_budget=args.budget, search="async", map_store_learn=False)),
        ("mixtral-offloading", dict(policy="mixtral-offloading", expert_budget=args.budget)),
        ("lru", dict(policy="lru", expert_budget=args.budget)),
    ]
    for name, kw in runs:
        eng.reconfigure(**kw)
        rec["results"][name] = r = decode(eng, test, args.new_tokens)
        log.info("%s: %s", name, r)
    base = rec["results"]["all-gpu 100%"]["step_ms"]
    for r in rec["results"].values():
        r["predictor_share_of_100pct_step"] = r["predictor_ms_per_decode_iteration"] / base
    eng.config = eng.config.__class__(**{**eng.config.__dict__, "map_store": None})  # do not save
    eng.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=1))
    print(f"{'run':<20} {'step ms':>8} {'predictor ms/it':>15} {'share of 100% step':>18} {'hit':>6}")
    for k, r in rec["results"].items():
        print(
            f"{k:<20} {r['step_ms']:>8.2f} {r['predictor_ms_per_decode_iteration']:>15.3f} "
            f"{r['predictor_share_of_100pct_step']:>18.2%} {r['hit_rate']:>6.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
