"""The job launcher: it waits for the agent's cgroup move, sets rlimits, then execs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kowalski.agent.cgroups import CgroupManager
from kowalski.agent.jail import LAUNCH_FAILED, LAUNCH_MARK, LAUNCHER, launcher_args


def start_launcher(gate_fd: int, rlimits: list[tuple[str, int]],
                   argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", LAUNCHER, *launcher_args(gate_fd, rlimits, argv)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(gate_fd,))


def test_launcher_runs_the_command_only_after_the_gate_opens() -> None:
    gate_read, gate_write = os.pipe()
    launcher = start_launcher(gate_read, [("RLIMIT_NOFILE", 77), ("RLIMIT_CORE", 0)],
                              ["/bin/sh", "-c", "ulimit -n; ulimit -c"])
    os.close(gate_read)
    try:
        # Whenever this is read, before the gate opens the process is still the launcher.
        command_line = Path(f"/proc/{launcher.pid}/cmdline").read_bytes()
        assert b"ulimit" not in command_line.split(b"\0")[0]
        assert launcher.poll() is None
        os.write(gate_write, b"1")
    finally:
        os.close(gate_write)
    out, err = launcher.communicate(timeout=30)
    assert (launcher.returncode, out.split(), err) == (0, [b"77", b"0"], b"")


def test_launcher_fails_with_its_mark_when_the_gate_closes_unopened() -> None:
    gate_read, gate_write = os.pipe()
    launcher = start_launcher(gate_read, [], ["/bin/true"])
    os.close(gate_read)
    os.close(gate_write)
    _, err = launcher.communicate(timeout=30)
    assert launcher.returncode == LAUNCH_FAILED
    assert err.startswith(LAUNCH_MARK)
    assert b"could not move the job into its cgroup" in err


def test_launcher_without_a_gate_reports_a_missing_command_with_its_mark() -> None:
    launcher = subprocess.run(
        [sys.executable, "-I", "-S", "-c", LAUNCHER,
         *launcher_args(-1, [], ["/nonexistent/command"])],
        capture_output=True, timeout=30, check=False)
    assert launcher.returncode == LAUNCH_FAILED
    assert launcher.stderr.startswith(LAUNCH_MARK)
    assert b"/nonexistent/command" in launcher.stderr


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
