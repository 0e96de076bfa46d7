"""The CPU engine's decode step with and without gathering a layer's experts into scratch, and
with decode calls as gathered weights and two bmm (`runtime.batched_max_pairs`, the default).

torch's CPU grouped_mm walks every group of the slot pool, empty ones included (~2.3 us each on
the 2-core machine), so without the gather a decode call over a 192-slot pool pays for ~190 empty
groups twice per layer. Both arms run in one process on one engine, interleaved per round
(`runtime.cpu_gather_max` = 0 turns the gather off, `batched_max_pairs` = 0 the batched calls),
same prompts, greedy:

    python benchmarks/cpu_gather.py --out docs/results/cpu_gather.json
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import write_record  # noqa: E402
from finemoe import Engine, SamplingParams, reference  # noqa: E402
from finemoe.workload import load_workload  # noqa: E402

log = logging.getLogger("cpu_gather")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="checkpoint (default: the reference model)")
    ap.add_argument("--budget", default="40%")
    ap.add_argument("--policy", default="lru")
    ap.add_argument("--prompts", type=int, default=3, help="test-split prompts per round")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="docs/results/cpu_gather.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    model = args.model or str(reference.ensure_built())
    prompts = [p.prompt for p in load_workload(split="test")[: args.prompts]]
    params = SamplingParams(max_new_tokens=args.tokens, ignore_eos=True)
    arms = ("no gather", "gather", "batched")
    steps: dict[str, list[float]] = {arm: [] for arm in arms}
    tokens: dict[str, list[list[int]]] = {}
    with Engine.from_pretrained(model, expert_budget=args.budget, policy=args.policy, progress=False) as eng:
        auto, batched = eng.runtime.cpu_gather_max, eng.runtime.batched_max_pairs
        eng.generate(prompts[0], params)  # warm-up
        for rnd in range(args.rounds):
            for arm in arms if rnd % 2 == 0 else arms[::-1]:
                eng.runtime.cpu_gather_max = 0 if arm == "no gather" else auto
                eng.runtime.batched_max_pairs = batched if arm == "batched" else 0
                for p in prompts:
                    out = eng.generate(p, params)[0]
                    t = out.token_times_s
                    steps[arm] += [b - a for a, b in zip(t, t[1:], strict=False)]
                    tokens.setdefault(arm, []).append(out.token_ids)
            log.info("round %d/%d done", rnd + 1, args.rounds)
        slots = eng.cache.num_slots
    same = tokens["gather"] == tokens["no gather"] == tokens["batched"]
    med = {arm: statistics.median(v) for arm, v in steps.items()}
    results = {
        arm: {"median_step_ms": med[arm] * 1e3, "mean_step_ms": statistics.fmean(v) * 1e3, "steps": len(v)}
        for arm, v in steps.items()
    }
    results["gather_over_no_gather"] = med["gather"] / med["no gather"]
    results["batched_over_gather"] = med["batched"] / med["gather"]
    results["same_tokens"] = same
    cfg = vars(args) | {
        "slots": slots,
        "cpu_gather_max": auto,
        "batched_max_pairs": batched,
        "threads": torch.get_num_threads(),
    }
    write_record(args.out, cfg, results)
    print(
        f"{slots} slots, gather up to {auto} experts: median decode step {med['gather'] * 1e3:.1f} ms with, "
        f"{med['no gather'] * 1e3:.1f} ms without ({results['gather_over_no_gather']:.2f}x); batched decode calls "
        f"{med['batched'] * 1e3:.1f} ms ({results['batched_over_gather']:.2f}x the gather); same tokens: {same}"
    )
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
