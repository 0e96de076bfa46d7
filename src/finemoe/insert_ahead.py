"""A full map store's insert scored on a helper thread, before the insert is applied.

A graphed decode step's expert map goes into the store late (`ExpertMapStore.add_later`): it is
applied when the next step first reads the store, on the forward thread, where the GPU has only
that step's first segment queued. On the H200 the insert's redundancy scores (a [1, L*E] x
[L*E, C] and a [1, D] x [D, C] product over the 1,000 stored rows) took ~0.27 ms of that thread
per step (`docs/design/device_plans.md`, "Session 44"). Here one worker thread makes both
products as soon as their inputs exist (the embedding's share at the step's start, the map's at
its last layer), while the forward thread waits for the GPU; the insert then only picks the row
and writes it. Torch releases the GIL inside the products.

Same bits: the worker runs the store's own functions (`semantic_part_at`, `redundancy_at`) on the
rows of the version it was given, and the insert uses its scores only if the store is still at
that version (else it scores again, as without the worker). The store's invariant that makes this
safe: nothing writes a row while a job runs (`ExpertMapStore._write` waits for the jobs first),
and the jobs only read.
"""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from finemoe.expert_map import ExpertMapStore, SemanticPart

log = logging.getLogger(__name__)


class InsertAhead:
    """One worker thread making a full store's insert scores ahead (`semantic`, `scores`)."""

    def __init__(self, store: ExpertMapStore) -> None:
        self.store = store
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="finemoe-insert")
        self._jobs: deque[Future] = deque()  # submitted, maybe not finished
        self.jobs = 0  # submitted, in total

    @property
    def busy(self) -> bool:
        """True while a submitted job may still be running."""
        jobs = self._jobs
        while jobs and jobs[0].done():
            jobs.popleft()
        return bool(jobs)

    def wait(self) -> None:
        """Until every submitted job has finished (its exception, if any, stays in its future)."""
        if self._jobs:
            wait_all(list(self._jobs))
            self._jobs.clear()

    def _submit(self, fn, *args) -> Future:  # type: ignore[no-untyped-def]
        fut = self._pool.submit(fn, *args)
        self._jobs.append(fut)
        self.jobs += 1
        return fut

    def semantic(self, emb: torch.Tensor) -> Future:
        """`store.semantic_part(emb)` [N, size] at the store's current version, on the worker."""
        s = self.store
        return self._submit(s.semantic_part_at, emb, s.version, s.size)

    def scores(self, emb: torch.Tensor, maps: torch.Tensor, semantic: SemanticPart | Future | None) -> Future:
        """(version, `store.redundancy(emb, maps, semantic)` [N, size]) at the store's current
        version, on the worker (`semantic`, a future of `semantic`, is read there: it ran first)."""
        s = self.store
        version, size = s.version, s.size

        def job() -> tuple[int, torch.Tensor]:
            part = resolve(semantic)
            return version, s.redundancy_at(emb, maps, part, version, size)

        return self._submit(job)

    def close(self) -> None:
        self.wait()
        self._pool.shutdown(wait=True)


def resolve(value):  # type: ignore[no-untyped-def]
    """`value`, or a future's result (None if it raised: the caller then computes it itself)."""
    if isinstance(value, Future):
        try:
            return value.result()
        except Exception:  # (logged: the insert still happens, scored on this thread)
            log.warning("the map store's insert scores failed on the helper thread", exc_info=True)
            return None
    return value
