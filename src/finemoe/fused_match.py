"""One Triton kernel for the trajectory match (`device_plans.DevicePlanner.step`) of one or more
layers from the routers' logits, for softmax-routed families.

The torch ops of `step` (the routing softmax, a cast, two matrix-vector products, a division, a
max over the store's rows, a cast into the packed result) are ~9 kernels per layer on the GPU:
replayed beside a graphed decode segment they lengthen its kernels (~7 µs per segment on the H200
for the reference shape, `benchmarks/decode_gpu_timeline.py`). This kernel is one program (one SM)
that *catches up*: from the layer after the last one in the running sums (`state`, -1 at an
iteration's start) through layer `last`, it does in float32, per layer j,

    p = softmax(logits_j)                                 [E]
    dot[c] += sum_e maps[j, c, e] * p[e]                  [C] (from zero at layer 0)
    q_sq   += sum_e p[e]^2
    best, row = max_c dot[c] / norms[j, c], the first such c (norms +inf past the valid rows: ratio 0)

and writes (best, row, q_sq) into `rows[j]` [3]; then `rows[last]` into `packed` [3] and `last`
into `state`. The logits of layer j are read through a table of addresses (`table[j]`, the routers'
static outputs in a captured decode step), so one launch may cover every layer a graphed step ran
ahead of its routing sync without a match (`side_graphs.SideGraphs`, deferred matches) and a
launch with nothing left to do only copies `rows[last]`. Summation order differs from cuBLAS's, so
scores agree to float32 rounding and the best row up to near-exact ties, as the torch path's do with
the host search. Triton is optional: without it (or off CUDA) `available()` is False and the planner
keeps its torch ops.
"""

from __future__ import annotations

import torch

try:  # optional: Triton ships with CUDA builds of torch; CPU builds (and CI) go without
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

MAX_EXPERTS = 1024  # one block holds a row of routed experts
TILE_ELEMENTS = 32768  # at most store rows x experts per loop step beyond 128 experts (`tile_rows`)


def available(device: torch.device) -> bool:
    """Whether the fused step can run on `device` (CUDA with Triton installed)."""
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit(do_not_specialize=["last"])
    def _catch_up(
        table_ptr,  # [L] int64: layer j's logits address ([E] contiguous, any float dtype)
        like_ptr,  # one layer's logits: the element type every address in `table` points to
        maps_ptr,  # [L, C, E] float32 contiguous: the store's maps, layer-major
        norms_ptr,  # [L, C] float32: the rows' prefix norms (+inf past the valid rows)
        dot_ptr,  # [C] float32: the running dot products (in/out)
        rows_ptr,  # [L, 3] float32: per layer (best ratio, its row, the query's running squared norm)
        packed_ptr,  # [3] float32: rows[last]
        state_ptr,  # [1] int32: the last layer in the running sums (-1: none yet)
        last,  # the layer to reach
        C,
        E,
        BLOCK_C: tl.constexpr,
        BLOCK_E: tl.constexpr,
    ):
        start = tl.load(state_ptr) + 1
        offs_e = tl.arange(0, BLOCK_E)
        in_e = offs_e < E
        q_sq = tl.load(rows_ptr + (start - 1) * 3 + 2, mask=start > 0, other=0.0)
        for j in range(start, last + 1):
            logits = tl.load(table_ptr + j).to(like_ptr.dtype)
            x = tl.load(logits + offs_e, mask=in_e, other=-float("inf")).to(tl.float32)
            x = x - tl.max(x, axis=0)
            ex = tl.where(in_e, tl.exp(x), 0.0)
            p = ex / tl.sum(ex, axis=0)  # [BLOCK_E]
            q_sq += tl.sum(p * p, axis=0)
            best = -float("inf")
            best_row = 0
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                in_c = offs_c < C
                tile = maps_ptr + j * C * E + offs_c[:, None] * E + offs_e[None, :]
                m = tl.load(tile, mask=in_c[:, None] & in_e[None, :], other=0.0)
                d = tl.sum(m * p[None, :], axis=1)  # [BLOCK_C]
                d += tl.load(dot_ptr + offs_c, mask=in_c & (j > 0), other=0.0)
                tl.store(dot_ptr + offs_c, d, mask=in_c)
                n = tl.load(norms_ptr + j * C + offs_c, mask=in_c, other=float("inf"))
                r = tl.where(in_c, d / n, -float("inf"))
                tile_best = tl.max(r, axis=0)
                tile_row = tl.argmax(r, axis=0, tie_break_left=True) + c0
                better = tile_best > best  # strict: an earlier tile keeps equal maxima (the first row wins)
                best_row = tl.where(better, tile_row, best_row)
                best = tl.where(better, tile_best, best)
            tl.store(rows_ptr + j * 3, best)
            tl.store(rows_ptr + j * 3 + 1, best_row.to(tl.float32))
            tl.store(rows_ptr + j * 3 + 2, q_sq)
            tl.debug_barrier()  # layer j's sums are written before layer j + 1 reads them
        for k in range(0, 3):
            tl.store(packed_ptr + k, tl.load(rows_ptr + last * 3 + k))
        tl.store(state_ptr, tl.maximum(start - 1, last))


