"""The OpenAI wire format the server speaks: request models (validated by pydantic), the error
object, and response/chunk builders. No engine, no HTTP framework here.

Unknown request fields are ignored (clients send many); fields finemoe cannot honour with a
non-default value (`n` > 1, `logprobs`, `echo`, penalties, `best_of`, `suffix`) are refused
with a 400 rather than silently dropped.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


class APIError(Exception):
    """An error answered as an OpenAI error object with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by both endpoints (OpenAI names and ranges, plus vLLM-style `top_k` and
    `ignore_eos`)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="the served model's id (see /v1/models); default: that model")
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy; default 1")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=1_000_000, description="0 disables (extension)")
    n: int | None = Field(None, ge=1, le=128, description="only 1 is supported")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description="up to 4 strings")
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    ignore_eos: bool | None = Field(None, description="keep generating past end-of-sequence (extension)")
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logprobs: Any = None
    user: str | None = None

    def unsupported(self) -> APIError | None:
        if self.n not in (None, 1):
            return APIError(400, "only n=1 is supported", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                return APIError(400, f"{name} is not supported (use 0)", param=name)
        if self.logprobs not in (None, False):
            return APIError(400, "logprobs are not supported", param="logprobs")
        return None

    def stop_strings(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4:
            raise APIError(400, "at most 4 stop sequences", param="stop")
        return tuple(s for s in stop if s)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="text, or token ids; one prompt per request"
    )
    max_tokens: int | None = Field(16, ge=1, description="tokens to generate; prompt + max_tokens <= context")
    echo: bool | None = False
    best_of: int | None = Field(None, ge=1, le=128)
    suffix: str | None = None

    def unsupported(self) -> APIError | None:
        if self.echo:
            return APIError(400, "echo is not supported", param="echo")
        if self.best_of not in (None, 1):
            return APIError(400, "best_of is not supported", param="best_of")
        if self.suffix:
            return APIError(400, "suffix is not supported", param="suffix")
        return super().unsupported()


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="default: what the context leaves (server cap)")
    max_completion_tokens: int | None = Field(None, ge=1, description="preferred name of max_tokens")

    def unsupported(self) -> APIError | None:
        if self.logprobs not in (None, False):
            return APIError(400, "logprobs are not supported", param="logprobs")
        return super().unsupported()


# -- responses --------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def expert_stats(result: Any, policy: str) -> dict[str, Any]:
    """finemoe's per-request figures (`finemoe` field): times in seconds; cache counters are those
    of the iterations the request took part in, shared with the requests batched with it."""
    c = result.cache
    return {
        "policy": policy,
        "queue_s": result.queue_s,
        "ttft_s": result.ttft_s,
        "tpot_s": result.tpot_s,
        "latency_s": result.latency_s,
        "iterations": result.iterations,
        "mean_batch_size": result.mean_batch_size,
        "expert_hits": c.hits,
        "expert_misses": c.misses,
        "hit_rate": c.hit_rate,
        "bytes_copied": c.bytes_copied,
        "stall_s": c.stall_s,
        "prefetches_issued": c.prefetches_issued,
        "prefetches_used": c.prefetches_used,
        "prefetch_precision": c.prefetch_precision,
        "prefetch_recall": c.prefetch_recall,
    }


class Envelope:
    """id, object type, creation time and model shared by a response and all its chunks."""

    def __init__(self, chat: bool, request_id: int, model: str) -> None:
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{request_id:08d}-{time.time_ns() % 10**9:09d}"
        self.created = int(time.time())
        self.model = model

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def response(self, text: str, finish: str, usage_: dict, extra: dict) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
        choice["finish_reason"] = finish
        return {
            **self._base("chat.completion" if self.chat else "text_completion"),
            "choices": [choice],
            "usage": usage_,
            "finemoe": extra,
        }

    def chunk(self, text: str | None, finish: str | None = None, role: bool = False) -> dict[str, Any]:
        """One streamed chunk: a text piece, the opening role (chat), or the finish reason."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**self._base("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}

    def usage_chunk(self, usage_: dict) -> dict[str, Any]:
        return {
            **self._base("chat.completion.chunk" if self.chat else "text_completion"),
            "choices": [],
            "usage": usage_,
        }
