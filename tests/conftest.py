"""Shared fixtures: a guard against leaked processes, a stand-in exo, agents, a controller,
and a page in headless Chromium.

A test module changes what the shared fixtures start by overriding a small one:
``exo_reply`` (what the stand-in model says) or ``agent_count``.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from controller_env import controller_config, healthy_ids, running_controller, start_agents
from exo_standin import DEFAULT_MODEL, STANDIN, ExoStandin, make_exo_app
from procs import SECRET, AgentProcess

from kowalski.common.client import SignedClient
from kowalski.controller.fleet.agent_client import AgentClient
from kowalski.controller.service import Controller


def _descendants() -> set[int]:
    try:
        return {child.pid for child in psutil.Process().children(recursive=True)}
    except psutil.Error:
        return set()


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    """Fail a test that leaves a child process of the test run behind."""
    before = _descendants()
    yield
    deadline = time.monotonic() + 5.0
    leaked = _descendants() - before
    while leaked and time.monotonic() < deadline:
        time.sleep(0.05)
        leaked = {
            pid for pid in _descendants() - before
            if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        }
    if leaked:
        names = []
        for pid in leaked:
            try:
                names.append(f"{pid}:{' '.join(psutil.Process(pid).cmdline())[:80]}")
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        if names:
            pytest.fail(f"test leaked processes: {names}")


def is_root() -> bool:
    return os.geteuid() == 0


# --- a stand-in exo ---------------------------------------------------------------------------

ServeExo = Callable[..., Awaitable[tuple[ExoStandin, str]]]


@pytest.fixture
def serve(aiohttp_server: Any) -> ServeExo:
    """Start a stand-in exo (make_exo_app's keyword arguments); gives it and its base URL."""
    async def start(**kwargs: Any) -> tuple[ExoStandin, str]:
        app = make_exo_app(**kwargs)
        server = await aiohttp_server(app)
        return app[STANDIN], str(server.make_url("")).rstrip("/")

    return start


@pytest.fixture
def exo_reply() -> Callable[[dict[str, Any]], Any]:
    """What the ``exo`` fixture's model answers to a chat request's body."""
    return lambda body: "pong"


@pytest.fixture
async def exo(aiohttp_server: Any, exo_reply: Callable[[dict[str, Any]], Any]) -> Any:
    """A stand-in exo v1 server with DEFAULT_MODEL ready, answering with ``exo_reply``."""
    return await aiohttp_server(make_exo_app(flavour="v1", models=(DEFAULT_MODEL,),
                                             reply=exo_reply))


# --- agents and a controller ------------------------------------------------------------------


@pytest.fixture
def agent_count() -> int:
    """How many agent processes the ``agents`` fixture starts."""
    return 2


@pytest.fixture
async def agents(tmp_path: Path, agent_count: int) -> AsyncIterator[list[AgentProcess]]:
    """``agent_count`` real agent processes, stopped after the test."""
    started = await start_agents(tmp_path, agent_count)
    yield started
    for agent in started:
        await agent.stop()


@pytest.fixture
async def controller(agents: list[AgentProcess], exo: Any, tmp_path: Path
                     ) -> AsyncIterator[Controller]:
    """A controller in the test process with every agent healthy and ``exo`` as endpoint."""
    config = controller_config(agents, [str(exo.make_url("")).rstrip("/")], tmp_path)
    async with running_controller(config) as running:
        assert await running.cluster.wait_for(
            lambda t: len(healthy_ids(t)) == len(agents), timeout_s=15), running.cluster.table
        # Endpoints are probed in the background: tests start once the first probe answered.
        await running.router.first_probes()
        yield running


# --- a browser --------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture
async def browser_page(tmp_path: Path) -> AsyncIterator[Any]:
    """A page in a fresh headless Chromium profile; fails the test on any script error."""
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (Debian package: chromium)")
    from playwright.async_api import async_playwright

    errors: list[str] = []
    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            tmp_path / "profile", executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 900})
        try:
            page = context.pages[0] if context.pages else await context.new_page()
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("console", lambda message: errors.append(message.text)
                    if "Content Security Policy" in message.text else None)
            yield page
        finally:
            await context.close()
    assert errors == []


@pytest.fixture
async def agent_client() -> AsyncIterator[AgentClient]:
    """A signed client for agents' APIs, holding the test secret."""
    async with aiohttp.ClientSession() as session:
        yield AgentClient(SignedClient(session, secret=SECRET.encode()))
