"""Applies `PrefetchPlan`s to the cache under an in-flight limit. It never chooses experts.

On a miss the cache calls `pause()`: no new prefetch starts until the on-demand copies are done,
so demand loads go first (in-flight prefetches are bounded by `max_inflight`).
"""

from __future__ import annotations

import heapq

from finemoe.cache import ExpertCache
from finemoe.types import ExpertId, PrefetchPlan


class Prefetcher:
    def __init__(self, cache: ExpertCache, max_inflight: int = 4) -> None:
        self.cache = cache
        self.max_inflight = max_inflight
        self._heap: list[tuple[float, int, ExpertId]] = []
        self._seq = 0
        self._inflight: list[int] = []  # slots with prefetch copies possibly still running
        self._paused = False
        cache.on_demand_miss = self.pause

    def submit(self, plan: PrefetchPlan | None) -> None:
        if plan is None:
            return
        if plan.replace:
            self._heap.clear()
        for req in plan.requests:
            self._seq += 1
            heapq.heappush(self._heap, (-req.priority, self._seq, req.expert))

    def pause(self) -> None:
        self._paused = True

    def pending(self) -> int:
        return len(self._heap)

    def pump(self) -> int:
        """Start queued prefetches, highest priority first, up to the in-flight limit."""
        cache = self.cache
        if self._paused:
            if cache.demand_pending():
                return 0
            self._paused = False
        self._inflight = [s for s in self._inflight if not cache.transfer.is_done(s)]
        started = 0
        while self._heap and len(self._inflight) < self.max_inflight:
            _, _, eid = heapq.heappop(self._heap)
            if cache.try_prefetch(eid):
                self._inflight.append(cache.slot_of[eid.layer][eid.expert])
                started += 1
        return started

    def clear(self) -> None:
        self._heap.clear()
