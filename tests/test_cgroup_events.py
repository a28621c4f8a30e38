"""cgroup v2's kill: one write to cgroup.kill, then cgroup.events says when all are gone.

Jobs on a cgroup v1 host never take this path, so it is tested here on any cgroup2 mount
the host has (a hybrid host mounts one without controllers, which is enough: every v2
cgroup has cgroup.kill and cgroup.events).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kowalski.agent.cgroup_events import populated, wait_unpopulated
from kowalski.agent.cgroup_mounts import parse_mountinfo
from kowalski.agent.cgroups import JobCgroup

pytestmark = pytest.mark.timeout(60)


def test_the_populated_flag_is_read_from_cgroup_events() -> None:
    assert populated("populated 1\nfrozen 0\n") is True
    assert populated("populated 0\nfrozen 0\n") is False
    assert populated("frozen 0\n") is None


def _v2_mount() -> Path | None:
    mounts = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    for mount in mounts:
        if mount.version == 2 and mount.root == "/":
            return Path(mount.mount_point)
    return None


@pytest.fixture
async def v2_cgroup() -> AsyncIterator[Path]:
    mount = _v2_mount()
    if mount is None or os.geteuid() != 0:
        pytest.skip("needs root and a cgroup2 mount")
    path = mount / f"kowalski_test_events_{secrets.token_hex(4)}"
    try:
        path.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot make a cgroup under {mount}: {exc.strerror}")
    if not (path / "cgroup.kill").exists():
        path.rmdir()
        pytest.skip("this kernel has no cgroup.kill (before 5.14)")
    try:
        yield path
    finally:
        deadline = time.monotonic() + 5
        while True:
            try:
                path.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.02)


async def _sleepers(cgroup: Path, count: int) -> list[asyncio.subprocess.Process]:
    processes = [await asyncio.create_subprocess_exec("sleep", "60") for _ in range(count)]
    for process in processes:
        (cgroup / "cgroup.procs").write_text(str(process.pid))
    return processes


async def test_cgroup_kill_ends_every_process_and_the_events_say_so(v2_cgroup: Path) -> None:
    processes = await _sleepers(v2_cgroup, 3)
    assert populated((v2_cgroup / "cgroup.events").read_text()) is True
    group = JobCgroup(2, {"memory": v2_cgroup, "pids": v2_cgroup})
    started = time.monotonic()
    assert await group.kill_all()
    assert time.monotonic() - started < 1.0
    assert group.pids() == set()
    assert [await process.wait() for process in processes] == [-9, -9, -9]


async def test_the_wait_ends_when_the_last_process_leaves_and_not_before(
        v2_cgroup: Path) -> None:
    [process] = await _sleepers(v2_cgroup, 1)
    try:
        assert not await wait_unpopulated(v2_cgroup, 0.2)
        asyncio.get_running_loop().call_later(0.1, process.kill)
        started = time.monotonic()
        assert await wait_unpopulated(v2_cgroup, 10.0)
        assert time.monotonic() - started < 2.0
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
