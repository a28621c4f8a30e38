"""Warm sessions: started ahead of need, each adopted by one new session, then refilled."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from controller_env import controller_config, running_controller
from procs import SECRET, AgentProcess

from kowalski.common.client import SignedClient
from kowalski.common.errors import RemoteError
from kowalski.common.messages import CellRequest, Heartbeat, LlmCallback, SessionCreate
from kowalski.controller.fleet.agent_client import AgentClient
from kowalski.controller.fleet.sessions import RemoteSession

pytestmark = pytest.mark.timeout(120)
CALLBACK = LlmCallback(url="http://127.0.0.1:1/v1/llm", token="run-token")


class Agent:
    """A real agent process and a signed client for it."""

    def __init__(self, process: AgentProcess, client: AgentClient) -> None:
        self.process = process
        self.client = client

    async def heartbeat(self) -> Heartbeat:
        return await self.client.heartbeat(self.process.url, timeout_s=10)

    async def wait_for(self, condition: Callable[[Heartbeat], bool],
                       timeout_s: float = 30.0) -> Heartbeat:
        deadline = time.monotonic() + timeout_s
        while True:
            beat = await self.heartbeat()
            if condition(beat):
                return beat
            assert time.monotonic() < deadline, f"never reached; last heartbeat {beat}"
            await asyncio.sleep(0.02)

    async def cell(self, session_id: str, code: str, cell_id: str) -> str:
        result = await self.client.execute(self.process.url, session_id,
                                           CellRequest(cell_id=cell_id, code=code),
                                           timeout_s=30)
        assert result.status == "ok", result
        return result.stdout


@pytest.fixture
async def start_agent(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    processes: list[AgentProcess] = []
    async with aiohttp.ClientSession() as http:
        client = AgentClient(SignedClient(http, secret=SECRET.encode()))

        async def start(**agent: object) -> Agent:
            process = AgentProcess(tmp_path, name=f"warm{len(processes)}", agent=agent)
            processes.append(process)
            await process.start()
            return Agent(process, client)

        try:
            yield start
        finally:
            for process in processes:
                assert await process.stop() == 0, process.read_log()


async def test_a_new_session_adopts_a_warm_one_and_gets_its_context(
        start_agent: Callable[..., Any]) -> None:
    agent = await start_agent(warm_sessions=1)
    await agent.wait_for(lambda beat: beat.warm_sessions == 1)
    asked_at = time.time()
    info = await agent.client.create_session(
        agent.process.url, SessionCreate(session_id="run-1", context={"lines": ["a", "b"]},
                                         llm_callback=CALLBACK), timeout_s=30)
    assert info.warm
    # The process was running before the session was asked for.
    assert info.created_at < asked_at
    assert await agent.cell("run-1", "print(context['lines'])", "c1") == "['a', 'b']\n"
    # It was given the run's callback: llm_query tries it (and finds nobody there).
    reply = await agent.client.execute(agent.process.url, "run-1", CellRequest(
        cell_id="c2", code="llm_query('hi')"), timeout_s=30)
    assert reply.status == "error"
    assert "without an llm_callback" not in reply.stderr
    # The pool is refilled behind it; the adopted session counts as a session.
    beat = await agent.wait_for(lambda beat: beat.warm_sessions == 1)
    assert beat.sessions == 1


async def test_sessions_asked_for_together_never_share_a_process(
        start_agent: Callable[..., Any]) -> None:
    agent = await start_agent(warm_sessions=2)
    await agent.wait_for(lambda beat: beat.warm_sessions == 2)
    infos = await asyncio.gather(*(agent.client.create_session(
        agent.process.url, SessionCreate(session_id=f"run-{n}", context=n), timeout_s=30)
        for n in range(3)))
    # Two warm ones are handed out once each; the third is started, or waits for a refill.
    assert sum(info.warm for info in infos) >= 2
    for n in range(3):
        # A session shared with another run would already hold that run's `seen`.
        out = await agent.cell(f"run-{n}", "seen = globals().get('seen', []) + [context]\n"
                               "print(seen)", f"c{n}")
        assert out == f"[{n}]\n"
    for n in range(3):
        assert await agent.cell(f"run-{n}", "print(seen)", f"d{n}") == f"[{n}]\n"


async def test_without_a_warm_session_one_is_started_on_demand(
        start_agent: Callable[..., Any]) -> None:
    agent = await start_agent(warm_sessions=0)
    asked_at = time.time()
    info = await agent.client.create_session(
        agent.process.url, SessionCreate(session_id="cold", context="text"), timeout_s=30)
    assert not info.warm
    assert info.created_at >= asked_at
    assert await agent.cell("cold", "print(context)", "c1") == "text\n"
    assert (await agent.heartbeat()).warm_sessions == 0


async def test_warm_sessions_count_against_the_limit_and_refill_when_room_is_made(
        start_agent: Callable[..., Any]) -> None:
    agent = await start_agent(warm_sessions=1, max_sessions=2)
    url = agent.process.url
    await agent.wait_for(lambda beat: beat.warm_sessions == 1)
    assert (await agent.client.create_session(url, SessionCreate(session_id="a"),
                                              timeout_s=30)).warm
    await agent.wait_for(lambda beat: beat.warm_sessions == 1)
    assert (await agent.client.create_session(url, SessionCreate(session_id="b"),
                                              timeout_s=30)).warm
    # Two sessions fill the limit: no warm one is started beside them.
    await asyncio.sleep(0.5)
    beat = await agent.heartbeat()
    assert (beat.sessions, beat.warm_sessions) == (2, 0)
    with pytest.raises(RemoteError, match="limit of 2 sessions") as caught:
        await agent.client.create_session(url, SessionCreate(session_id="c"), timeout_s=30)
    assert caught.value.remote_code == "busy"
    await agent.client.delete_session(url, "a", timeout_s=10)
    beat = await agent.wait_for(lambda beat: beat.warm_sessions == 1)
    assert beat.sessions == 1


async def test_an_adopted_session_its_controller_left_is_reaped_when_idle(
        start_agent: Callable[..., Any]) -> None:
    agent = await start_agent(warm_sessions=1, session_idle_timeout_s=0.5)
    await agent.wait_for(lambda beat: beat.warm_sessions == 1)
    info = await agent.client.create_session(
        agent.process.url, SessionCreate(session_id="orphan"), timeout_s=30)
    assert info.warm
    # Nobody uses it again, as when the controller that opened it was killed.
    beat = await agent.wait_for(lambda beat: beat.sessions == 0, timeout_s=20)
    assert beat.warm_sessions == 1
    with pytest.raises(RemoteError) as caught:
        await agent.cell("orphan", "print(1)", "late")
    # Lost while it is being killed, then gone.
    assert caught.value.remote_code in {"session_lost", "session_not_found"}
    # The warm session itself is the agent's own: idle, but kept ready.
    await asyncio.sleep(1.0)
    assert (await agent.heartbeat()).warm_sessions == 1
    assert "ended: it was idle too long" in agent.process.read_log()


async def test_a_run_session_opened_through_the_controller_is_warm(
        start_agent: Callable[..., Any], tmp_path: Path) -> None:
    agent = await start_agent(warm_sessions=1)
    await agent.wait_for(lambda beat: beat.warm_sessions == 1)
    config = controller_config([agent.process], [], tmp_path)
    async with running_controller(config) as controller:
        assert await controller.cluster.wait_for(
            lambda table: any(row.health == "healthy" for row in table.devices.values()),
            timeout_s=30)
        session = RemoteSession(dispatcher=controller.dispatcher, session_id="run-x",
                                context=["x" * 10] * 3, llm_callback=None, timeout_s=30)
        await session.open()
        try:
            assert session.warm
            result = await session.execute("print(len(context), context[0])")
            assert result.stdout == "3 xxxxxxxxxx\n"
        finally:
            await session.close()
    await agent.wait_for(lambda beat: (beat.sessions, beat.warm_sessions) == (0, 1))
