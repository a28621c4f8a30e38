"""AgentClient: every agent route the controller calls, against a real agent process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from procs import SECRET, AgentProcess

from kowalski.common.client import SignedClient
from kowalski.common.errors import NetworkError, RemoteError
from kowalski.common.messages import (
    CellRequest,
    JobId,
    JobRequest,
    SessionCreate,
    SessionId,
)
from kowalski.controller.fleet.agent_client import AgentClient

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[AgentProcess]:
    process = await AgentProcess(tmp_path, name="client").start()
    yield process
    assert await process.stop() == 0, process.read_log()


@pytest.fixture
async def agents() -> AsyncIterator[AgentClient]:
    async with aiohttp.ClientSession() as session:
        yield AgentClient(SignedClient(session, secret=SECRET.encode()))


async def test_heartbeat_and_metrics_are_typed(agent: AgentProcess, agents: AgentClient) -> None:
    beat = await agents.heartbeat(agent.url, timeout_s=5)
    assert (beat.agent_id, beat.name) == (agent.agent_id, "client")
    assert "python" in beat.languages
    metrics = await agents.metrics(agent.url, timeout_s=5)
    assert 0 < metrics.memory_available_bytes <= metrics.memory_total_bytes


async def test_a_job_runs_once_per_id(agent: AgentProcess, agents: AgentClient) -> None:
    job = JobRequest(job_id=JobId("client-job"), language="python",
                     code="import random\nprint(random.random())")
    first = await agents.run_job(agent.url, job, timeout_s=30)
    again = await agents.run_job(agent.url, job, timeout_s=30)
    assert (first.status, first.job_id, first.agent_id) == ("ok", "client-job", agent.agent_id)
    assert again.stdout == first.stdout


async def test_a_session_keeps_state_until_it_is_deleted(
    agent: AgentProcess, agents: AgentClient,
) -> None:
    session_id = SessionId("client-session")
    info = await agents.create_session(
        agent.url, SessionCreate(session_id=session_id, context=["a", "b", "c"]), timeout_s=30)
    assert (info.session_id, info.agent_id) == (session_id, agent.agent_id)
    result = await agents.execute(agent.url, session_id,
                                  CellRequest(cell_id="c1", code="n = len(context)\nprint(n)"),
                                  timeout_s=30)
    assert (result.status, result.stdout, result.session_id) == ("ok", "3\n", session_id)
    value = await agents.get_variable(agent.url, session_id, "n", max_chars=10, timeout_s=10)
    assert (value.found, value.value) == (True, "3")
    long = await agents.get_variable(agent.url, session_id, "context", max_chars=4,
                                     timeout_s=10)
    assert (long.value, long.truncated) == ("['a'", True)
    assert await agents.delete_session(agent.url, session_id, timeout_s=10)
    assert not await agents.delete_session(agent.url, session_id, timeout_s=10)


async def test_a_missing_session_is_a_remote_error_that_a_retry_cannot_fix(
    agent: AgentProcess, agents: AgentClient,
) -> None:
    with pytest.raises(RemoteError) as caught:
        await agents.execute(agent.url, SessionId("never-made"),
                             CellRequest(cell_id="c1", code="print(1)"), timeout_s=10)
    assert (caught.value.status, caught.value.remote_code) == (404, "session_not_found")
    assert not caught.value.is_recoverable


async def test_an_agent_that_is_gone_is_a_network_error(agents: AgentClient) -> None:
    # Port 9 (discard) has no listener on the loopback interface.
    with pytest.raises(NetworkError) as caught:
        await agents.heartbeat("http://127.0.0.1:9", timeout_s=5)
    assert caught.value.is_recoverable
