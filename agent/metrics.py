"""Host metrics from /proc, as sent in heartbeats."""

from __future__ import annotations

import os
from pathlib import Path

from kowalski.common.messages import Metrics


def _cpu_times() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot, counted as psutil counts them."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    # user nice system idle iowait irq softirq steal; guest time is inside user and nice.
    total = sum(fields[:8])
    return total - fields[3] - fields[4], total


def _memory() -> tuple[int, int]:
    """(total, available) bytes from /proc/meminfo."""
    values: dict[str, int] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("MemTotal", "MemAvailable", "MemFree"):
            values[name] = int(rest.split()[0]) * 1024
    total = values.get("MemTotal", 0)
    return total, values.get("MemAvailable", values.get("MemFree", 0))


class MetricsSampler:
    """Samples memory, CPU and load; CPU percent is measured between calls.

    Read from /proc rather than psutil: the agent is smaller without it.
    """

    def __init__(self) -> None:
        # The first sample's CPU percent covers the time since the sampler was made.
        self._last = _cpu_times()

    def sample(self) -> Metrics:
        total, available = _memory()
        load_1m, load_5m, load_15m = os.getloadavg()
        busy, ticks = _cpu_times()
        spent = ticks - self._last[1]
        percent = 100.0 * (busy - self._last[0]) / spent if spent > 0 else 0.0
        self._last = busy, ticks
        return Metrics(
            memory_total_bytes=total,
            memory_available_bytes=available,
            cpu_percent=round(min(max(percent, 0.0), 100.0), 1),
            cpu_count=os.cpu_count() or 1,
            load_1m=load_1m,
            load_5m=load_5m,
            load_15m=load_15m,
        )
