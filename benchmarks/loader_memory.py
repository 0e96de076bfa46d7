"""Peak host memory of finemoe's loader vs the size of what it keeps (CPU).

Builds a medium random MoE checkpoint (default: 8 layers, 32 experts of 1024x512, ~1.6 GB of fp32
experts), then loads it in fresh subprocesses with finemoe and with plain transformers, and
records each process's peak RSS growth over its baseline.

    python benchmarks/loader_memory.py --out docs/results/loader_memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import run_meta  # noqa: E402

CHILD = r"""
import json, sys, torch
torch.set_num_threads(2)
import transformers, finemoe  # imports before the baseline
from finemoe import Engine
def status_kib(field):
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0])
def rss_kib():
    return status_kib("VmRSS")
base = rss_kib()
path, mode = sys.argv[1], sys.argv[2]
out = {"baseline_kib": base}
if mode == "finemoe":
    eng = Engine.from_pretrained(path, expert_budget="25%", policy="lru", device="cpu", progress=False)
    out.update(store_bytes=eng.store.nbytes, dense_bytes=eng.dense_bytes, pool_bytes=eng.plan.pool_bytes)
else:
    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    out["model_bytes"] = sum(p.numel() * p.element_size() for p in m.parameters())
# VmHWM: this process image's own high-water mark (ru_maxrss would include the parent's pages from fork)
out["peak_kib"] = status_kib("VmHWM")
out["end_kib"] = rss_kib()
print(json.dumps(out))
"""


def measure(path: Path, mode: str) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, str(path), mode], capture_output=True, text=True, check=True)
    r = json.loads(res.stdout.strip().splitlines()[-1])
    r["peak_growth_bytes"] = (r["peak_kib"] - r["baseline_kib"]) * 1024
    return r


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=512)
    ap.add_argument("--out", default="loader_memory.json")
    args = ap.parse_args()
    from finemoe.synthetic import build_random_checkpoint, make_config

    cfg = make_config(
        "qwen3_moe",
        hidden_size=args.hidden,
        intermediate_size=4 * args.inter,
        num_hidden_layers=args.layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=64,
        num_experts=args.experts,
        num_experts_per_tok=4,
        moe_intermediate_size=args.inter,
        vocab_size=32000,
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = build_random_checkpoint(Path(tmp) / "medium", cfg, seed=0, max_shard_size="500MB")
        ckpt_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        fm = measure(path, "finemoe")
        hf = measure(path, "transformers")
    kept = fm["store_bytes"] + fm["dense_bytes"]  # the CPU "device" pool is allocated but never touched
    record = {
        "meta": run_meta(),
        "config": vars(args),
        "checkpoint_bytes": ckpt_bytes,
        "finemoe": fm,
        "transformers": hf,
        "finemoe_peak_over_store_plus_dense": fm["peak_growth_bytes"] / kept,
        "finemoe_peak_over_store": fm["peak_growth_bytes"] / fm["store_bytes"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    gib = 2**30
    print(
        f"checkpoint {ckpt_bytes / gib:.2f} GiB; finemoe keeps store {fm['store_bytes'] / gib:.2f} + dense "
        f"{fm['dense_bytes'] / gib:.2f} + pool {fm['pool_bytes'] / gib:.2f} GiB"
    )
    print(
        f"finemoe peak RSS growth {fm['peak_growth_bytes'] / gib:.2f} GiB "
        f"= {record['finemoe_peak_over_store_plus_dense']:.3f} x (store + dense weights)"
    )
    print(
        f"transformers from_pretrained peak RSS growth {hf['peak_growth_bytes'] / gib:.2f} GiB "
        f"(model {hf['model_bytes'] / gib:.2f} GiB)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
