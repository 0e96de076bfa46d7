"""Many replays of one trace, spread over worker processes: the sweeps of `finemoe simulate` and the
policy study (policies x budgets x shapes x knobs) take as many cores as they are given.

Each replay is independent and deterministic (`simulator.simulate`: the same inputs give the same
result, `history` is cloned when a replay learns), so the results do not depend on the number of
workers or on the order they finish in; `replay_all` returns them in the order asked. Workers are
forked: they share the parent's trace, histories and cost models (read-only, copy-on-write) and
send back only the results. Off Linux the replays run one after another in this process (Windows has
no `fork`; on macOS forking a process that loaded system frameworks is unsafe).

The per-replay speed (`SimResult.steps_per_s`) of concurrent replays is that of a shared machine:
issue 5's per-core figures come from `benchmarks/sim_speed.py`, one replay at a time.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass

from finemoe import simulator
from finemoe.config import EngineConfig
from finemoe.costmodel import CostModel
from finemoe.errors import ConfigError
from finemoe.sim_history import History
from finemoe.simulator import SimResult
from finemoe.threads import usable_cores
from finemoe.trace import Trace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Replay:
    """One replay of the shared trace: `simulate`'s arguments but the trace; `history` names one of
    the histories given to `replay_all` (None: no stores)."""

    config: EngineConfig
    cost: CostModel | None = None
    link: str = "timed"
    history: str | None = None
    batch_size: int = 1
    oracle_noise: float = 0.0
    graphed: bool = False
    run_ahead: bool = True


# The inputs of the replays in flight, set before the workers fork (they inherit it) and cleared after.
_shared: tuple[Trace, Sequence[Replay], dict[str, History]] | None = None


def resolve_jobs(jobs: int, runs: int) -> int:
    """Worker processes for `runs` replays: `jobs` (0: every usable core), at most one per replay,
    1 off Linux (see the module's docstring)."""
    if jobs < 0:
        raise ConfigError(f"--jobs must be >= 0 (0: every usable core), got {jobs}")
    n = usable_cores() if jobs == 0 else jobs
    n = max(1, min(n, runs))
    if n > 1 and not (sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()):
        log.info("replays fork workers on Linux only: the %d replays run one after another", runs)
        return 1
    return n


def _run_one(trace: Trace, job: Replay, histories: dict[str, History]) -> SimResult:
    hist = None
    if job.history is not None:
        if job.history not in histories:
            raise ConfigError(f"replay asks for history {job.history!r}; given: {sorted(histories)}")
        hist = histories[job.history]
    return simulator.simulate(  # (looked up per call: a test may wrap it)
        trace,
        job.config,
        job.cost,
        job.link,
        hist,
        job.batch_size,
        oracle_noise=job.oracle_noise,
        graphed=job.graphed,
        run_ahead=job.run_ahead,
    )


def _worker_start() -> None:
    """A forked worker: one intra-op thread (the replay is single-threaded; the parent's OpenMP pool
    does not survive the fork, as in a DataLoader worker)."""
    import torch

    torch.set_num_threads(1)


def _worker_run(i: int) -> tuple[int, SimResult]:
    assert _shared is not None, "a replay worker runs only in a process forked by replay_all"
    trace, jobs, histories = _shared
    return i, _run_one(trace, jobs[i], histories)


def replay_all(
    trace: Trace,
    jobs: Sequence[Replay],
    histories: dict[str, History] | None = None,
    workers: int = 1,
    on_result: Callable[[int, SimResult], None] | None = None,
) -> list[SimResult]:
    """Run every replay of `jobs` on `trace`; returns their results in `jobs`' order.

    `workers`: processes (0: every usable core; `resolve_jobs`). `on_result(i, result)` is called in
    this process as each replay finishes (in finishing order with several workers), e.g. for
    progress. A replay that raises (or an interrupt) stops the sweep: the error is raised here, the
    queued replays dropped. Run the caller with one torch thread (`torch.set_num_threads(1)`, as the
    workers do) for results that cannot depend on the number of workers."""
    global _shared
    histories = histories or {}
    n = resolve_jobs(workers, len(jobs))
    results: list[SimResult | None] = [None] * len(jobs)
    if n <= 1:
        for i, job in enumerate(jobs):
            results[i] = r = _run_one(trace, job, histories)
            if on_result is not None:
                on_result(i, r)
        return results  # type: ignore[return-value]
    if _shared is not None:
        raise RuntimeError("replay_all is not re-entrant: a sweep is already running in this process")
    _shared = (trace, jobs, histories)
    try:
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_worker_start) as pool:
            try:
                pending = {pool.submit(_worker_run, i) for i in range(len(jobs))}
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        i, r = fut.result()  # (a replay's error is raised here)
                        results[i] = r
                        if on_result is not None:
                            on_result(i, r)
            except BaseException:  # an error, Ctrl-C: the queued replays are dropped, not run first
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    finally:
        _shared = None
    return results  # type: ignore[return-value]
