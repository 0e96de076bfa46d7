"""Continuous batching: requests join the running batch at an iteration boundary and leave it
when they finish. Mechanism only: no HTTP, no asyncio.

One engine thread owns the model. Each turn it drops cancelled requests, admits waiting ones (up
to `max_batch` running and `max_prefill_tokens` prompt tokens per turn), prefills them in groups
of similar length (one iteration per group, so left padding wastes little compute), merges each
group into the decode batch, then runs one decode iteration for every running request. Every
iteration is published to the engine with the stable id of each batch row and the ids that left
since the previous one, so predictors plan for the whole batch and commit a request's history
when it ends. Tokens and text reach each request's `sink` on the engine thread.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from finemoe.errors import FineMoEError
from finemoe.generation import RunningBatch, sample_tokens, sampling_generator
from finemoe.request import (
    Event,
    FinishEvent,
    GenerationRequest,
    IterationRecord,
    RequestResult,
    SchedulerBusy,
    SchedulerClosed,
    Sink,
    TokenEvent,
)
from finemoe.textstream import TextStream
from finemoe.types import CacheStats

__all__ = [
    "FinishEvent",
    "GenerationRequest",
    "IterationRecord",
    "RequestResult",
    "Scheduler",
    "SchedulerBusy",
    "SchedulerClosed",
    "TokenEvent",
]

log = logging.getLogger(__name__)


@dataclass
class _Sequence:
    """A request's state on the engine thread."""

    id: int
    request: GenerationRequest
    sink: Sink
    stop_ids: frozenset[int]
    text: TextStream
    submitted: float
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    stamps: list[float] = field(default_factory=list)
    admitted: float = 0.0
    iterations: int = 0
    batch_rows: int = 0  # sum over its iterations of the batch size
    cache: CacheStats | None = None
    finish: str = ""  # why it ends, once known
    done: bool = False  # its finish event was sent


