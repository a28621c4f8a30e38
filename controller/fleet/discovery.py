"""Finds agents: an mDNS browser for _kowalski._tcp.local. plus the static list."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from kowalski.common.addresses import by_preference, local_networks
from kowalski.common.errors import ConfigError

SERVICE_TYPE = "_kowalski._tcp.local."
log = logging.getLogger(__name__)

# (agent_id, name, urls) when an agent appears or re-announces, its advertised addresses as
# URLs in the order to try them; (agent_id,) when it goes.
FoundCallback = Callable[[str, str, list[str]], None]
LostCallback = Callable[[str], None]


def static_agent_url(entry: str, *, scheme: str = "http") -> str:
    """'host:port' or a URL, as a base URL without a trailing slash."""
    entry = entry.strip().rstrip("/")
    if entry.startswith(("http://", "https://")):
        return entry
    host, sep, port = entry.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"expected host:port or a URL, got {entry!r}",
                          key="controller.static_agents")
    return f"{scheme}://{entry}"


class MdnsBrowser:
    """Turns mDNS service changes into found/lost callbacks; close() is idempotent."""

    def __init__(self, *, on_found: FoundCallback, on_lost: LostCallback,
                 scheme: str = "http", interfaces: list[str] | None = None) -> None:
        self._on_found = on_found
        self._on_lost = on_lost
        self._scheme = scheme
        self._interfaces = interfaces
        self._zeroconf: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._lookups: set[asyncio.Task[None]] = set()
        self._ids: dict[str, str] = {}

    async def start(self) -> None:
        kwargs: dict[str, Any] = {"ip_version": IPVersion.V4Only}
        if self._interfaces:
            kwargs["interfaces"] = self._interfaces
        self._zeroconf = AsyncZeroconf(**kwargs)
        self._browser = AsyncServiceBrowser(self._zeroconf.zeroconf, SERVICE_TYPE,
                                            handlers=[self._changed])

    def _changed(self, zeroconf: Zeroconf, service_type: str, name: str,
                 state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            agent_id = self._ids.pop(name, None)
            log.info("mDNS: %s left (%s)", name, agent_id or "never resolved")
            if agent_id is not None:
                self._on_lost(agent_id)
            return
        task = asyncio.get_running_loop().create_task(self._resolve(zeroconf, service_type, name))
        self._lookups.add(task)
        task.add_done_callback(self._lookups.discard)

    async def _resolve(self, zeroconf: Zeroconf, service_type: str, name: str) -> None:
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(zeroconf, 3000):
            log.warning("mDNS service %s did not answer its info request", name)
            return
        addresses = info.parsed_addresses(IPVersion.V4Only)
        if not addresses or info.port is None:
            log.warning("mDNS service %s has no IPv4 address or port", name)
            return
        properties = {
            key.decode(): (value or b"").decode(errors="replace")
            for key, value in info.properties.items()
        }
        agent_id = properties.get("id") or name.removesuffix("." + SERVICE_TYPE)
        display = properties.get("name") or agent_id
        # Which address answers is for heartbeats to settle; here only the order to try:
        # an address on one of this host's subnets first, loopback last.
        urls = [f"{self._scheme}://{address}:{info.port}"
                for address in by_preference(addresses, local_networks())]
        self._ids[name] = agent_id
        log.info("mDNS: found %s at %s", agent_id, ", ".join(urls))
        self._on_found(agent_id, display, urls)

    async def close(self) -> None:
        browser, self._browser = self._browser, None
        zeroconf, self._zeroconf = self._zeroconf, None
        for task in list(self._lookups):
            task.cancel()
        await asyncio.gather(*self._lookups, return_exceptions=True)
        if browser is not None:
            await browser.async_cancel()
        if zeroconf is not None:
            await zeroconf.async_close()
