"""`finemoe chat` (in-process and against a server) and `finemoe serve` as a real subprocess."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from finemoe import Engine, SamplingParams
from finemoe.chat import LocalChat, RemoteChat, ReplyStats, run_chat
from finemoe.cli import main
from finemoe.server import ServerConfig

from tests.serving import live_server

GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0)


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return tiny_checkpoint("qwen2_moe", tokenizer=True, vocab_size=260)


class Scripted:
    """A chat backend that answers 'reply N' and records the conversations it was given."""

    def __init__(self) -> None:
        self.seen: list[list[dict]] = []
        self.last = ReplyStats()

    def stream(self, messages, params):
        self.seen.append([dict(m) for m in messages])
        self.last = ReplyStats(tokens=2, seconds=0.5, hit_rate=0.5, finish_reason="length")
        yield "reply "
        yield str(len(self.seen))

    def close(self) -> None:
        pass


def test_chat_loop_keeps_history_and_resets():
    backend = Scripted()
    lines = iter(["hello", "", "again", "/reset", "fresh", "/exit", "never read"])
    out, err = io.StringIO(), io.StringIO()
    rc = run_chat(backend, GREEDY, system="sys", read=lambda _: next(lines), out=out, err=err)
    assert rc == 0
    assert out.getvalue().splitlines() == ["reply 1", "reply 2", "reply 3"]
    assert [m["content"] for m in backend.seen[1]] == ["sys", "hello", "reply 1", "again"]
    assert [m["content"] for m in backend.seen[2]] == ["sys", "fresh"]
    assert "4.0 tok/s" in err.getvalue() and "hit rate 0.500" in err.getvalue()


def test_local_and_remote_chat_stream_the_engine_reply(ckpt):
    engine = Engine.from_pretrained(ckpt, expert_budget="40%", policy="lru", device="cpu", progress=False)
    messages = [{"role": "user", "content": "hi"}]
    want = engine.generate(messages, GREEDY)[0].text
    local = LocalChat(engine)
    assert "".join(local.stream(messages, GREEDY)) == want
    assert local.last.tokens >= 1 and local.last.hit_rate is not None
    local.close()
    with live_server(engine, ServerConfig(model_name="m", api_key="k")) as live:
        remote = RemoteChat(live.base, api_key="k")
        assert "".join(remote.stream(messages, GREEDY)) == want
        assert remote.last.finish_reason in ("stop", "length") and remote.last.tokens >= 1
        bad = RemoteChat(live.v1, api_key="wrong")
        with pytest.raises(Exception, match="401"):
            list(bad.stream(messages, GREEDY))
        remote.close()
        bad.close()
    engine.close()


def test_chat_command_against_a_server(ckpt, monkeypatch, capsys):
    engine = Engine.from_pretrained(ckpt, expert_budget="40%", policy="lru", device="cpu", progress=False)
    with live_server(engine, ServerConfig(model_name="m")) as live:
        lines = iter(["hello", "/exit"])
        monkeypatch.setattr("builtins.input", lambda _: next(lines))
        rc = main(["chat", "--url", live.base, "--max-tokens", "4", "--temperature", "0"])
        assert rc == 0
        assert "tokens" in capsys.readouterr().err
    engine.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_binds_loopback_and_saves_the_map_store_on_sigint(ckpt, tmp_path):
    port, maps = _free_port(), tmp_path / "maps.fms"
    cmd = [sys.executable, "-m", "finemoe", "serve", "--model", str(ckpt), "--port", str(port)]
    cmd += ["--expert-budget", "40%", "--device", "cpu", "--no-progress", "--map-store", str(maps)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "server did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 3},
        )
        assert r.status_code == 200 and r.json()["model"] == ckpt.name
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "127.0.0.1" in err and maps.exists()
