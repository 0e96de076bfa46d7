"""The OpenAI-compatible server, started for real on a loopback port and driven with the official
`openai` client (and raw HTTP where the client would hide the status): endpoints, streaming,
concurrency with exact greedy parity, metrics, auth, bad input, disconnects and shutdown."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import openai
import pytest

from finemoe import Engine, SamplingParams
from finemoe.server import ServerConfig

from tests.serving import live_server, metric

PROMPTS = [
    "hello",
    "The quick brown fox jumps over the lazy dog",
    "a",
    "What is a mixture of experts?",
    "1 2 3 4 5 6 7 8 9 10",
    "zzz",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit",
    "ok then",
    "MoE offloading keeps experts in host memory",
    "é€日本",
]
LENGTHS = [7, 19, 4, 25, 11, 3, 16, 9, 22, 13]
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return tiny_checkpoint("qwen2_moe", tokenizer=True, vocab_size=260)


def _engine(path, **kw):
    return Engine.from_pretrained(path, expert_budget="40%", device="cpu", progress=False, **kw)


@pytest.fixture(scope="module")
def served(ckpt):
    """One server (no API key) plus what the engine gives each prompt alone, computed first."""
    engine = _engine(ckpt)
    solo = {
        p: engine.generate(p, SamplingParams(max_new_tokens=n, ignore_eos=True), chat=False)[0]
        for p, n in zip(PROMPTS, LENGTHS, strict=True)
    }
    chat = engine.generate(CHAT, SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    with live_server(engine, ServerConfig(model_name="tiny-moe", max_batch=8, max_body_bytes=64 * 1024)) as live:
        live.solo, live.chat = solo, chat
        live.client = openai.OpenAI(base_url=live.v1, api_key="unused", max_retries=0)
        yield live
    engine.close()


def test_models_health_metrics(served):
    models = served.client.models.list()
    assert [m.id for m in models.data] == ["tiny-moe"]
    assert served.client.models.retrieve("tiny-moe").id == "tiny-moe"
    with pytest.raises(openai.NotFoundError):
        served.client.models.retrieve("gpt-4")
    health = httpx.get(served.base + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    text = httpx.get(served.base + "/metrics").text
    for name in ("finemoe_expert_hit_rate", "finemoe_queue_depth", "finemoe_cache_occupancy"):
        assert f"# TYPE {name} gauge" in text
    assert "finemoe_prediction_active 1" in text  # finemoe on a CPU always predicts
    assert "# TYPE finemoe_time_to_first_token_seconds histogram" in text


def test_completion_equals_engine_and_reports_usage(served):
    p, n = PROMPTS[1], LENGTHS[1]
    r = served.client.completions.create(model="tiny-moe", prompt=p, max_tokens=n, **GREEDY)
    want = served.solo[p]
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(want.prompt_token_ids) and r.usage.completion_tokens == n
    assert r.usage.total_tokens == r.usage.prompt_tokens + n
    stats = r.model_extra["finemoe"]
    assert stats["policy"] == "finemoe" and stats["iterations"] == n
    assert stats["expert_hits"] + stats["expert_misses"] > 0 and 0 <= stats["hit_rate"] <= 1
    ids = served.client.completions.create(prompt=want.prompt_token_ids, max_tokens=n, model="tiny-moe", **GREEDY)
    assert ids.choices[0].text == want.text  # a prompt of token ids


def test_chat_and_streams_reassemble(served):
    kw = dict(model="tiny-moe", messages=CHAT, max_tokens=12, **GREEDY)
    whole = served.client.chat.completions.create(**kw)
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == served.chat.text
    assert whole.usage.completion_tokens == 12
    chunks = list(served.client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert finals[0].model_extra["finemoe"]["iterations"] == 12
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert len({c.id for c in chunks}) == 1
    p, n = PROMPTS[3], LENGTHS[3]
    pieces = served.client.completions.create(model="tiny-moe", prompt=p, max_tokens=n, stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in pieces) == served.solo[p].text


def test_concurrent_requests_each_get_their_solo_text(served):
    before = httpx.get(served.base + "/metrics").text
    results: dict[str, object] = {}
    start = threading.Barrier(len(PROMPTS))

    def ask(p: str, n: int) -> None:
        start.wait()
        results[p] = served.client.completions.create(model="tiny-moe", prompt=p, max_tokens=n, **GREEDY)

    threads = [threading.Thread(target=ask, args=pn) for pn in zip(PROMPTS, LENGTHS, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == len(PROMPTS)
    for p, n in zip(PROMPTS, LENGTHS, strict=True):
        r = results[p]
        assert r.choices[0].text == served.solo[p].text, p
        assert r.usage.completion_tokens == n
    after = httpx.get(served.base + "/metrics").text
    # The batch really formed: some iterations ran more than one request.
    iterations = metric(after, "finemoe_batch_size_count") - metric(before, "finemoe_batch_size_count")
    single = metric(after, 'finemoe_batch_size_bucket{le="1"}') - metric(before, 'finemoe_batch_size_bucket{le="1"}')
    assert iterations > 0 and single < iterations
    assert max(r.model_extra["finemoe"]["mean_batch_size"] for r in results.values()) > 1
    assert served.server.scheduler.max_rows_seen > 1


def test_stop_strings_and_seeds(served):
    p, n = PROMPTS[6], LENGTHS[6]
    full = served.solo[p].text
    cut = next(i for i in range(3, len(full)) if full[i] not in "\ufffd")
    stop = full[cut : cut + 2]
    r = served.client.completions.create(model="tiny-moe", prompt=p, max_tokens=n, stop=[stop], **GREEDY)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[: full.index(stop)]
    kw = dict(model="tiny-moe", prompt=p, max_tokens=8, temperature=1.0, top_p=0.9, seed=11)
    a, b = (served.client.completions.create(**kw).choices[0].text for _ in range(2))
    assert a == b


BAD = [
    ("malformed JSON", "/v1/completions", b'{"prompt": "x",', 400, None),
    ("wrong type", "/v1/completions", {"prompt": 5}, 422, None),
    ("wrong type nested", "/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 422, None),
    ("unknown role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 422, None),
    ("no messages", "/v1/chat/completions", {"messages": []}, 422, None),
    ("negative max_tokens", "/v1/completions", {"prompt": "x", "max_tokens": -3}, 422, None),
    ("huge max_tokens", "/v1/completions", {"prompt": "x", "max_tokens": 10**12}, 400, "context_length_exceeded"),
    ("prompt too long", "/v1/completions", {"prompt": "y" * 600, "max_tokens": 1}, 400, "context_length_exceeded"),
    ("unknown model", "/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model_not_found"),
    ("n > 1", "/v1/completions", {"prompt": "x", "n": 2}, 400, None),
    ("temperature out of range", "/v1/completions", {"prompt": "x", "temperature": 9}, 422, None),
    ("token id outside vocabulary", "/v1/completions", {"prompt": [1, 99999]}, 400, None),
    ("batch of prompts", "/v1/completions", {"prompt": ["a", "b"]}, 400, None),
    ("empty prompt", "/v1/completions", {"prompt": ""}, 400, None),
    ("too many stops", "/v1/completions", {"prompt": "x", "stop": list("abcde")}, 400, None),
    ("body too large", "/v1/completions", {"prompt": "x" * 70_000}, 413, None),
]


@pytest.mark.parametrize(("name", "path", "body", "status", "code"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_an_openai_error(served, name, path, body, status, code):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(served.base + path, content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and "Traceback" not in r.text
    if code:
        assert err["code"] == code


def test_chunked_body_over_the_limit_is_413(served):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"x" * 4096
        yield b'"}'

    r = httpx.post(served.v1 + "/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["message"]


def test_unknown_route_and_method(served):
    r = httpx.get(served.base + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]
    assert httpx.get(served.base + "/v1/completions").status_code == 405


def _wait(cond, timeout=30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _cancelled(live) -> float:
    try:
        return metric(httpx.get(live.base + "/metrics").text, 'finemoe_requests_total{finish_reason="cancelled"}')
    except KeyError:
        return 0.0


def test_stream_disconnect_cancels_and_frees(served):
    sched, engine = served.server.scheduler, served.server.engine
    before = _cancelled(served)
    body = {"prompt": "tell me everything", "max_tokens": 450, "stream": True, "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", served.v1 + "/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [ln for ln in (next(lines) for _ in range(6)) if ln.startswith("data:")]
        assert got and sched.running == 1
    _wait(lambda: sched.running == 0 and sched.queue_depth == 0)
    assert all(c == 0 for c in engine.cache.refcount)
    _wait(lambda: _cancelled(served) == before + 1)


def test_non_streaming_disconnect_cancels(served):
    sched = served.server.scheduler
    before = _cancelled(served)
    body = json.dumps({"prompt": "go on", "max_tokens": 450, "ignore_eos": True}).encode()
    host, port = served.base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
    sock.sendall(head.encode() + b"\r\n\r\n" + body)
    _wait(lambda: sched.running == 1)
    sock.close()
    _wait(lambda: _cancelled(served) == before + 1)
    _wait(lambda: sched.running == 0)


def test_api_key_required_everywhere_but_health(ckpt):
    engine = _engine(ckpt, policy="lru")
    with live_server(engine, ServerConfig(model_name="m", api_key="sekrit")) as live:
        good = openai.OpenAI(base_url=live.v1, api_key="sekrit", max_retries=0)
        bad = openai.OpenAI(base_url=live.v1, api_key="wrong", max_retries=0)
        assert good.completions.create(model="m", prompt="hi", max_tokens=2).usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model="m", prompt="hi", max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        for path in ("/metrics", "/v1/models", "/docs", "/openapi.json"):
            r = httpx.get(live.base + path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(live.base + "/health").status_code == 200
        ok = httpx.get(live.base + "/metrics", headers={"Authorization": "Bearer sekrit"})
        assert ok.status_code == 200
    engine.close()


def test_full_queue_429_and_closed_503(ckpt):
    engine = _engine(ckpt, policy="lru")
    with live_server(engine, ServerConfig(model_name="m", max_queue=0)) as live:
        r = httpx.post(live.v1 + "/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "queue_full"
        live.server.scheduler.close()  # as when shutting down
        r = httpx.post(live.v1 + "/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 503 and "retry-after" in r.headers
        assert httpx.get(live.base + "/health").status_code == 503
    engine.close()


def test_shutdown_cancels_in_flight_and_saves_the_map_store(ckpt, tmp_path):
    maps = tmp_path / "maps.fms"
    engine = _engine(ckpt, map_store=str(maps))
    config = ServerConfig(model_name="m", drain_s=0.2)
    with live_server(engine, config, graceful_s=1) as live:
        client = openai.OpenAI(base_url=live.v1, api_key="x", max_retries=0)
        assert client.completions.create(model="m", prompt="warm", max_tokens=3).choices
        pieces: list[str] = []

        def stream() -> None:
            body = {"prompt": "never ends", "max_tokens": 480, "stream": True, "ignore_eos": True}
            try:
                with httpx.stream("POST", live.v1 + "/completions", json=body, timeout=60) as r:
                    pieces.extend(r.iter_lines())
            except httpx.HTTPError:
                pieces.append("(connection closed)")

        t = threading.Thread(target=stream)
        t.start()
        _wait(lambda: live.server.scheduler.running == 1)
    t.join(timeout=30)
    assert not t.is_alive() and not live.server.scheduler.accepting
    assert maps.exists() and maps.stat().st_size > 0
    assert live.server.scheduler.running == 0
    engine.close()
