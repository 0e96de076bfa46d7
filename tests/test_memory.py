"""The loader never holds a second full copy of the experts: peak RSS ~ store + dense weights."""

from __future__ import annotations

import json
import subprocess
import sys

from finemoe.synthetic import build_random_checkpoint, make_config

CHILD = r"""
import json, sys, torch
import transformers, finemoe
from finemoe import Engine
def kib(field):
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0])
base = kib("VmRSS")
eng = Engine.from_pretrained(sys.argv[1], expert_budget="25%", device="cpu", progress=False)
print(json.dumps({"growth": (kib("VmHWM") - base) * 1024, "store": eng.store.nbytes, "dense": eng.dense_bytes}))
"""


def test_loader_peak_memory_is_store_plus_dense(tmp_path):
    cfg = make_config(
        "olmoe",
        hidden_size=512,
        intermediate_size=512,
        num_hidden_layers=4,
        num_experts=32,
        num_experts_per_tok=4,
        vocab_size=4096,
    )
    path = build_random_checkpoint(tmp_path / "m", cfg, max_shard_size="50MB")  # ~100 MB of experts, sharded
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["store"] >= 100 * 2**20
    # A second full copy of the experts would add another `store` bytes; allow 32 MiB of slack.
    assert r["growth"] <= r["store"] + r["dense"] + 32 * 2**20, r
