"""The map store's insert (`ExpertMapStore.add` of one decode row into a full store of 1K maps, the
reference shape: 30 layers x 16 experts, 576-wide embeddings) timed on this host's CPU by part, with
torch's default intra-op threads and with one: what online learning adds at a graphed step's last
layer (`docs/design/device_plans.md`, "Session 41").

    PYTHONPATH=src python benchmarks/insert_probe.py [--threads 0,1] [--repeats 400]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from finemoe.expert_map import ExpertMapStore, StoreGeometry


def timed(fn, repeats: int) -> float:
    for _ in range(20):
        fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="0,1", help="torch intra-op threads per run (0: the default)")
    ap.add_argument("--repeats", type=int, default=400)
    args = ap.parse_args()
    default = torch.get_num_threads()
    g = StoreGeometry(30, 16, 576)
    gen = torch.Generator().manual_seed(0)
    store = ExpertMapStore(g, 1000, 3)
    store.add(torch.randn(1000, 576, generator=gen), torch.softmax(torch.randn(1000, 30, 16, generator=gen), -1))
    emb = torch.randn(1, 576, generator=gen)
    maps = torch.softmax(torch.randn(1, 30, 16, generator=gen), -1)
    rows = {}
    for n in [int(x) for x in args.threads.split(",")]:
        torch.set_num_threads(n or default)
        rows[n or default] = {
            "add_us": timed(lambda: store.add(emb, maps), args.repeats),
            "redundancy_us": timed(lambda: store.redundancy(emb, maps), args.repeats),
            "write_us": timed(lambda: store._write(7, emb[0], maps[0]), args.repeats),
        }
    for n, r in rows.items():
        print(f"threads {n:3d}: " + ", ".join(f"{k} {v:7.1f}" for k, v in r.items()))
    print(json.dumps({"threads": rows}))


if __name__ == "__main__":
    main()
