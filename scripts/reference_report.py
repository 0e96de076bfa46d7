"""Write docs/reference-model.md (+ docs/results/reference_model.json and plots).

python scripts/reference_report.py [--per-domain 30]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from finemoe import reference  # noqa: E402
from finemoe.reference import report  # noqa: E402
from finemoe.reference.fit import load_fits  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-domain", type=int, default=30)
    ap.add_argument("--geometry", default=str(reference.DEFAULT_GEOMETRY))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    geo = reference.Geometry.parse(args.geometry)
    path = reference.ensure_built(geo)
    fits, _, meta = load_fits(reference.shipped_fit(geo))
    meta["geometry"] = str(geo)
    rec = report.run(path, fits, meta, args.per_domain, ROOT / "docs" / "reference-model.md", ROOT / "docs" / "results")
    print(rec["perplexity"]["all"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
