"""Waits until no other package manager holds apt's or dpkg's locks, saying so once.

Another apt-get, or unattended-upgrades on a fresh machine, may hold them when the set-up
starts; apt-get update has no lock timeout of its own, so it would fail at once.
Settings from the environment: APT_LOCK_WAIT_S (default 300), APT_LOCK_FILES (a
colon-separated list, for tests).
"""

from __future__ import annotations

import fcntl
import os
import sys
import time

LOCKS = ("/var/lib/dpkg/lock-frontend", "/var/lib/dpkg/lock", "/var/lib/apt/lists/lock",
         "/var/cache/apt/archives/lock")
POLL_INTERVAL_S = 1.0


def held(paths: list[str]) -> list[str]:
    """The lock files another process holds now."""
    busy = []
    for path in paths:
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            busy.append(path)
        finally:
            os.close(fd)
    return busy


def main() -> int:
    paths = os.environ.get("APT_LOCK_FILES", "").split(":") if os.environ.get(
        "APT_LOCK_FILES") else list(LOCKS)
    limit_s = float(os.environ.get("APT_LOCK_WAIT_S", "300"))
    start = time.monotonic()
    said = False
    while busy := held(paths):
        if time.monotonic() - start > limit_s:
            print(f"setup: {busy[0]} is still held after {limit_s:.0f} s: another package "
                  "manager is running; let it finish, then run this script again",
                  file=sys.stderr)
            return 1
        if not said:
            print(f"setup: waiting up to {limit_s:.0f} s for another package manager to "
                  f"release {busy[0]}", flush=True)
            said = True
        time.sleep(POLL_INTERVAL_S)
    return 0


if __name__ == "__main__":
    sys.exit(main())
