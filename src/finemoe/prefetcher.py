"""Applies `PrefetchPlan`s to the cache under an in-flight limit. It never chooses experts.

On a miss the cache calls `pause()`: no new prefetch starts until the on-demand copies are done,
so demand loads go first (in-flight prefetches are bounded by `max_inflight`). Plans made for an
iteration are dropped once a later iteration starts, and requests for layers the iteration has
already reached are skipped. `post()` may be called from another thread (the asynchronous
searcher); everything else runs on the forward thread.
"""

from __future__ import annotations

import heapq
from collections import deque

from finemoe.cache import ExpertCache
from finemoe.types import ExpertId, PrefetchPlan


class Prefetcher:
    def __init__(self, cache: ExpertCache, max_inflight: int = 4) -> None:
        self.cache = cache
        self.max_inflight = max_inflight
        self._heap: list[tuple[float, int, int, ExpertId]] = []  # (-priority, seq, iteration, expert)
        self._seq = 0
        self._inflight: list[int] = []  # slots with prefetch copies possibly still running
        self._paused = False
        self._inbox: deque[PrefetchPlan] = deque()  # plans posted by other threads
        self.iteration, self.layer = -1, -1  # where the forward pass is
        cache.on_demand_miss = self.pause

    def now(self, iteration: int, layer: int) -> None:
        """The forward pass reached MoE layer `layer` (-1: the start) of `iteration`."""
        self.iteration, self.layer = iteration, layer
        self.cache.now = (iteration, layer)

    def post(self, plan: PrefetchPlan | None) -> None:
        """Thread-safe submit: the plan is applied at the next `pump()`."""
        if plan is not None:
            self._inbox.append(plan)

    def submit(self, plan: PrefetchPlan | None) -> None:
        if plan is None:
            return
        if 0 <= plan.iteration < self.iteration:
            self.cache.stats.prefetches_dropped += len(plan.requests)
            return
        self.cache.policy.on_plan(plan)
        if plan.replace:
            self.cache.stats.prefetches_dropped += len(self._heap)
            self._heap.clear()
        for req in plan.requests:
            self._seq += 1
            heapq.heappush(self._heap, (-req.priority, self._seq, plan.iteration, req.expert))

    def pause(self) -> None:
        self._paused = True

    def pending(self) -> int:
        return len(self._heap) + len(self._inbox)

    def _stale(self, iteration: int, eid: ExpertId) -> bool:
        if iteration < 0:
            return False
        return iteration < self.iteration or (iteration == self.iteration and eid.layer <= self.layer)

    def pump(self) -> int:
        """Start queued prefetches, highest priority first, up to the in-flight limit."""
        if not self._heap and not self._inbox:
            return 0  # nothing to start (a pause only matters once something is queued)
        while self._inbox:
            self.submit(self._inbox.popleft())
        cache = self.cache
        if self._paused:
            if cache.demand_pending():
                return 0
            self._paused = False
        self._inflight = [s for s in self._inflight if not cache.transfer.is_done(s)]
        started = 0
        while self._heap and len(self._inflight) < self.max_inflight:
            _, _, iteration, eid = heapq.heappop(self._heap)
            if self._stale(iteration, eid):
                cache.stats.prefetches_dropped += 1
                continue
            if cache.try_prefetch(eid, iteration):
                self._inflight.append(cache.slot_of[eid.layer][eid.expert])
                started += 1
            elif not cache.is_resident(eid):
                cache.stats.prefetches_dropped += 1  # no slot could be freed for it
        return started

    def clear(self) -> None:
        self._heap.clear()
        self._inbox.clear()
