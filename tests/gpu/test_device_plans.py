"""The device planner captured in CUDA graphs the way a graphed decode segment would hold it (a
side branch forked from the segment's stream and joined at its end), replayed layer by layer: the
same results as the planner run eagerly on CPU tensors."""

from __future__ import annotations

import pytest
import torch

from finemoe.device_plans import DevicePlanner
from finemoe.expert_map import ExpertMapStore, StoreGeometry


def test_planner_captured_on_a_side_branch_equals_the_cpu_planner():
    g = torch.Generator().manual_seed(11)
    L, E, C, k, d = 8, 16, 300, 4, 2
    dev = torch.device("cuda")
    store = ExpertMapStore(StoreGeometry(L, E, 4), capacity=C)
    store.add(torch.randn(200, 4, generator=g), torch.softmax(2 * torch.randn(200, L, E, generator=g), dim=-1))
    cpu = DevicePlanner(store.geometry, capacity=C, top_k=k)
    gpu = DevicePlanner(store.geometry, capacity=C, top_k=k, device=dev)
    cpu.load(store)
    gpu.load(store)
    probs = torch.zeros(E, device=dev, dtype=torch.bfloat16)  # the router's static output stand-in
    slots = torch.full((L, E), -1, device=dev, dtype=torch.int32)  # the device slot table stand-in
    slots[:, ::3] = 7  # every third expert resident
    x = torch.randn(64, 64, device=dev)  # the segment's own work
    side, seg = torch.cuda.Stream(), torch.cuda.Stream()
    graphs = []
    seg.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(seg):
        x @ x  # (warm-up of the matmul outside the capture)
        for layer in range(L - d):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=seg):
                here = torch.cuda.current_stream()
                side.wait_stream(here)  # fork
                with torch.cuda.stream(side):
                    if layer == 0:
                        gpu.begin()
                    gpu.step(layer, probs)
                    gpu.plan(layer + d, slots[layer + d])
                y = x @ x  # noqa: F841 (kernels the branch overlaps)
                here.wait_stream(side)  # join
            graphs.append(graph)
    torch.cuda.current_stream().wait_stream(seg)
    compared = 0
    for _ in range(3):  # three tokens through the same graphs
        traj = torch.softmax(2 * torch.randn(L, E, generator=g), dim=-1).to(torch.bfloat16)
        cpu.begin()
        for layer, graph in enumerate(graphs):
            probs.copy_(traj[layer])
            graph.replay()
            torch.cuda.synchronize()
            cpu.step(layer, traj[layer])
            cpu.plan(layer + d, slots[layer + d].cpu())
            want, got = cpu.read(), gpu.read()
            ratio = cpu.ratio[: store.size]
            top2 = torch.topk(ratio, 2).values
            if float(top2[0] - top2[1]) < 1e-5 * float(top2[0]):
                continue  # a near-tie: the GPU's sums may order it either way
            assert got.row == want.row
            assert got.score == pytest.approx(want.score, rel=1e-5)
            assert got.probs == pytest.approx(want.probs)
            if any(abs(c - (1.0 - want.score)) < 1e-5 for c in cpu._cum.tolist()):
                continue
            assert got.planned == want.planned and got.needed == want.needed
            assert all(e % 3 != 0 for e in got.needed)  # the resident ones filtered out
            compared += 1
    assert compared >= 10
