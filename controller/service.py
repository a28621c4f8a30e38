"""The controller daemon: cluster, model router, dispatcher and HTTP API as one component.

Lifecycle, the same shape as the agent's: ``Controller(config=..., secret=...)`` only keeps
its arguments. ``await run()`` reads the secrets and certificates first (a bad file fails
before anything starts), opens the HTTP client, starts the embedded model when no exo
endpoint is set, binds the socket, serves the API through AppRunner + SockSite, and then
runs the background loops (the cluster's discovery, heartbeats and failure detector; the
router's exo health polls) in a TaskGroup until ``close()``. Its ``finally`` stops them all
in reverse order. ``close()`` may be called any number of times, before, during or after
``run()``. In-process callers (the CLI's local mode, tests, benchmarks) write
``async with Controller(...) as controller``: it runs ``run()`` in a task, returns once the
API answers (a start-up error is raised there) and closes on the way out.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import msgspec
from aiohttp import web

from kowalski.common.addresses import host_addresses, is_loopback
from kowalski.common.client import SignedClient
from kowalski.common.config import Config, read_api_token
from kowalski.common.errors import ConfigError
from kowalski.common.http import ServerLog
from kowalski.common.ratelimit import RateLimiter
from kowalski.common.signing import Verifier
from kowalski.common.tls import client_ssl_context, server_ssl_context
from kowalski.controller.api.alerts import Alerter
from kowalski.controller.api.app import make_app
from kowalski.controller.api.state import ControllerState
from kowalski.controller.circuit import CircuitPolicy
from kowalski.controller.fleet.agent_client import AgentClient
from kowalski.controller.fleet.cluster import Cluster
from kowalski.controller.fleet.dispatch import Dispatcher
from kowalski.controller.models.cache import CachedBackend, ResultCache
from kowalski.controller.models.embedded import EmbeddedModel
from kowalski.controller.models.grammar import reply_grammar
from kowalski.controller.models.router import LlmRouter
from kowalski.controller.retry import RetryPolicy
from kowalski.controller.rlm.runs import RunRegistry

log = logging.getLogger("kowalski.controller")
# Time open requests (an event stream, a run) get to finish when the controller stops.
_SHUTDOWN_TIMEOUT_S = 5.0
# How long unfinished runs wait at start for a healthy agent before they are left alone.
_RESUME_WAIT_S = 30.0


@dataclass(frozen=True)
class Services:
    """The running pieces, for the HTTP app and for in-process callers such as the CLI."""

    cluster: Cluster
    dispatcher: Dispatcher
    router: LlmRouter
    state: ControllerState
    http: aiohttp.ClientSession
    base_url: str
    port: int


class Controller:
    """The daemon: device table, dispatcher, model router, RLM runs and the HTTP API."""

    def __init__(self, *, config: Config, secret: bytes | None, embedded_model: bool = True,
                 mdns_interfaces: list[str] | None = None,
                 port_file: Path | None = None) -> None:
        self.config = config
        self._secret = secret
        self._embedded_model = embedded_model
        self._mdns_interfaces = mdns_interfaces
        self._port_file = port_file
        self._services: Services | None = None
        self._run_called = False
        self._started = asyncio.Event()
        self._stop = asyncio.Event()
        self._stopped = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def services(self) -> Services:
        """The running pieces; there are none before run() has started them."""
        if self._services is None:
            raise RuntimeError("the controller has not started: await run() or use async with")
        return self._services

    @property
    def cluster(self) -> Cluster:
        return self.services.cluster

    @property
    def dispatcher(self) -> Dispatcher:
        return self.services.dispatcher

    @property
    def router(self) -> LlmRouter:
        return self.services.router

    @property
    def state(self) -> ControllerState:
        return self.services.state

    @property
    def http(self) -> aiohttp.ClientSession:
        return self.services.http

    @property
    def base_url(self) -> str:
        return self.services.base_url

    @property
    def port(self) -> int:
        return self.services.port

    async def run(self) -> None:
        """Start everything, serve until close(), then stop everything."""
        if self._run_called:
            raise RuntimeError("Controller.run() was already called")
        self._run_called = True
        config, settings = self.config, self.config.controller
        http: aiohttp.ClientSession | None = None
        model: EmbeddedModel | None = None
        router: LlmRouter | None = None
        sock: socket.socket | None = None
        runner: web.AppRunner | None = None
        runs: RunRegistry | None = None
        try:
            if self._stop.is_set():
                return
            # Secrets and certificates first: a bad file fails before anything starts.
            api_token = read_api_token(config.security)
            _refuse_open_api(config, api_token)
            tls = server_ssl_context(config.security)
            http = aiohttp.ClientSession()
            agents = AgentClient(SignedClient(http, secret=self._secret,
                                              ssl=client_ssl_context(config.security)))
            cluster = Cluster(config=settings, agents=agents,
                              scheme="https" if config.security.tls_ca_file else "http",
                              mdns_interfaces=self._mdns_interfaces)
            urls = list(config.exo.endpoints)
            exo_config = config.exo
            if not urls and self._embedded_model and config.exo.embedded:
                model = EmbeddedModel.from_config(config.exo)
                urls = [await model.start()]
                if not exo_config.default_model:
                    exo_config = msgspec.structs.replace(exo_config, default_model=model.model_name)
            router = LlmRouter(config=exo_config, urls=urls, session=http,
                               policy=RetryPolicy.from_config(settings),
                               circuit_policy=CircuitPolicy.from_config(settings),
                               load_penalty=settings.load_penalty)
            # Endpoints are probed in the background (router.run()): one that accepts TCP
            # and never answers must not keep the API, heartbeats and jobs waiting.
            dispatcher = Dispatcher(cluster=cluster, agents=agents,
                                    policy=RetryPolicy.from_config(settings))
            verifier = None if self._secret is None else Verifier(
                self._secret, clock_skew_s=config.security.clock_skew_s)
            # Bound first: sessions need the callback address before the first run.
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((settings.host, settings.port))
            port = sock.getsockname()[1]
            base_url = f"{'https' if tls else 'http'}://{_reachable(settings.host)}:{port}"
            cache = ResultCache.from_config(config.exo)
            backend = CachedBackend(router, cache)
            runs = RunRegistry(config=config.rlm, dispatcher=dispatcher, backend=backend,
                               callback_url=base_url + "/v1/llm/query",
                               cell_timeout_s=config.rlm.run_timeout_s,
                               reply_grammar=(reply_grammar(config.exo.embedded_grammar)
                                              if model is not None else None))
            state = ControllerState(cluster=cluster, dispatcher=dispatcher, router=router,
                                    cache=cache, backend=backend, runs=runs, verifier=verifier,
                                    api_token=api_token)
            app = make_app(state, max_body_bytes=settings.max_body_bytes, secret=self._secret,
                           rate_limiter=RateLimiter.from_config(config.security))
            runner = web.AppRunner(app, handle_signals=False, access_log=None,
                                   shutdown_timeout=_SHUTDOWN_TIMEOUT_S, logger=ServerLog())
            await runner.setup()
            await web.SockSite(runner, sock, ssl_context=tls).start()
            log.info("controller listening on %s", base_url)
            self._services = Services(cluster=cluster, dispatcher=dispatcher, router=router,
                                      state=state, http=http, base_url=base_url, port=port)
            if self._port_file is not None:
                await asyncio.to_thread(self._port_file.write_text, f"{port}\n")
            self._started.set()
            async with asyncio.TaskGroup() as group:
                loops = [group.create_task(cluster.run(), name="cluster"),
                         group.create_task(dispatcher.run(), name="cancel-moved"),
                         group.create_task(router.run(), name="exo-router"),
                         group.create_task(runs.expire_contexts(), name="expire-contexts")]
                if config.rlm.resume_on_start:
                    loops.append(group.create_task(
                        _resume_unfinished(cluster, router, runs, settings.failure_timeout_s),
                        name="resume-runs"))
                if config.alerts.webhook_url:
                    loops.append(group.create_task(Alerter(
                        config=config.alerts, snapshot=state.status, http=http,
                        secret=self._secret, controller_url=base_url).run(), name="alerts"))
                await self._stop.wait()
                # Before the loops stop: a resumed run cancelled with them keeps no end either.
                runs.suspend()
                for task in loops:
                    task.cancel()
        finally:
            if runs is not None:
                runs.suspend()
            if runner is not None:
                await runner.cleanup()
            if sock is not None:
                sock.close()
            if router is not None:
                await router.close()
            if model is not None:
                await model.close()
            if http is not None:
                await http.close()
            self._stopped.set()

    async def close(self) -> None:
        """Stop run() and wait for its cleanup; safe to call twice, or before run()."""
        self._stop.set()
        if self._run_called:
            await self._stopped.wait()

    async def stopped(self) -> None:
        """Return once run() has ended, by close() or by a failure."""
        await self._stopped.wait()

    async def __aenter__(self) -> Controller:
        """Run in a task; return once the API answers, or raise why it could not start."""
        task = self._task = asyncio.create_task(self.run(), name="controller")
        started = asyncio.create_task(self._started.wait())
        try:
            await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise
        finally:
            started.cancel()
        if not self._started.is_set():
            await task
            raise RuntimeError("the controller was closed before it started")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        await self.close()
        task = self._task
        if task is None:
            return
        await asyncio.wait({task})
        if not task.cancelled():
            error = task.exception()
            # A background loop that failed is this block's failure, unless it has its own.
            if error is not None and exc_type is None:
                raise error


async def _resume_unfinished(cluster: Cluster, router: LlmRouter, runs: RunRegistry,
                             failure_timeout_s: float) -> None:
    """Once an agent is healthy, go on with the runs a stopped controller left unfinished."""
    # Agents answer their first heartbeat within a failure timeout or so, when they are up.
    wait_s = max(_RESUME_WAIT_S, 4 * failure_timeout_s)
    if not await cluster.wait_for(lambda table: any(
            row.health == "healthy" for row in table.devices.values()), timeout_s=wait_s):
        log.warning("no agent is healthy after %.0f s: unfinished runs wait for "
                    "`kowalski-ctl runs resume`", wait_s)
        return
    await router.first_probes()
    await runs.resume_unfinished()


def _refuse_open_api(config: Config, api_token: bytes | None) -> None:
    """Refuse a write API open to the network unless the config says so on purpose."""
    host = config.controller.host
    if api_token is not None or config.security.allow_open_api or is_loopback(host):
        return
    raise ConfigError(
        f"controller.host is {host or '0.0.0.0'!r}, reachable from the network, and no API "
        "token guards writes; make one (head -c 32 /dev/urandom | base64 > api-token && "
        "chmod 600 api-token) and set security.api_token_file, or set "
        "security.allow_open_api = true", key="security.api_token_file")


def _reachable(host: str) -> str:
    """An address agents can call back on: the bound one, or the host's first."""
    if host not in ("0.0.0.0", ""):
        return host
    return next(iter(host_addresses()), "127.0.0.1")


async def serve(config: Config, *, secret: bytes | None, stop: asyncio.Event,
                port_file: Path | None = None) -> None:
    """kowalski-ctl serve: run until stop is set, or until the controller fails."""
    async with Controller(config=config, secret=secret, port_file=port_file) as controller:
        waits = [asyncio.create_task(stop.wait()), asyncio.create_task(controller.stopped())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
