"""Moving expert slabs from the host store into device slots. Mechanism only: no choices.

`SyncTransfer` copies at once (CPU devices). `CudaTransfer` copies on dedicated streams: a
high-priority stream for on-demand loads and a low-priority one for prefetches. Per slot it keeps a
copy-done event (compute waits on it before reading the slot) and a last-use event (a copy into the
slot waits on it), so nothing on the hot path synchronises the device.
"""

from __future__ import annotations

import time
from typing import Protocol

import torch

from finemoe.pool import SlotPool


class Transfer(Protocol):
    """Copies one expert's parts (host views) into slot `slot` of the pool."""

    def load(self, slot: int, src: list[torch.Tensor], demand: bool) -> None: ...

    def is_done(self, slot: int) -> bool: ...

    def landed(self, slot: int) -> bool:
        """Like `is_done`, but never issues queued copies (a queued copy has not landed)."""
        ...

    def before_compute(self, slots: list[int]) -> None: ...

    def after_compute(self, slots: list[int]) -> None: ...

    def demand_seconds(self) -> float: ...

    def copy_seconds(self) -> float:
        """Seconds one expert copy takes, as measured so far (0: unknown or instant)."""
        ...

    def synchronize(self) -> None: ...

    # Optional: `flush()`, issue the copies `load` queued so far now (a transfer that queues them).
    # Optional: `load_many(slots, srcs, demand)`, `load` of each (slot, src) pair in order, one call.
    # Optional: `settled() -> bool`, True only if every copy issued so far has landed (then `is_done`
    # and `landed` are True for every slot; the cache skips asking them).
    # Optional: `unfinished(slots) -> list[int]`, the slots of `slots` whose copies are not done
    # (`is_done` False), in order: one call for a prefetcher's in-flight list.


class SyncTransfer:
    """Synchronous copies for CPU devices; `demand_seconds` is the wall time of on-demand copies."""

    def __init__(self, pool: SlotPool) -> None:
        self.pool = pool
        self._demand_s = 0.0

    def load(self, slot: int, src: list[torch.Tensor], demand: bool) -> None:
        t0 = time.perf_counter()
        for dst, part in zip(self.pool.slot(slot), src, strict=True):
            dst.copy_(part)
        if demand:
            self._demand_s += time.perf_counter() - t0

    def load_many(self, slots: list[int], srcs: list[list[torch.Tensor]], demand: bool) -> None:
        """`load` of each pair of `slots` and `srcs`, in order."""
        for slot, src in zip(slots, srcs, strict=True):
            self.load(slot, src, demand)

    def is_done(self, slot: int) -> bool:
        return True

    def settled(self) -> bool:
        return True

    def landed(self, slot: int) -> bool:
        return True

    def before_compute(self, slots: list[int]) -> None:
        pass

    def after_compute(self, slots: list[int]) -> None:
        pass

    def demand_seconds(self) -> float:
        return self._demand_s

    def copy_seconds(self) -> float:
        return 0.0  # copies finish when issued: nothing to wait behind

    def synchronize(self) -> None:
        pass


