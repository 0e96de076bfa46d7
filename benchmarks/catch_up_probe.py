"""What the fused match (`fused_match.catch_up`) costs on the GPU: one layer, or many layers caught
up in one launch (the side graphs' deferred matches), per shape and tile configuration (GPU only).

Each case is a CUDA graph holding one catch-up (after a captured `restart` and a catch-up to the
layer before the first one timed, so the timed launch does exactly `layers` layers), replayed
`--replays` times back to back and timed with CUDA events (median of `--repeat` blocks): µs per
catch-up, and per layer. The kernel is one program, so the figures are one SM's time. Writes a
JSON record:

    PYTHONPATH=src python benchmarks/catch_up_probe.py --out "$OUT/catch_up_probe.json"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_meta  # noqa: E402
from device_match_probe import time_replays  # noqa: E402
from finemoe.device_plans import DevicePlanner  # noqa: E402
from finemoe.expert_map import ExpertMapStore, StoreGeometry  # noqa: E402

SHAPES = {"reference": (30, 16), "qwen1.5-moe-a2.7b": (24, 60), "qwen3-30b-a3b": (48, 128)}  # (MoE layers, experts)


def planner_for(layers: int, experts: int, capacity: int, device: torch.device) -> tuple[DevicePlanner, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    store = ExpertMapStore(StoreGeometry(layers, experts, 8), capacity=capacity)
    store.add(
        torch.randn(capacity, 8, generator=g), torch.softmax(torch.randn(capacity, layers, experts, generator=g), -1)
    )
    planner = DevicePlanner(store.geometry, capacity, top_k=2, device=device)
    planner.load(store)
    logits = torch.randn(layers, 1, experts, generator=g).to(device, torch.bfloat16)
    planner.bind_logits(list(logits.unbind(0)))
    return planner, logits


def time_case(planner: DevicePlanner, first: int, last: int, replays: int, repeat: int, **knobs) -> float:
    """µs per launch of a catch-up from layer `first` through `last` (the sums reset to `first` - 1
    before each, outside the timed launch's share: the reset graph is timed alone and subtracted)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())

    def setup() -> None:
        planner.restart()
        if first > 0:
            planner.catch_up(first - 1, **knobs)

    with torch.cuda.stream(side):
        setup()
        planner.catch_up(last, **knobs)  # (compiles outside the capture)
        base, case = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(base, stream=side):
            setup()
        with torch.cuda.graph(case, stream=side):
            setup()
            planner.catch_up(last, **knobs)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    return time_replays(case, replays, repeat) - time_replays(base, replays, repeat)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--capacity", type=int, default=1000, help="map store rows")
    ap.add_argument("--configs", default="default,64x4,256x4,256x8,1024x8,1024x16", help="BLOCK_Cxwarps, or default")
    ap.add_argument("--replays", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default="docs/results/catch_up_probe.json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    results = []
    print(f"{'shape':<20} {'config':<10} {'layers':>6} {'us':>9} {'us/layer':>9}")
    for shape in args.shapes.split(","):
        L, E = SHAPES[shape]
        planner, _ = planner_for(L, E, args.capacity, dev)
        for config in args.configs.split(","):
            knobs = {}
            if config != "default":
                bc, nw = (int(x) for x in config.split("x"))
                if bc * (1 << (E - 1).bit_length()) > 65536:
                    continue  # (too many registers)
                knobs = {"block_c": bc, "num_warps": nw}
            for first, last in ((L // 2, L // 2), (L // 2 - 3, L // 2), (0, L - 5)):
                us = time_case(planner, first, last, args.replays, args.repeat, **knobs)
                n = last - first + 1
                results.append({"shape": shape, "config": config, "layers": n, "us": us})
                print(f"{shape:<20} {config:<10} {n:>6} {us:>9.2f} {us / n:>9.2f}")
    record = {"meta": run_meta(), "config": vars(args), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
