"""Does an on-demand expert copy wait behind prefetch copies already queued on another stream?

    python benchmarks/copy_contention_probe.py [--expert-mb 9] [--out FILE]

Measures, on the GPU, the latency from issuing one expert's host-to-device copy on a
high-priority stream to its completion: alone, behind N copies queued on a low-priority stream,
and behind N copies on the same stream. Pinned host memory, one expert per copy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_meta  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--expert-mb", type=float, default=9.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 1
    n = int(args.expert_mb * 2**20) // 2
    host = [torch.randn(n, dtype=torch.bfloat16).pin_memory() for _ in range(9)]
    dev = [torch.empty(n, dtype=torch.bfloat16, device="cuda") for _ in range(9)]
    hi = torch.cuda.Stream(priority=-1)
    lo = torch.cuda.Stream(priority=0)
    res: dict[str, float] = {}

    def demand_latency(queued: int, same: bool, chunks: int = 1) -> float:
        torch.cuda.synchronize()
        side = hi if same else lo
        with torch.cuda.stream(side):
            for i in range(queued):
                if chunks == 1:
                    dev[i].copy_(host[i], non_blocking=True)
                else:
                    for a, b in zip(dev[i].chunk(chunks), host[i].chunk(chunks), strict=True):
                        a.copy_(b, non_blocking=True)
        t0 = time.perf_counter()
        with torch.cuda.stream(hi):
            dev[8].copy_(host[8], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(hi)
        ev.synchronize()
        t = time.perf_counter() - t0
        torch.cuda.synchronize()
        return t

    for _ in range(3):
        demand_latency(0, False)
    for case, (q, same, ch) in {
        "alone": (0, False, 1),
        "behind 2 other-stream": (2, False, 1),
        "behind 4 other-stream": (4, False, 1),
        "behind 8 other-stream": (8, False, 1),
        "behind 4 same-stream": (4, True, 1),
        "behind 4 other-stream, 8 chunks each": (4, False, 8),
    }.items():
        ts = sorted(demand_latency(q, same, ch) for _ in range(9))
        res[case] = ts[len(ts) // 2] * 1e3
        print(f"{case:40s} {res[case]:7.3f} ms (median of 9)")
    if args.out:
        rec = {"meta": run_meta(), "expert_mb": args.expert_mb, "demand_ms": res}
        Path(args.out).write_text(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
