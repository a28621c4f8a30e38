"""Waiting on a cgroup v2 directory's cgroup.events until no process is left in it."""

from __future__ import annotations

import asyncio
import os
import select
import time
from pathlib import Path


def populated(events_text: str) -> bool | None:
    """The `populated` flag of a cgroup.events text; None when it has none."""
    for line in events_text.splitlines():
        name, _, value = line.partition(" ")
        if name == "populated" and value.strip() in ("0", "1"):
            return value.strip() == "1"
    return None


async def wait_unpopulated(directory: Path, timeout_s: float) -> bool:
    """Wait until the cgroup holds no process; False at the timeout.

    The kernel flags a change of cgroup.events as a priority event on the open file; an
    epoll set of its own, edge-triggered, turns that into a readable fd the event loop
    watches, so nothing polls or sleeps. Raises OSError if the file cannot be watched.
    """
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()
    fd = os.open(directory / "cgroup.events", os.O_RDONLY | os.O_CLOEXEC)
    watch = select.epoll()
    try:
        # Registered before the first read: a change after that read is not missed.
        watch.register(fd, select.EPOLLPRI | select.EPOLLET)

        def wake() -> None:
            watch.poll(0)
            changed.set()

        loop.add_reader(watch.fileno(), wake)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                # Reading the file is also what re-arms the kernel's notification.
                state = populated(os.pread(fd, 4096, 0).decode())
                if state is None:
                    raise OSError(f"no populated line in {directory / 'cgroup.events'}")
                if not state:
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                changed.clear()
                try:
                    await asyncio.wait_for(changed.wait(), remaining)
                except TimeoutError:
                    continue
        finally:
            loop.remove_reader(watch.fileno())
    finally:
        watch.close()
        os.close(fd)
