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


def test_fused_match_catch_up_from_logits_equals_the_torch_ops_in_a_graph():
    """The fused Triton catch-up (`fused_match`, the side graphs' match for softmax routing), captured
    in one CUDA graph per layer and replayed token after token from bf16 logits at fixed addresses:
    the same running sums, best row and score per layer as `DevicePlanner.step` on the softmax of the
    same logits, whether each layer's graph runs in turn or one graph catches several layers up (the
    deferred matches); on an exact tie across row tiles the first row wins, as torch.max picks it."""
    from finemoe import fused_match

    if not fused_match.available(torch.device("cuda")):
        pytest.fail("Triton is missing on a CUDA machine: the fused match step cannot run")
    g = torch.Generator().manual_seed(5)
    L, E, C = 6, 60, 1002  # C not a multiple of 4; E = 60: several row tiles per layer
    dev = torch.device("cuda")
    store = ExpertMapStore(StoreGeometry(L, E, 4), capacity=C)
    maps = torch.softmax(2 * torch.randn(700, L, E, generator=g), dim=-1)
    maps[650] = maps[10]  # an exact duplicate in a later row tile: row 10 must win whenever it is best
    store.add(torch.randn(700, 4, generator=g), maps)
    ref = DevicePlanner(store.geometry, capacity=C, top_k=4, device=dev)
    fused = DevicePlanner(store.geometry, capacity=C, top_k=4, device=dev)
    ref.load(store)
    fused.load(store)
    logits = torch.zeros(L, 1, E, device=dev, dtype=torch.bfloat16)  # the routers' static outputs stand-in
    fused.bind_logits(list(logits.unbind(0)))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graphs = []
    with torch.cuda.stream(side):
        fused.restart()
        fused.catch_up(L - 1)  # Triton compiles outside the capture
        restart = torch.cuda.CUDAGraph()
        with torch.cuda.graph(restart, stream=side):
            fused.restart()
        for layer in range(L):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side):
                fused.catch_up(layer)
            graphs.append(graph)
    torch.cuda.current_stream().wait_stream(side)
    compared = 0
    for token in range(6):
        traj = (3 * torch.randn(L, E, generator=g)).to(torch.bfloat16)
        traj[:, 0] = traj[:, 0] + 4  # some tokens lean on one expert
        logits.copy_(traj.view(L, 1, E))
        restart.replay()
        # every layer in turn, or only some: the launches skipped are caught up by the next one
        launched = set(range(L)) if token % 2 == 0 else {1, 4, L - 1}
        for layer in sorted(launched):
            graphs[layer].replay()
        graphs[L - 1].replay()  # nothing left to catch up: only `packed` rewritten
        torch.cuda.synchronize()
        assert int(fused.state) == L - 1
        ref.begin()
        for layer in range(L):
            ref.step(layer, torch.softmax(traj[layer].to(dev).float(), dim=-1))
            want = ref.read()
            best, row, q_sq = fused.rows[layer].tolist()
            assert q_sq == pytest.approx(float(ref.q_sq), rel=1e-5)
            assert row != 650  # the duplicate never beats its first copy
            ratio = ref.ratio[: store.size].cpu()
            top = torch.topk(torch.cat([ratio[:650], ratio[651:]]), 2).values
            if float(top[0] - top[1]) < 1e-5 * float(top[0]):
                continue  # a near-tie between distinct rows: either order is right
            assert int(row) == want.row
            assert best / max(q_sq**0.5, 1e-12) == pytest.approx(want.score, rel=1e-5)
            compared += 1
        assert torch.allclose(fused.dot, ref.dot, rtol=1e-5, atol=1e-7)
        assert fused.packed.tolist() == fused.rows[L - 1].tolist()
        graphs[1].replay()  # an earlier layer, already in the sums: its row into `packed`, the state kept
        torch.cuda.synchronize()
        assert fused.packed.tolist() == fused.rows[1].tolist() and int(fused.state) == L - 1
    assert compared >= 18
