"""The job launcher: it joins the job's cgroup (or waits for the move), sets rlimits, execs."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from kowalski.agent.cgroup_mounts import parse_proc_cgroup
from kowalski.agent.cgroups import CgroupManager
from kowalski.agent.launcher import (
    LAUNCH_FAILED,
    LAUNCH_MARK,
    build_launcher,
    cache_dir,
    launcher_args,
    python_launcher,
)


@pytest.fixture(params=["python", "c"])
def launcher(request: pytest.FixtureRequest, tmp_path: Path) -> list[str]:
    """Each launcher the agent may use; the C one where a compiler is installed."""
    if request.param == "python":
        return python_launcher()
    built = build_launcher(tmp_path)
    if built == python_launcher():
        pytest.skip("no C compiler here")
    return built


def start_launcher(launcher: list[str], gate_fd: int, rlimits: list[tuple[str, int]],
                   argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*launcher, *launcher_args(gate_fd, rlimits, argv)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(gate_fd,))


def test_launcher_runs_the_command_only_after_the_gate_opens(launcher: list[str]) -> None:
    gate_read, gate_write = os.pipe()
    process = start_launcher(launcher, gate_read, [("RLIMIT_NOFILE", 77), ("RLIMIT_CORE", 0)],
                             ["/bin/sh", "-c", "ulimit -n; ulimit -c"])
    os.close(gate_read)
    try:
        # Whenever this is read, before the gate opens the process is still the launcher.
        command_line = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")
        assert b"ulimit" not in command_line[0]
        assert process.poll() is None
        os.write(gate_write, b"1")
    finally:
        os.close(gate_write)
    out, err = process.communicate(timeout=30)
    assert (process.returncode, out.split(), err) == (0, [b"77", b"0"], b"")


def test_launcher_fails_with_its_mark_when_the_gate_closes_unopened(
        launcher: list[str]) -> None:
    gate_read, gate_write = os.pipe()
    process = start_launcher(launcher, gate_read, [], ["/bin/true"])
    os.close(gate_read)
    os.close(gate_write)
    _, err = process.communicate(timeout=30)
    assert process.returncode == LAUNCH_FAILED
    assert err.startswith(LAUNCH_MARK)
    assert b"could not move the job into its cgroup" in err


def test_launcher_without_a_gate_reports_a_missing_command_with_its_mark(
        launcher: list[str]) -> None:
    process = subprocess.run([*launcher, *launcher_args(-1, [], ["/nonexistent/command"])],
                             capture_output=True, timeout=30, check=False)
    assert process.returncode == LAUNCH_FAILED
    assert process.stderr.startswith(LAUNCH_MARK)
    assert b"cannot run /nonexistent/command" in process.stderr


def test_launcher_joins_the_job_cgroups_itself_before_the_command_runs(
        launcher: list[str]) -> None:
    manager, reason = CgroupManager.detect()
    if manager is None:
        pytest.skip(f"no usable cgroup: {reason}")
    try:
        cgroup = manager.create(f"launcher-join-{os.getpid()}", memory_bytes=1 << 28,
                                pids_max=16)
        try:
            if not cgroup.join_files:
                pytest.skip("cgroup v2: the agent moves the launcher (see the gate tests)")
            process = subprocess.run(
                [*launcher, *launcher_args(-1, [], ["/bin/cat", "/proc/self/cgroup"],
                                           joins=cgroup.join_files)],
                capture_output=True, timeout=30, check=False)
            assert (process.returncode, process.stderr) == (0, b"")
            paths = parse_proc_cgroup(process.stdout.decode())
            for controller, path in cgroup.dirs.items():
                assert paths[controller].endswith(f"/{path.name}"), (controller, paths)
        finally:
            asyncio.run(cgroup.remove())
    finally:
        manager.close()


def test_launcher_fails_with_its_mark_when_it_cannot_join_a_cgroup(
        launcher: list[str], tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-cgroup" / "tasks")
    process = subprocess.run(
        [*launcher, *launcher_args(-1, [], ["/bin/true"], joins=[missing])],
        capture_output=True, timeout=30, check=False)
    assert process.returncode == LAUNCH_FAILED
    assert process.stderr.startswith(LAUNCH_MARK)
    assert f"cannot join the cgroup {missing}".encode() in process.stderr


def test_launcher_clamps_a_limit_to_the_hard_limit_it_inherits(launcher: list[str]) -> None:
    # A non-root agent cannot raise a hard limit; the launcher lowers the request instead.
    soft, hard = 50, 60
    process = subprocess.run(
        ["prlimit", f"--nofile={soft}:{hard}", "--", *launcher,
         *launcher_args(-1, [("RLIMIT_NOFILE", 1000)], ["/bin/sh", "-c", "ulimit -n"])],
        capture_output=True, timeout=30, check=False)
    assert (process.returncode, process.stdout.strip()) == (0, str(hard).encode())


def test_a_built_launcher_is_reused_and_one_others_can_write_is_not(tmp_path: Path) -> None:
    first = build_launcher(tmp_path)
    if first == python_launcher():
        pytest.skip("no C compiler here")
    binary = Path(first[0])
    built_at = binary.stat().st_mtime_ns
    assert build_launcher(tmp_path) == first
    assert binary.stat().st_mtime_ns == built_at
    binary.chmod(0o777)
    assert build_launcher(tmp_path) == first
    assert binary.stat().st_mode & 0o777 == 0o755


def test_priming_leaves_the_agent_in_its_own_cgroup() -> None:
    manager, reason = CgroupManager.detect()
    if manager is None:
        pytest.skip(f"no usable cgroup: {reason}")
    try:
        before = Path("/proc/self/cgroup").read_text()
        manager.prime()
        assert Path("/proc/self/cgroup").read_text() == before
    finally:
        manager.close()


def test_the_launcher_cache_is_systemds_cache_directory_when_given(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CACHE_DIRECTORY", f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("CACHE_DIRECTORY")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "kowalski"
