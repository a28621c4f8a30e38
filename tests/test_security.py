"""Authentication, answer signing, bearer tokens, rate limits and caps, end to end."""

from __future__ import annotations

import asyncio
import io
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from controller_env import controller_config, healthy_ids, running_controller
from hypothesis import given, settings
from hypothesis import strategies as st
from procs import SECRET, AgentProcess

from kowalski.common import errors
from kowalski.common.client import SignedClient
from kowalski.common.config import SecurityConfig, read_api_token
from kowalski.common.errors import RemoteError
from kowalski.common.http import RESPONSE_SIGNATURE_HEADER, response_signature
from kowalski.common.messages import Heartbeat, JobRequest, JobResult, Metrics, encode
from kowalski.common.ratelimit import RateLimiter
from kowalski.common.signing import NONCE_HEADER, sign

pytestmark = pytest.mark.timeout(90)
TOKEN = "api-token-" + "t" * 32
StartAgent = Callable[..., Awaitable[AgentProcess]]


@pytest.fixture
async def start_agent(tmp_path: Path) -> AsyncIterator[StartAgent]:
    started: list[AgentProcess] = []

    async def start(**sections: dict[str, object]) -> AgentProcess:
        agent = AgentProcess(tmp_path, name=f"sec{len(started)}", **sections)
        started.append(agent)
        return await agent.start()

    yield start
    for agent in started:
        assert await agent.stop() == 0, agent.read_log()


@dataclass
class Answer:
    status: int
    raw: bytes
    headers: dict[str, str]

    @property
    def body(self) -> Any:
        return json.loads(self.raw)

    @property
    def error(self) -> dict[str, Any]:
        error: dict[str, Any] = self.body["error"]
        return error


async def send(url: str, method: str, path: str, body: bytes = b"",
               headers: dict[str, str] | None = None, *,
               session: aiohttp.ClientSession | None = None) -> Answer:
    """One raw request, as any HTTP client could send it."""
    async with AsyncExitStack() as stack:
        if session is None:
            session = await stack.enter_async_context(aiohttp.ClientSession())
        async with session.request(method, url + path, data=io.BytesIO(body), headers={
                "Content-Type": "application/json", **(headers or {})}) as response:
            return Answer(response.status, await response.read(), dict(response.headers))


def job_body(job_id: str, code: str = "echo ran") -> bytes:
    return encode(JobRequest(job_id=job_id, language="bash", code=code))


def signed(path: str, body: bytes, secret: str = SECRET, now: float | None = None
           ) -> dict[str, str]:
    return sign(secret.encode(), "POST", path, body, now=now)


# --- controller <-> agent: request signatures --------------------------------------------


async def test_agent_refuses_unsigned_forged_stale_and_tampered_jobs_and_runs_none(
    start_agent: StartAgent,
) -> None:
    agent = await start_agent(agent={"max_body_bytes": 100_000},
                              security={"clock_skew_s": 5.0})
    # Unsigned is refused before the body is read: a 401, not a 413.
    answer = await send(agent.url, "POST", "/v1/jobs", job_body("big", "#" * 200_000))
    assert (answer.status, answer.error["message"]) == (
        401, "request is not signed. " + errors.AuthError.hint)
    body = job_body("probe")
    refusals = {
        "request is not signed": {},
        "bad signature": signed("/v1/jobs", body, secret="another-secret-" + "x" * 20),
        # Old (captured earlier) and from the future (a clock far ahead).
        "timestamp is +6": signed("/v1/jobs", body, now=time.time() - 60),
        "timestamp is -6": signed("/v1/jobs", body, now=time.time() + 60),
    }
    for reason, headers in refusals.items():
        answer = await send(agent.url, "POST", "/v1/jobs", body, headers)
        assert (answer.status, answer.error["code"]) == (401, "unauthorized"), reason
        assert reason in answer.error["message"]
        assert ("outside ±5 s" in answer.error["message"]) == ("timestamp" in reason)
    # Signed for one body, sent with another.
    tampered = job_body("probe", code="echo tampered")
    answer = await send(agent.url, "POST", "/v1/jobs", tampered, signed("/v1/jobs", body))
    assert answer.status == 401
    assert "bad signature" in answer.error["message"]
    # Had any refused request run, its job id would now be taken by other code (409).
    other = job_body("probe", code="echo fresh")
    answer = await send(agent.url, "POST", "/v1/jobs", other, signed("/v1/jobs", other))
    assert (answer.status, answer.body["stdout"]) == (200, "fresh\n")


