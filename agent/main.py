"""kowalski-agent: composes the agent's components and maps SIGTERM to a clean stop."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from kowalski.agent.app import VERSION, AgentState, make_app
from kowalski.agent.arguments import build_config, parse_args
from kowalski.agent.jobs import JobRunner
from kowalski.agent.kept_context import KEPT_DIR
from kowalski.agent.llm_relay import LlmRelay
from kowalski.agent.metrics import MetricsSampler
from kowalski.agent.sandbox import Sandbox
from kowalski.agent.sessions import SessionManager
from kowalski.common import config as config_module
from kowalski.common.config import Config
from kowalski.common.errors import KowalskiError
from kowalski.common.http import ServerLog
from kowalski.common.ratelimit import RateLimiter
from kowalski.common.signing import Verifier
from kowalski.common.tls import client_ssl_context, server_ssl_context

if TYPE_CHECKING:
    from kowalski.agent.mdns import Advertiser

log = logging.getLogger("kowalski.agent")


class Agent:
    """The daemon: sandbox, job runner, sessions, HTTP API and mDNS record."""

    def __init__(self, *, config: Config, secret: bytes | None,
                 port_file: Path | None = None) -> None:
        self._config = config
        self._secret = secret
        self._port_file = port_file
        self.port: int | None = None

    async def run(self, stop: asyncio.Event) -> None:
        settings = self._config.agent
        # Before the slow sandbox probes: a bad certificate path fails start-up at once.
        tls = server_ssl_context(self._config.security)
        sandbox = Sandbox(self._config.sandbox, work_root=Path(settings.work_dir),
                          job_slots=settings.max_concurrent_jobs)
        advertiser: Advertiser | None = None
        runner: web.AppRunner | None = None
        jobs: JobRunner | None = None
        sessions: SessionManager | None = None
        try:
            await sandbox.start()
            async with aiohttp.ClientSession() as http:
                # The controller's callback may be https with a private CA: trust it here too.
                relay = LlmRelay(http, secret=self._secret,
                                 ssl_context=client_ssl_context(self._config.security),
                                 timeout_s=self._config.exo.request_timeout_s)
                sessions = SessionManager(sandbox, max_sessions=settings.max_sessions,
                                          idle_timeout_s=settings.session_idle_timeout_s,
                                          llm_handler=relay,
                                          warm_sessions=settings.warm_sessions,
                                          contexts_dir=Path(settings.work_dir) / KEPT_DIR)
                name = settings.name or socket.gethostname()
                # The id needs the port: it must be stable across restarts and unique
                # when several agents share a host.
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((settings.host, settings.port))
                self.port = sock.getsockname()[1]
                agent_id = f"{name}-{self.port}"
                jobs = JobRunner(sandbox=sandbox, agent_id=agent_id,
                                 max_concurrent=settings.max_concurrent_jobs,
                                 max_queued=settings.max_queued_jobs,
                                 cache_size=settings.result_cache_size)
                state = AgentState(agent_id=agent_id, name=name, sandbox=sandbox, jobs=jobs,
                                   sessions=sessions, metrics=MetricsSampler(),
                                   max_code_bytes=settings.max_code_bytes)
                verifier = None if self._secret is None else Verifier(
                    self._secret, clock_skew_s=self._config.security.clock_skew_s)
                app = make_app(state, verifier=verifier, max_body_bytes=settings.max_body_bytes,
                               secret=self._secret,
                               rate_limiter=RateLimiter.from_config(self._config.security))
                runner = web.AppRunner(app, handle_signals=False,
                                       shutdown_timeout=settings.shutdown_timeout_s,
                                       access_log=None, logger=ServerLog())
                await runner.setup()
                site = web.SockSite(runner, sock, ssl_context=tls)
                await site.start()
                log.info("agent %s listening on %s://%s:%d (sandbox %s, languages %s)",
                         agent_id, "https" if tls else "http", settings.host, self.port,
                         sandbox.mode, ", ".join(sandbox.languages))
                if self._port_file is not None:
                    self._port_file.write_text(f"{self.port}\n")
                if settings.advertise_mdns:
                    # Imported here: zeroconf and psutil cost memory an agent without mDNS
                    # never needs.
                    from kowalski.agent.mdns import Advertiser
                    from kowalski.common.addresses import advertised_addresses

                    addresses = ([settings.advertise_address] if settings.advertise_address
                                 else advertised_addresses(settings.host))
                    advertiser = Advertiser(agent_id=agent_id, name=name, port=self.port,
                                            version=VERSION, addresses=addresses)
                    await advertiser.start()
                async with asyncio.TaskGroup() as group:
                    reaper = group.create_task(sessions.run(), name="session-reaper")
                    await stop.wait()
                    reaper.cancel()
        finally:
            log.info("agent stopping")
            # Stop answering before the mDNS goodbye, so that no heartbeat answered
            # after the goodbye makes the controller think the agent came back.
            if runner is not None:
                await runner.cleanup()
            if advertiser is not None:
                await advertiser.close()
            if jobs is not None:
                await jobs.close()
            if sessions is not None:
                await sessions.close()
            await sandbox.close()


def main(argv: list[str] | None = None, *,
         parsed: tuple[argparse.Namespace, Config | KowalskiError] | None = None) -> int:
    """The daemon; parsed: the arguments and the config (or why it failed) already read."""
    args, built = parsed or (parse_args(argv), None)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if isinstance(built, KowalskiError):
            raise built
        config = built or build_config(args)
        secret = config_module.required_secret(config.security)
    except KowalskiError as exc:
        print(f"kowalski-agent: {exc.user_message()}", file=sys.stderr)
        return 3
    # asyncio's own loop, not uvloop: measured, a cold job started 2-6 ms sooner on it
    # (process spawns dominate an agent's work) and the idle agent is smaller without it.
    with asyncio.Runner() as runner:
        return runner.run(_serve(Agent(config=config, secret=secret, port_file=args.port_file)))


async def _serve(agent: Agent) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await agent.run(stop)
    except KowalskiError as exc:
        log.error("%s", exc.user_message())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
