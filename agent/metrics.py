"""Host metrics from psutil, as sent in heartbeats."""

from __future__ import annotations

import os

import psutil

from kowalski.common.messages import Metrics


class MetricsSampler:
    """Samples memory, CPU and load; CPU percent is measured between calls."""

    def __init__(self) -> None:
        # The first cpu_percent(None) call only starts the measuring window.
        psutil.cpu_percent(interval=None)

    def sample(self) -> Metrics:
        memory = psutil.virtual_memory()
        load_1m, load_5m, load_15m = os.getloadavg()
        return Metrics(
            memory_total_bytes=memory.total,
            memory_available_bytes=memory.available,
            cpu_percent=psutil.cpu_percent(interval=None),
            cpu_count=psutil.cpu_count() or 1,
            load_1m=load_1m,
            load_5m=load_5m,
            load_15m=load_15m,
        )
