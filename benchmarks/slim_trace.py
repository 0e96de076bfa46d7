"""Copy the first N requests of a routing trace, optionally without its speculative router
outputs, to carry it to the GPU machine (64 MiB per call). Trace routing needs `spec1`/`spec2`
for the speculative baselines, so keep them unless space forbids.

    python benchmarks/slim_trace.py q128x8.fmt gpu_traces/q128x8_test.fmt --requests 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from finemoe.trace import load_trace  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("out")
    ap.add_argument("--requests", type=int, required=True)
    ap.add_argument("--drop-speculative", action="store_true")
    args = ap.parse_args()
    t = load_trace(args.trace)
    s = t.head(args.requests)
    if args.drop_speculative:
        s.spec_probs = {}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    s.save(args.out)
    print(f"{args.out}: {s.num_requests} requests, {Path(args.out).stat().st_size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
