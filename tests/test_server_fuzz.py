"""Schema fuzzing: schemathesis generates requests (valid and invalid) from the app's own OpenAPI
document and sends them to the live server; no response may be a 5xx. Bounded and derandomized."""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings

from finemoe import Engine
from finemoe.server import ServerConfig

from tests.serving import live_server

schemathesis = pytest.importorskip("schemathesis")

EXAMPLES = 25  # per operation and generation mode


@pytest.fixture(scope="module")
def live(tiny_checkpoint):
    # A short context bounds what any generated max_tokens can cost.
    path = tiny_checkpoint("qwen2_moe", tokenizer=True, vocab_size=260, max_position_embeddings=48)
    engine = Engine.from_pretrained(path, expert_budget="40%", policy="lru", device="cpu", progress=False)
    with live_server(engine, ServerConfig(model_name="tiny", api_key="k", max_batch=4)) as srv:
        srv.schema = schemathesis.openapi.from_url(srv.base + "/openapi.json", headers={"Authorization": "Bearer k"})
        yield srv
    engine.close()


def _fuzz(live, op, mode: str, seen: list[int]) -> None:
    """Send EXAMPLES generated requests for one operation; fail on any 5xx."""

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=op.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
    def check(case) -> None:
        response = case.call(base_url=live.base, headers={"Authorization": "Bearer k"}, timeout=60)
        seen.append(response.status_code)
        assert response.status_code < 500, f"{op.method.upper()} {op.path}: {response.status_code} {response.text}"

    check()


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_server_errors(live, mode):
    operations = [r.ok() for r in live.schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"} <= paths
    seen: list[int] = []
    for op in operations:
        if mode == "negative" and op.method.upper() == "GET":
            continue  # nothing to make invalid: no body, and a model id may be any string
        _fuzz(live, op, mode, seen)
    assert seen and all(code < 500 for code in seen)
    assert 200 in seen or mode == "negative"
    sched = live.server.scheduler
    deadline = time.monotonic() + 30  # the last finished row leaves the batch just after its response
    while sched.running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sched.accepting and sched.running == 0 and sched.queue_depth == 0
