"""The set-up script waits for a package manager that holds apt's locks, then goes on."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "apt_lock_wait.py"


def _wait(lock: Path, limit_s: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "APT_LOCK_FILES": str(lock), "APT_LOCK_WAIT_S": str(limit_s)}
    return subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True,
                          text=True, timeout=60)


@contextmanager
def _held(lock: Path, seconds: float) -> Iterator[None]:
    """Hold lock from a child process (fcntl locks are per process) for seconds."""
    code = ("import fcntl, os, time\n"
            f"fd = os.open({str(lock)!r}, os.O_RDWR)\n"
            "fcntl.lockf(fd, fcntl.LOCK_EX)\n"
            "print('held', flush=True)\n"
            f"time.sleep({seconds})\n")
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                          text=True) as holder:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "held\n"
        try:
            yield
        finally:
            holder.kill()


def test_a_free_lock_goes_straight_through(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    lock.touch()
    result = _wait(lock, 5)
    assert result.returncode == 0
    assert result.stdout == ""


def test_a_held_lock_is_waited_for_and_said_once(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    lock.touch()
    with _held(lock, 2.0):
        result = _wait(lock, 60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("waiting up to 60 s for another package manager") == 1


def test_a_lock_held_past_the_limit_fails_with_the_next_step(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    lock.touch()
    with _held(lock, 30.0):
        result = _wait(lock, 1)
    assert result.returncode == 1
    assert "still held" in result.stderr
    assert "run this script again" in result.stderr
    assert "Traceback" not in result.stderr
