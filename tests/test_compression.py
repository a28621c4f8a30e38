"""Compressed bodies between controller and agents: negotiation, signatures, limits."""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from procs import SECRET, AgentProcess

from kowalski.common import compression
from kowalski.common.client import SignedClient
from kowalski.common.errors import AuthError, ParseError, RemoteError
from kowalski.common.http import (
    compression_middleware,
    errors_middleware,
    json_response,
    read_body,
    sign_responses,
    signature_middleware,
)
from kowalski.common.messages import (
    CellRequest,
    Heartbeat,
    JobRequest,
    JobResult,
    SessionCreate,
    SessionId,
    encode,
)
from kowalski.common.signing import Verifier, sign
from kowalski.controller.fleet.agent_client import AgentClient

pytestmark = pytest.mark.timeout(90)
Server = Any  # pytest-aiohttp's TestServer


def test_both_encodings_round_trip_and_zstd_comes_first() -> None:
    body = json.dumps({"context": "the quick brown fox " * 50_000}).encode()
    assert compression.SUPPORTED == ("zstd", "gzip")
    for encoding in compression.SUPPORTED:
        packed = compression.compress(body, encoding)
        assert len(packed) < len(body) // 20
        assert compression.decompress(packed, encoding, max_bytes=len(body)) == body
    assert compression.choose(("zstd", "gzip"), len(body)) == "zstd"
    assert compression.choose(("gzip",), len(body)) == "gzip"
    assert compression.choose((), len(body)) is None
    assert compression.choose(("zstd",), compression.COMPRESS_FROM_BYTES - 1) is None
    assert compression.parse_accept("br, GZIP;q=0.5, zstd") == ("zstd", "gzip")