async def test_replayed_request_is_refused_and_the_secret_never_reaches_the_log(
    start_agent: StartAgent,
) -> None:
    agent = await start_agent()
    body = job_body("once")
    headers = signed("/v1/jobs", body)
    first = await send(agent.url, "POST", "/v1/jobs", body, headers)
    again = await send(agent.url, "POST", "/v1/jobs", body, headers)
    assert (first.status, first.body["stdout"]) == (200, "ran\n")
    assert again.status == 401
    assert "replayed request (nonce already used)" in again.error["message"]
    assert await agent.stop() == 0
    log = agent.read_log()
    assert "listening on http://127.0.0.1" in log
    assert SECRET not in log


async def test_agent_signs_every_answer_to_a_verified_request_errors_included(
    start_agent: StartAgent,
) -> None:
    agent = await start_agent()
    for body, status in ((job_body("signed-ok"), 200), (b"{not json", 400)):
        headers = signed("/v1/jobs", body)
        answer = await send(agent.url, "POST", "/v1/jobs", body, headers)
        assert answer.status == status
        assert answer.headers[RESPONSE_SIGNATURE_HEADER] == response_signature(
            SECRET.encode(), headers[NONCE_HEADER], status, answer.raw)
    # An unverified request gets no signed answer: no one can collect signatures.
    answer = await send(agent.url, "GET", "/v1/heartbeat", headers={NONCE_HEADER: "a" * 32})
    assert answer.status == 401
    assert RESPONSE_SIGNATURE_HEADER not in answer.headers


def impostor_app(hits: dict[str, int], polled: asyncio.Event, secret: bytes | None
                 ) -> web.Application:
    """Answers like an agent without the secret (or signing with the wrong one)."""

    async def heartbeat(request: web.Request) -> web.Response:
        hits["heartbeat"] += 1
        if hits["heartbeat"] >= 4:
            polled.set()
        body = encode(Heartbeat(
            agent_id="impostor", name="impostor", version="0.1.0", started_at=0.0,
            sent_at=time.time(), seq=hits["heartbeat"], sandbox_mode="bwrap",
            languages=["bash", "python"], jobs_running=0, jobs_queued=0, sessions=0,
            metrics=Metrics(memory_total_bytes=1 << 40, memory_available_bytes=1 << 40,
                            cpu_percent=0.0, cpu_count=128, load_1m=0, load_5m=0,
                            load_15m=0)))
        headers = {}
        if secret is not None:
            headers[RESPONSE_SIGNATURE_HEADER] = response_signature(
                secret, request.headers.get(NONCE_HEADER, ""), 200, body)
        return web.Response(body=body, content_type="application/json", headers=headers)

    async def job(request: web.Request) -> web.Response:
        hits["job"] += 1
        return web.json_response({"job_id": "x", "status": "ok", "exit_code": 0,
                                  "stdout": "forged\n", "stderr": ""})

    app = web.Application()
    app.router.add_get("/v1/heartbeat", heartbeat)
    app.router.add_post("/v1/jobs", job)
    return app


@pytest.mark.parametrize(("impostor_secret", "says"),
                         [(None, "no signature"), (b"guessed-secret-" + b"g" * 20,
                                                   "a bad signature")])
