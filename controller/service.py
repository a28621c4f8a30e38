"""The controller daemon: composes cluster, router, dispatcher and the HTTP API."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import msgspec
from aiohttp import web

from kowalski.common.client import SignedClient
from kowalski.common.config import Config, read_api_token
from kowalski.common.ratelimit import RateLimiter
from kowalski.common.signing import Verifier
from kowalski.common.tls import client_ssl_context, server_ssl_context
from kowalski.controller.api.app import make_app
from kowalski.controller.api.state import ControllerState
from kowalski.controller.circuit import CircuitPolicy
from kowalski.controller.fleet.cluster import Cluster
from kowalski.controller.fleet.dispatch import Dispatcher
from kowalski.controller.models.cache import CachedBackend, ResultCache
from kowalski.controller.models.embedded import EmbeddedModel
from kowalski.controller.models.router import LlmRouter
from kowalski.controller.retry import RetryPolicy
from kowalski.controller.rlm.runs import RunRegistry

log = logging.getLogger("kowalski.controller")


@dataclass
class Services:
    """The running pieces, for the HTTP app and for in-process callers such as the CLI."""

    config: Config
    cluster: Cluster
    dispatcher: Dispatcher
    router: LlmRouter
    state: ControllerState
    http: aiohttp.ClientSession
    base_url: str
    port: int


@asynccontextmanager
async def services(config: Config, *, secret: bytes | None, embedded_model: bool = True,
                   mdns_interfaces: list[str] | None = None) -> AsyncIterator[Services]:
    """Start everything, the HTTP site included; everything stops on exit."""
    # Secrets and certificates first: a bad file fails before anything starts.
    api_token = read_api_token(config.security)
    tls = server_ssl_context(config.security)
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession())
        ssl = client_ssl_context(config.security)
        client = SignedClient(http, secret=secret, ssl=ssl)
        scheme = "https" if config.security.tls_ca_file else "http"
        cluster = Cluster(config=config.controller, client=client, scheme=scheme,
                          mdns_interfaces=mdns_interfaces)
        urls = list(config.exo.endpoints)
        exo_config = config.exo
        if not urls and embedded_model and config.exo.embedded:
            model = EmbeddedModel.from_config(config.exo)
            stack.push_async_callback(model.close)
            urls = [await model.start()]
            if not exo_config.default_model:
                exo_config = msgspec.structs.replace(exo_config, default_model=model.model_name)
        router = LlmRouter(config=exo_config, urls=urls, session=http,
                           policy=RetryPolicy.from_config(config.controller),
                           circuit_policy=CircuitPolicy.from_config(config.controller))
        stack.push_async_callback(router.close)
        await router.refresh()
        dispatcher = Dispatcher(cluster=cluster, client=client,
                                policy=RetryPolicy.from_config(config.controller))
        verifier = None if secret is None else Verifier(
            secret, clock_skew_s=config.security.clock_skew_s)
        settings = config.controller
        # Bound first: sessions need the callback address before the first run.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((settings.host, settings.port))
        stack.callback(sock.close)
        port = sock.getsockname()[1]
        base_url = f"{'https' if tls else 'http'}://{_reachable(settings.host)}:{port}"
        cache = ResultCache.from_config(config.exo)
        backend = CachedBackend(router, cache)
        runs = RunRegistry(config=config.rlm, dispatcher=dispatcher, backend=backend,
                           callback_url=base_url + "/v1/llm/query",
                           cell_timeout_s=config.rlm.run_timeout_s)
        state = ControllerState(cluster=cluster, dispatcher=dispatcher, router=router,
                                cache=cache, backend=backend, runs=runs, verifier=verifier,
                                api_token=api_token)
        app = make_app(state, max_body_bytes=settings.max_body_bytes, secret=secret,
                       rate_limiter=RateLimiter.from_config(config.security))
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=5.0)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        await web.SockSite(runner, sock, ssl_context=tls).start()
        log.info("controller listening on %s", base_url)
        group = await stack.enter_async_context(asyncio.TaskGroup())
        tasks = [group.create_task(cluster.run(), name="cluster"),
                 group.create_task(router.run(), name="exo-router")]
        stack.callback(lambda: [task.cancel() for task in tasks])
        yield Services(config=config, cluster=cluster, dispatcher=dispatcher, router=router,
                       state=state, http=http, base_url=base_url, port=port)


def _reachable(host: str) -> str:
    """An address agents can call back on: the bound one, or the host's first."""
    if host not in ("0.0.0.0", ""):
        return host
    from kowalski.agent.mdns import host_addresses

    return next(iter(host_addresses()), "127.0.0.1")


async def serve(config: Config, *, secret: bytes | None, stop: asyncio.Event,
                port_file: Path | None = None) -> None:
    """kowalski-ctl serve: run until stop is set."""
    async with services(config, secret=secret) as running:
        if port_file is not None:
            await asyncio.to_thread(port_file.write_text, f"{running.port}\n")
        await stop.wait()