@pytest.mark.parametrize("encoding", ["zstd", "gzip"])
def test_a_body_that_expands_past_the_limit_or_is_cut_is_refused(encoding: str) -> None:
    bomb = compression.compress(b"\0" * 20_000_000, encoding)
    assert len(bomb) < 100_000
    with pytest.raises(ParseError, match="over 1000000 bytes"):
        compression.decompress(bomb, encoding, max_bytes=1_000_000)
    whole = compression.compress(b"some text " * 100_000, encoding)
    with pytest.raises(ParseError, match="cannot be decoded"):
        compression.decompress(whole[: len(whole) // 2], encoding, max_bytes=10_000_000)
    with pytest.raises(ParseError, match="cannot be decoded"):
        compression.decompress(b"not compressed at all", encoding, max_bytes=1000)


def test_an_unknown_encoding_names_the_ones_that_work() -> None:
    with pytest.raises(ParseError, match="'br' is not supported here; send one of: zstd, gzip"):
        compression.decompress(b"x", "br", max_bytes=100)


# --- a real server with the agent's middleware stack -------------------------------------


class Echo(SimpleNamespace):
    """What the server saw: the last request's wire encoding and its decoded size."""


def echo_app(seen: Echo, *, advertise: bool = True) -> web.Application:
    secret = SECRET.encode()
    middlewares = [errors_middleware,
                   signature_middleware(Verifier(secret), open_paths=frozenset())]
    if advertise:
        middlewares.append(compression_middleware(max_body_bytes=8_000_000))
    app = web.Application(client_max_size=8_000_000, middlewares=middlewares)
    sign_responses(app, secret)

    async def echo(request: web.Request) -> web.Response:
        job = await read_body(request, JobRequest)
        seen.encoding = compression.encoding_of(request.headers)
        seen.wire_bytes = len(await request.read())
        return json_response(JobResult(job_id=job.job_id, status="ok", exit_code=0,
                                       stdout=job.code, stderr=""))

    app.router.add_post("/echo", echo)
    return app


@pytest.fixture
async def client() -> AsyncIterator[SignedClient]:
    async with aiohttp.ClientSession() as session:
        yield SignedClient(session, secret=SECRET.encode(), compress_loopback=True)


def big_job(size: int = 1_000_000) -> JobRequest:
    line = "print('a line of output that repeats')\n"
    return JobRequest(job_id="big", language="python", code=line * (size // len(line)))


async def test_large_bodies_go_compressed_once_the_peer_has_named_its_encodings(
    aiohttp_server: Callable[..., Awaitable[Server]], client: SignedClient,
) -> None:
    seen = Echo()
    server = await aiohttp_server(echo_app(seen))
    url = str(server.make_url("/echo"))
    job = big_job()
    # The first call cannot know what the peer decodes; its answer says.
    first = await client.call("POST", url, JobResult, job, timeout_s=30)
    assert (seen.encoding, first.stdout) == ("", job.code)
    again = await client.call("POST", url, JobResult, job, timeout_s=30)
    assert seen.encoding == "zstd"
    assert seen.wire_bytes < len(job.code) // 20
    assert again.stdout == job.code
    small = JobRequest(job_id="small", language="python", code="print(1)")
    await client.call("POST", url, JobResult, small, timeout_s=30)
    assert seen.encoding == ""


async def test_bodies_to_this_host_go_plain_unless_asked_otherwise(
    aiohttp_server: Callable[..., Awaitable[Server]],
) -> None:
    seen = Echo()
    server = await aiohttp_server(echo_app(seen))
    async with aiohttp.ClientSession() as http:
        client = SignedClient(http, secret=SECRET.encode())
        for host in ("127.0.0.1", "localhost"):
            url = f"http://{host}:{server.port}/echo"
            for _ in range(2):
                result = await client.call("POST", url, JobResult, big_job(), timeout_s=30)
                assert (seen.encoding, result.stdout) == ("", big_job().code)


async def test_a_peer_that_names_no_encoding_gets_plain_bodies(
    aiohttp_server: Callable[..., Awaitable[Server]], client: SignedClient,
) -> None:
    seen = Echo()
    server = await aiohttp_server(echo_app(seen, advertise=False))
    url = str(server.make_url("/echo"))
    for _ in range(2):
        result = await client.call("POST", url, JobResult, big_job(), timeout_s=30)
        assert (seen.encoding, seen.wire_bytes) == ("", len(encode(big_job())))
        assert result.stdout == big_job().code


async def test_the_encoding_is_signed_so_a_relabelled_body_is_refused(
    aiohttp_server: Callable[..., Awaitable[Server]],
) -> None:
    seen = Echo()
    server = await aiohttp_server(echo_app(seen))
    body = gzip.compress(json.dumps({"job_id": "j", "language": "python",
                                     "code": "x" * 100_000}).encode())
    # Signed as a plain body, sent as gzip: the name is part of what is signed.
    headers = {"Content-Type": "application/json", compression.ENCODING_HEADER: "gzip",
               **sign(SECRET.encode(), "POST", "/echo", body)}
    async with aiohttp.ClientSession() as http:
        async with http.post(server.make_url("/echo"), data=body, headers=headers) as response:
            assert response.status == 401
            assert (await response.json())["error"]["message"].startswith("bad signature")
        headers = {"Content-Type": "application/json", compression.ENCODING_HEADER: "gzip",
                   **sign(SECRET.encode(), "POST", "/echo", body, encoding="gzip")}
        async with http.post(server.make_url("/echo"), data=body, headers=headers) as response:
            assert response.status == 200
            # This caller named no encoding, so its answer is plain.
            assert compression.ENCODING_HEADER not in response.headers
            assert len((await response.json())["stdout"]) == 100_000
    assert seen.encoding == "gzip"


async def test_a_compressed_bomb_from_a_signed_peer_is_a_clear_400(
    aiohttp_server: Callable[..., Awaitable[Server]],
) -> None:
    server = await aiohttp_server(echo_app(Echo()))
    body = compression.compress(b" " * 20_000_000, "zstd")
    headers = {"Content-Type": "application/json", compression.ENCODING_HEADER: "zstd",
               **sign(SECRET.encode(), "POST", "/echo", body, encoding="zstd")}
    async with aiohttp.ClientSession() as http, http.post(
        server.make_url("/echo"), data=body, headers=headers,
    ) as response:
        assert response.status == 400
        assert "decodes to over 8000000 bytes" in (await response.json())["error"]["message"]


# --- a real agent ----------------------------------------------------------------------------


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[AgentProcess]:
    process = await AgentProcess(tmp_path, name="packed").start()
    yield process
    assert await process.stop() == 0, process.read_log()


async def test_a_large_context_and_a_large_output_cross_compressed_to_a_real_agent(
    agent: AgentProcess,
) -> None:
    wire: dict[str, list[int]] = {"sent": [], "received": []}
    encodings: list[str] = []

    async def on_chunk_sent(_: Any, __: Any, params: aiohttp.TraceRequestChunkSentParams
                            ) -> None:
        wire["sent"].append(len(params.chunk))

    async def on_headers(_: Any, __: Any, params: aiohttp.TraceRequestHeadersSentParams
                         ) -> None:
        encodings.append(params.headers.get(compression.ENCODING_HEADER, ""))

    async def on_chunk_received(_: Any, __: Any,
                                params: aiohttp.TraceResponseChunkReceivedParams) -> None:
        wire["received"].append(len(params.chunk))

    trace = aiohttp.TraceConfig()
    trace.on_response_chunk_received.append(on_chunk_received)
    trace.on_request_chunk_sent.append(on_chunk_sent)
    trace.on_request_headers_sent.append(on_headers)
    context = " ".join(f"word{n}" for n in range(400_000))  # about 4 MB
    async with aiohttp.ClientSession(trace_configs=[trace]) as http:
        client = SignedClient(http, secret=SECRET.encode(), compress_loopback=True)
        agents = AgentClient(client)
        beat = await agents.heartbeat(agent.url, timeout_s=5)
        assert isinstance(beat, Heartbeat)
        wire["sent"].clear()
        started = time.monotonic()
        await agents.create_session(agent.url, SessionCreate(
            session_id=SessionId("packed"), context=context), timeout_s=60)
        assert encodings[-1] == "zstd"
        assert sum(wire["sent"]) < len(context) // 3
        cell = await agents.execute(agent.url, SessionId("packed"), CellRequest(
            cell_id="c1", code="print(len(context), context.split()[-1])"), timeout_s=60)
        assert cell.stdout == f"{len(context)} word399999\n"
        assert time.monotonic() - started < 30
        wire["received"].clear()
        job = await agents.run_job(agent.url, JobRequest(
            job_id="loud", language="python", code="print('y' * 500_000)"), timeout_s=60)
        assert job.stdout == "y" * 500_000 + "\n"
        assert sum(wire["received"]) < 50_000
        with pytest.raises(RemoteError) as caught:
            await client.call("POST", agent.url + "/v1/jobs", JobResult,
                              JobRequest(job_id="loud", language="python", code="other"),
                              timeout_s=30)
        assert caught.value.status == 409
        assert not isinstance(caught.value, AuthError)