def tile_rows(capacity: int, experts: int) -> int:
    """Store rows per loop step for `experts` per layer: a power of two, at most the capacity's.
    The fastest tiles of `benchmarks/catch_up_probe.py` on the H200 (1,000 maps, 8 warps): 1024
    rows for 16 experts (4.0 µs per layer against 15 for 64 rows), 256 for 60 and 128 (17.9 and 13.0
    µs; 1024 rows or 128 were slower); beyond 128 experts a tile of at most 32K values."""
    block_e = triton.next_power_of_2(experts)
    rows = 1024 if block_e <= 16 else 256 if block_e <= 128 else max(16, TILE_ELEMENTS // block_e)
    return min(triton.next_power_of_2(capacity), rows)


def catch_up(
    table: torch.Tensor,
    like: torch.Tensor,
    maps: torch.Tensor,
    norms: torch.Tensor,
    dot: torch.Tensor,
    rows: torch.Tensor,
    packed: torch.Tensor,
    state: torch.Tensor,
    last: int,
    block_c: int | None = None,
    num_warps: int | None = None,
) -> None:
    """Launch the catch-up through layer `last` (see the module docstring): `table` [L] int64 the
    logits' addresses, `like` one of those logits tensors, `maps` [L, C, E] float32 contiguous,
    `norms` [L, C], `dot` [C], `rows` [L, 3], `packed` [3] float32, `state` [1] int32, all on one
    CUDA device (or CPU tensors under TRITON_INTERPRET=1). Capturable in a CUDA graph (no host
    sync, no allocation); the layers run are decided on the device. `block_c` (store rows per loop
    step, a power of two) and `num_warps` override the defaults (`tile_rows`; a probe's knobs)."""
    L, C, E = maps.shape
    if E > MAX_EXPERTS:
        raise ValueError(f"fused match step: {E} experts per layer, at most {MAX_EXPERTS}")
    if not 0 <= last < L:
        raise ValueError(f"fused match step: layer {last} outside 0..{L - 1}")
    if L * C * E >= 2**31:  # (the kernel's offsets are 32-bit)
        raise ValueError(f"fused match step: a store copy of {L}x{C}x{E} values is too large (< 2^31)")
    for t in (maps, norms, dot, rows, packed, table):
        assert t.is_contiguous()
    block_c = block_c or tile_rows(C, E)
    if num_warps is None:
        num_warps = 8 if block_c * triton.next_power_of_2(E) >= 8192 else 4
    _catch_up[(1,)](
        table,
        like,
        maps,
        norms,
        dot,
        rows,
        packed,
        state,
        last,
        C,
        E,
        BLOCK_C=block_c,
        BLOCK_E=triton.next_power_of_2(E),
        num_warps=num_warps,
    )
