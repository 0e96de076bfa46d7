"""Server metrics in the Prometheus text exposition format (version 0.0.4), without dependencies.

`Counter`, `Gauge` and `Histogram` are thread-safe (the engine thread records iterations, the
event loop records requests). `ServerMetrics` holds the server's set: HTTP requests, request
latency, TTFT, TPOT, tokens, throughput, queue depth, requests per iteration (batch size) and the
expert cache's counters (hit rate, prefetch precision and recall, occupancy, bytes copied).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_TIME_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _fmt(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Counter:
    """A monotonically increasing value per label set."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.label_names = name, help_text, labels
        self._values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, labels: tuple[str, ...] = ()) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def samples(self) -> Iterable[str]:
        with self._lock:
            items = sorted(self._values.items())
        for labels, v in items:
            yield f"{self.name}{_labels(self.label_names, labels)} {_fmt(v)}"


class Gauge:
    """A value that goes up and down; either set, or read from `source` at scrape time (a
    `source` that only grows may be exported as kind "counter")."""

    def __init__(
        self, name: str, help_text: str, source: Callable[[], float] | None = None, kind: str = "gauge"
    ) -> None:
        self.name, self.help, self.source, self.kind = name, help_text, source, kind
        self._value = 0.0

    def set(self, value: float) -> None:
        self._value = float(value)

    def samples(self) -> Iterable[str]:
        v = self.source() if self.source is not None else self._value
        yield f"{self.name} {_fmt(v)}"


class Histogram:
    """Observations counted into cumulative buckets (upper bounds `buckets`, plus +Inf)."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help_text, tuple(sorted(buckets))
        self._counts = [0] * (len(self.buckets) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    @property
    def count(self) -> int:
        return sum(self._counts)

    def samples(self) -> Iterable[str]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        cum = 0
        for b, c in zip((*self.buckets, math.inf), counts, strict=True):
            cum += c
            yield f'{self.name}_bucket{{le="{_fmt(b)}"}} {cum}'
        yield f"{self.name}_sum {_fmt(total)}"
        yield f"{self.name}_count {cum}"


class Throughput:
    """Tokens per second over a sliding window of `window_s` seconds."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._events: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def add(self, tokens: int, now: float | None = None) -> None:
        with self._lock:
            self._events.append((time.monotonic() if now is None else now, tokens))

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            while self._events and self._events[0][0] < now - self.window_s:
                self._events.popleft()
            return sum(n for _, n in self._events) / self.window_s


class Registry:
    def __init__(self) -> None:
        self.metrics: list[Counter | Gauge | Histogram] = []

    def add(self, metric):
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for m in self.metrics:
            lines.append(f"# HELP {m.name} {m.help}")
            lines.append(f"# TYPE {m.name} {m.kind}")
            lines.extend(m.samples())
        return "\n".join(lines) + "\n"


class ServerMetrics:
    """The server's metrics. `scheduler` is read at scrape time (queue depth, running requests,
    the cache counters it snapshots after every iteration)."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.registry = r = Registry()
        self.throughput = Throughput()
        self.http = r.add(
            Counter("finemoe_http_requests_total", "HTTP requests by route and status", ("path", "status"))
        )
        self.finished = r.add(
            Counter("finemoe_requests_total", "Generation requests finished, by finish reason", ("finish_reason",))
        )
        self.rejected = r.add(Counter("finemoe_requests_rejected_total", "Requests refused by reason", ("reason",)))
        self.latency = r.add(
            Histogram("finemoe_request_latency_seconds", "Submission to last token", LATENCY_BUCKETS_S)
        )
        self.queue_time = r.add(Histogram("finemoe_queue_time_seconds", "Submission to admission", LATENCY_BUCKETS_S))
        self.ttft = r.add(
            Histogram("finemoe_time_to_first_token_seconds", "Submission to first token", LATENCY_BUCKETS_S)
        )
        self.tpot = r.add(
            Histogram("finemoe_time_per_output_token_seconds", "Mean time between output tokens", TOKEN_TIME_BUCKETS_S)
        )
        self.prompt_tokens = r.add(Counter("finemoe_prompt_tokens_total", "Prompt tokens of finished requests"))
        self.generation_tokens = r.add(Counter("finemoe_generation_tokens_total", "Tokens generated"))
        r.add(
            Gauge(
                "finemoe_generation_tokens_per_second", "Tokens generated per second, last 10 s", self.throughput.rate
            )
        )
        self.batch = r.add(
            Histogram("finemoe_batch_size", "Requests per iteration (forward pass), decode and prefill", BATCH_BUCKETS)
        )
        self.iterations = r.add(Counter("finemoe_iterations_total", "Forward passes by kind", ("kind",)))
        self.iteration_time = r.add(
            Histogram("finemoe_iteration_seconds", "Wall time of one forward pass", TOKEN_TIME_BUCKETS_S)
        )
        sched = scheduler
        r.add(Gauge("finemoe_queue_depth", "Requests waiting to join the batch", lambda: sched.queue_depth))
        r.add(Gauge("finemoe_running_requests", "Requests in the running batch", lambda: sched.running))
        snap = lambda: sched.cache_snapshot  # noqa: E731
        r.add(Gauge("finemoe_expert_hit_rate", "Expert cache hit rate since start", lambda: snap().hit_rate))
        r.add(
            Gauge("finemoe_expert_hits_total", "Expert accesses served from the cache", lambda: snap().hits, "counter")
        )
        r.add(Gauge("finemoe_expert_misses_total", "Expert accesses that copied", lambda: snap().misses, "counter"))
        r.add(Gauge("finemoe_prefetch_precision", "Prefetches used / issued", lambda: snap().prefetch_precision))
        r.add(Gauge("finemoe_prefetch_recall", "Needed experts a prefetch brought in", lambda: snap().prefetch_recall))
        r.add(
            Gauge(
                "finemoe_bytes_copied_total",
                "Expert bytes copied host to device",
                lambda: snap().bytes_copied,
                "counter",
            )
        )
        r.add(
            Gauge("finemoe_stall_seconds_total", "Time waiting for on-demand copies", lambda: snap().stall_s, "counter")
        )
        runtime = sched.engine.runtime

        def predicting() -> float:  # the policy's planners ran in the latest iteration (prediction duty)
            active = runtime.active
            return 1.0 if active and active is runtime.predictors else 0.0

        r.add(Gauge("finemoe_prediction_active", "1 while the policy's predictor runs (0: none or paused)", predicting))
        slots = max(int(sched.engine.plan.slots), 1)
        r.add(Gauge("finemoe_cache_slots", "Expert slots in the device pool", lambda: slots))
        r.add(
            Gauge("finemoe_cache_occupancy", "Share of slots holding an expert", lambda: sched.resident_experts / slots)
        )

    def on_iteration(self, record: Any) -> None:
        """An `IterationRecord` from the scheduler (engine thread)."""
        self.batch.observe(record.rows)
        self.iterations.inc(1, (record.kind,))
        self.iteration_time.observe(record.seconds)
        self.throughput.add(record.rows)

    def on_result(self, result: Any) -> None:
        """A finished `RequestResult`."""
        self.finished.inc(1, (result.finish_reason,))
        self.prompt_tokens.inc(result.prompt_tokens)
        self.generation_tokens.inc(result.completion_tokens)
        if result.completion_tokens:
            self.latency.observe(result.latency_s)
            self.queue_time.observe(result.queue_s)
            self.ttft.observe(result.ttft_s)
        if result.completion_tokens > 1:
            self.tpot.observe(result.tpot_s)

    def render(self) -> str:
        return self.registry.render()