async def test_an_impostor_at_an_agent_address_never_becomes_healthy_nor_gets_work(
    aiohttp_server: Any, tmp_path: Path, impostor_secret: bytes | None, says: str,
) -> None:
    hits = {"heartbeat": 0, "job": 0}
    polled = asyncio.Event()
    server = await aiohttp_server(impostor_app(hits, polled, impostor_secret))
    url = str(server.make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as session:
        client = SignedClient(session, secret=SECRET.encode())
        with pytest.raises(errors.UnverifiedAnswerError, match=says):
            await client.call("GET", url + "/v1/heartbeat", Heartbeat, timeout_s=5)
    config = controller_config([], [], tmp_path, controller={"static_agents": [url]})
    async with running_controller(config) as running:
        await asyncio.wait_for(polled.wait(), 10)
        assert running.cluster.table.devices == {}
        with pytest.raises(errors.NoDevicesAvailableError):
            await running.dispatcher.run_job(JobRequest(job_id="j", language="bash",
                                                        code="true"))
    assert hits["job"] == 0


# --- the controller's own API: bearer token ------------------------------------------------


def write_private(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


async def test_controller_writes_need_the_bearer_token_and_reads_stay_open(
    start_agent: StartAgent, tmp_path: Path,
) -> None:
    agent = await start_agent()
    token_file = write_private(tmp_path / "token", TOKEN)
    config = controller_config([agent], [], tmp_path,
                               security={"api_token_file": str(token_file)})
    async with running_controller(config) as running:
        assert await running.cluster.wait_for(lambda t: len(healthy_ids(t)) == 1, timeout_s=15)
        base = running.base_url
        for path in ("/v1/jobs", "/v1/runs", "/v1/chat/completions"):
            answer = await send(base, "POST", path, b"{}")
            assert (answer.status, answer.error["code"]) == (401, "unauthorized"), path
            assert "needs 'Authorization: Bearer <token>'" in answer.error["message"]
            answer = await send(base, "POST", path, b"{}",
                                {"Authorization": "Bearer wrong-" + "w" * 32})
            assert answer.status == 401
            assert answer.error["message"].startswith("wrong bearer token")
        for path in ("/v1/status", "/v1/devices", "/v1/runs", "/v1/models"):
            assert (await send(base, "GET", path)).status == 200, path
        answer = await send(base, "POST", "/v1/jobs", job_body("with-token"),
                            {"Authorization": f"Bearer {TOKEN}"})
        assert (answer.status, answer.body["stdout"]) == (200, "ran\n")


def test_token_file_is_checked_like_the_secret_and_a_systemd_credential_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert read_api_token(SecurityConfig()) is None
    loose = write_private(tmp_path / "loose", TOKEN, mode=0o644)
    with pytest.raises(errors.ConfigError, match="readable by others"):
        read_api_token(SecurityConfig(api_token_file=str(loose)))
    short = write_private(tmp_path / "short", "abc")
    with pytest.raises(errors.ConfigError, match="shorter than 16 bytes"):
        read_api_token(SecurityConfig(api_token_file=str(short)))
    good = write_private(tmp_path / "good", TOKEN)
    assert read_api_token(SecurityConfig(api_token_file=str(good))) == TOKEN.encode()
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    # A unit that loads only the HMAC secret: the configured file still counts.
    assert read_api_token(SecurityConfig(api_token_file=str(good))) == TOKEN.encode()
    write_private(credentials / "kowalski-api-token", "from-systemd-" + "c" * 20, mode=0o400)
    assert read_api_token(SecurityConfig(api_token_file=str(good))) == (
        b"from-systemd-" + b"c" * 20)


async def test_controller_refuses_to_start_with_a_token_file_others_can_read(
    tmp_path: Path,
) -> None:
    token_file = write_private(tmp_path / "token", TOKEN, mode=0o640)
    config = controller_config([], [], tmp_path, security={"api_token_file": str(token_file)})
    with pytest.raises(errors.ConfigError, match="readable by others"):
        async with running_controller(config):
            pass


# --- rate limits -----------------------------------------------------------------------------


def test_bucket_allows_a_burst_then_refuses_with_the_wait_then_refills() -> None:
    now = [100.0]
    limiter = RateLimiter(rate_per_s=2, burst=3, clock=lambda: now[0])
    for _ in range(3):
        limiter.check("a")
    with pytest.raises(errors.RateLimitedError) as caught:
        limiter.check("a")
    assert caught.value.retry_after_s == pytest.approx(0.5)
    assert "2 per second" in caught.value.message
    limiter.check("b")  # another client has its own bucket
    now[0] += 0.25
    with pytest.raises(errors.RateLimitedError) as caught:
        limiter.check("a")
    # Refused requests spend nothing: the wait only shrinks.
    assert caught.value.retry_after_s == pytest.approx(0.25)
    now[0] += 0.25
    limiter.check("a")


def test_idle_clients_are_forgotten_and_the_table_is_capped() -> None:
    now = [0.0]
    limiter = RateLimiter(rate_per_s=2, burst=3, max_clients=100, clock=lambda: now[0])
    for n in range(1000):
        limiter.check(f"client-{n}")
    assert len(limiter) == 100
    # A bucket untouched for burst / rate seconds is full: keeping it would change nothing.
    now[0] += 1.5
    limiter.check("late")
    assert len(limiter) == 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcd"), st.floats(0, 2)), max_size=100))
def test_forgetting_idle_clients_never_changes_an_answer(
    events: list[tuple[str, float]],
) -> None:
    now = [0.0]
    limiter = RateLimiter(rate_per_s=2, burst=3, clock=lambda: now[0])
    # The plain token bucket, remembering every client forever.
    tokens: dict[str, tuple[float, float]] = {}
    accepted: dict[str, int] = {}
    for key, step in events:
        now[0] += step
        level, last = tokens.get(key, (3.0, now[0]))
        level = min(3.0, level + (now[0] - last) * 2)
        if level >= 1:
            limiter.check(key)
            tokens[key] = (level - 1, now[0])
            accepted[key] = accepted.get(key, 0) + 1
        else:
            with pytest.raises(errors.RateLimitedError) as caught:
                limiter.check(key)
            assert caught.value.retry_after_s == pytest.approx((1 - level) / 2)
            tokens[key] = (level, now[0])
        assert len(limiter) <= 4
    for count in accepted.values():
        assert count <= 3 + 2 * now[0] + 1e-9


async def test_agent_rate_limits_job_submission_with_429_and_retry_after(
    start_agent: StartAgent,
) -> None:
    agent = await start_agent(security={"rate_limit_per_s": 1.0, "rate_limit_burst": 3})
    bodies = [job_body(f"rate-{n}", code="true") for n in range(6)]
    answers = await asyncio.gather(*(
        send(agent.url, "POST", "/v1/jobs", body, signed("/v1/jobs", body)) for body in bodies))
    assert sorted(answer.status for answer in answers) == [200, 200, 200, 429, 429, 429]
    for answer in answers:
        if answer.status == 429:
            assert answer.error["code"] == "rate_limited"
            assert answer.error["retryable"] is True
            assert "1 per second (bursts of 3)" in answer.error["message"]
            assert answer.headers["Retry-After"] == "1"
    # Heartbeats are not counted.
    beat = await send(agent.url, "GET", "/v1/heartbeat",
                      headers=sign(SECRET.encode(), "GET", "/v1/heartbeat"))
    assert beat.status == 200
    # A client that waits as told gets in again.
    await asyncio.sleep(1.0)
    body = job_body("after-waiting", code="true")
    answer = await send(agent.url, "POST", "/v1/jobs", body, signed("/v1/jobs", body))
    assert answer.status == 200


async def test_controller_rate_limits_work_per_client_but_not_reads_or_bad_tokens(
    tmp_path: Path,
) -> None:
    token_file = write_private(tmp_path / "token", TOKEN)
    config = controller_config([], [], tmp_path, security={
        "api_token_file": str(token_file), "rate_limit_per_s": 0.5, "rate_limit_burst": 3})
    auth = {"Authorization": f"Bearer {TOKEN}"}
    paths = ["/v1/jobs", "/v1/runs", "/v1/chat/completions"]
    async with running_controller(config) as running, aiohttp.ClientSession() as session:
        base = running.base_url
        # Bad bodies count too: the limit is on requests, checked before any parsing.
        firsts = await asyncio.gather(*(send(base, "POST", path, b"[]", auth, session=session)
                                        for path in paths))
        assert [answer.status for answer in firsts] == [400, 400, 400]
        started = time.monotonic()
        for path in paths:
            answer = await send(base, "POST", path, b"[]", auth, session=session)
            assert (answer.status, answer.headers.get("Retry-After")) == (429, "2"), path
            assert answer.error["code"] == "rate_limited"
            # Without the token it is a 401, never a 429.
            assert (await send(base, "POST", path, b"[]", session=session)).status == 401
        for _ in range(5):
            assert (await send(base, "GET", "/v1/status", session=session)).status == 200
        while (answer := await send(base, "POST", "/v1/jobs", b"[]", auth,
                                    session=session)).status == 429:
            assert time.monotonic() - started < 5
            await asyncio.sleep(0.2)
        assert answer.status == 400


# --- caps: concurrency, sessions, body size ------------------------------------------------


async def test_two_hundred_submissions_to_a_one_slot_agent_admit_exactly_three(
    start_agent: StartAgent,
) -> None:
    agent = await start_agent(
        agent={"max_concurrent_jobs": 1, "max_queued_jobs": 2, "max_sessions": 1},
        security={"rate_limit_burst": 10_000})
    # Bounded client connections: the agent's listen backlog must not drop connects.
    connector = aiohttp.TCPConnector(limit=40)
    async with aiohttp.ClientSession(connector=connector) as session:
        bodies = [job_body(f"flood-{n}", code="sleep 1.5") for n in range(200)]
        answers = await asyncio.gather(*(
            send(agent.url, "POST", "/v1/jobs", body, signed("/v1/jobs", body),
                 session=session) for body in bodies))
        assert sorted(answer.status for answer in answers) == [200] * 3 + [503] * 197
        for answer in answers:
            if answer.status == 503:
                assert answer.error["code"] == "busy"
                # The first job may not have taken its slot yet: three are in, either way.
                counts = re.search(r"running (\d) jobs with (\d) queued", answer.error["message"])
                assert counts is not None
                assert int(counts[1]) + int(counts[2]) == 3
                assert answer.headers["Retry-After"] == "1"
        body = job_body("afterwards", code="true")
        answer = await send(agent.url, "POST", "/v1/jobs", body, signed("/v1/jobs", body),
                            session=session)
        assert answer.status == 200
        # Sessions have a cap of their own, answered the same way.
        first, second = b'{"session_id": "s1"}', b'{"session_id": "s2"}'
        answer = await send(agent.url, "POST", "/v1/sessions", first,
                            signed("/v1/sessions", first), session=session)
        assert answer.status == 201
        answer = await send(agent.url, "POST", "/v1/sessions", second,
                            signed("/v1/sessions", second), session=session)
        assert (answer.status, answer.error["code"]) == (503, "busy")
        assert "limit of 1 sessions" in answer.error["message"]
        assert int(answer.headers["Retry-After"]) >= 1


async def test_controller_refuses_a_body_over_its_limit_with_413(tmp_path: Path) -> None:
    config = controller_config([], [], tmp_path, controller={"max_body_bytes": 10_000})
    async with running_controller(config) as running:
        answer = await send(running.base_url, "POST", "/v1/runs",
                            b'{"query": "' + b"q" * 20_000 + b'"}')
    assert answer.status == 413
    assert "Maximum request body size 10000 exceeded" in answer.error["message"]


async def test_a_refused_call_carries_the_peers_retry_after(start_agent: StartAgent) -> None:
    agent = await start_agent(security={"rate_limit_per_s": 0.25, "rate_limit_burst": 1})
    async with aiohttp.ClientSession() as session:
        client = SignedClient(session, secret=SECRET.encode())
        job = JobRequest(job_id="first", language="bash", code="true")
        await client.call("POST", agent.url + "/v1/jobs", JobResult, job, timeout_s=30)
        with pytest.raises(RemoteError) as caught:
            await client.call("POST", agent.url + "/v1/jobs", JobResult,
                              JobRequest(job_id="second", language="bash", code="true"),
                              timeout_s=30)
    assert (caught.value.status, caught.value.remote_code) == (429, "rate_limited")
    assert caught.value.is_recoverable
    # retry() waits at least this long before the next attempt.
    assert caught.value.retry_after_s in (2.0, 3.0, 4.0)
