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

    def before_compute(self, slots: list[int]) -> None: ...

    def after_compute(self, slots: list[int]) -> None: ...

    def demand_seconds(self) -> float: ...

    def synchronize(self) -> None: ...


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

    def is_done(self, slot: int) -> bool:
        return True

    def before_compute(self, slots: list[int]) -> None:
        pass

    def after_compute(self, slots: list[int]) -> None:
        pass

    def demand_seconds(self) -> float:
        return self._demand_s

    def synchronize(self) -> None:
        pass


class CudaTransfer:
    """Asynchronous H2D copies from pinned slabs; ordering by per-slot CUDA events.

    `demand_seconds` sums the device-measured durations of on-demand copies (timing events are
    resolved lazily, never with a device-wide synchronisation).
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
        slots = pool.num_slots
        self.copy_done: list[torch.cuda.Event | None] = [None] * slots
        self.copy_stream: list[torch.cuda.Stream | None] = [None] * slots
        self.last_use: list[torch.cuda.Event | None] = [None] * slots
        self.unwaited = [False] * slots  # copy finished-or-not, but compute has not waited on it yet
        self._timing: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._demand_s = 0.0

    def load(self, slot: int, src: list[torch.Tensor], demand: bool) -> None:
        stream = self.demand_stream if demand else self.prefetch_stream
        with torch.cuda.stream(stream):
            if self.last_use[slot] is not None:
                stream.wait_event(self.last_use[slot])
            prev = self.copy_done[slot]
            if prev is not None and self.copy_stream[slot] is not stream:
                stream.wait_event(prev)
            if demand:
                start = torch.cuda.Event(enable_timing=True)
                start.record(stream)
            for dst, part in zip(self.pool.slot(slot), src, strict=True):
                dst.copy_(part, non_blocking=True)
            done = torch.cuda.Event(enable_timing=demand)
            done.record(stream)
        if demand:
            self._timing.append((start, done))
        self.copy_done[slot] = done
        self.copy_stream[slot] = stream
        self.unwaited[slot] = True

    def is_done(self, slot: int) -> bool:
        ev = self.copy_done[slot]
        return ev is None or ev.query()

    def before_compute(self, slots: list[int]) -> None:
        cur = torch.cuda.current_stream(self.pool.device)
        for s in slots:
            if self.unwaited[s]:
                cur.wait_event(self.copy_done[s])
                self.unwaited[s] = False

    def after_compute(self, slots: list[int]) -> None:
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.pool.device))
        for s in slots:
            self.last_use[s] = ev

    def demand_seconds(self) -> float:
        pending = []
        for start, end in self._timing:
            if end.query():
                self._demand_s += start.elapsed_time(end) / 1e3
            else:
                pending.append((start, end))
        self._timing = pending
        return self._demand_s

    def synchronize(self) -> None:
        self.demand_stream.synchronize()
        self.prefetch_stream.synchronize()


def make_transfer(pool: SlotPool) -> Transfer:
    return CudaTransfer(pool) if pool.device.type == "cuda" else SyncTransfer(pool)
