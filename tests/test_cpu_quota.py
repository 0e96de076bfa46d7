"""The cores a process may use under a container's CPU quota (`threads.cpu_quota`, `usable_cores`):
cgroup trees written by hand, v1 and v2, limited and not."""

from __future__ import annotations

import sys

import pytest

from finemoe import simjobs, threads


def tree(tmp_path, membership: str, files: dict[str, str]):
    for rel, text in files.items():
        path = tmp_path / "cg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    (tmp_path / "self").write_text(membership)
    return str(tmp_path / "cg"), str(tmp_path / "self")


def test_v2_quota_in_cores_the_smallest_along_the_group_chain(tmp_path):
    root, me = tree(
        tmp_path,
        "0::/kube/pod1/app\n",
        {"kube/cpu.max": "400000 100000", "kube/pod1/cpu.max": "150000 100000", "kube/pod1/app/cpu.max": "max 100000"},
    )
    assert threads.cpu_quota(root, me) == pytest.approx(1.5)  # the pod's 1.5 cores, below its parent's 4


def test_v2_unlimited_and_missing_files_give_none(tmp_path):
    root, me = tree(tmp_path, "0::/\n", {"cpu.max": "max 100000"})
    assert threads.cpu_quota(root, me) is None
    assert threads.cpu_quota(str(tmp_path / "nowhere"), me) is None
    assert threads.cpu_quota(root, str(tmp_path / "no-membership-file")) is None


def test_v1_cfs_quota(tmp_path):
    membership = "4:memory:/x\n2:cpuacct,cpu:/docker/abc\n0::/\n"
    root, me = tree(
        tmp_path,
        membership,
        {"cpuacct,cpu/docker/abc/cpu.cfs_quota_us": "250000", "cpuacct,cpu/docker/abc/cpu.cfs_period_us": "100000"},
    )
    assert threads.cpu_quota(root, me) == pytest.approx(2.5)
    root, me = tree(
        tmp_path / "b", "1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}
    )  # -1: no quota (this CI machine's own setting)
    assert threads.cpu_quota(root, me) is None


def test_a_host_path_the_container_does_not_mount_falls_back_to_the_mount_root(tmp_path):
    """Docker and Kubernetes show the host's group path in /proc/self/cgroup while the container sees
    its own group at the mount's root: v2, v1 under `cpu,cpuacct` (and its `cpu` alias), and v2 under
    `unified/` on a hybrid system."""
    root, me = tree(tmp_path / "v2", "0::/system.slice/docker-abc.scope\n", {"cpu.max": "200000 100000"})
    assert threads.cpu_quota(root, me) == pytest.approx(2.0)
    root, me = tree(
        tmp_path / "v1",
        "4:cpu,cpuacct:/docker/abc\n",
        {"cpu,cpuacct/cpu.cfs_quota_us": "300000", "cpu,cpuacct/cpu.cfs_period_us": "100000"},
    )
    assert threads.cpu_quota(root, me) == pytest.approx(3.0)
    root, me = tree(
        tmp_path / "alias", "3:cpu:/x\n", {"cpu/cpu.cfs_quota_us": "50000", "cpu/cpu.cfs_period_us": "100000"}
    )
    assert threads.cpu_quota(root, me) == pytest.approx(0.5)
    root, me = tree(tmp_path / "hybrid", "0::/user.slice\n", {"unified/user.slice/cpu.max": "400000 100000"})
    assert threads.cpu_quota(root, me) == pytest.approx(4.0)


def test_garbage_and_foreign_groups_give_no_quota_and_never_raise(tmp_path):
    root, me = tree(tmp_path / "a", "0::/\n", {"cpu.max": "\u00b200000 100000"})  # a digit int() refuses
    assert threads.cpu_quota(root, me) is None
    root, me = tree(tmp_path / "b", "0::/\n", {"cpu.max": "0 100000"})  # no quota of 0 cores
    assert threads.cpu_quota(root, me) is None
    root, me = tree(tmp_path / "c", "0::/\n", {"cpu.max": "200000"})  # a field missing
    assert threads.cpu_quota(root, me) is None
    bad = tmp_path / "bytes"
    bad.write_bytes(b"0::/\xff\xfe\n")  # not UTF-8
    assert threads.cpu_quota(str(tmp_path / "b" / "cg"), str(bad)) is None
    # a group outside the process's cgroup namespace: the namespace root's limit is not its own
    root, me = tree(tmp_path / "d", "0::/../../other\n", {"cpu.max": "100000 100000"})
    assert threads.cpu_quota(root, me) is None


def test_usable_cores_ignores_a_quota_that_fails_to_read(monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)

    def broken():
        raise RuntimeError("unreadable")

    monkeypatch.setattr(threads, "cpu_quota", broken)
    assert threads.usable_cores() == 6


def test_usable_cores_rounds_the_quota_up_and_caps_the_affinity(monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setattr(threads, "cpu_quota", lambda: 2.5)
    assert threads.usable_cores() == 3
    monkeypatch.setattr(threads, "cpu_quota", lambda: 0.2)
    assert threads.usable_cores() == 1
    monkeypatch.setattr(threads, "cpu_quota", lambda: None)
    assert threads.usable_cores() == 64
    # `--jobs 0` forks no more workers than the quota's cores (and no more than the replays; Linux
    # only: elsewhere replays run one at a time)
    monkeypatch.setattr(threads, "cpu_quota", lambda: 4.0)
    linux = sys.platform.startswith("linux")
    assert simjobs.resolve_jobs(0, 100) == (4 if linux else 1)
    assert simjobs.resolve_jobs(0, 2) == (2 if linux else 1)
