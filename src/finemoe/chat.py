"""`finemoe chat`: an interactive terminal chat with streamed replies.

Two backends stream the assistant's reply piece by piece: `LocalChat` runs the engine in-process
through the continuous-batching `Scheduler`; `RemoteChat` talks to a running `finemoe serve` (or
any OpenAI-compatible server) over HTTP with server-sent events. `/reset` starts a new
conversation, `/exit` (or end of input) leaves.
"""

from __future__ import annotations

import contextlib
import json
import queue
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TextIO

from finemoe.config import SamplingParams
from finemoe.errors import FineMoEError

Messages = list[dict[str, str]]


@dataclass
class ReplyStats:
    """What the last reply cost: tokens, seconds, expert-cache hit rate (None if unknown)."""

    tokens: int = 0
    seconds: float = 0.0
    hit_rate: float | None = None
    finish_reason: str = ""


class ChatBackend(Protocol):
    last: ReplyStats

    def stream(self, messages: Messages, params: SamplingParams) -> Iterator[str]: ...

    def close(self) -> None: ...


class LocalChat:
    """Streams replies from an in-process engine (the scheduler runs on its own thread)."""

    def __init__(self, engine: Any) -> None:
        from finemoe.scheduler import Scheduler

        self.engine = engine
        self.scheduler = Scheduler(engine, max_batch=1).start()
        self.last = ReplyStats()

    def stream(self, messages: Messages, params: SamplingParams) -> Iterator[str]:
        from finemoe.request import FinishEvent, GenerationRequest

        ids = _fit_context(self.engine, messages, params.max_new_tokens)
        events: queue.Queue = queue.Queue()
        rid = self.scheduler.submit(GenerationRequest(tuple(ids), params), events.put)
        try:
            while True:
                event = events.get()
                if isinstance(event, FinishEvent):
                    r = event.result
                    self.last = ReplyStats(len(r.token_ids), r.latency_s, r.cache.hit_rate, r.finish_reason)
                    if r.finish_reason == "error":
                        raise FineMoEError(f"generation failed: {r.error}")
                    return
                if event.text:
                    yield event.text
        finally:
            self.scheduler.cancel(rid)  # no-op once finished (e.g. Ctrl-C mid-reply)

    def close(self) -> None:
        self.scheduler.close()


def _fit_context(engine: Any, messages: Messages, max_tokens: int) -> list[int]:
    """Token ids of the conversation; the oldest turns are dropped (system prompt kept) when it
    does not fit the context with `max_tokens` to spare."""
    context = engine.context_length
    msgs = list(messages)
    while True:
        ids = engine.encode(msgs, chat=True)
        if context is None or len(ids) + max_tokens <= context:
            return ids
        first = 1 if msgs and msgs[0]["role"] == "system" else 0
        if len(msgs) - first <= 1:
            raise FineMoEError(f"the message does not fit the model's context of {context} tokens")
        del msgs[first]


class RemoteChat:
    """Streams replies from an OpenAI-compatible server at `url` (e.g. http://127.0.0.1:8000)."""

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None, timeout_s: float = 600) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        base = url.rstrip("/")
        self.endpoint = base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")
        self.client = httpx.Client(headers=headers, timeout=timeout_s)
        self.model = model
        self.last = ReplyStats()

    def stream(self, messages: Messages, params: SamplingParams) -> Iterator[str]:
        body: dict[str, Any] = {
            "messages": messages,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.model:
            body["model"] = self.model
        if params.seed is not None:
            body["seed"] = params.seed
        t0, n = time.perf_counter(), 0
        self.last = ReplyStats()
        with self.client.stream("POST", self.endpoint, json=body) as resp:
            if resp.status_code != 200:
                resp.read()
                raise FineMoEError(f"server answered {resp.status_code}: {_error_message(resp.text)}")
            for chunk in _sse_objects(resp.iter_lines()):
                if "error" in chunk:
                    raise FineMoEError(f"server error: {chunk['error'].get('message')}")
                if chunk.get("usage"):
                    n = chunk["usage"].get("completion_tokens", n)
                for choice in chunk.get("choices", []):
                    if choice.get("finish_reason"):
                        self.last.finish_reason = choice["finish_reason"]
                        self.last.hit_rate = (chunk.get("finemoe") or {}).get("hit_rate")
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        yield piece
        self.last.tokens, self.last.seconds = n, time.perf_counter() - t0

    def close(self) -> None:
        self.client.close()


def _sse_objects(lines: Iterator[str]) -> Iterator[dict]:
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def _error_message(text: str) -> str:
    try:
        return json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return text[:200]


def run_chat(
    backend: ChatBackend,
    params: SamplingParams,
    system: str | None = None,
    read: Callable[[str], str] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """The read-reply loop (default: `input`, stdout, stderr); returns an exit status. Ctrl-C
    stops a reply, not the chat."""
    read, out, err = read or input, out or sys.stdout, err or sys.stderr
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    start: Messages = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    err.write("finemoe chat: /reset starts over, /exit leaves\n")
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return 0
        text = line.strip()
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            messages = list(start)
            err.write("(new conversation)\n")
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        reply: list[str] = []
        try:
            for piece in backend.stream(messages, params):
                reply.append(piece)
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            err.write("\n(interrupted)\n")
        except FineMoEError as e:
            err.write(f"\nerror: {e}\n")
            messages.pop()
            continue
        out.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
        s = backend.last
        if s.tokens:
            rate = f", {s.tokens / s.seconds:.1f} tok/s" if s.seconds > 0 else ""
            hit = f", hit rate {s.hit_rate:.3f}" if s.hit_rate is not None else ""
            err.write(f"[{s.tokens} tokens{rate}{hit}]\n")
