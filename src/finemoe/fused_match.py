"""One Triton kernel for a layer's trajectory-match step (`device_plans.DevicePlanner.step`) from
the router's logits, for softmax-routed families.

The torch ops of `step` (the routing softmax, a cast, two matrix-vector products, a division, a
max over the store's rows, a cast into the packed result) are ~9 kernels on the GPU: replayed beside
a graphed decode segment they lengthen its kernels (~7 µs per segment on the H200 for the reference
shape, `benchmarks/decode_gpu_timeline.py`). This kernel is one program (one SM) that does the same
arithmetic in float32:

    p = softmax(logits)                                   [E]
    dot[c] += sum_e maps[c, e] * p[e]                     [C] (zeroed first on the iteration's first layer)
    q_sq   += sum_e p[e]^2
    best, row = max_c dot[c] / norms[c], the first such c (norms +inf past the valid rows: ratio 0)

and writes (best, row, q_sq) into `packed` [3]. Summation order differs from cuBLAS's, so scores
agree to float32 rounding and the best row up to near-exact ties, as the torch path's do with the
host search. Triton is optional: without it (or off CUDA) `available()` is False and the planner
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
ROWS_PER_TILE = 64  # store rows per loop step of the single program


def available(device: torch.device) -> bool:
    """Whether the fused step can run on `device` (CUDA with Triton installed)."""
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _match_step(
        logits_ptr,  # [E] any float dtype: the router's logits of the token
        maps_ptr,  # [C, E] float32, row-major: the store's maps at this layer
        norms_ptr,  # [C] float32: the rows' prefix norms through this layer (+inf past the valid rows)
        dot_ptr,  # [C] float32: the running dot products (in/out)
        packed_ptr,  # [3] float32: (best ratio, its row, the query's running squared norm) (in/out)
        C,
        E,
        FIRST: tl.constexpr,  # the iteration's first layer: the running sums start from zero
        BLOCK_C: tl.constexpr,
        BLOCK_E: tl.constexpr,
    ):
        offs_e = tl.arange(0, BLOCK_E)
        in_e = offs_e < E
        x = tl.load(logits_ptr + offs_e, mask=in_e, other=-float("inf")).to(tl.float32)
        x = x - tl.max(x, axis=0)
        ex = tl.where(in_e, tl.exp(x), 0.0)
        p = ex / tl.sum(ex, axis=0)  # [BLOCK_E]
        q_sq = tl.sum(p * p, axis=0)
        if not FIRST:
            q_sq += tl.load(packed_ptr + 2)
        best = -float("inf")
        best_row = 0
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            in_c = offs_c < C
            m = tl.load(maps_ptr + offs_c[:, None] * E + offs_e[None, :], mask=in_c[:, None] & in_e[None, :], other=0.0)
            d = tl.sum(m * p[None, :], axis=1)  # [BLOCK_C]
            if not FIRST:
                d += tl.load(dot_ptr + offs_c, mask=in_c, other=0.0)
            tl.store(dot_ptr + offs_c, d, mask=in_c)
            n = tl.load(norms_ptr + offs_c, mask=in_c, other=float("inf"))
            r = tl.where(in_c, d / n, -float("inf"))
            tile_best = tl.max(r, axis=0)
            tile_row = tl.argmax(r, axis=0, tie_break_left=True) + c0
            better = tile_best > best  # strict: an earlier tile keeps equal maxima (the first row wins)
            best_row = tl.where(better, tile_row, best_row)
            best = tl.where(better, tile_best, best)
        tl.store(packed_ptr, best)
        tl.store(packed_ptr + 1, best_row.to(tl.float32))
        tl.store(packed_ptr + 2, q_sq)


def match_step(
    logits: torch.Tensor, maps: torch.Tensor, norms: torch.Tensor, dot: torch.Tensor, packed: torch.Tensor, first: bool
) -> None:
    """Launch the fused step (see the module docstring): `logits` [E] or [1, E], `maps` [C, E]
    float32 contiguous, `norms` [C], `dot` [C], `packed` [3] float32, all on one CUDA device
    (or CPU tensors under TRITON_INTERPRET=1). Capturable in a CUDA graph (no host sync, no
    allocation)."""
    C, E = maps.shape
    if E > MAX_EXPERTS:
        raise ValueError(f"fused match step: {E} experts per layer, at most {MAX_EXPERTS}")
    logits = logits.reshape(-1)
    assert logits.is_contiguous() and maps.is_contiguous() and norms.is_contiguous()
    assert dot.is_contiguous() and packed.is_contiguous()
    _match_step[(1,)](
        logits,
        maps,
        norms,
        dot,
        packed,
        C,
        E,
        FIRST=first,
        BLOCK_C=ROWS_PER_TILE,
        BLOCK_E=triton.next_power_of_2(E),
    )
