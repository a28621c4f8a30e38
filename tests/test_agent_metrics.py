"""The agent's host metrics and process tree, read from /proc."""

from __future__ import annotations

import os
import subprocess
import time

import psutil

from kowalski.agent.jail import descendants
from kowalski.agent.metrics import MetricsSampler


def test_metrics_agree_with_psutil_and_count_busy_time() -> None:
    sampler = MetricsSampler()
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:
        pass
    metrics = sampler.sample()
    memory = psutil.virtual_memory()
    assert metrics.memory_total_bytes == memory.total
    assert abs(metrics.memory_available_bytes - memory.available) < 256 << 20
    assert metrics.cpu_count == psutil.cpu_count()
    # This process alone kept one CPU busy the whole time.
    assert 100 / metrics.cpu_count * 0.5 <= metrics.cpu_percent <= 100


def test_descendants_finds_grandchildren_and_nothing_else() -> None:
    shell = subprocess.Popen(["/bin/sh", "-c", "sleep 30 & sleep 30 & wait"])
    try:
        deadline = time.monotonic() + 10
        while len(psutil.Process(shell.pid).children()) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        expected = {child.pid for child in psutil.Process(shell.pid).children(recursive=True)}
        assert len(expected) == 2
        assert set(descendants(shell.pid)) == expected
        assert os.getpid() not in descendants(shell.pid)
    finally:
        for pid in descendants(shell.pid):
            os.kill(pid, 9)
        shell.kill()
        shell.wait()
