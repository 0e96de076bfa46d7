"""Search off the critical path (spec §3.11): a searcher thread runs a predictor on the contexts
the forward pass publishes, and posts the plans it makes to the prefetcher.

The forward thread only enqueues (CPU tensors it already holds); it never waits for a search.
The queue is bounded: when the searcher falls behind, new contexts are dropped (counted) and the
predictor sits out the rest of that iteration. `flush()` waits until every queued context is
handled (used before saving the map store and in deterministic tests).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

from finemoe.predictor import Predictor
from finemoe.types import IterationContext, PrefetchPlan, RoutingEvent

log = logging.getLogger(__name__)


class AsyncPredictor:
    """Wraps a predictor; its events return None at once and its plans arrive via `sink`.

    The hand-off is a deque (an append is atomic and far cheaper than `queue.Queue.put`); the
    searcher sleeps on an event when idle and is woken only then.
    """

    def __init__(self, inner: Predictor, sink, queue_size: int = 64) -> None:
        self.inner, self.sink = inner, sink
        self.name = inner.name
        self.queue_size = queue_size
        self._items: deque = deque()
        self._wake = threading.Event()
        self._idle = False
        self._stop = False
        self.posted = self.handled = 0
        self.dropped = 0
        self.search_s = 0.0  # time the searcher thread spent in the predictor
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"finemoe-search-{inner.name}", daemon=True)
        self._thread.start()

    def _put(self, item: tuple[str, Any]) -> None:
        if len(self._items) >= self.queue_size:
            self.dropped += 1
            return
        self.posted += 1
        self._items.append(item)
        if self._idle:
            self._wake.set()

    def on_iteration_start(self, ctx: IterationContext) -> PrefetchPlan | None:
        self._put(("start", ctx))
        return None

    def on_routing(self, event: RoutingEvent) -> PrefetchPlan | None:
        self._put(("route", event))  # probabilities are computed on the searcher thread
        return None

    def end_requests(self) -> None:
        self._put(("end", None))

    def _next(self) -> tuple[str, Any] | None:
        while True:
            try:
                return self._items.popleft()
            except IndexError:
                if self._stop:
                    return None
                self._idle = True
                if self._items:  # appended between the failed pop and the flag
                    self._idle = False
                    continue
                self._wake.wait(0.005)  # bounded: a missed wake costs at most 5 ms
                self._wake.clear()
                self._idle = False

    def _run(self) -> None:
        while (item := self._next()) is not None:
            kind, value = item
            try:
                t0 = time.perf_counter()
                if kind == "start":
                    plan = self.inner.on_iteration_start(value)
                elif kind == "route":
                    plan = self.inner.on_routing(value)
                else:
                    self.inner.end_requests()
                    plan = None
                self.search_s += time.perf_counter() - t0
                if plan is not None:
                    self.sink(plan)
            except Exception as e:  # keep serving; prefetching just stops helping
                if self.error is None:
                    log.exception("searcher thread failed; prefetch plans stop (%s)", e)
                self.error = e
            finally:
                self.handled += 1

    def flush(self) -> None:
        """Wait until every posted context has been handled."""
        while self.handled < self.posted and self._thread.is_alive():
            self._wake.set()
            time.sleep(0.0005)

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    def stats(self) -> dict[str, Any]:
        self.flush()
        return {**self.inner.stats(), "search_thread_s": self.search_s, "contexts_dropped": self.dropped}
