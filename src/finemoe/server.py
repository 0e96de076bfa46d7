"""The OpenAI-compatible HTTP server: a FastAPI app over the continuous-batching `Scheduler`.

Handlers never touch the model: they tokenize (in a worker thread), submit to the scheduler and
await its events, which the engine thread hands over with `call_soon_threadsafe`. Safe defaults:
loopback only unless told otherwise, an optional bearer key on every endpoint but `/health`, a
request-body limit, a bounded queue (429 with `Retry-After` past it), OpenAI error objects and no
stack traces. A client that disconnects cancels its request; shutdown lets in-flight requests
drain for `drain_s`, cancels the rest and saves the map store.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from finemoe.config import SamplingParams
from finemoe.errors import FineMoEError
from finemoe.metrics import ServerMetrics
from finemoe.request import (
    FinishEvent,
    GenerationRequest,
    RequestResult,
    SchedulerBusy,
    SchedulerClosed,
    TokenEvent,
)
from finemoe.scheduler import Scheduler
from finemoe.server_routes import add_routes
from finemoe.server_schema import (
    APIError,
    Envelope,
    error_body,
    expert_stats,
    usage,
)

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25  # how often a waiting non-streamed request checks its client is still there
ROUTES = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"description": text}
    for code, text in (
        (400, "invalid request (bad JSON, context length exceeded, unsupported option)"),
        (401, "missing or wrong API key"),
        (404, "unknown model"),
        (413, "request body too large"),
        (422, "a field has the wrong type or range"),
        (429, "queue full; retry after Retry-After seconds"),
        (503, "shutting down or engine unavailable"),
    )
}


@dataclass(frozen=True)
class ServerConfig:
    """How the server behaves; sizes in bytes, times in seconds."""

    model_name: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch: int = 16  # requests decoding together
    max_queue: int = 64  # requests waiting to join; past it: 429
    max_prefill_tokens: int = 4096  # padded prompt tokens admitted per prefill pass
    max_body_bytes: int = 1 << 20
    default_max_tokens: int = 1024  # chat requests that set no max_tokens (capped by the context)
    drain_s: float = 10.0  # shutdown: how long in-flight requests may finish
    retry_after_s: int = 1


class Server:
    """The app's state: engine, scheduler and metrics, and the generation path of both endpoints."""

    def __init__(self, engine: Any, config: ServerConfig) -> None:
        self.engine, self.config = engine, config
        self.scheduler = Scheduler(engine, config.max_batch, config.max_queue, config.max_prefill_tokens)
        self.metrics = ServerMetrics(self.scheduler)
        self.scheduler.on_iteration = self.metrics.on_iteration
        self.vocab_size = engine.vocab_size

    # -- request checks ---------------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model not in (None, "", self.config.model_name):
            raise APIError(
                404,
                f"the model {model!r} does not exist; this server serves {self.config.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def check_ids(self, ids: list[int]) -> list[int]:
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})", param="prompt")
        return ids

    def params(self, body: Any, prompt_tokens: int, max_tokens: int | None) -> SamplingParams:
        context = self.engine.context_length
        if max_tokens is None:  # chat default: what the context leaves, capped
            room = (context - prompt_tokens) if context else self.config.default_max_tokens
            max_tokens = max(min(self.config.default_max_tokens, room), 1)
        if context is not None and prompt_tokens + max_tokens > context:
            raise APIError(
                400,
                f"this model's context is {context} tokens; the prompt has {prompt_tokens} and max_tokens asks for "
                f"{max_tokens} more; shorten the prompt or lower max_tokens",
                param="max_tokens" if prompt_tokens < context else "messages",
                code="context_length_exceeded",
            )
        try:
            return SamplingParams(
                max_new_tokens=max_tokens,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                top_k=body.top_k or 0,
                seed=body.seed,
                ignore_eos=bool(body.ignore_eos),
            )
        except FineMoEError as e:
            raise APIError(400, str(e)) from e

    # -- generation -------------------------------------------------------------------------
    async def run(
        self, request: Request, chat: bool, ids: list[int], body: Any, max_tokens: int | None
    ) -> JSONResponse | StreamingResponse:
        params = self.params(body, len(ids), max_tokens)
        stop = body.stop_strings()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        metrics, stream = self.metrics, bool(body.stream)

        def sink(event: TokenEvent | FinishEvent) -> None:  # engine thread
            if isinstance(event, FinishEvent):
                metrics.on_result(event.result)
            elif not stream:
                return  # a whole response needs only the result
            with contextlib.suppress(RuntimeError):  # the event loop is gone (server stopped)
                loop.call_soon_threadsafe(events.put_nowait, event)

        retry = {"Retry-After": str(self.config.retry_after_s)}
        try:
            rid = self.scheduler.submit(GenerationRequest(tuple(ids), params, stop), sink)
        except SchedulerBusy as e:
            metrics.rejected.inc(1, ("queue_full",))
            raise APIError(429, str(e), "rate_limit_error", code="queue_full", headers=retry) from e
        except SchedulerClosed as e:
            metrics.rejected.inc(1, ("unavailable",))
            raise APIError(503, str(e), "server_error", code="unavailable", headers=retry) from e
        except FineMoEError as e:
            raise APIError(400, str(e)) from e
        env = Envelope(chat, rid, self.config.model_name)
        if stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                self._stream(rid, env, events, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        result = await self._collect(rid, request, events)
        _raise_for(result)
        u = usage(result.prompt_tokens, result.completion_tokens)
        extra = expert_stats(result, self.engine.preset.name)
        return JSONResponse(env.response(result.text, result.finish_reason, u, extra))

    async def _collect(self, rid: int, request: Request, events: asyncio.Queue) -> RequestResult:
        """Wait for the request's finish; cancel it if the client goes away first."""
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=DISCONNECT_POLL_S)
                except TimeoutError:
                    if await request.is_disconnected():
                        log.info("client of request %d disconnected; cancelling it", rid)
                        self.scheduler.cancel(rid)
                        raise APIError(499, "client closed the request") from None
                    continue
                if isinstance(event, FinishEvent):
                    return event.result
        finally:
            self.scheduler.cancel(rid)  # no-op when finished

    async def _stream(self, rid: int, env: Envelope, events: asyncio.Queue, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events in the OpenAI chunk format, then `data: [DONE]`."""
        try:
            if env.chat:
                yield _sse(env.chunk(None, role=True))
            while True:
                event = await events.get()
                if isinstance(event, TokenEvent):
                    if event.text:
                        yield _sse(env.chunk(event.text))
                    continue
                result = event.result
                if result.finish_reason in ("cancelled", "error"):
                    err = _error_of(result)
                    yield _sse(err.body())
                else:
                    last = env.chunk(None, finish=result.finish_reason)
                    last["finemoe"] = expert_stats(result, self.engine.preset.name)
                    yield _sse(last)
                    if include_usage:
                        yield _sse(env.usage_chunk(usage(result.prompt_tokens, result.completion_tokens)))
                yield "data: [DONE]\n\n"
                return
        finally:  # the client went away (the task is cancelled) or the stream ended
            self.scheduler.cancel(rid)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _error_of(result: RequestResult) -> APIError:
    if result.finish_reason == "cancelled":
        return APIError(503, "the server is shutting down; the request was cancelled", "server_error", code="cancelled")
    log.error("request %d failed: %s", result.request_id, result.error)
    return APIError(500, "the engine failed while running this request", "server_error", code="engine_error")


def _raise_for(result: RequestResult) -> None:
    if result.finish_reason in ("cancelled", "error"):
        raise _error_of(result)


# -- the app -------------------------------------------------------------------------------------
def create_app(engine: Any, config: ServerConfig, close_engine: bool = False) -> FastAPI:
    """The FastAPI app serving `engine`. The scheduler starts with the app (lifespan) and stops
    with it; `close_engine` also closes the engine at shutdown (which saves its map store)."""
    server = Server(engine, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.scheduler.start()
        log.info("serving %s (%s, policy %s)", config.model_name, engine.device, engine.preset.name)
        try:
            yield
        finally:
            await run_in_threadpool(_shutdown, server, close_engine)

    app = FastAPI(title="finemoe", version="0.1.0", lifespan=lifespan, responses=ERROR_RESPONSES)
    app.state.server = server
    _add_error_handlers(app)
    add_routes(app, server)
    app.add_middleware(Guard, api_key=config.api_key, max_body_bytes=config.max_body_bytes, metrics=server.metrics)
    return app


def _shutdown(server: Server, close_engine: bool) -> None:
    server.scheduler.close(server.config.drain_s)
    engine = server.engine
    if close_engine:
        engine.close()  # saves the map store when one is configured
    elif engine.config.map_store:
        engine.save_map_store()


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse(error_body("the request body is not valid JSON", "invalid_request_error"), 400)
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body" and not _is_type_tag(x)]
        param = ".".join(loc) or None
        msg = f"{param}: {first.get('msg', 'invalid value')}" if param else str(first.get("msg", "invalid request"))
        return JSONResponse(error_body(msg, "invalid_request_error", param), 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), type_), exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal server error", "server_error"), 500)


def _is_type_tag(part: object) -> bool:
    """pydantic names the union member that failed in `loc` ('str', 'list[int]'): not a field."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "list", "dict") or "[" in part)


class _BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body exceeds {limit} bytes")


class Guard:
    """ASGI middleware: bearer-key check (all paths but /health), request-body limit, and the
    HTTP request counter by route and status."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int, metrics: ServerMetrics) -> None:
        self.app, self.api_key, self.limit, self.metrics = app, api_key, max_body_bytes, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        status = [0]

        async def send_(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            if self.api_key and path != "/health" and not self._authorized(headers):
                err = APIError(401, "a valid API key is required: Authorization: Bearer KEY", code="invalid_api_key")
                await _reply(send_, err, {"WWW-Authenticate": "Bearer"})
                return
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) > self.limit:
                await _reply(send_, APIError(413, f"the request body exceeds {self.limit} bytes", code="too_large"))
                return
            await self.app(scope, self._counting(receive), send_)
        finally:
            label = path if path in ROUTES else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
            self.metrics.http.inc(1, (label, str(status[0])))

    def _authorized(self, headers: dict[str, str]) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    def _counting(self, receive: Receive) -> Receive:
        seen = [0]

        async def wrapped() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > self.limit:
                    raise _BodyTooLarge(self.limit)
            return message

        return wrapped


async def _reply(send: Send, err: APIError, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(err.body()).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in {**err.headers, **(headers or {})}.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def serve(engine: Any, config: ServerConfig, close_engine: bool = True) -> None:
    """Run the server until interrupted (blocking). Binds `config.host` (loopback by default)."""
    import uvicorn

    if config.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        log.warning("listening on %s without an API key: anyone who can reach it can use it", config.host)
    app = create_app(engine, config, close_engine=close_engine)
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        log_level="info",
        timeout_graceful_shutdown=max(int(config.drain_s), 1),
    )
