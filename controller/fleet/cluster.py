"""The live device table: discovery and heartbeats produce events, apply() changes state."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from kowalski.common.config import ControllerConfig
from kowalski.common.errors import KowalskiError
from kowalski.common.messages import DeviceId
from kowalski.controller.fleet.agent_client import AgentClient
from kowalski.controller.fleet.device_table import (
    DeviceDiscovered,
    DeviceEvent,
    DeviceLost,
    DeviceTable,
    HeartbeatFailed,
    HeartbeatReceived,
    TableSettings,
    Tick,
    apply,
)
from kowalski.controller.fleet.discovery import MdnsBrowser, static_agent_url

log = logging.getLogger(__name__)
Listener = Callable[[DeviceTable, DeviceEvent], None]
# Longest pause between two health judgements.
_TICK_S = 0.25


class Cluster:
    """Owns the device table; run() browses mDNS, polls heartbeats and ticks the detector."""

    def __init__(self, *, config: ControllerConfig, agents: AgentClient,
                 clock: Callable[[], float] = time.monotonic, scheme: str = "http",
                 mdns_interfaces: list[str] | None = None) -> None:
        self._config = config
        self._agents = agents
        self.clock = clock
        self._scheme = scheme
        self._mdns_interfaces = mdns_interfaces
        self.table = DeviceTable(settings=TableSettings.from_config(config))
        self._listeners: list[Listener] = []
        # Set and replaced on every change: waiters hold the old one.
        self._changed = asyncio.Event()
        # Static entries are keyed by the agent id their first heartbeat reports.
        self._static_urls = [static_agent_url(entry, scheme=scheme)
                             for entry in config.static_agents]
        self._static_errors: dict[str, str] = {}

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call listener after every change; returns a function that unsubscribes."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def apply(self, event: DeviceEvent) -> DeviceTable:
        """Apply one event and tell listeners and waiters when the table changed."""
        before = self.table
        self.table = apply(before, event)
        if self.table is not before:
            for listener in list(self._listeners):
                listener(self.table, event)
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()
        return self.table

    async def changed(self) -> None:
        """Return at the next change of the table."""
        await self._changed.wait()

    async def wait_for(self, predicate: Callable[[DeviceTable], bool], timeout_s: float) -> bool:
        """Wait until predicate(table) holds; False on timeout."""
        deadline = self.clock() + timeout_s
        while not predicate(self.table):
            remaining = deadline - self.clock()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return predicate(self.table)
        return True

    def _found(self, agent_id: str, name: str, url: str, source: str) -> None:
        self.apply(DeviceDiscovered(device_id=DeviceId(agent_id), name=name, url=url,
                                    source="mdns" if source == "mdns" else "static",
                                    at=self.clock()))

    def _lost(self, agent_id: str) -> None:
        self.apply(DeviceLost(device_id=DeviceId(agent_id), at=self.clock()))

    async def run(self) -> None:
        browser: MdnsBrowser | None = None
        try:
            if self._config.discover_mdns:
                browser = MdnsBrowser(on_found=self._found, on_lost=self._lost,
                                      scheme=self._scheme, interfaces=self._mdns_interfaces)
                await browser.start()
            async with asyncio.TaskGroup() as group:
                group.create_task(self._tick_loop(), name="failure-detector")
                while True:
                    started = self.clock()
                    await self.poll_once()
                    elapsed = self.clock() - started
                    await asyncio.sleep(max(0.0, self._config.heartbeat_interval_s - elapsed))
        finally:
            if browser is not None:
                await browser.close()

    async def _tick_loop(self) -> None:
        """Judge health several times per interval, so a death is seen within the timeout
        rather than at the first poll round after it."""
        period = min(_TICK_S, self._config.heartbeat_interval_s / 4)
        while True:
            self.apply(Tick(now=self.clock()))
            await asyncio.sleep(period)

    async def poll_once(self) -> None:
        """Ask every known agent, and every static address not yet known, for a heartbeat."""
        targets: dict[str, DeviceId | None] = {
            row.url: device_id for device_id, row in self.table.devices.items()
        }
        for url in self._static_urls:
            targets.setdefault(url, None)
        await asyncio.gather(*(self._beat(url, device_id) for url, device_id in targets.items()))

    async def _beat(self, url: str, device_id: DeviceId | None) -> None:
        sent = self.clock()
        try:
            beat = await self._agents.heartbeat(url, timeout_s=self._config.heartbeat_timeout_s)
        except KowalskiError as exc:
            if device_id is not None:
                self.apply(HeartbeatFailed(device_id=device_id, reason=str(exc), at=self.clock()))
            elif self._static_errors.get(url) != exc.message:
                # Not in the table yet, so nothing else would show why (a wrong secret, a
                # typo in the address): say it once per change.
                self._static_errors[url] = exc.message
                log.warning("static agent %s does not answer heartbeats: %s", url, exc.message)
            return
        if self._static_errors.pop(url, None) is not None:
            log.info("static agent %s answers again", url)
        received = self.clock()
        if device_id is None:
            device_id = DeviceId(beat.agent_id)
            if device_id not in self.table.devices:
                self.apply(DeviceDiscovered(device_id=device_id, name=beat.name, url=url,
                                            source="static", at=received))
        elif beat.agent_id != device_id:
            # Another agent now answers at this address (a restart on a new id).
            self.apply(HeartbeatFailed(device_id=device_id,
                                       reason=f"{url} now answers as {beat.agent_id}",
                                       at=received))
            return
        self.apply(HeartbeatReceived(device_id=device_id, heartbeat=beat,
                                     rtt_ms=(received - sent) * 1000.0, at=received))

    def url_of(self, device_id: str) -> str:
        row = self.table.devices.get(DeviceId(device_id))
        if row is None:
            raise KowalskiError(f"device {device_id!r} is not in the device table")
        return row.url
