"""The `finemoe` command line, run in-process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from finemoe.cli import main

FIELDS = {"text", "token_ids", "ttft_s", "tpot_s", "hit_rate", "bytes_copied", "policy"}


@pytest.fixture
def tok_ckpt(tiny_checkpoint):
    return tiny_checkpoint("qwen2_moe", tokenizer=True, vocab_size=260)


def test_generate_json(tok_ckpt, capsys):
    rc = main(
        [
            "generate",
            "--model",
            str(tok_ckpt),
            "--prompt",
            "hello",
            "--json",
            "--max-new-tokens",
            "6",
            "--expert-budget",
            "3",
            "--policy",
            "lru",
            "--no-progress",
        ]
    )
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    obj = json.loads(lines[0])
    assert obj.keys() >= FIELDS
    assert obj["policy"] == "lru" and 1 <= len(obj["token_ids"]) <= 6 and 0 <= obj["hit_rate"] <= 1
    assert obj["bytes_copied"] > 0
    summary = json.loads(lines[1])["summary"]
    assert summary["hits"] + summary["misses"] == obj["hits"] + obj["misses"]
    assert summary.keys() >= {"prefetch_precision", "prefetch_recall", "stall_s", "layer_hit_rate", "search"}


def test_generate_ignore_eos_runs_every_token(tok_ckpt, capsys, monkeypatch):
    """`--ignore-eos` (fixed-length runs, as the benchmarks' `ignore_eos=True`): with every token made
    a stop token, a prompt gets exactly --max-new-tokens tokens with the flag and one without it."""
    from finemoe import Engine

    monkeypatch.setattr(Engine, "stop_ids", lambda self, params: set(range(self.model.config.vocab_size)))
    args = ["generate", "--model", str(tok_ckpt), "--prompt", "hello", "--json", "--max-new-tokens", "7"]
    args += ["--expert-budget", "3", "--policy", "lru", "--no-progress"]
    lengths = []
    for extra in (["--ignore-eos"], []):
        assert main([*args, *extra]) == 0
        lengths.append(len(json.loads(capsys.readouterr().out.strip().splitlines()[0])["token_ids"]))
    assert lengths == [7, 1]


def test_generate_with_a_warm_pool(tok_ckpt, capsys):
    """`--warm-pool` fills the budget's free slots at start-up: the same tokens, fewer misses."""
    out = {}
    for warm in (False, True):
        args = ["generate", "--model", str(tok_ckpt), "--prompt", "hello", "--json", "--max-new-tokens", "6"]
        args += ["--expert-budget", "90%", "--policy", "lru", "--no-progress"] + (["--warm-pool"] if warm else [])
        assert main(args) == 0
        out[warm] = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert out[True]["token_ids"] == out[False]["token_ids"]
    assert out[True]["misses"] < out[False]["misses"]


def test_generate_prompts_files_in_order(tok_ckpt, tmp_path, capsys):
    txt = tmp_path / "p.txt"
    txt.write_text("first\n\nsecond\nthird\n")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps({"prompt": p, "id": i}) for i, p in enumerate(["first", "second", "third"])))
    outs = []
    for f in (txt, jsonl):
        assert (
            main(
                [
                    "generate",
                    "--model",
                    str(tok_ckpt),
                    "--prompts",
                    str(f),
                    "--json",
                    "--max-new-tokens",
                    "4",
                    "--expert-budget",
                    "25%",
                    "--no-progress",
                ]
            )
            == 0
        )
        outs.append([json.loads(ln) for ln in capsys.readouterr().out.strip().splitlines()][:-1])
    assert len(outs[0]) == len(outs[1]) == 3
    assert [o["token_ids"] for o in outs[0]] == [o["token_ids"] for o in outs[1]]


