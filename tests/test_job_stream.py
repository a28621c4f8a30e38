"""Streamed jobs: output leaves the agent and the controller while the job still runs."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from procs import AgentProcess

from kowalski.common.client import SignedClient
from kowalski.common.errors import RemoteError, UnverifiedAnswerError
from kowalski.common.messages import (
    JobId,
    JobOutput,
    JobRequest,
    JobResult,
    JobStreamEnd,
    JobStreamResult,
    encode,
)
from kowalski.controller.fleet.agent_client import AgentClient
from kowalski.controller.service import Controller

pytestmark = pytest.mark.timeout(90)

SLOW = "echo first; sleep 2; echo second >&2; echo third"


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[AgentProcess]:
    process = await AgentProcess(tmp_path, name="streamer").start()
    yield process
    assert await process.stop() == 0, process.read_log()


async def test_an_agent_streams_output_before_the_job_ends(
    agent: AgentProcess, agent_client: AgentClient,
) -> None:
    heard: list[tuple[float, str, str]] = []
    job = JobRequest(job_id=JobId("streamed"), language="bash", code=SLOW)
    result = await agent_client.run_job_streamed(
        agent.url, job, timeout_s=30,
        on_output=lambda stream, data: heard.append((time.monotonic(), stream, data)))
    ended = time.monotonic()
    assert (result.status, result.stdout, result.stderr) == ("ok", "first\nthird\n", "second\n")
    assert [(stream, data) for _, stream, data in heard] == [
        ("stdout", "first\n"), ("stderr", "second\n"), ("stdout", "third\n")]
    # The first line came while the job slept, not with its result.
    assert ended - heard[0][0] > 1.5


async def test_streamed_output_stops_at_the_cap_and_the_result_says_so(
    agent: AgentProcess, agent_client: AgentClient,
) -> None:
    heard: list[str] = []
    job = JobRequest(job_id=JobId("capped"), language="python", max_output_bytes=100,
                     code="print('é' * 10_000)")
    result = await agent_client.run_job_streamed(
        agent.url, job, timeout_s=30, on_output=lambda stream, data: heard.append(data))
    streamed = "".join(heard)
    assert result.stdout_truncated
    # 100 bytes are 50 two-byte characters: none is split between lines.
    assert streamed == result.stdout == "é" * 50


async def test_a_stream_without_the_secret_is_refused(agent: AgentProcess) -> None:
    async with aiohttp.ClientSession() as session:
        unsigned = AgentClient(SignedClient(session, secret=None))
        job = JobRequest(job_id=JobId("unsigned"), language="bash", code="echo no")
        with pytest.raises(RemoteError) as caught:
            await unsigned.run_job_streamed(agent.url, job, timeout_s=30,
                                            on_output=lambda stream, data: None)
    assert caught.value.status == 401


async def _post_streamed(controller: Controller, body: dict[str, Any]
                         ) -> list[tuple[float, dict[str, Any]]]:
    lines: list[tuple[float, dict[str, Any]]] = []
    async with aiohttp.ClientSession() as http, http.post(
            controller.base_url + "/v1/jobs", json={**body, "stream": True}) as response:
        assert response.status == 200, await response.text()
        assert response.content_type == "application/x-ndjson"
        async for line in response.content:
            lines.append((time.monotonic(), json.loads(line)))
    return lines


async def test_the_controller_streams_a_job_from_an_agent_as_it_runs(
    controller: Controller,
) -> None:
    lines = await _post_streamed(controller, {"job_id": "through", "language": "bash",
                                              "code": SLOW})
    kinds = [item["kind"] for _, item in lines]
    assert kinds == ["output", "output", "output", "result"]
    assert lines[0][1] == {"kind": "output", "stream": "stdout", "data": "first\n"}
    result = lines[-1][1]["result"]
    assert (result["status"], result["stdout"]) == ("ok", "first\nthird\n")
    assert lines[-1][0] - lines[0][0] > 1.5


@pytest.fixture
def agent_count() -> int:
    return 1


async def test_a_job_whose_agent_dies_after_output_is_not_sent_elsewhere(
    controller: Controller, agents: list[AgentProcess],
) -> None:
    async def kill_after_first_line() -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        async with aiohttp.ClientSession() as http, http.post(
                controller.base_url + "/v1/jobs", json={
                    "job_id": "cut", "language": "bash", "stream": True,
                    "code": "echo started; sleep 30; echo never"}) as response:
            async for line in response.content:
                items.append(json.loads(line))
                if len(items) == 1:
                    await agents[0].kill()
        return items

    items = await asyncio.wait_for(kill_after_first_line(), timeout=45)
    assert items[0] == {"kind": "output", "stream": "stdout", "data": "started\n"}
    assert items[-1]["kind"] == "error"
    assert controller.dispatcher.counters.rerouted == 0
    assert controller.dispatcher.counters.failed == 1


async def test_a_streamed_job_refused_before_it_starts_is_a_plain_error(
    controller: Controller,
) -> None:
    async with aiohttp.ClientSession() as http, http.post(
            controller.base_url + "/v1/jobs", json={
                "job_id": "nowhere", "language": "cobol", "stream": True,
                "code": "DISPLAY 1"}) as response:
        body = await response.json()
    assert response.status == 400
    assert "cobol" in body["error"]["message"]


async def test_a_stream_not_signed_with_the_secret_is_rejected_at_its_end(
    aiohttp_server: Any, agent_client: AgentClient,
) -> None:
    # An impostor at an agent's address: it streams, but cannot sign with the secret.
    async def impostor(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        result = JobResult(job_id=JobId("forged"), status="ok", exit_code=0,
                           stdout="forged\n", stderr="")
        for line in (JobOutput(stream="stdout", data="forged\n"),
                     JobStreamResult(result=result), JobStreamEnd(signature="00" * 32)):
            await response.write(encode(line) + b"\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/jobs", impostor)
    server = await aiohttp_server(app)
    heard: list[str] = []
    with pytest.raises(UnverifiedAnswerError):
        await agent_client.run_job_streamed(
            str(server.make_url("")).rstrip("/"),
            JobRequest(job_id=JobId("forged"), language="bash", code="echo hi"),
            timeout_s=10, on_output=lambda stream, data: heard.append(data))
    # The line came live, before the stream's end could show it was not the agent's.
    assert heard == ["forged\n"]
