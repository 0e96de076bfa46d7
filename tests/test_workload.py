"""The shipped workload validates: fields, split, counts, licenses."""

from __future__ import annotations

import json

import pytest

from finemoe.errors import FineMoEError
from finemoe.workload import FIELDS, load_workload, split_of, summary

LICENSES = {"Apache-2.0", "BSD-3-Clause", "MIT"}


def test_shipped_workload_is_valid_and_diverse():
    prompts = load_workload()
    s = summary(prompts)
    assert s["prompts"] >= 1500
    assert len(s["domains"]) >= 8 and min(s["domains"].values()) >= 50
    assert len(s["languages"]) >= 5
    assert {"code", "math", "chit-chat", "qa", "instructions"} <= set(s["domains"])
    assert {p.license for p in prompts} <= LICENSES
    share = s["splits"]["history"] / s["prompts"]
    assert 0.65 <= share <= 0.75
    assert all(p.split == split_of(p.id) for p in prompts)  # the split is the fixed hash rule
    assert len({p.prompt for p in prompts}) >= 0.98 * len(prompts)  # essentially no duplicates
    assert len(load_workload(split="test")) + len(load_workload(split="history")) == len(prompts)


def test_bad_workload_files_are_refused(tmp_path):
    f = tmp_path / "w.jsonl"
    good = {k: "x" for k in FIELDS} | {"split": "history"}
    f.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(FineMoEError, match="duplicate ids"):
        load_workload(f)
    f.write_text(json.dumps(good | {"split": "train"}) + "\n")
    with pytest.raises(FineMoEError, match="split must be"):
        load_workload(f)
    f.write_text(json.dumps({k: v for k, v in good.items() if k != "language"}) + "\n")
    with pytest.raises(FineMoEError, match="language"):
        load_workload(f)
    f.write_text("{not json\n")
    with pytest.raises(FineMoEError, match="not valid JSON"):
        load_workload(f)
