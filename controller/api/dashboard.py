"""The live dashboard: the page at /, its static files, and its event stream at /v1/events.

The page is a view of the same data as /v1/status. It holds one EventSource on
/v1/events, which sends a full snapshot whenever the device table or an RLM run
changes (at most one per `min_interval_s`) and at least every
`snapshot_interval_s`, so a page that stops hearing from the server can tell.
The first line of every stream is `retry:`, so browsers reconnect quickly after
a controller restart. The feed also reads exo v1 instances for the endpoints
table, but only while a page is open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
from aiohttp import web

from kowalski.common.errors import KowalskiError
from kowalski.controller.api.state import STATE, ControllerState
from kowalski.controller.api.status import Status
from kowalski.controller.fleet.device_table import DeviceEvent, DeviceTable
from kowalski.controller.models.exo_connection import READY_PARTS
from kowalski.controller.models.router import Endpoint
from kowalski.controller.rlm.events import RlmEvent, RunFinished
from kowalski.controller.rlm.trajectory import StoredRunSummary, list_runs

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
# What the browser waits before reconnecting a dropped stream (the SSE `retry:` field).
RECONNECT_MS = 1000
# Stored runs (from the trajectory directory) sent with each snapshot.
STORED_RUNS = 30
# A snapshot goes to every open page several times a second: queries are cut to this.
QUERY_CHARS = 200
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# The page needs nothing from elsewhere; model output it shows can never load or run anything.
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_encoder = msgspec.json.Encoder()


class InstanceView(msgspec.Struct, frozen=True, kw_only=True):
    """One exo v1 instance: a model placed on some nodes."""

    instance_id: str
    kind: str
    model_id: str
    nodes: int
    ready: bool


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the page shows, sent as one SSE `snapshot` event."""

    status: Status
    # The device table's clock now: history sample times are on that clock.
    clock: float
    history_window_s: float
    # The longest the server stays silent; the page reconnects after a few of these.
    snapshot_interval_s: float
    # Endpoint URL -> its exo v1 instances; endpoints of other flavours are absent.
    instances: dict[str, list[InstanceView]]
    # Root runs from the trajectory directory: queries cut to QUERY_CHARS, answers left
    # out (empty; None still means unfinished).
    stored_runs: list[StoredRunSummary]


