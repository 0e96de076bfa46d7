"""What a trajectory match on the GPU would cost a graphed decode segment (design probe for the
device-resident planning of docs/design/device_plans.md; GPU only).

A stand-in segment of a real shape's batch-1 decode layer (its top-k experts' three GEMVs each and
an attention-sized GEMV block, bf16) is captured in a CUDA graph four ways and replayed many times:

- `segment`: the layer alone;
- `match, main stream`: then the trajectory match of one layer on the same stream (the running dot
  products over the store `addmv_`, the query's squared norm, the ratio to the stored prefix norms,
  the best row and its ratio written to a static buffer);
- `match, side branch`: the same match forked onto a second stream at the segment's start and
  joined at its end, so it may overlap the layer's kernels;
- `match alone`: the match's kernels without the layer;
- `gate, side branch` (session 26): the speculative gate as `graph_gates` captures it, forked onto
  its own stream: the next router's linear map on the layer's input, softmax, and a copy of the
  probabilities into a pinned host row inside the graph;
- `match + gate, two branches`: both, each on its own side stream (what the engine does);
- `match + gate, one branch`: both on one side stream, one after the other.

Three figures per variant: µs per replay back to back (CUDA events, median of `--repeat` timed
blocks: the GPU's time); the host time of the `replay()` call alone (the launch: it grows with the
graph's nodes); and µs per iteration of the engine's per-layer loop, `replay()` then a blocking
copy of the routed ids to the host (launch, GPU time, the copy and the host's wake-up: what a
graphed decode layer costs when the host does nothing else). Writes a JSON record:

    PYTHONPATH=src python benchmarks/device_match_probe.py --out "$OUT/device_match_probe.json"
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_meta  # noqa: E402

# (hidden, expert intermediate, top-k, experts, MoE layers): the configs' numbers (Hugging Face
# config.json of each model; the reference shape is this project's reference model)
SHAPES = {
    "qwen3-30b-a3b": (2048, 768, 8, 128, 48),
    "qwen1.5-moe-a2.7b": (2048, 1408, 4, 60, 24),
    "reference": (576, 256, 4, 16, 30),
}


class Segment:
    """Static tensors of one stand-in decode layer and of a one-layer trajectory match."""

    def __init__(self, shape: str, capacity: int, device: torch.device) -> None:
        h, i, k, e, _ = SHAPES[shape]
        g = torch.Generator(device="cpu").manual_seed(0)

        def rnd(*s: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
            return (torch.randn(*s, generator=g) * 0.02).to(device, dtype)

        self.x = rnd(1, h)  # [1, H]
        self.attn = [rnd(h, h) for _ in range(4)]  # q, k, v, o stand-ins [H, H]
        self.experts = [(rnd(2 * i, h), rnd(h, i)) for _ in range(k)]  # gate_up [2I, H], down [H, I]
        self.out = torch.zeros(1, h, device=device, dtype=torch.bfloat16)
        self.maps = torch.rand(capacity, e, generator=g).to(device)  # [C, E] float32, one layer's store slice
        self.norm = torch.rand(capacity, generator=g).to(device) + 0.5  # [C] prefix norms
        self.probs = torch.softmax(torch.randn(e, generator=g), 0).to(device)  # [E] this layer's router probs
        self.dot = torch.zeros(capacity, device=device)  # [C] running dot products
        self.q = torch.zeros(1, device=device)  # [1] running squared norm of the query
        self.ratio = torch.zeros(capacity, device=device)  # [C]
        self.best = torch.zeros(2, device=device)  # [2] (best ratio, its row) for the host copy
        self.router = rnd(e, h)  # [E, H] the next layer's router weight (the speculative gate)
        self.gate_host = torch.zeros(1, e, pin_memory=True)  # [1, E] float32, written inside the graph
        self.ids = torch.arange(k, device=device).view(1, k)  # [1, k] the routed ids the host syncs on

    def layer(self) -> None:
        y = self.x
        for w in self.attn:
            y = torch.nn.functional.linear(y, w)
        acc = torch.zeros_like(y)
        for w1, w2 in self.experts:
            gu = torch.nn.functional.linear(y, w1)
            a, b = gu.chunk(2, dim=-1)
            acc = acc + torch.nn.functional.linear(torch.nn.functional.silu(a) * b, w2)
        self.out.copy_(acc)

    def gate(self) -> None:
        probs = torch.softmax(torch.nn.functional.linear(self.x, self.router).float(), dim=-1)  # [1, E]
        self.gate_host.copy_(probs, non_blocking=True)

    def match(self) -> None:
        p = self.probs
        self.dot.addmv_(self.maps, p)
        self.q.add_(torch.dot(p, p))
        torch.div(self.dot, self.norm, out=self.ratio)
        v, i = self.ratio.max(dim=0)
        self.best[0].copy_(v)
        self.best[1].copy_(i)


def _branch(here: torch.cuda.Stream, side: torch.cuda.Stream, *work) -> None:
    """Fork `side` from `here`, run `work` on it (the caller joins)."""
    side.wait_stream(here)
    with torch.cuda.stream(side):
        for fn in work:
            fn()


def capture(seg: Segment, variant: str, side: torch.cuda.Stream, side2: torch.cuda.Stream) -> torch.cuda.CUDAGraph:
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up outside the capture (allocations, kernel selection)
            seg.layer()
            seg.match()
            seg.gate()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, stream=stream):
            if variant == "segment":
                seg.layer()
            elif variant == "match, main stream":
                seg.layer()
                seg.match()
            elif variant == "match, side branch":
                here = torch.cuda.current_stream()
                side.wait_stream(here)  # fork
                with torch.cuda.stream(side):
                    seg.match()
                seg.layer()
                here.wait_stream(side)  # join
            elif variant == "match alone":
                seg.match()
            elif variant == "gate, side branch":
                here = torch.cuda.current_stream()
                _branch(here, side2, seg.gate)
                seg.layer()
                here.wait_stream(side2)
            elif variant == "match + gate, two branches":
                here = torch.cuda.current_stream()
                _branch(here, side, seg.match)
                _branch(here, side2, seg.gate)
                seg.layer()
                here.wait_stream(side)
                here.wait_stream(side2)
            elif variant == "match + gate alone":  # a side graph of its own (the engine since session 27)
                seg.match()
                seg.gate()
            elif variant == "match + gate, one branch":
                here = torch.cuda.current_stream()
                _branch(here, side, seg.match, seg.gate)
                seg.layer()
                here.wait_stream(side)
    torch.cuda.synchronize()
    return graph


def time_replays(graph: torch.cuda.CUDAGraph, n: int, repeat: int) -> float:
    """Median µs per replay over `repeat` blocks of `n` back-to-back replays."""
    out = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(n):
            graph.replay()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) * 1e3 / n)
    return statistics.median(out)


def time_launches(graph: torch.cuda.CUDAGraph, n: int) -> float:
    """Median host µs of the `replay()` call itself (the device idle before each)."""
    out = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph.replay()
        out.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(out) * 1e6


def time_layer_loop(graph: torch.cuda.CUDAGraph, ids: torch.Tensor, n: int, repeat: int) -> float:
    """Median µs per iteration of `replay()` then a blocking copy of `ids` to the host (the
    engine's per-layer critical path when the host does nothing else)."""
    out = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            graph.replay()
            ids.to("cpu")
        out.append((time.perf_counter() - t0) / n)
    return statistics.median(out) * 1e6


def time_detached(
    segment: torch.cuda.CUDAGraph,
    side_graph: torch.cuda.CUDAGraph,
    side: torch.cuda.Stream,
    ids: torch.Tensor,
    n: int,
    repeat: int,
) -> tuple[float, float]:
    """The engine's per-layer loop with the predictors' work as a graph of its own (session 27):
    replay the segment, replay `side_graph` on `side` after it, wait for the side graph's event (the
    host reads its results), then the blocking ids copy. Median µs per iteration and of the wait:
    a wait near the segment's GPU time means the side graph ran after the segment, not beside it."""
    loops, waits = [], []
    done = torch.cuda.Event()
    for _ in range(repeat):
        torch.cuda.synchronize()
        waited = 0.0
        t0 = time.perf_counter()
        for _ in range(n):
            segment.replay()
            with torch.cuda.stream(side):
                side_graph.replay()
            done.record(side)
            tw = time.perf_counter()
            done.synchronize()
            waited += time.perf_counter() - tw
            ids.to("cpu")
        loops.append((time.perf_counter() - t0) / n)
        waits.append(waited / n)
    return statistics.median(loops) * 1e6, statistics.median(waits) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="qwen3-30b-a3b,reference")
    ap.add_argument("--capacity", type=int, default=1000, help="map store rows")
    ap.add_argument("--replays", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--out", default="docs/results/device_match_probe.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("device_match_probe needs CUDA", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    side, side2 = torch.cuda.Stream(), torch.cuda.Stream()
    variants = [
        "segment",
        "match, main stream",
        "match, side branch",
        "match alone",
        "gate, side branch",
        "match + gate, two branches",
        "match + gate, one branch",
        "match + gate alone",
    ]
    rec: dict = {"meta": run_meta(), "config": vars(args), "results": {}, "launch_us": {}, "layer_loop_us": {}}
    print(f"{'shape':<20} {'variant':<28} {'GPU µs/replay':>14} {'launch µs':>10} {'layer loop µs':>14}")
    for shape in args.shapes.split(","):
        seg = Segment(shape, args.capacity, dev)
        graphs = {v: capture(seg, v, side, side2) for v in variants}
        got = {v: time_replays(g, args.replays, args.repeat) for v, g in graphs.items()}
        launch = {v: time_launches(g, args.replays) for v, g in graphs.items()}
        loop = {v: time_layer_loop(g, seg.ids, args.replays, args.repeat) for v, g in graphs.items()}
        rec["results"][shape], rec["launch_us"][shape], rec["layer_loop_us"][shape] = got, launch, loop
        for v in variants:
            print(f"{shape:<20} {v:<28} {got[v]:>14.2f} {launch[v]:>10.2f} {loop[v]:>14.2f}")
        detached = {}
        for name, stream in (("normal", torch.cuda.Stream()), ("high priority", torch.cuda.Stream(priority=-1))):
            loop_us, wait_us = time_detached(
                graphs["segment"], graphs["match + gate alone"], stream, seg.ids, args.replays, args.repeat
            )
            detached[name] = {"layer_loop_us": loop_us, "side_wait_us": wait_us}
            print(f"{shape:<20} detached side graph, {name} stream: layer loop {loop_us:.2f} µs, wait {wait_us:.2f} µs")
        rec.setdefault("detached", {})[shape] = detached
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
