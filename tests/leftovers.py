"""Finding processes a job may have left behind."""

from __future__ import annotations

import uuid

import psutil


def marker(base: int) -> str:
    """A sleep length no other process on the host uses, to find a job's stragglers."""
    return f"{base + uuid.uuid4().int % 1000}.{uuid.uuid4().int % 10**6:06d}"


def processes_with(text: str) -> list[psutil.Process]:
    """Live processes whose command line contains text."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        try:
            if (process.info["status"] != psutil.STATUS_ZOMBIE
                    and text in " ".join(process.info["cmdline"] or ())):
                found.append(process)
        except psutil.Error:
            continue
    return found
