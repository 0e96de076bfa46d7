"""How far ahead must an eviction policy know the routing? Decode hit rates of clairvoyant variants.

A plain slot-cache model (not the engine's objects: no prefetch, no link, no pinning beyond the
layer being served) replayed over a trace, batch 1: on a miss with the cache full, evict
- `lru`: the least recently used expert;
- `belady`: the expert whose next use is farthest (optimal);
- `horizon H`: an expert *not* used within the next H iterations if there is one (least recently
  used among them), else the least recently used: what a perfect predictor of the next H tokens'
  routing (every layer) could tell an eviction policy;
- `router-ema`: the lowest moving average (α = 0.3) of the router probability, the policy of
  `finemoe.router_ema` (updated after the layer is served, as there).
Hit rates overall and over decode iterations only, as JSON.

    python benchmarks/eviction_horizon.py --traces q60x4.fmt --limit 2 --out docs/results/eviction_horizon_qwen15.json
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import write_record  # noqa: E402
from finemoe.trace import load_trace  # noqa: E402

NEVER = 1 << 62


def accesses(trace, limit: int) -> list[tuple[bool, int, list[int], np.ndarray]]:
    """(decode?, layer, sorted experts, mean router probabilities [E]) per (iteration, layer)."""
    L = trace.spec.num_layers
    out = []
    for r in range(min(limit, trace.num_requests)):
        for it in range(int(trace.output_len[r])):
            a, b = trace.rows(r, it)
            ids, probs = trace.topk[a:b].numpy(), trace.probs[a:b].float().numpy()  # [T, L, k], [T, L, E]
            for layer in range(L):
                out.append((it > 0, layer, sorted(set(ids[:, layer].reshape(-1).tolist())), probs[:, layer].mean(0)))
    return out


def replay(seq, L: int, E: int, slots: int, policy: str, horizon: int = 0, alpha: float = 0.3) -> dict:
    nxt: list[dict[int, int]] = [{} for _ in seq]  # per access, each expert's next access index
    later: dict[int, int] = {}
    for i in range(len(seq) - 1, -1, -1):
        _, layer, ex, _ = seq[i]
        for e in ex:
            f = layer * E + e
            nxt[i][f] = later.get(f, NEVER)
            later[f] = i
    resident: set[int] = set()
    last: dict[int, int] = {}
    upcoming: dict[int, int] = {}
    keys = np.full(L * E, -np.inf)  # router-ema: log of the undecayed average
    rate, t = -math.log(1 - alpha), -1
    hits = misses = dec_hits = dec_misses = 0
    for i, (dec, layer, ex, p) in enumerate(seq):
        if layer == 0:
            t += 1
        used = {layer * E + e for e in ex}
        for f in used:
            if f in resident:
                hits += 1
                dec_hits += dec
                continue
            misses += 1
            dec_misses += dec
            if len(resident) >= slots:
                cands = [c for c in resident if c not in used]
                if policy == "lru":
                    v = min(cands, key=last.__getitem__)
                elif policy == "belady":
                    v = max(cands, key=upcoming.__getitem__)
                elif policy == "horizon":
                    limit = i + horizon * L
                    v = min(cands, key=lambda c: (upcoming[c] <= limit, last[c]))
                else:  # router-ema
                    v = min(cands, key=lambda c: (keys[c], last[c], c))
                resident.discard(v)
            resident.add(f)
        for f in used:
            last[f], upcoming[f] = i, nxt[i][f]
        row = keys[layer * E : layer * E + E]
        np.logaddexp(row, np.log(alpha * p.astype(np.float64) + 1e-300) + rate * t, out=row)
    return {"hit_rate": hits / (hits + misses), "decode_hit_rate": dec_hits / max(1, dec_hits + dec_misses)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--traces", required=True)
    ap.add_argument("--limit", type=int, default=2, help="requests replayed")
    ap.add_argument("--budget", type=float, default=0.25, help="share of all experts")
    ap.add_argument("--horizons", default="1,2,4,8")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    trace = load_trace(args.traces)
    L, E = trace.spec.num_layers, trace.spec.num_experts
    seq = accesses(trace, args.limit)
    slots = int(args.budget * L * E)
    runs = [("lru", 0), ("belady", 0), ("router-ema", 0)] + [("horizon", int(h)) for h in args.horizons.split(",")]
    rows = []
    for policy, h in runs:
        r = replay(seq, L, E, slots, policy, h) | {"policy": policy, "horizon": h}
        rows.append(r)
        label = f"{policy} {h}" if h else policy
        print(f"{label:<12} hit {r['hit_rate']:.3f}  decode hit {r['decode_hit_rate']:.3f}", flush=True)
    write_record(args.out, vars(args) | {"slots": slots}, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
