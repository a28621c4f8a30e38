"""Advertises the agent as _kowalski._tcp.local. over mDNS."""

from __future__ import annotations

import logging

from zeroconf import IPVersion, ServiceInfo
from zeroconf.asyncio import AsyncZeroconf

from kowalski.common.errors import ConfigError

SERVICE_TYPE = "_kowalski._tcp.local."
log = logging.getLogger(__name__)


class Advertiser:
    """Registers one service record for the agent's lifetime; close() is idempotent.

    addresses are those a peer can dial (see common/addresses.py); the controller tries
    them in its own order and keeps the first that answers as this agent.
    """

    def __init__(self, *, agent_id: str, name: str, port: int, version: str,
                 addresses: list[str], interfaces: list[str] | None = None) -> None:
        if not addresses:
            raise ConfigError("no IPv4 address to advertise: agent.host resolves to none; "
                              "set agent.advertise_address", key="agent.host")
        self._info = ServiceInfo(
            SERVICE_TYPE,
            f"{agent_id}.{SERVICE_TYPE}",
            port=port,
            parsed_addresses=addresses,
            properties={"id": agent_id, "name": name, "version": version, "api": "v1"},
            # One host name per agent: agents sharing a UTS name (containers, namespaces)
            # must not merge their address records.
            server=f"{agent_id}.local.",
        )
        self._interfaces = interfaces
        self._zeroconf: AsyncZeroconf | None = None

    async def start(self) -> None:
        if self._interfaces:
            self._zeroconf = AsyncZeroconf(interfaces=self._interfaces, ip_version=IPVersion.V4Only)
        else:
            self._zeroconf = AsyncZeroconf(ip_version=IPVersion.V4Only)
        # allow_name_change: two agents restarted quickly must not fail on a stale record.
        announced = await self._zeroconf.async_register_service(self._info,
                                                                allow_name_change=True)
        await announced
        log.info("advertising %s on %s", self._info.name, self._info.parsed_addresses())

    async def close(self) -> None:
        zeroconf, self._zeroconf = self._zeroconf, None
        if zeroconf is None:
            return
        try:
            # The returned task sends the goodbye packets; closing first would drop them.
            goodbye = await zeroconf.async_unregister_service(self._info)
            await goodbye
        finally:
            await zeroconf.async_close()
