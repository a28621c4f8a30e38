"""A session's context sent as the request's own body (PUT /v1/sessions/{id}), end to end."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from procs import SECRET, AgentProcess

from kowalski.common.client import SignedClient
from kowalski.common.errors import RemoteError
from kowalski.common.messages import (
    FEATURE_CONTEXT_BODY,
    CellRequest,
    Heartbeat,
    JobId,
    JobRequest,
    LlmCallback,
    SessionId,
    SessionOpen,
    encode,
)
from kowalski.common.signing import META_HEADER, sign
from kowalski.controller.fleet.agent_client import AgentClient
from kowalski.controller.fleet.context_body import ContextBody

pytestmark = pytest.mark.timeout(120)
TEXT = "first line\nsecond\r\nthird ünï 中文 \U0001f600 \x00 \"quoted\" \\ end\n"


@pytest.fixture
async def client() -> AsyncIterator[AgentClient]:
    async with aiohttp.ClientSession() as http:
        yield AgentClient(SignedClient(http, secret=SECRET.encode()))


@pytest.fixture
async def start_agent(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    processes: list[AgentProcess] = []

    async def start(**agent: object) -> AgentProcess:
        process = AgentProcess(tmp_path, name=f"upload{len(processes)}", agent=agent)
        processes.append(process)
        return await process.start()

    try:
        yield start
    finally:
        for process in processes:
            assert await process.stop() == 0, process.read_log()


def incoming(agent: AgentProcess) -> list[str]:
    """Files a received body left in the agent's kept-context directory."""
    return sorted(path.name for path in (agent.dir / "jobs" / ".contexts").glob("incoming-*"))


async def cell(client: AgentClient, agent: AgentProcess, session_id: str, code: str) -> str:
    result = await client.execute(agent.url, SessionId(session_id),
                                  CellRequest(cell_id=f"{session_id}-{len(code)}", code=code),
                                  timeout_s=30)
    assert result.status == "ok", result
    return result.stdout


@pytest.mark.parametrize("warm", [0, 1], ids=["cold", "warm"])
async def test_a_text_context_arrives_exactly_as_sent(
        start_agent: Callable[..., Any], client: AgentClient, warm: int) -> None:
    agent = await start_agent(warm_sessions=warm)
    if warm:
        beat = await client.heartbeat(agent.url, timeout_s=10)
        while beat.warm_sessions < 1:
            beat = await client.heartbeat(agent.url, timeout_s=10)
    info = await client.open_session(agent.url, SessionId("text"), await ContextBody.of(TEXT),
                                     None, timeout_s=30)
    # A warm session adopts the context by the same path as a cold one.
    assert info.warm is bool(warm)
    out = await cell(client, agent, "text", "import json\nprint(type(context).__name__, "
                                            "json.dumps(context))")
    kind, _, sent = out.rstrip("\n").partition(" ")
    assert (kind, json.loads(sent)) == ("str", TEXT)
    assert incoming(agent) == []


async def test_a_json_context_and_no_context_still_work(
        start_agent: Callable[..., Any], client: AgentClient) -> None:
    agent = await start_agent(warm_sessions=0)
    value = {"rows": [1, 2.5, None], "name": "ünï", "text": "x" * 70_000}
    body = await ContextBody.of(value)
    assert body.format == "json"
    await client.open_session(agent.url, SessionId("dict"), body, None, timeout_s=30)
    out = await cell(client, agent, "dict", "import json\nprint(json.dumps(context))")
    assert json.loads(out) == value
    await client.open_session(agent.url, SessionId("empty"), await ContextBody.of(None),
                              None, timeout_s=30)
    assert await cell(client, agent, "empty", "print(context is None)") == "True\n"


async def test_a_job_beside_the_session_finds_the_context_as_a_file(
        start_agent: Callable[..., Any], client: AgentClient) -> None:
    agent = await start_agent()
    await client.open_session(agent.url, SessionId("text"), await ContextBody.of(TEXT), None,
                              timeout_s=30)
    await client.open_session(agent.url, SessionId("json"), await ContextBody.of([1, "two"]),
                              None, timeout_s=30)
    text = await client.run_job(agent.url, JobRequest(
        job_id=JobId("read-text"), language="bash", code="od -An -tx1 -v context.txt",
        session_id="text"), timeout_s=30)
    assert text.status == "ok", text
    assert bytes.fromhex(text.stdout.replace("\n", " ")) == TEXT.encode()
    data = await client.run_job(agent.url, JobRequest(
        job_id=JobId("read-json"), language="bash", code="cat context.json",
        session_id="json"), timeout_s=30)
    assert json.loads(data.stdout) == [1, "two"]


async def put(agent: AgentProcess, session_id: str, body: bytes, headers: dict[str, str]
              ) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.put(
            f"{agent.url}/v1/sessions/{session_id}", data=io.BytesIO(body),
            headers=headers) as answer:
        return answer.status, await answer.json()


def meta(callback: LlmCallback | None = None) -> str:
    return base64.urlsafe_b64encode(encode(SessionOpen(context="text",
                                                       llm_callback=callback))).decode()


