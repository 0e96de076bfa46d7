"""The server's endpoints: /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics.

Each handler validates what pydantic cannot (model name, unsupported options, prompt shape and
token ids), tokenizes in a worker thread and hands generation to `Server.run`.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool

from finemoe.errors import FineMoEError
from finemoe.server_schema import APIError, ChatCompletionRequest, CompletionRequest

STARTED = int(time.time())


def add_routes(app: FastAPI, server: Any) -> None:
    engine, config = server.engine, server.config

    def model_card() -> dict[str, Any]:
        return {"id": config.model_name, "object": "model", "created": STARTED, "owned_by": "finemoe"}

    @app.get("/health", summary="liveness: 200 while the engine takes requests, else 503")
    async def health() -> JSONResponse:
        sched = server.scheduler
        body = {
            "status": "ok" if sched.accepting else "unavailable",
            "model": config.model_name,
            "running": sched.running,
            "queue_depth": sched.queue_depth,
        }
        return JSONResponse(body, 200 if sched.accepting else 503)

    @app.get("/metrics", summary="Prometheus text exposition", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", summary="the served model")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", summary="one model")
    async def model(model_id: str) -> dict[str, Any]:
        server.check_model(model_id)
        return model_card()

    @app.post("/v1/completions", summary="complete a prompt (text or token ids)")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        server.check_model(body.model)
        if (err := body.unsupported()) is not None:
            raise err
        ids = server.check_ids(await run_in_threadpool(_encode_prompt, engine, body.prompt))
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        return await server.run(request, False, ids, body, max_tokens)

    @app.post("/v1/chat/completions", summary="answer a conversation (chat template)")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        server.check_model(body.model)
        if (err := body.unsupported()) is not None:
            raise err
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        ids = server.check_ids(await run_in_threadpool(_encode_chat, engine, messages))
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await server.run(request, True, ids, body, max_tokens)


def _encode_prompt(engine: Any, prompt: Any) -> list[int]:
    """Token ids of a completions prompt: raw text (no chat template) or ids; one prompt only."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(400, "one prompt per request is supported (got a batch of prompts)", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, list):
        return list(prompt)
    try:
        return engine.encode(prompt, chat=False)
    except FineMoEError as e:
        raise APIError(400, str(e), param="prompt") from e


def _encode_chat(engine: Any, messages: list[dict[str, str]]) -> list[int]:
    try:
        return engine.encode(messages, chat=True)
    except FineMoEError as e:
        raise APIError(400, str(e), param="messages") from e
    except Exception as e:  # the template rejected the conversation (e.g. roles out of order)
        raise APIError(400, f"the chat template rejected these messages: {e}", param="messages") from e
