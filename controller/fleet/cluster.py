"""The live device table: discovery and heartbeats produce events, apply() changes state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from kowalski.common.config import ControllerConfig
from kowalski.common.errors import KowalskiError
from kowalski.common.messages import DeviceId, Heartbeat
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
        # An mDNS agent's advertised addresses as URLs, in the order to try them, and the
        # one that last answered as that agent; until one has, every poll tries them all.
        self._candidates: dict[DeviceId, list[str]] = {}
        self._settled: dict[DeviceId, str] = {}
        # Set by a discovery so the next poll round starts now, not an interval later.
        self._wake = asyncio.Event()

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

    def _found(self, agent_id: str, name: str, urls: list[str]) -> None:
        device_id = DeviceId(agent_id)
        self._candidates[device_id] = urls
        row = self.table.devices.get(device_id)
        # The row keeps the address that answers while it is still advertised; a new one
        # shows the most likely address until a heartbeat settles it.
        url = row.url if row is not None and row.url in urls else urls[0]
        if self._settled.get(device_id) != url:
            self._settled.pop(device_id, None)
        self.apply(DeviceDiscovered(device_id=device_id, name=name, url=url, source="mdns",
                                    at=self.clock()))
        self._wake.set()

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
                    remaining_s = max(0.0, self._config.heartbeat_interval_s - elapsed)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), remaining_s)
                    self._wake.clear()
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
        devices = self.table.devices
        for gone in (self._candidates.keys() | self._settled.keys()) - devices.keys():
            self._candidates.pop(gone, None)
            self._settled.pop(gone, None)
        beats = [self._beat_device(device_id, self._urls_to_try(device_id))
                 for device_id in devices]
        known = {row.url for row in devices.values()}
        beats += [self._beat_static(url) for url in self._static_urls if url not in known]
        await asyncio.gather(*beats)

    def _urls_to_try(self, device_id: DeviceId) -> list[str]:
        row = self.table.devices[device_id]
        candidates = self._candidates.get(device_id)
        if row.source == "static" or not candidates or self._settled.get(device_id) == row.url:
            return [row.url]
        return candidates

    async def _beat_device(self, device_id: DeviceId, urls: list[str]) -> None:
        answer = await self._first_answer(device_id, urls)
        if isinstance(answer, str):
            self._settled.pop(device_id, None)
            self.apply(HeartbeatFailed(device_id=device_id, reason=answer, at=self.clock()))
            return
        url, beat, sent, received = answer
        row = self.table.devices.get(device_id)
        if row is None:
            return
        if url != row.url:
            log.info("mDNS agent %s answers at %s", device_id, url)
            self.apply(DeviceDiscovered(device_id=device_id, name=row.name, url=url,
                                        source=row.source, at=received))
        self._settled[device_id] = url
        self.apply(HeartbeatReceived(device_id=device_id, heartbeat=beat,
                                     rtt_ms=(received - sent) * 1000.0, at=received))

    async def _first_answer(
        self, device_id: DeviceId, urls: list[str],
    ) -> tuple[str, Heartbeat, float, float] | str:
        """The first of urls whose signed heartbeat comes from device_id, or why none does.

        All are asked at once; the answer is taken in the order of urls, so a preferred
        address wins over one that merely answered sooner, and the round waits only as
        long as the preferred addresses take to succeed or fail.
        """
        asks = [asyncio.create_task(self._ask(url)) for url in urls]
        reasons: list[str] = []
        try:
            for url, ask in zip(urls, asks, strict=True):
                try:
                    beat, sent, received = await ask
                except KowalskiError as exc:
                    reasons.append(exc.message)
                    continue
                if beat.agent_id != device_id:
                    # Another agent answers here: its own loopback, a shared bridge address,
                    # or a restart on a new id.
                    reasons.append(f"{url} now answers as {beat.agent_id}")
                    continue
                return url, beat, sent, received
        finally:
            for ask in asks:
                ask.cancel()
            await asyncio.gather(*asks, return_exceptions=True)
        return "; ".join(reasons)

    async def _ask(self, url: str) -> tuple[Heartbeat, float, float]:
        sent = self.clock()
        beat = await self._agents.heartbeat(url, timeout_s=self._config.heartbeat_timeout_s)
        return beat, sent, self.clock()

    async def _beat_static(self, url: str) -> None:
        """A configured address not in the table yet: filed under the id that answers."""
        try:
            beat, sent, received = await self._ask(url)
        except KowalskiError as exc:
            if self._static_errors.get(url) != exc.message:
                # Not in the table yet, so nothing else would show why (a wrong secret, a
                # typo in the address): say it once per change.
                self._static_errors[url] = exc.message
                log.warning("static agent %s does not answer heartbeats: %s", url, exc.message)
            return
        if self._static_errors.pop(url, None) is not None:
            log.info("static agent %s answers again", url)
        device_id = DeviceId(beat.agent_id)
        if device_id not in self.table.devices:
            self.apply(DeviceDiscovered(device_id=device_id, name=beat.name, url=url,
                                        source="static", at=received))
        self.apply(HeartbeatReceived(device_id=device_id, heartbeat=beat,
                                     rtt_ms=(received - sent) * 1000.0, at=received))

    def url_of(self, device_id: str) -> str:
        row = self.table.devices.get(DeviceId(device_id))
        if row is None:
            raise KowalskiError(f"device {device_id!r} is not in the device table")
        return row.url
