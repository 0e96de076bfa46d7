"""Quality of the reference model at other expert geometries (built with routers fitted at build
time, no distillation), against the dense model and the shipped default.

    python scripts/reference_geometries.py --geometries 8x2+1024,60x4+336,64x8+1024 --per-domain 10

Writes docs/results/reference_geometries.json and prints a markdown table (pasted into
docs/reference-model.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from finemoe import reference  # noqa: E402
from finemoe.reference.fit import Geometry  # noqa: E402
from finemoe.reference.report import _nll  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--geometries", default="8x2+1024,60x4+336,64x8+1024")
    ap.add_argument("--per-domain", type=int, default=10)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "reference_geometries.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from transformers import AutoModelForCausalLM

    from finemoe.reference.source import load_dense
    from finemoe.synthetic import cache_dir
    from finemoe.workload import load_workload

    src = load_dense(cache_dir() / "sources")
    tok = src.tokenizer
    test = load_workload(split="test")
    random.Random(0).shuffle(test)
    seqs, per = [], {}
    for p in test:
        if per.get(p.domain, 0) < args.per_domain:
            ids = tok.apply_chat_template([{"role": "user", "content": p.prompt}], tokenize=True)
            seqs.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids)[:256])
            per[p.domain] = per.get(p.domain, 0) + 1
    nll, n = _nll(src.model, seqs)
    rows = {"dense": {"ppl": math.exp(nll / n), "tokens": n}}
    for text in [str(reference.DEFAULT_GEOMETRY), *args.geometries.split(",")]:
        geo = Geometry.parse(text)
        t0 = time.perf_counter()
        path = reference.ensure_built(geo)
        built = time.perf_counter() - t0
        moe = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        nll, n = _nll(moe, seqs)
        shipped = reference.shipped_fit(geo).exists()
        rows[str(geo)] = {
            "ppl": math.exp(nll / n),
            "ratio": math.exp(nll / n) / rows["dense"]["ppl"],
            "fit": "shipped (layer-wise fit + distillation)" if shipped else "fitted at build time",
            "build_s": built,
        }
        logging.info("%s: %s", geo, rows[str(geo)])
        del moe
    Path(args.out).write_text(json.dumps({"per_domain": args.per_domain, "results": rows}, indent=1))
    print("| geometry | routers | perplexity | × dense | build time |")
    print("|---|---|---|---|---|")
    print(f"| dense | – | {rows['dense']['ppl']:.2f} | 1.000 | – |")
    for k, r in rows.items():
        if k != "dense":
            print(f"| {k} | {r['fit']} | {r['ppl']:.2f} | {r['ratio']:.3f} | {r['build_s']:.0f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
