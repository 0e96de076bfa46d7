"""The values a scheduler request passes through: what is asked (`GenerationRequest`), what streams
back (`TokenEvent`, then one `FinishEvent` carrying the `RequestResult`), and why a request can be
refused (`SchedulerBusy`, `SchedulerClosed`). Plain values, no behaviour.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from finemoe.config import SamplingParams
from finemoe.errors import FineMoEError
from finemoe.types import CacheStats


class SchedulerBusy(FineMoEError):
    """The waiting queue is full; try again later."""


class SchedulerClosed(FineMoEError):
    """The scheduler is shutting down (or its thread died) and takes no new requests."""


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt (token ids) to complete. `stop` strings end generation and are cut from the text."""

    prompt_ids: tuple[int, ...]
    params: SamplingParams
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class RequestResult:
    """A finished request. Times in seconds from submission; `cache` holds the expert-cache
    counters of the iterations this request took part in (shared with its batch-mates)."""

    request_id: int
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    finish_reason: str  # "stop", "length", "cancelled" or "error"
    queue_s: float
    ttft_s: float
    tpot_s: float
    latency_s: float
    iterations: int
    mean_batch_size: float
    cache: CacheStats
    error: str | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class TokenEvent:
    """New tokens of a request and the text they completed ('' while a character or a possible stop
    string is incomplete)."""

    request_id: int
    token_ids: tuple[int, ...]
    text: str


@dataclass(frozen=True)
class FinishEvent:
    """The request is done; the last event its sink receives."""

    result: RequestResult


Event = TokenEvent | FinishEvent
Sink = Callable[[Event], None]  # called on the engine thread: must be quick and must not block


@dataclass(frozen=True)
class IterationRecord:
    """One forward pass: its kind, rows (requests), tokens processed and wall time."""

    kind: str  # "prefill" | "decode"
    rows: int
    tokens: int
    seconds: float
