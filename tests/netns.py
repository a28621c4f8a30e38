"""Test hosts in network namespaces joined by veth pairs: real multicast, no host traffic."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field

import pytest


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=10)


def netns_unavailable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's ip command is missing"
    probe = f"kwprobe{secrets.token_hex(3)}"
    try:
        _run("ip", "netns", "add", probe)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        return f"ip netns add failed: {getattr(exc, 'stderr', b'')!r}"
    _run("ip", "netns", "del", probe)
    return None


def require_netns() -> None:
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)


@dataclass
class Lan:
    """Hosts on one LAN: host 0 holds the bridge, the others hang off it by veth."""

    prefix: str
    names: list[str] = field(default_factory=list)
    links: list[tuple[str, str]] = field(default_factory=list)

    def address(self, index: int) -> str:
        return f"{self.prefix}.{index + 1}"

    def exec_argv(self, index: int, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.names[index], *argv]

    def set_link(self, index: int, up: bool) -> None:
        """Take host index's cable out (or plug it back in): a network partition."""
        namespace, device = self.links[index - 1]
        _run("ip", "-n", namespace, "link", "set", device, "up" if up else "down")

    def add_bridge(self, index: int, cidr: str) -> None:
        """Give host index a bridge with no ports and the address cidr, as containers do."""
        # Interface names are per namespace: every host may use the same one.
        device = "kwdocker0"
        _run("ip", "-n", self.names[index], "link", "add", device, "type", "bridge")
        _run("ip", "-n", self.names[index], "addr", "add", cidr, "dev", device)
        _run("ip", "-n", self.names[index], "link", "set", device, "up")

    def close(self) -> None:
        for name in self.names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


def make_lan(hosts: int) -> Lan:
    """Host 0 holds a bridge; every other host is cabled to it by a veth pair."""
    tag = secrets.token_hex(3)
    lan = Lan(prefix=f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250)}")
    try:
        for index in range(hosts):
            name = f"kw{tag}h{index}"
            _run("ip", "netns", "add", name)
            lan.names.append(name)
            _run("ip", "-n", name, "link", "set", "lo", "up")
        hub = lan.names[0]
        bridge = f"kw{tag}br"
        _run("ip", "-n", hub, "link", "add", bridge, "type", "bridge", "mcast_snooping", "0")
        _run("ip", "-n", hub, "addr", "add", f"{lan.address(0)}/24", "dev", bridge)
        _run("ip", "-n", hub, "link", "set", bridge, "up")
        for index in range(1, hosts):
            hub_end, peer_end = f"kw{tag}a{index}", f"kw{tag}b{index}"
            _run("ip", "link", "add", hub_end, "netns", hub, "type", "veth",
                 "peer", "name", peer_end, "netns", lan.names[index])
            _run("ip", "-n", hub, "link", "set", hub_end, "master", bridge, "up")
            _run("ip", "-n", lan.names[index], "addr", "add", f"{lan.address(index)}/24",
                 "dev", peer_end)
            _run("ip", "-n", lan.names[index], "link", "set", peer_end, "up")
            lan.links.append((lan.names[index], peer_end))
    except BaseException:
        lan.close()
        raise
    return lan