class CudaTransfer:
    """Asynchronous H2D copies from pinned slabs; ordering by per-slot CUDA events.

    `load` only queues: the queued copies are issued together (one stream switch and one event
    per run of same-kind copies, not per expert) as soon as anything looks at copy state
    (`is_done`, `before_compute`, `after_compute`, ...), which the forward path does right after
    a layer's loads or a prefetch pump. `demand_seconds` sums the device-measured durations of
    on-demand copy batches (timing events are resolved lazily, never with a device-wide
    synchronisation).
    """

    def __init__(self, pool: SlotPool) -> None:
        self.pool = pool
        dev = pool.device
        self.demand_stream = torch.cuda.Stream(device=dev, priority=-1)
        self.prefetch_stream = torch.cuda.Stream(device=dev, priority=0)
        # The pool was allocated on the compute stream: copies into it must come after that.
        here = torch.cuda.current_stream(dev)
        self.demand_stream.wait_stream(here)
        self.prefetch_stream.wait_stream(here)
        self._device_index = here.device_index
        # The stream the forward pass computes on, looked up once per iteration (`refresh_stream`):
        # torch's stream lookups and stream contexts cost more host time than the copies' issue.
        self._compute = here
        slots = pool.num_slots
        self.copy_done: list[torch.cuda.Event | None] = [None] * slots
        self.copy_stream: list[torch.cuda.Stream | None] = [None] * slots
        self.last_use: list[torch.cuda.Event | None] = [None] * slots
        self.unwaited = [False] * slots  # copy finished-or-not, but compute has not waited on it yet
        self._timing: list[tuple[torch.cuda.Event, torch.cuda.Event, int]] = []  # (start, end, experts)
        self._demand_s = 0.0
        self._timed_copies = 0  # experts in resolved on-demand batches
        self._queued: list[tuple[int, list[torch.Tensor], bool]] = []  # (slot, host parts, demand)
        self._queued_slots: set[int] = set()

    @property
    def compute_stream(self) -> torch.cuda.Stream:
        return self._compute

    def refresh_stream(self) -> None:
        """Take the current stream as the compute stream (call where the forward pass starts)."""
        self._compute = torch.cuda.current_stream(self._device_index)

    def load(self, slot: int, src: list[torch.Tensor], demand: bool) -> None:
        self._queued.append((slot, src, demand))
        self._queued_slots.add(slot)

    def flush(self) -> None:
        """Issue the queued copies now, not at the next query or compute (the link starts on them)."""
        if self._queued:
            self._issue()

    def _issue(self) -> None:
        """Issue the queued copies in order, one stream context per run of the same kind."""
        queued, self._queued = self._queued, []
        self._queued_slots.clear()
        i = 0
        while i < len(queued):
            demand = queued[i][2]
            j = i
            while j < len(queued) and queued[j][2] == demand:
                j += 1
            self._issue_run(queued[i:j], demand)
            i = j

    def _issue_run(self, run: list[tuple[int, list[torch.Tensor], bool]], demand: bool) -> None:
        stream = self.demand_stream if demand else self.prefetch_stream
        waited: set[int] = set()
        torch.cuda.set_stream(stream)  # not a stream context: no device or stream lookups
        try:
            for slot, _, _ in run:  # a copy waits for the slot's last reader and any other-stream copy
                for ev in (self.last_use[slot], self.copy_done[slot] if self.copy_stream[slot] is not stream else None):
                    if ev is not None and id(ev) not in waited:
                        waited.add(id(ev))
                        stream.wait_event(ev)
            start = None
            if demand:
                start = torch.cuda.Event(enable_timing=True)
                start.record(stream)
            slot_parts = self.pool.slot
            dsts: list[torch.Tensor] = []
            srcs: list[torch.Tensor] = []
            for slot, src, _ in run:
                dsts += slot_parts(slot)
                srcs += src
            _copy_all(dsts, srcs)  # one dispatch for the whole run
            done = torch.cuda.Event(enable_timing=demand)
            done.record(stream)
        finally:
            torch.cuda.set_stream(self._compute)
        if start is not None:
            self._timing.append((start, done, len(run)))
        copy_done, copy_stream, unwaited = self.copy_done, self.copy_stream, self.unwaited
        for slot, _, _ in run:
            copy_done[slot] = done
            copy_stream[slot] = stream
            unwaited[slot] = True

    def is_done(self, slot: int) -> bool:
        if self._queued:
            self._issue()
        ev = self.copy_done[slot]
        return ev is None or self._landed(slot, ev)

    def landed(self, slot: int) -> bool:
        if slot in self._queued_slots:
            return False
        ev = self.copy_done[slot]
        return ev is None or self._landed(slot, ev)

    def _landed(self, slot: int, ev: torch.cuda.Event) -> bool:
        """Whether the slot's latest copy (`ev`) has finished; once it has, the slot forgets it: a
        finished copy needs no wait (the compute stream's or a later copy's), and the slot's hits
        ask the device nothing more (an event query per hit and per victim candidate otherwise)."""
        if not ev.query():
            return False
        self.copy_done[slot] = None
        self.unwaited[slot] = False
        return True

    def before_compute(self, slots: list[int]) -> None:
        if self._queued:
            self._issue()
        cur = self._compute
        waited: set[int] = set()
        unwaited, copy_done = self.unwaited, self.copy_done
        for s in slots:
            if unwaited[s]:
                ev = copy_done[s]
                if id(ev) not in waited:
                    waited.add(id(ev))
                    cur.wait_event(ev)
                unwaited[s] = False

    def after_compute(self, slots: list[int]) -> None:
        if self._queued:
            self._issue()
        ev = torch.cuda.Event()
        ev.record(self._compute)
        for s in slots:
            self.last_use[s] = ev

    def _resolve(self) -> None:
        """Fold the finished on-demand timings into the totals (no device synchronisation)."""
        pending = []
        for start, end, n in self._timing:
            if end.query():
                self._demand_s += start.elapsed_time(end) / 1e3
                self._timed_copies += n
            else:
                pending.append((start, end, n))
        self._timing = pending

    def demand_seconds(self) -> float:
        if self._queued:
            self._issue()
        self._resolve()
        return self._demand_s

    def copy_seconds(self) -> float:
        """Mean device time per expert of the on-demand copy batches so far (a batch queued behind
        prefetch copies counts its wait too, which only makes the prefetch window smaller)."""
        if self._timing:
            self._resolve()
        return self._demand_s / self._timed_copies if self._timed_copies else 0.0

    def synchronize(self) -> None:
        if self._queued:
            self._issue()
        self.demand_stream.synchronize()
        self.prefetch_stream.synchronize()


def _copy_all(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    """dsts[i].copy_(srcs[i], non_blocking=True) for every i, in one call where torch has it."""
    if _foreach_copy is not None:
        _foreach_copy(dsts, srcs, non_blocking=True)
    else:
        for dst, src in zip(dsts, srcs, strict=True):
            dst.copy_(src, non_blocking=True)


_foreach_copy = getattr(torch, "_foreach_copy_", None)


def make_transfer(pool: SlotPool) -> Transfer:
    return CudaTransfer(pool) if pool.device.type == "cuda" else SyncTransfer(pool)
