"""The host's own network addresses, for mDNS records and callback URLs."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

_ANY = ("", "0.0.0.0")


def host_addresses() -> list[str]:
    """IPv4 addresses of the host's interfaces that are up, loopback last."""
    return [str(address) for address, _ in _interface_networks()]


def is_loopback(host: str) -> bool:
    """Whether host names this machine's loopback; any other name may resolve anywhere."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def local_networks() -> list[ipaddress.IPv4Network]:
    """The IPv4 subnets this host's interfaces that are up sit on, loopback left out."""
    return [network for address, network in _interface_networks()
            if not address.is_loopback]


def advertised_addresses(bind_host: str) -> list[str]:
    """What an agent bound to bind_host puts in its mDNS record: addresses a peer can reach.

    A specific bind address is the only one that answers. Bound to every interface, the
    host's non-loopback addresses; loopback only when the host has nothing else, since a
    peer that dials 127.0.0.1 reaches itself, not this host.
    """
    if bind_host not in _ANY:
        return _resolve(bind_host)
    addresses = host_addresses()
    reachable = [a for a in addresses if not ipaddress.IPv4Address(a).is_loopback]
    return reachable or addresses or ["127.0.0.1"]


def by_preference(addresses: Iterable[str],
                  networks: Iterable[ipaddress.IPv4Network]) -> list[str]:
    """addresses in the order to try them: on one of networks first, loopback last."""
    subnets = list(networks)

    def rank(address: str) -> int:
        ip = ipaddress.IPv4Address(address)
        if ip.is_loopback:
            return 2
        return 0 if any(ip in subnet for subnet in subnets) else 1

    # sorted() is stable: within a rank, the advertiser's own order stands.
    return sorted(dict.fromkeys(addresses), key=rank)


def _interface_networks() -> list[tuple[ipaddress.IPv4Address, ipaddress.IPv4Network]]:
    # Imported here: every agent imports this module (for is_loopback), and one without
    # mDNS is 0.9 MiB smaller without psutil.
    import psutil

    found: dict[ipaddress.IPv4Address, ipaddress.IPv4Network] = {}
    stats = psutil.net_if_stats()
    for name, entries in psutil.net_if_addrs().items():
        if name in stats and not stats[name].isup:
            continue
        for entry in entries:
            if entry.family != socket.AF_INET:
                continue
            address = ipaddress.IPv4Address(entry.address)
            mask = entry.netmask or "255.255.255.255"
            found[address] = ipaddress.IPv4Network(f"{address}/{mask}", strict=False)
    return sorted(found.items(), key=lambda item: (item[0].is_loopback, item[0]))


def _resolve(host: str) -> list[str]:
    """An IPv4 literal as it is; a host name as the IPv4 addresses it resolves to."""
    try:
        return [str(ipaddress.IPv4Address(host))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, family=socket.AF_INET, type=socket.SOCK_STREAM)
    except OSError:
        return []
    return list(dict.fromkeys(str(info[4][0]) for info in infos))