async def test_a_tampered_body_is_refused_and_leaves_nothing_behind(
        start_agent: Callable[..., Any], client: AgentClient) -> None:
    agent = await start_agent(warm_sessions=0)
    path = "/v1/sessions/tampered"
    sent = b"x" * 3_000_000
    headers = sign(SECRET.encode(), "PUT", path, b"y" * 3_000_000, meta=meta())
    status, answer = await put(agent, "tampered", sent, headers)
    assert (status, answer["error"]["code"]) == (401, "unauthorized")
    assert "bad signature" in answer["error"]["message"]
    # The signed metadata cannot be swapped either: another callback is another request.
    headers = sign(SECRET.encode(), "PUT", path, sent, meta=meta())
    headers[META_HEADER] = meta(LlmCallback(url="http://127.0.0.1:1/", token="stolen"))
    status, answer = await put(agent, "tampered", sent, headers)
    assert status == 401, answer
    assert incoming(agent) == []
    assert not list((agent.dir / "jobs" / ".contexts").iterdir())
    beat: Heartbeat = await client.heartbeat(agent.url, timeout_s=10)
    assert beat.sessions == 0


async def test_a_context_over_the_body_limit_gets_a_clear_error(
        start_agent: Callable[..., Any], client: AgentClient) -> None:
    agent = await start_agent(warm_sessions=0, max_body_bytes=1_000_000)
    with pytest.raises(RemoteError) as caught:
        await client.open_session(agent.url, SessionId("big"),
                                  await ContextBody.of("z" * 1_500_000), None, timeout_s=30)
    assert (caught.value.status, caught.value.remote_code) == (413, "context_too_large")
    assert "agent.max_body_bytes" in caught.value.message
    assert incoming(agent) == []
    # Without a declared length the limit is counted as the body arrives.
    path = "/v1/sessions/chunked"
    body = b"z" * 1_500_000

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 100_000):
            yield body[start:start + 100_000]

    headers = sign(SECRET.encode(), "PUT", path, body, meta=meta())
    async with aiohttp.ClientSession() as http, http.put(
            agent.url + path, data=chunks(), headers=headers) as answer:
        assert answer.status == 413
        assert (await answer.json())["error"]["code"] == "context_too_large"
    assert incoming(agent) == []


async def test_a_bad_metadata_header_is_a_parse_error(
        start_agent: Callable[..., Any]) -> None:
    agent = await start_agent(warm_sessions=0)
    path = "/v1/sessions/bad"
    for value in ("not base64!", base64.urlsafe_b64encode(b'{"version": 2}').decode(), ""):
        headers = sign(SECRET.encode(), "PUT", path, b"text", meta=value)
        headers[META_HEADER] = value
        status, answer = await put(agent, "bad", b"text", headers)
        assert (status, answer["error"]["code"]) == (400, "parse_error"), answer
        assert META_HEADER in answer["error"]["message"]
    assert incoming(agent) == []


async def test_a_compressed_context_is_decoded_once_verified(
        start_agent: Callable[..., Any]) -> None:
    agent = await start_agent(warm_sessions=0)
    text = "a compressible line ünï\n" * 20_000
    async with aiohttp.ClientSession() as http:
        signed = SignedClient(http, secret=SECRET.encode(), compress_loopback=True)
        client = AgentClient(signed)
        # The first answer names the agent's encodings; bodies after it go compressed.
        await client.heartbeat(agent.url, timeout_s=10)
        await client.open_session(agent.url, SessionId("packed"), await ContextBody.of(text),
                                  None, timeout_s=30)
        out = await cell(client, agent, "packed", "print(len(context), context[:20])")
    assert out == f"{len(text)} {text[:20]}\n"
    assert incoming(agent) == []


async def test_a_text_context_that_is_not_utf8_is_refused_and_no_session_is_left(
        start_agent: Callable[..., Any], client: AgentClient) -> None:
    agent = await start_agent(warm_sessions=1)
    path = "/v1/sessions/latin1"
    body = "caf\u00e9 cr\u00e8me".encode("latin-1")
    status, answer = await put(agent, "latin1", body,
                               sign(SECRET.encode(), "PUT", path, body, meta=meta()))
    assert (status, answer["error"]["code"]) == (400, "parse_error"), answer
    assert "cannot be read as UTF-8 text" in answer["error"]["message"]
    beat = await client.heartbeat(agent.url, timeout_s=10)
    assert beat.sessions == 0
    assert incoming(agent) == []


async def test_a_heartbeat_lists_the_body_feature_and_a_newer_ones_fields_are_ignored(
    start_agent: Callable[..., Any], client: AgentClient,
) -> None:
    agent = await start_agent()
    beat = await client.heartbeat(agent.url, timeout_s=10)
    assert FEATURE_CONTEXT_BODY in beat.features
    # A controller reads the heartbeat of an agent newer than itself.
    newer = json.loads(encode(beat))
    newer["field_from_a_later_version"] = {"any": [1, 2]}
    assert msgspec.json.decode(json.dumps(newer).encode(), type=Heartbeat) == beat
