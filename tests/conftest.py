"""Shared fixtures: a guard against leaked processes, configs with shrunk timers."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import psutil
import pytest


def _descendants() -> set[int]:
    try:
        return {child.pid for child in psutil.Process().children(recursive=True)}
    except psutil.Error:
        return set()


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    """Fail a test that leaves a child process of the test run behind."""
    before = _descendants()
    yield
    deadline = time.monotonic() + 5.0
    leaked = _descendants() - before
    while leaked and time.monotonic() < deadline:
        time.sleep(0.05)
        leaked = {
            pid for pid in _descendants() - before
            if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        }
    if leaked:
        names = []
        for pid in leaked:
            try:
                names.append(f"{pid}:{' '.join(psutil.Process(pid).cmdline())[:80]}")
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        if names:
            pytest.fail(f"test leaked processes: {names}")


def is_root() -> bool:
    return os.geteuid() == 0