def test_human_output_has_stats(tok_ckpt, capsys):
    assert (
        main(
            [
                "generate",
                "--model",
                str(tok_ckpt),
                "--prompt",
                "hi",
                "--max-new-tokens",
                "3",
                "--expert-budget",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "ttft=" in err and "tpot=" in err and "hit_rate=" in err and "copied=" in err


def test_errors_exit_2_with_message(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt field"}\n')
    assert main(["generate", "--model", str(tmp_path), "--prompts", str(bad)]) == 2
    assert "needs a string field 'prompt'" in capsys.readouterr().err


def test_python_m_finemoe_and_models_list():
    out = subprocess.run([sys.executable, "-m", "finemoe", "models"], capture_output=True, text=True, check=True)
    for name in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "phimoe", "gpt_oss"):
        assert name in out.stdout


def test_inspect_is_a_dry_run(tiny_checkpoint, capsys):
    path = tiny_checkpoint("qwen2_moe")
    assert main(["inspect", "--model", str(path), "--expert-budget", "25%", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_type"] == "qwen2_moe" and info["moe_layers"] == 2 and info["experts_per_layer"] == 8
    assert info["slots"] == 4 and info["pool_bytes"] == 4 * info["expert_bytes"]
    # dense + experts account for every byte of the checkpoint (fp32 on disk and in memory)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    assert 0 < size - info["dense_bytes"] - info["total_expert_bytes"] < 64 * 1024  # headers only
    assert main(["inspect", "--model", str(path), "--expert-budget", "1"]) == 2
    assert "top-k = 2" in capsys.readouterr().err


def test_trace_record_and_info(tok_ckpt, tmp_path, capsys):
    """`finemoe trace record` builds its engine with every engine setting at its default (a setting
    added to the engine arguments once broke it: the recorder's parser lacked it)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello there\nwhat is an expert\n")
    out = tmp_path / "t.fmt"
    args = ["trace", "record", "--model", str(tok_ckpt), "--prompts", str(prompts), "--max-new-tokens", "3"]
    assert main([*args, "--out", str(out)]) == 0
    assert main(["trace", "info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["requests"] == 2 and info["generated_tokens"] == 6


def test_bench_runs_the_benchmark_script(tmp_path, capsys, monkeypatch):
    """`finemoe bench ARGS` is benchmarks/bench_offload.py ARGS: its own help, its plotting of a
    record (no GPU needed), and a clear error where the checkout has no benchmarks/."""
    import shutil
    from pathlib import Path

    from finemoe import cli

    assert main(["bench", "--help"]) == 0  # argparse's exit inside the script becomes the return code
    out = capsys.readouterr().out
    assert "--shape" in out and "--own-routing" in out and "--accelerate" in out
    record = Path(__file__).resolve().parents[1] / "docs" / "results" / "s13_qwen15moe_trace.json"
    mine = tmp_path / "rec.json"
    shutil.copy(record, mine)
    assert main(["bench", "--plot", str(mine)]) == 0
    assert (tmp_path / "rec.png").stat().st_size > 1000
    assert "finemoe" in capsys.readouterr().out  # the record's table, printed
    monkeypatch.setattr(cli, "bench_script", lambda: tmp_path / "nowhere" / "bench_offload.py")
    assert main(["bench", "--shape", "olmoe"]) == 2
    assert "source checkout" in capsys.readouterr().err


@pytest.mark.parametrize("frozen", [True, False])
def test_generate_freezes_the_loaded_engine_for_the_garbage_collector(tok_ckpt, capsys, monkeypatch, frozen):
    """While a command serves, what was alive once the engine loaded is exempt from the cyclic
    garbage collector (a full collection over it is a ~0.2 s pause); the freeze is lifted on exit,
    and `--no-gc-freeze` keeps the collector as it was."""
    import gc

    seen = []
    real_freeze = gc.freeze

    def freeze():
        real_freeze()
        seen.append(gc.get_freeze_count())

    monkeypatch.setattr(gc, "freeze", freeze)
    argv = ["generate", "--model", str(tok_ckpt), "--prompt", "hi", "--max-new-tokens", "2", "--no-progress"]
    assert main(argv + ([] if frozen else ["--no-gc-freeze"])) == 0
    capsys.readouterr()
    if frozen:
        assert len(seen) == 1 and seen[0] > 1000  # the model's modules, tensors and the stores
    else:
        assert seen == []
    assert gc.get_freeze_count() == 0


def test_generate_with_gathered_absent_experts(tok_ckpt, capsys):
    """`--gather-absent` one expert short of all (with `--warm-pool`): the same tokens as without it."""
    cfg = json.loads((tok_ckpt / "config.json").read_text())
    budget = str(cfg["num_hidden_layers"] * cfg["num_experts"] - 1)
    out = {}
    flags = {False: ["--no-gather-absent"], True: ["--gather-absent"], None: []}  # (None: the default, auto)
    for gather, flag in flags.items():
        args = ["generate", "--model", str(tok_ckpt), "--prompt", "hello there", "--json", "--max-new-tokens", "8"]
        args += ["--expert-budget", budget, "--warm-pool", "--no-progress"] + flag
        assert main(args) == 0
        out[gather] = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert out[True]["token_ids"] == out[False]["token_ids"] == out[None]["token_ids"]


def test_record_requests_flag_reaches_the_saved_store(tok_ckpt, tmp_path, capsys):
    """With a --map-store file finemoe keeps request matrices by default (auto), not with
    --no-record-requests; the maps are saved either way."""
    from finemoe import map_store_file as msf
    from finemoe.engine import Engine

    got = {}
    for flags in ([], ["--no-record-requests"]):
        store = tmp_path / f"s{len(flags)}.fms"
        args = ["generate", "--model", str(tok_ckpt), "--prompt", "hello", "--max-new-tokens", "3"]
        rc = main([*args, "--expert-budget", "3", "--map-store", str(store), "--no-progress", "--json", *flags])
        assert rc == 0
        capsys.readouterr()
        with Engine.from_pretrained(tok_ckpt, policy="lru", device="cpu", progress=False) as eng:
            saved = msf.load(store, eng.identity())
        got[bool(flags)] = (saved.maps.shape[0] > 0, saved.eams.shape[0])
    assert got == {False: (True, 1), True: (True, 0)}
