"""A description of the machine a run measured: CPU, cores, memory, kernel, Python."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import psutil


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> list[tuple[str, str]]:
    """(name, value) rows for the report."""
    memory = psutil.virtual_memory()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [
        ("date", time.strftime("%Y-%m-%d %H:%M:%S %Z")),
        ("cpu", f"{cpu_model()} ({platform.machine()})"),
        ("cores", f"{psutil.cpu_count(logical=True)} logical, {usable} usable by this run"),
        ("memory", f"{memory.total / 2**30:.1f} GiB"),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("os", _os_release()),
        ("python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("user", "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"),
    ]


def _os_release() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"
