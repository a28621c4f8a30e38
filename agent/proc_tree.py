"""Processes as /proc shows them: parent links, process groups and start times.

The agent signals processes by pid only where the number is sure to be the job's: a
number freed by a reap goes to another process once the kernel's pid counter comes round.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["boot_ticks", "descendants", "group_outlived"]

# The unit of a process's start time in /proc/PID/stat.
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def boot_ticks() -> int:
    """Now, in the unit of a process's start time in /proc/PID/stat."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * _CLOCK_TICKS)


def _stat_fields(entry: Path) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state first); [] if gone."""
    try:
        stat = (entry / "stat").read_text()
    except OSError:
        return []
    # The command name may hold spaces and parentheses: the fields follow the last ")".
    return stat.rsplit(")", 1)[1].split()


def group_outlived(pgid: int, reaped_ticks: int) -> bool:
    """Whether the group pgid is still the one its leader, reaped at reaped_ticks, led.

    It is while a member that started before the reap lives: that member has kept the
    group, and with it the number, in use since (the kernel gives no new process a number
    still in use as a group id). A live process whose pid is the number means the number
    went to someone else. Start times count in ticks of 10 ms or so, so only a member from
    a tick before the reap's counts.
    """
    kept = False
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(entry)
            if not fields:
                continue
            if int(entry.name) == pgid:
                return False
            # Fields 5 (pgrp) and 22 (starttime) of proc(5), counted from the state (3).
            kept = kept or (int(fields[2]) == pgid and int(fields[19]) < reaped_ticks)
    return kept


def descendants(pid: int) -> list[int]:
    """Every live descendant of pid, from the parent links in /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        fields = _stat_fields(entry) if entry.name.isdigit() else []
        if fields:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    pending = [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found
