"""Which matrix-vector kernel the single-row trajectory search should use on this host.

    python benchmarks/matvec_probe.py [--out FILE]

The search does one [C, E] @ [E] product per MoE layer (C stored maps, E experts). NumPy's
BLAS may spread it over every core (thread wake-ups cost more than the product on a many-core
host); einsum's own loop stays on the calling thread. Prints µs per call for each candidate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import timeit
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_meta  # noqa: E402


def candidates(m: np.ndarray, v: np.ndarray) -> dict:
    tm, tv = torch.from_numpy(m), torch.from_numpy(v)
    rows = max(1, 8192 // m.shape[1])  # chunks below OpenBLAS's threading threshold (2304 * 4 elements)
    out = np.empty(m.shape[0], np.float32)

    def chunked() -> np.ndarray:
        for a in range(0, m.shape[0], rows):
            np.matmul(m[a : a + rows], v, out=out[a : a + rows])
        return out

    mT = np.ascontiguousarray(m.T)
    return {
        "einsum": lambda: np.einsum("ck,k->c", m, v),
        "matmul": lambda: m @ v,
        "matmul_chunked": chunked,
        "vecmat_T": lambda: v @ mT,
        "torch_mv": lambda: torch.mv(tm, tv),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    res = {}
    for C, E in [(1000, 16), (1000, 60), (1000, 128), (4000, 128)]:
        m = np.random.rand(C, E).astype(np.float32)
        v = np.random.rand(E).astype(np.float32)
        for name, f in candidates(m, v).items():
            f()
            n = 2000
            t = min(timeit.repeat(f, number=n, repeat=3)) / n
            res[f"{C}x{E} {name}"] = t * 1e6
            print(f"{C}x{E:<4} {name:16s} {t * 1e6:8.2f} us")
    if torch.cuda.is_available():
        g = torch.rand(1000, 128, device="cuda")
        q = torch.rand(128, device="cuda")

        def gpu() -> int:
            return int((g @ q).argmax())

        gpu()
        t = min(timeit.repeat(gpu, number=500, repeat=3)) / 500
        res["1000x128 cuda_mv_argmax_item"] = t * 1e6
        print(f"1000x128 cuda mv+argmax+item   {t * 1e6:8.2f} us")
    res["cpu_count"] = os.cpu_count()
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": run_meta(), "results_us": res}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
