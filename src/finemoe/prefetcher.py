"""Applies `PrefetchPlan`s to the cache under an in-flight limit. It never chooses experts.

On a miss the cache calls `pause()`: no new prefetch starts until the on-demand copies are done,
so demand loads go first. The link copies in issue order (an on-demand copy waits for every
prefetch copy issued before it: docs/results/copy_contention_qwen3.json), so the number of
prefetch copies in flight is bounded by `LinkWindow`: at most what the link finishes within one
layer's time, between 1 and `max_inflight`. Plans made for an
iteration are dropped once a later iteration starts, and requests for layers the iteration has
already reached are skipped. `post()` may be called from another thread (the asynchronous
searcher); everything else runs on the forward thread.
"""

from __future__ import annotations

from bisect import insort
from collections import deque
from collections.abc import Callable

from finemoe.cache import ExpertCache
from finemoe.types import ExpertId, PrefetchPlan

SORT_PLANS_FROM = 64  # plans with more requests are merged into the queue by one sort, not insort each


class LinkWindow:
    """How many prefetch copies may be in flight: as many as the link copies in one layer's time
    (so the next layer's on-demand copies wait at most about one layer), clipped to
    [1, `max_inflight`]; `max_inflight` until both times are known or when `adaptive` is off.

    `clock()`: seconds (wall time in the engine, simulated time in the replay), read when the
    forward pass reaches a layer; the layer time is a moving average of the gaps between
    consecutive layers of an iteration. `copy_s()`: seconds per expert copy as the transfer
    measures it (0: unknown, or copies finish when issued), or a number where it never changes
    (the replay's link: no call per layer).
    """

    def __init__(
        self,
        max_inflight: int,
        clock: Callable[[], float] | None = None,
        copy_s: Callable[[], float] | float | None = None,
        adaptive: bool = True,
        smoothing: float = 0.1,
    ) -> None:
        self.max_inflight = max_inflight
        self._fixed_copy_s = None if copy_s is None or callable(copy_s) else float(copy_s)
        if self._fixed_copy_s is not None:
            fixed = self._fixed_copy_s
            copy_s = lambda: fixed  # noqa: E731 (`stats` and outside readers still call it)
        self.clock, self.copy_s = clock, copy_s
        self.adaptive = adaptive and clock is not None and copy_s is not None
        self.smoothing = smoothing
        self.layer_s = 0.0  # moving average; 0 until measured
        self._last: tuple[int, int, float] | None = None  # (iteration, layer, time) of the latest layer
        self.limit = max_inflight

    def on_layer(self, iteration: int, layer: int, t: float | None = None) -> None:
        """The forward pass reached `layer` of `iteration` at `t` (None: now, by `clock`)."""
        clock, copy_s = self.clock, self.copy_s
        if not self.adaptive or layer < 0 or clock is None or copy_s is None:  # (adaptive: both set)
            return
        if t is None:
            t = clock()
        last = self._last
        self._last = (iteration, layer, t)
        if last is None or last[0] != iteration or layer != last[1] + 1 or t <= last[2]:
            return
        gap = t - last[2]
        self.layer_s = gap if self.layer_s == 0.0 else self.layer_s + self.smoothing * (gap - self.layer_s)
        c = self._fixed_copy_s
        if c is None:
            c = copy_s()
        if c > 0:  # clip(layer time / copy time, 1, max_inflight), compares rather than min/max calls
            n = int(self.layer_s / c)
            if n > self.max_inflight:
                n = self.max_inflight
            self.limit = n if n > 1 else 1

    def stats(self) -> dict[str, float | int | str]:
        """The window's state: its mode, current limit, layer time and copy time (ms)."""
        c = self.copy_s() if self.adaptive and self.copy_s is not None else 0.0
        return {
            "prefetch_window": "link" if self.adaptive else "fixed",
            "prefetch_window_limit": self.limit,
            "window_layer_ms": self.layer_s * 1e3,
            "window_copy_ms": c * 1e3,
        }


