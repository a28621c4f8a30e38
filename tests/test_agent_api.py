"""The agent's HTTP API against a real agent process on 127.0.0.1."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from procs import SECRET, AgentProcess

from kowalski.common.client import SignedClient
from kowalski.common.errors import RemoteError
from kowalski.common.messages import (
    CellRequest,
    CellResult,
    Heartbeat,
    JobRequest,
    JobResult,
    Metrics,
    SessionCreate,
    SessionCreateRaw,
    SessionInfo,
    VariableValue,
)
from kowalski.common.signing import sign


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[AgentProcess]:
    process = await AgentProcess(
        tmp_path, name="api", agent={"max_concurrent_jobs": 1, "max_queued_jobs": 1,
                                     "max_body_bytes": 2_000_000, "max_code_bytes": 100_000},
    ).start()
    yield process
    assert await process.stop() == 0, process.read_log()


@pytest.fixture
async def client() -> AsyncIterator[SignedClient]:
    async with aiohttp.ClientSession() as session:
        yield SignedClient(session, secret=SECRET.encode())


async def raw(agent: AgentProcess, method: str, path: str, body: bytes = b"",
              *, signed: bool = True) -> tuple[int, dict[str, object], dict[str, str]]:
    headers = {"Content-Type": "application/json"}
    if signed:
        headers.update(sign(SECRET.encode(), method, path, body))
    async with aiohttp.ClientSession() as session, session.request(
        method, agent.url + path, data=io.BytesIO(body), headers=headers
    ) as response:
        return response.status, await response.json(), dict(response.headers)


async def test_healthz_is_open_and_everything_else_needs_a_signature(
    agent: AgentProcess,
) -> None:
    status, body, _ = await raw(agent, "GET", "/healthz", signed=False)
    assert (status, body) == (200, {"status": "ok"})
    status, body, _ = await raw(agent, "GET", "/v1/heartbeat", signed=False)
    assert status == 401
    assert "not signed" in str(body)
    headers = sign(b"wrong-secret-wrong-secret", "GET", "/v1/heartbeat")
    async with aiohttp.ClientSession() as session, session.get(
        agent.url + "/v1/heartbeat", headers=headers
    ) as response:
        assert response.status == 401
        assert "bad signature" in await response.text()


async def test_heartbeat_reports_identity_sandbox_languages_and_metrics(
    agent: AgentProcess, client: SignedClient,
) -> None:
    first = await client.call("GET", agent.url + "/v1/heartbeat", Heartbeat, timeout_s=5)
    second = await client.call("GET", agent.url + "/v1/heartbeat", Heartbeat, timeout_s=5)
    assert first.agent_id == agent.agent_id
    assert second.seq == first.seq + 1
    assert "python" in first.languages
    assert first.sandbox_mode in ("bwrap", "rlimit")
    # Two ready Python sandboxes by default, but the agent has only one job slot; the
    # pool is full before the agent answers.
    assert (first.pool_size, first.pool_ready) == (1, 1)
    assert 0 < first.metrics.memory_available_bytes <= first.metrics.memory_total_bytes
    metrics = await client.call("GET", agent.url + "/v1/metrics", Metrics, timeout_s=5)
    assert metrics.cpu_count >= 1


async def test_job_runs_and_a_repeated_id_returns_the_first_result(
    agent: AgentProcess, client: SignedClient,
) -> None:
    job = JobRequest(job_id="once-1", language="python",
                     code="import random, sys\nprint(random.random())\nprint('e', file=sys.stderr)")
    first, second = await asyncio.gather(
        client.call("POST", agent.url + "/v1/jobs", JobResult, job, timeout_s=30),
        client.call("POST", agent.url + "/v1/jobs", JobResult, job, timeout_s=30),
    )
    third = await client.call("POST", agent.url + "/v1/jobs", JobResult, job, timeout_s=30)
    assert first.status == "ok"
    assert first.stderr == "e\n"
    assert first.agent_id == agent.agent_id
    assert first == second == third


async def test_reusing_a_job_id_for_other_code_is_a_conflict(
    agent: AgentProcess, client: SignedClient,
) -> None:
    await client.call("POST", agent.url + "/v1/jobs", JobResult,
                      JobRequest(job_id="dup", language="bash", code="echo a"), timeout_s=30)
    with pytest.raises(RemoteError) as caught:
        await client.call("POST", agent.url + "/v1/jobs", JobResult,
                          JobRequest(job_id="dup", language="bash", code="echo b"), timeout_s=30)
    assert caught.value.status == 409
    assert "already used for different code" in caught.value.message


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b'{"job_id": "a", "language": "python"}', 400, "missing required field `code`"),
        (b'{"job_id": "a", "language": "cobol", "code": ""}', 400, "$.language"),
        (b'{"job_id": "a", "language": "python", "code": 5}', 400, "$.code"),
        (b'{"job_id": "a/b", "language": "python", "code": ""}', 400, "$.job_id"),
        (b'{"job_id": "a", "language": "python", "code": "", "env": {}}', 400,
         "unknown field `env`"),
        (b"[]", 400, "Expected `object`"),
        (b'{"job_id": "a", "language": "python", "code": "' + b"x" * 150_000 + b'"}', 400,
         "over the limit"),
        (b'{"job_id": "a", "language": "python", "code": "' + b"x" * 3_000_000 + b'"}', 413,
         "exceeded"),
    ],
)
async def test_bad_job_bodies_get_a_4xx_naming_the_problem(
    agent: AgentProcess, body: bytes, status: int, says: str,
) -> None:
    got_status, got_body, _ = await raw(agent, "POST", "/v1/jobs", body)
    assert got_status == status
    assert says in str(got_body)


async def test_unknown_path_and_method_are_json_errors(agent: AgentProcess) -> None:
    status, body, _ = await raw(agent, "GET", "/v1/nothing")
    assert status == 404
    assert body["error"]["code"] == "http_404"  # type: ignore[index]
    status, _, headers = await raw(agent, "PUT", "/v1/jobs")
    assert status == 405
    assert "POST" in headers.get("Allow", "")


async def test_full_agent_answers_busy_with_retry_after(
    agent: AgentProcess, client: SignedClient,
) -> None:
    slow = [JobRequest(job_id=f"slow-{n}", language="bash", code="sleep 2") for n in range(2)]
    running = [asyncio.create_task(
        client.call("POST", agent.url + "/v1/jobs", JobResult, job, timeout_s=30))
        for job in slow]
    await asyncio.sleep(0.5)
    body = JobRequest(job_id="third", language="bash", code="true")
    from kowalski.common.messages import encode

    status, reply, headers = await raw(agent, "POST", "/v1/jobs", encode(body))
    assert status == 503
    assert reply["error"]["code"] == "busy"  # type: ignore[index]
    assert headers["Retry-After"] == "1"
    results = await asyncio.gather(*running)
    assert [r.status for r in results] == ["ok", "ok"]


async def test_session_keeps_state_across_cells_over_http(
    agent: AgentProcess, client: SignedClient,
) -> None:
    base = agent.url + "/v1/sessions"
    info = await client.call("POST", base, SessionInfo,
                             SessionCreate(session_id="s1", context="line\n" * 1000),
                             timeout_s=30)
    assert info.agent_id == agent.agent_id
    cell = CellRequest(cell_id="c1", code="n = len(context.splitlines())\nprint(n)")
    result = await client.call("POST", f"{base}/s1/exec", CellResult, cell, timeout_s=30)
    assert (result.status, result.stdout) == ("ok", "1000\n")
    value = await client.call("GET", f"{base}/s1/vars/n", VariableValue, timeout_s=10)
    assert (value.found, value.value) == (True, "1000")
    missing = await client.call("GET", f"{base}/s1/vars/nope", VariableValue, timeout_s=10)
    assert not missing.found
    status, body, _ = await raw(agent, "DELETE", "/v1/sessions/s1")
    assert (status, body) == (200, {"deleted": True})
    with pytest.raises(RemoteError) as caught:
        await client.call("POST", f"{base}/s1/exec", CellResult, cell, timeout_s=10)
    assert caught.value.status == 404


@pytest.mark.parametrize("context", [
    None, "tab\there \"quoted\" \\ back ünï \u2028 \U0001f600 \x00 end",
    ["a", {"b": [1, 2.5, None]}], {"text": "x" * 70_000}, "",
], ids=["none", "escaped-text", "nested", "large-dict", "empty-text"])
async def test_a_context_reaches_the_session_exactly_as_sent_over_http(
    agent: AgentProcess, client: SignedClient, context: object,
) -> None:
    # The agent keeps the context as the JSON it received, never decoding it: what the
    # session sees must still be exactly what was sent.
    base = agent.url + "/v1/sessions"
    await client.call("POST", base, SessionInfo, SessionCreate(session_id="exact",
                                                               context=context), timeout_s=30)
    cell = CellRequest(cell_id="c", code="import json\nprint(json.dumps(context))")
    result = await client.call("POST", f"{base}/exact/exec", CellResult, cell, timeout_s=30)
    assert result.status == "ok", result
    assert json.loads(result.stdout) == context
    await raw(agent, "DELETE", "/v1/sessions/exact")


def test_the_raw_session_request_has_the_fields_of_the_session_request() -> None:
    assert SessionCreate.__struct_fields__ == SessionCreateRaw.__struct_fields__
