"""Search off the critical path (spec §3.11): a searcher thread runs a predictor on the contexts
the forward pass publishes, and posts the plans it makes to the prefetcher.

The forward thread only enqueues (CPU tensors it already holds); it never waits for a search.
The queue is bounded: when the searcher falls behind, new contexts are dropped (counted) and the
predictor sits out the rest of that iteration. `flush()` waits until every queued context is
handled (used before saving the map store and in deterministic tests).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from finemoe.predictor import Predictor
from finemoe.types import IterationContext, PrefetchPlan, RoutingEvent

log = logging.getLogger(__name__)

_STOP = object()


class AsyncPredictor:
    """Wraps a predictor; its events return None at once and its plans arrive via `sink`."""

    def __init__(self, inner: Predictor, sink, queue_size: int = 64) -> None:
        self.inner, self.sink = inner, sink
        self.name = inner.name
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.dropped = 0
        self.search_s = 0.0  # time the searcher thread spent in the predictor
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"finemoe-search-{inner.name}", daemon=True)
        self._thread.start()

    def _put(self, item: tuple[str, Any]) -> None:
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1

    def on_iteration_start(self, ctx: IterationContext) -> PrefetchPlan | None:
        self._put(("start", ctx))
        return None

    def on_routing(self, event: RoutingEvent) -> PrefetchPlan | None:
        self._put(("route", event))  # probabilities are computed on the searcher thread
        return None

    def end_requests(self) -> None:
        self._put(("end", None))

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item is _STOP:
                    return
                kind, value = item
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
            except BaseException as e:  # keep serving; prefetching just stops helping
                if self.error is None:
                    log.exception("searcher thread failed; prefetch plans stop (%s)", e)
                self.error = e
            finally:
                self.queue.task_done()

    def flush(self) -> None:
        self.queue.join()

    def close(self) -> None:
        if self._thread.is_alive():
            self.queue.put(_STOP)
            self._thread.join(timeout=10)

    def stats(self) -> dict[str, Any]:
        self.flush()
        return {**self.inner.stats(), "search_thread_s": self.search_s, "contexts_dropped": self.dropped}
