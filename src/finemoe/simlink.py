"""The simulator's device: expert slots without memory, a clock and a model of the host link.

`InstantLink` behaves like the engine's synchronous CPU transfer; `TimedLink` copies one expert
at a time over a link of a given copy time (see `simulator` for how the replay drives them).
"""

from __future__ import annotations

import torch

from finemoe.transfer import SyncTransfer
from finemoe.types import ExpertId


class SimPool:
    """A pool of `num_slots` slots that hold no memory."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.device = torch.device("cpu")


class NoWeights:
    """A host store without weights (a simulated copy moves nothing; `holds_weights` False tells
    the cache it need not ask for `parts`)."""

    holds_weights = False

    def parts(self, eid: ExpertId) -> list:
        return []


class Clock:
    """Simulated seconds since the start of the replay."""

    def __init__(self) -> None:
        self.t = 0.0


class InstantLink(SyncTransfer):
    """Copies finish when issued, as the engine's synchronous CPU transfer (whose bookkeeping it
    reuses) but without moving memory: no stalls, no late prefetches."""

    def __init__(self) -> None:
        super().__init__(SimPool(0))  # type: ignore[arg-type]  # a pool without memory: the bookkeeping only

    def load(self, slot: int, src: list, demand: bool) -> None:
        pass

    def load_many(self, slots: list[int], srcs: list[list], demand: bool) -> None:
        pass


LINK_ORDERS = ("fifo", "demand-first")


class TimedLink:
    """One host link, one copy at a time, `copy_s` seconds each, copies in issue order.

    `order` "fifo" (default): an on-demand copy waits for every copy issued before it, prefetches
    included, as measured on the H200 (docs/results/copy_contention_qwen3.json: one 9 MiB copy
    takes 0.19 ms alone and 0.85 ms issued behind 4 prefetch copies on a lower-priority stream;
    stream priority does not reorder copies). "demand-first": an on-demand copy starts when the
    copy in progress ends, ahead of queued prefetches (which move back), as a link with
    preemptible prefetches would. `before_compute` advances the clock to when the needed copies
    are done (a stall)."""

    def __init__(self, clock: Clock, num_slots: int, copy_s: float, order: str = "fifo") -> None:
        if order not in LINK_ORDERS:
            raise ValueError(f"link order must be one of {', '.join(LINK_ORDERS)}, got {order!r}")
        self.clock, self.copy_s, self.order = clock, copy_s, order
        self.done = [0.0] * num_slots  # when the latest copy into each slot completes
        self.queue: list[list] = []  # demand-first: [start, end, slot, demand] of unfinished copies, by start
        self._tail = 0.0  # fifo: when the last copy issued ends
        self.stall_s = 0.0
        self.busy_s = 0.0
        self._fifo = order == "fifo"
        # graphed decode (`Simulator`): the GPU waits for the copies, not the host; `before_compute`
        # then only notes when the needed copies are done (`ready`) and the replay charges the wait
        self.defer = False
        self.ready = 0.0
        # graphed decode: per slot, when the GPU stops reading it (the segment that uses it ends);
        # a copy into the slot starts no earlier, as the engine's copy waits for the slot's last
        # use. None: the host waited for the compute already (one sequential clock)
        self.busy: list[float] | None = None

    def load(self, slot: int, src: list, demand: bool) -> None:
        t, c_s = self.clock.t, self.copy_s
        self.busy_s += c_s
        earliest = t
        busy = self.busy
        if busy is not None and busy[slot] > t:
            earliest = busy[slot]  # the GPU still reads the slot (graphed decode)
        if self._fifo:  # in issue order: only the end of the last copy matters
            start = self._tail if self._tail > earliest else earliest
            self._tail = end = start + c_s
            self.done[slot] = end
            return
        q = self.queue
        while q and q[0][1] <= t:  # finished copies leave the queue (it is ordered by start)
            q.pop(0)
        if not demand or not q or q[-1][3] or q[-1][0] <= t:
            # at the end of the queue (demand-first: no queued prefetch to overtake)
            start = q[-1][1] if q and q[-1][1] > earliest else earliest
            q.append([start, start + c_s, slot, demand])
            self.done[slot] = start + c_s
            return
        # started copies (and earlier demand copies) keep their place; queued prefetches move back
        i = 0
        while i < len(q) and (q[i][0] <= t or q[i][3]):
            i += 1
        start = q[i - 1][1] if i and q[i - 1][1] > earliest else earliest
        end = start + c_s
        self.done[slot] = end
        rest = q[i:]
        for c in rest:
            c[0], c[1] = end, end + c_s
            self.done[c[2]] = c[1]
            end = c[1]
        q[i:] = [[start, start + c_s, slot, True], *rest]

    def load_many(self, slots: list[int], srcs: list[list], demand: bool) -> None:
        """`load` of each of `slots` in order (fifo: the same arithmetic, inlined)."""
        if not self._fifo or self.busy is not None:
            for slot, src in zip(slots, srcs, strict=True):
                self.load(slot, src, demand)
            return
        t, c_s, done = self.clock.t, self.copy_s, self.done
        busy, tail = self.busy_s, self._tail
        for slot in slots:
            busy += c_s
            start = tail if tail > t else t
            tail = start + c_s
            done[slot] = tail
        self.busy_s, self._tail = busy, tail

    def copy_seconds(self) -> float:
        return self.copy_s

    def forget_copies(self) -> None:
        """Every copy issued so far landed before the clock started (a warm pool's fill, which the
        engine waits for at set-up): nothing queued, no link time spent."""
        self.done[:] = [0.0] * len(self.done)  # (in place: others may hold the lists)
        self.queue.clear()
        self._tail, self.busy_s = 0.0, 0.0

    def is_done(self, slot: int) -> bool:
        return self.done[slot] <= self.clock.t

    def landed(self, slot: int) -> bool:
        return self.done[slot] <= self.clock.t

    def unfinished(self, slots: list[int]) -> list[int]:
        """The slots of `slots` whose copies are not done (`is_done` False), in order."""
        t, done = self.clock.t, self.done
        return [s for s in slots if done[s] > t]

    def settled(self) -> bool:
        """Every copy issued so far has landed: the last one issued ends last (copies run one at a
        time; demand-first: the queue holds every unfinished copy, ordered by start)."""
        if self._fifo:
            return self._tail <= self.clock.t
        q = self.queue
        return not q or q[-1][1] <= self.clock.t

    def before_compute(self, slots: list[int]) -> None:
        t = ready = self.clock.t
        done = self.done
        for s in slots:  # a loop: max() over a few slots costs more
            if done[s] > ready:
                ready = done[s]
        if self.defer:
            self.ready = ready
        elif ready > t:
            self.stall_s += ready - t
            self.clock.t = ready

    # (the cache skips the call; a subclass that overrides `after_compute` must set this False, as
    # one that overrides `is_done` must override `unfinished` too)
    after_compute_noop = True

    def after_compute(self, slots: list[int]) -> None:
        pass

    def demand_seconds(self) -> float:
        return self.stall_s

    def synchronize(self) -> None:
        pass


class GpuTimeline:
    """The GPU of a graphed decode step, on its own clock beside the host's (`clock`).

    The host launches a segment (a layer's experts, then the next layer's dense part up to its
    router, or the LM head after the last layer) and goes on with its own work; the segment starts
    once its copies are done (`TimedLink.before_compute` in `defer` mode notes when) and the GPU is
    free. The host waits for the GPU at each routing sync (`sync`). A copy into a slot the segment
    reads starts only once the segment has read it (`TimedLink.busy`), as the engine's copy waits
    for the slot's last-use event. The GPU's waits for copies count as the link's stall."""

    def __init__(self, clock: Clock, link: TimedLink) -> None:
        self.clock, self.link = clock, link
        self.end = 0.0  # when the segments launched so far end (seconds)
        self.expert_s = 0.0  # one routed expert's compute in the current layer
        link.busy = [0.0] * len(link.done)

    def begin(self, first_s: float) -> None:
        """A step starts: its first segment (`first_s`, up to layer 0's router) runs from now."""
        self.end = self.clock.t + first_s

    def sync(self) -> None:
        """The host waits for the segments launched so far (a routing sync, or the logits)."""
        if self.end > self.clock.t:
            self.clock.t = self.end

    def launch(self, got: list[int], slots: list[int], whole: bool) -> None:
        """The compute callback of a graphed layer: its experts (`got`, in `slots`) on the GPU."""
        link, t = self.link, self.clock.t
        free = self.end if self.end > t else t
        # `link.ready` (from `before_compute` just before, in `defer` mode) is never before now, so
        # the segment never starts before its launch
        start = link.ready if link.ready > self.end else self.end
        self._run(start, free, len(got), slots)

    def launch_pinned(self, routed: int, slots: list[int]) -> None:
        """A layer run ahead of its routing sync (every expert resident, `slots` [E] pinned): its
        `routed` experts run once the GPU is free and every copy into its slots has landed (the
        engine's launch waits behind them all), and not before the host launched it (now)."""
        link, t = self.link, self.clock.t
        done = link.done
        free = start = self.end if self.end > t else t  # (never before its launch)
        for s in slots:
            if done[s] > start:
                start = done[s]
        self._run(start, free, routed, slots)

    def _run(self, start: float, free: float, n: int, slots: list[int]) -> None:
        """`n` routed experts run from `start` (the GPU idle from `free`: a stall for the copies),
        reading `slots` until they end."""
        if start > free:
            self.link.stall_s += start - free
        self.end = end = start + self.expert_s * n
        busy = self.link.busy
        assert busy is not None
        for s in slots:
            busy[s] = end

    def then(self, seconds: float) -> None:
        """The launched segment runs on for `seconds` more (the next dense part, or the LM head)."""
        self.end += seconds