class DashboardFeed:
    """Tells open event streams when the status changed; keeps instances and stored runs."""

    def __init__(self, state: ControllerState, *, min_interval_s: float = 0.25,
                 snapshot_interval_s: float = 2.0, instances_interval_s: float = 5.0) -> None:
        self._state = state
        self.min_interval_s = min_interval_s
        self.snapshot_interval_s = snapshot_interval_s
        self._instances_interval_s = instances_interval_s
        # Bumped on every change; each stream remembers the revision it last sent.
        self.revision = 0
        self.streams = 0
        self.closed = False
        # Set and replaced on every change: waiters hold the old one.
        self._changed = asyncio.Event()
        self._closing = asyncio.Event()
        # Wakes run(): a page opened (instances wanted now) or a run finished.
        self._work = asyncio.Event()
        self._runs_stale = True
        self._instances: dict[str, list[InstanceView]] = {}
        self._stored: list[StoredRunSummary] = []

    def touch(self) -> None:
        """Note a change: every stream sends a fresh snapshot soon."""
        self.revision += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def on_table(self, _table: DeviceTable, _event: DeviceEvent) -> None:
        self.touch()

    def on_run(self, event: RlmEvent) -> None:
        self.touch()
        if isinstance(event, RunFinished) and event.depth == 0:
            self._runs_stale = True
            self._work.set()

    def snapshot(self) -> bytes:
        state = self._state
        return _encoder.encode(Snapshot(
            status=state.status(), clock=state.cluster.clock(),
            history_window_s=state.cluster.table.settings.history_window_s,
            snapshot_interval_s=self.snapshot_interval_s, instances=self._instances,
            stored_runs=self._stored,
        ))

    async def pause(self, seconds: float) -> None:
        """Sleep, but wake at once when the feed closes."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    async def next_change(self, seen: int, timeout_s: float) -> None:
        """Return once the revision has moved past seen, after timeout_s, or on close."""
        if self.revision != seen or self.closed:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout_s)

    def opened(self) -> None:
        self.streams += 1
        if self.streams == 1:
            self._work.set()

    def close(self) -> None:
        """End every stream (the server is stopping); safe to call twice."""
        self.closed = True
        self._closing.set()
        self.touch()

    async def run(self) -> None:
        """Refresh stored runs when one finishes, and instances while a page is open."""
        while True:
            self._work.clear()
            try:
                if self._runs_stale:
                    self._runs_stale = False
                    await self._refresh_runs()
                if self.streams:
                    await self._refresh_instances()
            except Exception:
                log.exception("dashboard refresh failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._work.wait(), self._instances_interval_s)

    async def _refresh_runs(self) -> None:
        found = await asyncio.to_thread(list_runs, self._state.runs.config.trajectory_dir)
        # The page shows no answers in its table (a selected run's answer comes from its
        # trajectory): leaving them out halves a snapshot's stored runs.
        stored = [msgspec.structs.replace(run, query=run.query[:QUERY_CHARS],
                                          answer=None if run.answer is None else "")
                  for run in found[:STORED_RUNS]]
        if stored != self._stored:
            self._stored = stored
            self.touch()

    async def _refresh_instances(self) -> None:
        endpoints = [e for e in self._state.router.endpoints if e.healthy and e.flavour == "v1"]
        found = await asyncio.gather(*(_instances(e) for e in endpoints))
        instances = {e.url: views for e, views in zip(endpoints, found, strict=True)
                     if views is not None}
        if instances != self._instances:
            self._instances = instances
            self.touch()


async def _instances(endpoint: Endpoint) -> list[InstanceView] | None:
    try:
        # Only the sub-trees that say which instances are ready: most of /state is downloads.
        cluster = await endpoint.client.state(READY_PARTS)
    except KowalskiError as exc:
        log.debug("no instances from %s: %s", endpoint.url, exc)
        return None
    return [InstanceView(instance_id=instance.instance_id, kind=instance.kind,
                         model_id=instance.model_id, nodes=len(instance.node_ids),
                         ready=cluster.instance_ready(instance))
            for instance in sorted(cluster.instances.values(), key=lambda i: i.model_id)]


FEED = web.AppKey("dashboard_feed", DashboardFeed)


async def get_index(_request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={
        **_PAGE_HEADERS, "Content-Type": _CONTENT_TYPES[".html"]})


async def get_static(request: web.Request) -> web.FileResponse:
    """A file of the page; only plain names of the kinds the page uses."""
    name = request.match_info["name"]
    path = STATIC_DIR / name
    content_type = _CONTENT_TYPES.get(path.suffix)
    if content_type is None or name.startswith(".") or not path.is_file():
        raise web.HTTPNotFound(text=f"no file {name!r}")
    return web.FileResponse(path, headers={
        "Content-Type": content_type, "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff"})


async def get_events(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: a snapshot now, then on every change and every few seconds."""
    feed = request.app[FEED]
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
        # Proxies such as nginx would otherwise hold events back.
        "X-Accel-Buffering": "no"})
    await response.prepare(request)
    feed.opened()
    try:
        await response.write(f"retry: {RECONNECT_MS}\n\n".encode())
        while not feed.closed:
            seen = feed.revision
            # JSON from msgspec has no raw newlines, so one data line holds it all.
            await response.write(b"event: snapshot\ndata: " + feed.snapshot() + b"\n\n")
            await feed.pause(feed.min_interval_s)
            await feed.next_change(seen, feed.snapshot_interval_s)
    except ConnectionResetError:
        pass  # the page went away; its browser reconnects if it wants more
    finally:
        feed.streams -= 1
    return response


def add_dashboard_routes(app: web.Application, *, min_interval_s: float = 0.25,
                         snapshot_interval_s: float = 2.0,
                         instances_interval_s: float = 5.0) -> DashboardFeed:
    """Serve the page and its stream on app, whose STATE must already be set."""
    feed = DashboardFeed(app[STATE], min_interval_s=min_interval_s,
                         snapshot_interval_s=snapshot_interval_s,
                         instances_interval_s=instances_interval_s)
    app[FEED] = feed

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        state = app[STATE]
        unsubscribe = [state.cluster.subscribe(feed.on_table), state.runs.subscribe(feed.on_run)]
        task = asyncio.create_task(feed.run(), name="dashboard-feed")
        try:
            yield
        finally:
            feed.close()
            task.cancel()
            await asyncio.wait([task])
            for undo in unsubscribe:
                undo()

    async def on_shutdown(_app: web.Application) -> None:
        # Before aiohttp waits for open handlers: streams end now, not at its timeout.
        feed.close()

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(on_shutdown)
    app.router.add_get("/", get_index)
    app.router.add_get("/static/{name}", get_static)
    app.router.add_get("/v1/events", get_events)
    return feed
