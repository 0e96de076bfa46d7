"""The host's intra-op threads against the cores this process may use.

torch sizes its CPU thread pool when it is imported. A process restricted to fewer cores later
(`os.sched_setaffinity`, a launcher pinning it after import) keeps every thread, and the small
CPU tensor ops of the forward thread (the map recorder's, with online learning) then wait on
threads that share a few cores: on the H200 host, 16 threads on 6 cores made the recorder take
31.6 ms per decode step instead of ~1.5 (docs/design/device_plans.md, session 40). The engine
does not change the process-wide setting itself; it says so once.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


def oversubscribed() -> tuple[int, int] | None:
    """(torch's intra-op threads, usable cores) when the threads outnumber the cores, else None
    (also where the OS does not tell the process's affinity)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None
    threads = torch.get_num_threads()
    return (threads, cores) if threads > cores else None


_warned = False  # the warning is logged once per process


def warn_if_oversubscribed(again: bool = False) -> bool:
    """Log a warning naming the fix when torch has more intra-op threads than usable cores (once per
    process; `again`: whether or not it was logged before); True if so."""
    global _warned
    found = oversubscribed()
    if found is None or (_warned and not again):
        return False
    _warned = True
    threads, cores = found
    log.warning(
        "torch uses %d CPU threads but this process may run on %d cores (restricted after torch was "
        "imported?): small CPU tensor ops on the forward thread can then take milliseconds each. Call "
        "torch.set_num_threads(%d) before creating the engine, or restrict the cores before starting Python.",
        threads,
        cores,
        cores,
    )
    return True
