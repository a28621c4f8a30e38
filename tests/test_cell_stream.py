"""Streamed cells, and jobs beside a session reading its context, against a real agent."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from procs import AgentProcess

from kowalski.common.errors import RemoteError
from kowalski.common.messages import (
    CellRequest,
    JobId,
    JobRequest,
    SessionCreate,
    SessionId,
)
from kowalski.controller.fleet.agent_client import AgentClient

pytestmark = pytest.mark.timeout(90)

SLOW_CELL = ("import sys, time\nprint('first', flush=True)\ntime.sleep(2)\n"
             "print('second', file=sys.stderr)\nprint('third')")


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[AgentProcess]:
    process = await AgentProcess(tmp_path, name="cells").start()
    yield process
    assert await process.stop() == 0, process.read_log()


async def _session(agent: AgentProcess, client: AgentClient, context: object) -> SessionId:
    session_id = SessionId("streamed-session")
    await client.create_session(agent.url, SessionCreate(session_id=session_id,
                                                         context=context), timeout_s=30)
    return session_id


async def test_a_cell_streams_its_first_line_before_it_ends(
    agent: AgentProcess, agent_client: AgentClient,
) -> None:
    session_id = await _session(agent, agent_client, "ctx")
    heard: list[tuple[float, str, str]] = []
    result = await agent_client.execute_streamed(
        agent.url, session_id, CellRequest(cell_id="slow", code=SLOW_CELL), timeout_s=30,
        on_output=lambda stream, data: heard.append((time.monotonic(), stream, data)))
    ended = time.monotonic()
    assert (result.status, result.stdout, result.stderr) == ("ok", "first\nthird\n", "second\n")
    assert result.agent_id == agent.agent_id
    assert "".join(data for _, stream, data in heard if stream == "stdout") == result.stdout
    assert "".join(data for _, stream, data in heard if stream == "stderr") == result.stderr
    # The first line came while the cell slept, not with its result.
    assert heard[0][1:] == ("stdout", "first")
    assert ended - heard[0][0] > 1.5
    # The session is the same one: a plain cell sees what the streamed one left.
    plain = await agent_client.execute(agent.url, session_id,
                                       CellRequest(cell_id="after", code="print(sys.argv[0])"),
                                       timeout_s=30)
    assert plain.status == "ok"


async def test_a_streamed_cell_stops_at_the_output_cap(
    agent: AgentProcess, agent_client: AgentClient,
) -> None:
    session_id = await _session(agent, agent_client, None)
    for cell_id, code in (("wide", "print('é' * 10_000)"),
                          ("many", "for i in range(20_000):\n    print('é' * 3)")):
        heard: list[str] = []
        result = await agent_client.execute_streamed(
            agent.url, session_id, CellRequest(cell_id=cell_id, code=code, max_output_bytes=100),
            timeout_s=30, on_output=lambda stream, data, heard=heard: heard.append(data))
        streamed = "".join(heard)
        assert result.stdout_truncated
        assert len(streamed.encode()) <= 100
        # The result's line also fits escaped JSON under the cap, so it may hold less.
        assert streamed.startswith(result.stdout)
        assert result.stdout.startswith("é")


async def test_a_job_beside_a_session_reads_its_context_from_a_file(
    agent: AgentProcess, agent_client: AgentClient,
) -> None:
    session_id = await _session(agent, agent_client, "hello\nworld\n")
    job = JobRequest(job_id=JobId("beside"), language="bash", session_id=session_id,
                     code="wc -l < context.txt; ls")
    result = await agent_client.run_job(agent.url, job, timeout_s=30)
    assert result.status == "ok", result
    assert result.stdout.startswith("2\ncontext.txt\n")
    heard: list[str] = []
    streamed = await agent_client.run_job_streamed(
        agent.url, JobRequest(job_id=JobId("beside-2"), language="python", session_id=session_id,
                              code="print(open('context.txt').read().split())"),
        timeout_s=30, on_output=lambda stream, data: heard.append(data))
    assert streamed.stdout == "".join(heard) == "['hello', 'world']\n"


async def test_a_job_naming_a_session_not_held_here_is_refused(
    agent: AgentProcess, agent_client: AgentClient,
) -> None:
    job = JobRequest(job_id=JobId("orphan"), language="bash", code="ls",
                     session_id=SessionId("never-made"))
    with pytest.raises(RemoteError) as caught:
        await agent_client.run_job(agent.url, job, timeout_s=30)
    assert (caught.value.status, caught.value.remote_code) == (404, "session_not_found")


async def test_a_job_reads_a_list_context_as_json_and_never_through_a_link_the_session_made(
    agent: AgentProcess, agent_client: AgentClient,
) -> None:
    session_id = await _session(agent, agent_client, {"rows": [1, 2, 3]})
    result = await agent_client.run_job(agent.url, JobRequest(
        job_id=JobId("json"), language="python", session_id=session_id,
        code="import json; print(sum(json.load(open('context.json'))['rows']))"), timeout_s=30)
    assert (result.status, result.stdout) == ("ok", "6\n")
    # The session's code owns its directory: it swaps its context file for a link to a file
    # only the agent could read. Jobs beside it still get the context the session was given.
    swapped = await agent_client.execute(agent.url, session_id, CellRequest(
        cell_id="swap", code="import os\nos.symlink('/etc/shadow', 'context.json')\n"
                              "print(sorted(os.listdir('.')))"), timeout_s=30)
    assert swapped.status == "ok", swapped
    after = await agent_client.run_job(agent.url, JobRequest(
        job_id=JobId("after-swap"), language="bash", session_id=session_id,
        code="cat context.json"), timeout_s=30)
    assert (after.status, after.stdout) == ("ok", '{"rows":[1,2,3]}')
