"""The host's intra-op threads against the cores this process may use.

torch sizes its CPU thread pool when it is imported. A process restricted to fewer cores later
(`os.sched_setaffinity`, a launcher pinning it after import) keeps every thread, and the small
CPU tensor ops of the forward thread (the map recorder's, with online learning) then wait on
threads that share a few cores: on the H200 host, 16 threads on 6 cores made the recorder take
31.6 ms per decode step instead of ~1.5 (docs/design/device_plans.md, session 40). A container's
CPU quota (cgroup bandwidth) does the same from the start: torch counts the host's cores, not the
quota. The engine does not change the process-wide setting itself; it says so once.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip()
    except (OSError, ValueError):
        return None


def _cores(quota: str, period: str) -> float | None:
    """`quota` / `period` (a cgroup file's fields, µs), or None where unlimited ("max", -1) or not numbers."""
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def cpu_quota(root: str = "/sys/fs/cgroup", membership: str = "/proc/self/cgroup") -> float | None:
    """The CPU bandwidth this process's cgroups allow, in cores (quota / period; the smallest of
    the process's group and its ancestors up to the mount's root, cgroup v2 `cpu.max`, also under
    `unified/` on hybrid systems, or v1 `cpu.cfs_quota_us`), or None when unlimited or not told
    (not Linux, no cgroup file system, unreadable files). A group path the container does not mount
    (the host's) falls back to its parents, down to the mount's root: the container's own group. A
    group outside the process's cgroup namespace (`/..`) is not read."""
    lines = _read(Path(membership))
    if lines is None:
        return None
    base, found = Path(root), []
    for line in lines.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3 or parts[2].startswith("/.."):
            continue
        _, controllers, group = parts
        rel = Path(group.strip().lstrip("/"))
        chain = [rel, *rel.parents] if group.strip("/ ") else [Path(".")]  # the group, then up to the root
        if controllers == "":  # v2: one hierarchy, `cpu.max` = "QUOTA PERIOD" or "max PERIOD"
            for top in (base, base / "unified"):
                for d in chain:
                    text = _read(top / d / "cpu.max")
                    if text is not None and (cores := _cores(*(text.split() + ["", ""])[:2])) is not None:
                        found.append(cores)
        elif "cpu" in controllers.split(","):  # v1: `cpu.cfs_quota_us` (-1: none) over `cpu.cfs_period_us`
            for mount in (controllers, "cpu", "cpu,cpuacct"):
                for d in chain:
                    q, p = _read(base / mount / d / "cpu.cfs_quota_us"), _read(base / mount / d / "cpu.cfs_period_us")
                    if q is not None and p is not None and (cores := _cores(q, p)) is not None:
                        found.append(cores)
    return min(found) if found else None


def usable_cores() -> int:
    """The cores this process may use: its affinity (else the CPU count), capped by its cgroups' CPU
    quota rounded up (`cpu_quota`; ignored if reading it fails in any way); at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # (not on Linux)
        cores = os.cpu_count() or 1
    try:
        quota = cpu_quota()
    except Exception:  # noqa: BLE001 (a diagnostic: never the reason an engine or a sweep fails)
        quota = None
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(cores, 1)


def oversubscribed() -> tuple[int, int] | None:
    """(torch's intra-op threads, usable cores) when the threads outnumber the cores (`usable_cores`),
    else None."""
    cores = usable_cores()
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
        "torch uses %d CPU threads but this process may use %d cores (restricted after torch was "
        "imported, or a container's CPU quota?): small CPU tensor ops on the forward thread can then take "
        "milliseconds each. Call "
        "torch.set_num_threads(%d) before creating the engine (or, for a core restriction, restrict the cores "
        "before starting Python).",
        threads,
        cores,
        cores,
    )
    return True