class Scheduler:
    """Serves `GenerationRequest`s on one engine thread with iteration-level batching.

    `submit` and `cancel` are thread-safe and never block on the model. `on_iteration` (optional)
    is called on the engine thread after every forward pass (metrics).
    """

    def __init__(
        self,
        engine: Any,
        max_batch: int = 16,
        max_queue: int = 64,
        max_prefill_tokens: int = 4096,
        on_iteration: Callable[[IterationRecord], None] | None = None,
        pad_slack: float = 1.25,
    ) -> None:
        if max_batch < 1 or max_queue < 0 or max_prefill_tokens < 1:
            raise FineMoEError("max_batch and max_prefill_tokens must be >= 1, max_queue >= 0")
        self.engine, self.max_batch, self.max_queue = engine, max_batch, max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.pad_slack = pad_slack  # a prefill group's padded tokens stay within this factor of its real ones
        self.on_iteration = on_iteration
        self._cv = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._cancel: set[int] = set()
        self._live: set[int] = set()  # submitted and not finished
        self._rows: list[_Sequence] = []  # the running batch, in batch-row order
        self._batch: RunningBatch | None = None
        self._left: list[int] = []  # ids that left the batch since the last iteration
        self._ids = itertools.count(1)
        self._closing = False
        self._stopped = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # what killed the engine thread, if anything
        self.iterations = {"prefill": 0, "decode": 0}
        self.max_rows_seen = 0
        self.continuous = RunningBatch.can_merge(engine.model)  # else static batches (sliding windows)
        self.cache_snapshot = engine.cache.stats.copy()  # refreshed after every iteration
        self.resident_experts = engine.cache.resident_count()

    # -- any thread -----------------------------------------------------------------------------
    def start(self) -> Scheduler:
        if self._thread is None:
            self.engine.serving = True
            self._thread = threading.Thread(target=self._run, name="finemoe-engine", daemon=True)
            self._thread.start()
        return self

    @property
    def accepting(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closing

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._rows)

    def submit(self, request: GenerationRequest, sink: Sink) -> int:
        """Queue a request; its id. Raises `SchedulerBusy` when the queue is full and
        `SchedulerClosed` when shutting down."""
        if not request.prompt_ids:
            raise FineMoEError("empty prompt: a request needs at least one token")
        if request.stop and self.engine.tokenizer is None:
            raise FineMoEError("stop strings need a tokenizer; this model has none")
        params = request.params
        gen = sampling_generator(params)
        with self._cv:
            if not self.accepting:
                raise SchedulerClosed("the server is shutting down" if self._closing else "the engine is not running")
            if len(self._waiting) >= self.max_queue:
                raise SchedulerBusy(f"{len(self._waiting)} requests are waiting; try again later")
            seq = _Sequence(
                next(self._ids),
                request,
                sink,
                frozenset(() if params.ignore_eos else self.engine.stop_ids(params)),
                TextStream(self.engine.tokenizer, request.stop),
                time.perf_counter(),
                gen,
            )
            self._waiting.append(seq)
            self._live.add(seq.id)
            self._cv.notify()
        return seq.id

    def cancel(self, request_id: int) -> None:
        """Stop a request at the next iteration boundary (its sink gets a 'cancelled' finish)."""
        with self._cv:
            if request_id in self._live:
                self._cancel.add(request_id)
                self._cv.notify()

    def close(self, drain_s: float = 0.0) -> None:
        """Take no new requests; let in-flight ones finish for up to `drain_s` seconds, cancel the
        rest, stop the engine thread and commit the predictors' request state."""
        with self._cv:
            self._closing = True
            deadline = time.monotonic() + drain_s
            while (self._waiting or self._rows) and self._thread is not None and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(min(left, 0.05))
            self._stopped = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
        self.engine.serving = False

    # -- engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._turn():
                pass
        except BaseException as e:  # a bug, not a request's fault: fail everything, stop serving
            log.exception("the engine thread stopped")
            self.error = e
            self._fail_all(f"engine failure: {type(e).__name__}")
        finally:
            with self._cv:
                self._closing = True
                self._cv.notify_all()

    def _turn(self) -> bool:
        """One scheduling turn; False once stopped."""
        with self._cv:
            while not (self._waiting or self._rows or self._cancel or self._stopped):
                self._cv.wait()
            if self._stopped:
                self._cancel.update(s.id for s in [*self._waiting, *self._rows])
            cancel, self._cancel = self._cancel, set()
            for seq in [s for s in self._waiting if s.id in cancel]:
                self._waiting.remove(seq)
                self._finish(seq, "cancelled")
            newcomers = self._admit()
        self._drop([i for i, s in enumerate(self._rows) if s.id in cancel], "cancelled")
        try:
            if newcomers:
                for group in self._groups(newcomers) if self.continuous else [newcomers]:
                    self._prefill(group)
            if self._rows:
                self._decode()
        except Exception as e:  # e.g. out of memory: these requests fail, the server keeps going
            log.exception("a forward pass failed; failing its %d requests", len(self._rows) + len(newcomers))
            for seq in [*newcomers, *self._rows]:
                if not seq.done:
                    self._finish(seq, "error", f"{type(e).__name__}: {e}")
            self._rows, self._batch = [], None
        if not self._rows:
            self._left = []
            try:
                self.engine.end_requests()  # the batch drained: predictors commit every request
            except Exception:  # predictor state only steers prefetching; keep serving
                log.exception("committing request state failed")
        with self._cv:
            self._cv.notify_all()  # wakes `close` waiting for a drain
            return not (self._stopped and not self._waiting and not self._rows)

    def _admit(self) -> list[_Sequence]:
        """Waiting requests that join now (called under the lock)."""
        if self._stopped or (self._batch is not None and not self.continuous):
            return []
        out: list[_Sequence] = []
        tokens = 0
        while self._waiting and len(self._rows) + len(out) < self.max_batch:
            n = len(self._waiting[0].request.prompt_ids)
            if out and tokens + n > self.max_prefill_tokens:
                break
            tokens += n
            out.append(self._waiting.popleft())
        return out

    def _groups(self, seqs: list[_Sequence]) -> list[list[_Sequence]]:
        """Split newcomers into prefill groups of similar prompt length (shortest first): a group
        grows while its padded size (longest x count) stays within `pad_slack` of its real tokens
        and within `max_prefill_tokens`."""
        groups: list[list[_Sequence]] = []
        real = 0
        for seq in sorted(seqs, key=lambda s: len(s.request.prompt_ids)):
            n = len(seq.request.prompt_ids)  # the longest so far (sorted)
            g = groups[-1] if groups else None
            padded = n * (len(g) + 1) if g else 0
            if g is None or padded > self.pad_slack * (real + n) or padded > self.max_prefill_tokens:
                groups.append([seq])
                real = n
            else:
                g.append(seq)
                real += n
        return groups

    def _begin(self, seqs: list[_Sequence], is_prefill: bool) -> Callable[[torch.Tensor, torch.Tensor], None]:
        ids = tuple(s.id for s in seqs)

        def before(input_ids: torch.Tensor, live: torch.Tensor) -> None:
            left, self._left = tuple(self._left), []
            self.engine.begin_iteration(is_prefill, input_ids, live, ids, left)

        return before

    def _prefill(self, newcomers: list[_Sequence]) -> None:
        now = time.perf_counter()
        for seq in newcomers:
            seq.admitted = now
        prompts = [list(s.request.prompt_ids) for s in newcomers]
        engine = self.engine
        with self._measure("prefill", newcomers, sum(len(p) for p in prompts)):
            batch, logits = RunningBatch.prefill(
                engine.model, prompts, engine.pad_id(), engine.device, self._begin(newcomers, True)
            )
        self._advance(newcomers, logits)
        keep = [i for i, s in enumerate(newcomers) if not s.finish]
        for seq in newcomers:
            if seq.finish:  # done in one token: never joins the batch
                self._left.append(seq.id)
                self._finish(seq, seq.finish)
        if not keep:
            return
        if len(keep) < len(newcomers):
            batch.select(keep)
        if self._batch is None:
            self._batch = batch
        else:
            self._batch.merge(batch)
        self._rows.extend(newcomers[i] for i in keep)

    def _decode(self) -> None:
        assert self._batch is not None
        rows = self._rows
        with self._measure("decode", rows, len(rows)):
            logits = self._batch.decode(self.engine.model, [s.tokens[-1] for s in rows], self._begin(rows, False))
        self._advance(rows, logits)
        self._drop([i for i, s in enumerate(rows) if s.finish], "")

    def _measure(self, kind: str, seqs: list[_Sequence], tokens: int) -> _Measured:
        return _Measured(self, kind, seqs, tokens)

    def _advance(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        """Sample one token per row of `logits` [B, V] and hand it to its request; a request that
        is done gets `finish` set (its finish event follows once it has left the batch)."""
        greedy = logits.argmax(dim=-1).tolist()  # [B]
        now = time.perf_counter()
        for i, seq in enumerate(seqs):
            params = seq.request.params
            tok = greedy[i] if params.greedy else int(sample_tokens(logits[i : i + 1], params, seq.generator)[0])
            seq.tokens.append(tok)
            seq.stamps.append(now)
            piece = seq.text.push([tok])
            if tok in seq.stop_ids or seq.text.stopped:
                seq.finish = "stop"
            elif len(seq.tokens) >= params.max_new_tokens:
                seq.finish = "length"
            self._emit(seq, TokenEvent(seq.id, (tok,), piece))

    def _drop(self, rows: list[int], reason: str) -> None:
        """Remove batch rows, then send their finish events (reason: theirs, else `reason`), so
        a client that learns its request is done finds its slot already free."""
        if not rows:
            return
        gone = set(rows)
        dropped = [self._rows[i] for i in rows]
        keep = [i for i in range(len(self._rows)) if i not in gone]
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._batch = None
        elif self._batch is not None:
            self._batch.select(keep)
        for seq in dropped:
            self._left.append(seq.id)
            self._finish(seq, seq.finish or reason)

    def _finish(self, seq: _Sequence, reason: str, error: str | None = None) -> None:
        seq.finish, seq.done = reason, True
        with self._cv:
            self._live.discard(seq.id)
        tail = seq.text.finish() if reason in ("stop", "length") else ""
        if tail:
            self._emit(seq, TokenEvent(seq.id, (), tail))
        s = seq.stamps
        first = s[0] - seq.submitted if s else 0.0
        result = RequestResult(
            request_id=seq.id,
            text=seq.text.text,
            token_ids=tuple(seq.tokens),
            prompt_tokens=len(seq.request.prompt_ids),
            finish_reason=reason,
            queue_s=(seq.admitted or time.perf_counter()) - seq.submitted,
            ttft_s=first,
            tpot_s=(s[-1] - s[0]) / (len(s) - 1) if len(s) > 1 else 0.0,
            latency_s=(s[-1] if s else time.perf_counter()) - seq.submitted,
            iterations=seq.iterations,
            mean_batch_size=seq.batch_rows / seq.iterations if seq.iterations else 0.0,
            cache=seq.cache if seq.cache is not None else CacheStats(self.engine.spec.num_layers),
            error=error,
        )
        self._emit(seq, FinishEvent(result))

    def _emit(self, seq: _Sequence, event: Event) -> None:
        try:
            seq.sink(event)
        except Exception:  # a broken consumer must not take the engine thread down
            log.exception("the sink of request %d failed; cancelling it", seq.id)
            self.cancel(seq.id)

    def _fail_all(self, message: str) -> None:
        with self._cv:
            seqs = [*self._waiting, *self._rows]
            self._waiting.clear()
        self._rows, self._batch = [], None
        for seq in seqs:
            if not seq.done:
                self._finish(seq, "error", message)


class _Measured:
    """Times one forward pass and charges its cache counters to the requests in it."""

    def __init__(self, sched: Scheduler, kind: str, seqs: list[_Sequence], tokens: int) -> None:
        self.sched, self.kind, self.seqs, self.tokens = sched, kind, seqs, tokens

    def __enter__(self) -> None:
        cache = self.sched.engine.cache
        self.before = cache.stats.copy()
        self.t0 = time.perf_counter()

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if exc_type is not None:
            return
        sched, cache = self.sched, self.sched.engine.cache
        seconds = time.perf_counter() - self.t0
        cache.refresh_stall()
        delta = cache.stats.minus(self.before)
        rows = len(self.seqs)
        for seq in self.seqs:
            seq.iterations += 1
            seq.batch_rows += rows
            seq.cache = delta.copy() if seq.cache is None else _add(seq.cache, delta)
        sched.iterations[self.kind] += 1
        sched.max_rows_seen = max(sched.max_rows_seen, rows)
        sched.cache_snapshot = cache.stats.copy()
        sched.resident_experts = cache.resident_count()
        if sched.on_iteration is not None:
            sched.on_iteration(IterationRecord(self.kind, rows, self.tokens, seconds))


def _add(into: CacheStats, delta: CacheStats) -> CacheStats:
    """`into` += `delta`, field by field (per-layer lists element-wise)."""
    for k, v in delta.__dict__.items():
        if k == "num_layers":
            continue
        cur = getattr(into, k)
        setattr(into, k, [a + b for a, b in zip(cur, v, strict=True)] if isinstance(v, list) else cur + v)
    return into