class Prefetcher:
    """`copies=False`: plans reach the eviction policy (`on_plan`) but their requests are dropped
    at once, so no prefetch copy starts (`EngineConfig.prefetch_copies`)."""

    def __init__(
        self, cache: ExpertCache, max_inflight: int = 4, window: LinkWindow | None = None, copies: bool = True
    ) -> None:
        self.cache = cache
        self.copies = copies
        self.max_inflight = max_inflight
        self.window = window if window is not None else LinkWindow(max_inflight)
        # (priority, -seq, iteration, expert), ascending: the next request is the last (the highest
        # priority, the earliest queued of equals). A sorted list, not a heap: `insort` compares fewer
        # entries than a push and a pop together, and popping the end compares none.
        self._queue: list[tuple[float, int, int, ExpertId]] = []
        self._seq = 0
        self._inflight: list[int] = []  # slots with prefetch copies possibly still running
        self._paused = False
        self._inbox: deque[PrefetchPlan] = deque()  # plans posted by other threads
        # True only while nothing is queued (`pump` would return at once), so callers on the hot
        # path may skip the call. Every insertion sets it False after inserting; only `pump` sets it
        # True, before checking that both queues are empty. So True => empty; False may be stale.
        self.idle = True
        self.iteration, self.layer = -1, -1  # where the forward pass is
        self._on_iteration = getattr(cache.policy, "on_iteration", None)  # optional policy hook
        self._settled = getattr(cache.transfer, "settled", None)  # optional: every copy issued has landed
        self._unfinished = getattr(cache.transfer, "unfinished", None)  # optional: `is_done` of many, one call
        self._batched = cache.batches_prefetches  # (fixed with the policy: read once, not per pump)
        cache.on_demand_miss = self.pause

    def now(self, iteration: int, layer: int, window: bool = True) -> None:
        """The forward pass reached MoE layer `layer` (-1: the start) of `iteration`. `window`
        False: the caller clocks the layer into the prefetch window itself (`window.on_layer`)."""
        if iteration != self.iteration and iteration >= 0 and self._on_iteration is not None:
            self._on_iteration(iteration)
        self.iteration, self.layer = iteration, layer
        self.cache.now = (iteration, layer)
        if window and layer >= 0 and self.window.adaptive:
            self.window.on_layer(iteration, layer)

    def post(self, plan: PrefetchPlan | None) -> None:
        """Thread-safe submit: the plan is applied at the next `pump()`."""
        if plan is not None:
            self._inbox.append(plan)
            self.idle = False  # after the append: `pump` publishes idle before it re-checks

    def submit(self, plan: PrefetchPlan | None, late: bool = False) -> None:
        """Queue `plan`'s requests (`late`: it was posted from another thread, see `post`)."""
        if plan is None:
            return
        if 0 <= plan.iteration < self.iteration:
            self.cache.stats.prefetches_dropped += len(plan.requests)
            return
        self.cache.policy.on_plan(plan)
        if not self.copies:
            self.cache.stats.prefetches_dropped += len(plan.requests)
            return
        if plan.replace:
            # A posted plan (searcher thread or process) may arrive after plans the forward thread
            # made for the same iteration: it replaces only what earlier iterations queued.
            keep = [e for e in self._queue if e[2] >= plan.iteration >= 0] if late else []  # (still sorted)
            self.cache.stats.prefetches_dropped += len(self._queue) - len(keep)
            self._queue = keep
        # Every request is queued, resident ones too: a demand load may evict such an expert before
        # the request is popped, and the plan still wants it back (skipping them at submit time
        # changed moe-infinity's replay, 0.364 -> 0.262 hit rate on the reference study's trace).
        queue, seq, it, reqs = self._queue, self._seq, plan.iteration, plan.requests
        if len(reqs) <= SORT_PLANS_FROM:
            for eid, priority in reqs:
                seq += 1
                insort(queue, (priority, -seq, it, eid))
        else:  # a long plan (e.g. every layer's experts at once): one sort merges it (each insort
            # moves the list's tail), to the same order (entries are distinct by their seq)
            entries = []
            for eid, priority in reqs:
                seq += 1
                entries.append((priority, -seq, it, eid))
            queue += entries
            queue.sort()
        self._seq = seq
        if queue:
            self.idle = False

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        """Lift a pause before the demand copies finish (they were issued before anything queued now)."""
        self._paused = False

    def pending(self) -> int:
        return len(self._queue) + len(self._inbox)

    def _stale(self, iteration: int, eid: ExpertId) -> bool:
        if iteration < 0:
            return False
        return iteration < self.iteration or (iteration == self.iteration and eid.layer <= self.layer)

    def pump(self) -> int:
        """Start queued prefetches, highest priority first, up to the in-flight limit."""
        if not self._queue and not self._inbox:
            self.idle = True  # published first, then checked again: a plan posted meanwhile is seen
            if not self._queue and not self._inbox:
                return 0  # nothing to start (a pause only matters once something is queued)
            self.idle = False
        while self._inbox:
            self.submit(self._inbox.popleft(), late=True)
        cache = self.cache
        if self._paused:
            if cache.demand_pending():
                return 0
            self._paused = False
        if self._inflight:
            if self._unfinished is not None:
                self._inflight = self._unfinished(self._inflight)
            elif self._settled is not None and self._settled():
                self._inflight = []
            else:
                done = cache.transfer.is_done
                self._inflight = [s for s in self._inflight if not done(s)]
        started = 0
        limit = self.window.limit
        if self._batched:
            started, finished = self._start_batch(limit - len(self._inflight))
            if finished:
                return started
        while self._queue and len(self._inflight) < limit:
            _, _, iteration, eid = self._queue.pop()
            if self._stale(iteration, eid):
                cache.stats.prefetches_dropped += 1
                continue
            if cache.try_prefetch(eid, iteration):
                self._inflight.append(cache.slot_of[eid.layer][eid.expert])
                started += 1
            elif not cache.is_resident(eid):
                cache.stats.prefetches_dropped += 1  # no slot could be freed for it
        return started

    def _start_batch(self, room: int) -> tuple[int, bool]:
        """The loop above with the victims of up to `room` prefetches found in one policy pass
        (`ExpertCache.prefetch_batch`): the same copies started, the same requests dropped.
        Returns (copies started, finished); not finished when it met a request without an
        iteration, left at the front of the queue for the one-at-a-time loop."""
        cache, queue, stats = self.cache, self._queue, self.cache.stats
        slot_of = cache.slot_of
        batch: list[tuple[ExpertId, int]] = []
        seen: set[ExpertId] = set()
        twins: list[ExpertId] = []  # requests for an expert already in the batch
        unfinished = False
        now_it, now_layer, pop = self.iteration, self.layer, queue.pop
        if now_it < 0:
            now_it = -2  # before the first iteration nothing is stale (and no request has iteration -2)
        dropped = 0
        while queue and room > 0:
            entry = pop()
            _, _, iteration, eid = entry
            if iteration == now_it:  # stale (`_stale`, inlined): a layer already reached, or an older iteration
                if eid[0] <= now_layer:
                    dropped += 1
                    continue
            elif 0 <= iteration < now_it:
                dropped += 1
                continue
            if slot_of[eid[0]][eid[1]] >= 0:
                continue  # resident: nothing to copy
            if iteration < 0:  # a prefetch without an iteration stays evictable: one at a time
                queue.append(entry)  # back at the front (everything popped before it ranked higher)
                unfinished = True
                break
            if eid in seen:
                twins.append(eid)
                continue
            seen.add(eid)
            batch.append((eid, iteration))
            if len(batch) == room:
                break
        stats.prefetches_dropped += dropped
        slots = cache.prefetch_batch(batch) if batch else []
        self._inflight += slots
        if len(slots) < len(batch):  # no slot for the rest: every later request finds none either
            stats.prefetches_dropped += len(batch) - len(slots)
            stats.prefetches_dropped += sum(slot_of[e.layer][e.expert] < 0 for e in twins)
            for _, _, iteration, eid in queue:  # (the order does not matter for the count)
                if self._stale(iteration, eid) or slot_of[eid.layer][eid.expert] < 0:
                    stats.prefetches_dropped += 1
            queue.clear()
            return len(slots), True
        return len(slots), not unfinished

    def clear(self) -> None:
        self._queue.clear()
        self._inbox.clear()
