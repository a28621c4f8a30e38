"""The host's own network addresses, for mDNS records and callback URLs."""

from __future__ import annotations

import socket

import psutil


def host_addresses() -> list[str]:
    """IPv4 addresses of the host's interfaces that are up, loopback last."""
    addresses: list[str] = []
    stats = psutil.net_if_stats()
    for name, entries in psutil.net_if_addrs().items():
        if name in stats and not stats[name].isup:
            continue
        addresses.extend(e.address for e in entries if e.family == socket.AF_INET)
    return sorted(set(addresses), key=lambda a: (a.startswith("127."), a))
