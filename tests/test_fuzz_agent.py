"""Hostile requests against a real agent process: no 500s, no hangs, JSON errors, still up."""

from __future__ import annotations

import asyncio
import itertools
import re
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import msgspec
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from procs import SECRET, AgentProcess
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from kowalski.common.messages import JobResult
from kowalski.common.signing import sign

pytestmark = pytest.mark.timeout(120)

SPEC_PATH = Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml"
# A request that takes longer than this counts as a hang.
REQUEST_TIMEOUT_S = 20.0
MAX_BODY_BYTES = 256 * 1024
MAX_CODE_BYTES = 16 * 1024
SESSION_ID = "fuzz-session"
# The same examples on every run, so that a failure reproduces; raise max_examples to search.
FUZZ = settings(
    deadline=None, database=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)
# 5xx answers that are documented (busy, no devices) pass; check_answer refuses any 500.
CHECKS = [status_code_conformance, content_type_conformance, response_schema_conformance]


class Signer(requests.auth.AuthBase):
    """Signs each request as sent: method, path with query, and the final body bytes."""

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        body = request.body or b""
        data = body.encode() if isinstance(body, str) else body
        assert isinstance(data, bytes), "bodies are sent as bytes or text"
        request.headers.update(sign(SECRET.encode(), request.method or "GET",
                                    request.path_url, data))
        return request


def check_answer(response: requests.Response) -> None:
    """No internal errors; every error answer is an ErrorBody naming the problem."""
    sent = response.request
    assert response.status_code != 500, (
        f"{sent.method} {sent.url} {sent.headers.get('Content-Type')!r} "
        f"{(sent.body or b'')[:300]!r} -> {response.text[:1000]}")
    if response.status_code < 400 or response.request.method == "HEAD":
        return
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] not in ("", "internal"), body
    assert isinstance(body["error"]["message"], str), body
    assert body["error"]["message"].strip(), body


def still_up(agent: AgentProcess) -> None:
    """The agent answers and logged no unhandled error through the barrage."""
    assert agent.process is not None
    assert agent.process.returncode is None, agent.read_log()
    assert requests.get(agent.url + "/healthz", timeout=5).json() == {"status": "ok"}
    beat = requests.get(agent.url + "/v1/heartbeat", auth=Signer(), timeout=5)
    assert beat.status_code == 200, beat.text
    assert not logged_errors(agent.dir / "agent.log")


def logged_errors(path: Path) -> list[str]:
    """Error records and tracebacks in a server log."""
    records = re.split(r"\n(?=\d{4}-\d\d-\d\d )", path.read_text(errors="replace"))
    return [record[:3000] for record in records
            if re.search(r" (ERROR|CRITICAL) ", record.split("\n", 1)[0])
            or "Traceback (most recent call last)" in record]


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[AgentProcess]:
    process = await AgentProcess(
        tmp_path, name="fuzz",
        agent={"max_concurrent_jobs": 2, "max_queued_jobs": 8, "max_sessions": 4,
               "max_body_bytes": MAX_BODY_BYTES, "max_code_bytes": MAX_CODE_BYTES},
        sandbox={"timeout_ms_python": 3000, "timeout_ms_bash": 3000,
                 "max_output_bytes": 64 * 1024},
        # The barrage is one client: a rate limit would hide what lies behind it.
        security={"rate_limit_per_s": 10_000.0, "rate_limit_burst": 100_000},
    ).start()
    yield process
    assert await process.stop() == 0, process.read_log()


def integral(value: Any) -> Any:
    """JSON Schema counts 3.0 as an integer; the servers take integers written as such."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: integral(item) for key, item in value.items()}
    if isinstance(value, list):
        return [integral(item) for item in value]
    return value


def sendable(case: schemathesis.Case) -> None:
    """Keep generated jobs cheap: no compilers, no unbounded timeouts."""
    case.body = integral(case.body)
    if case.path == "/v1/jobs" and isinstance(case.body, dict):
        if case.body.get("language") in ("java", "rust", "javascript"):
            case.body["language"] = "bash"
        if isinstance(case.body.get("timeout_ms"), int):
            case.body["timeout_ms"] = min(max(case.body["timeout_ms"], 1), 2000)


def create_session(http: requests.Session, base_url: str) -> None:
    create = http.post(base_url + "/v1/sessions", json={"session_id": SESSION_ID},
                       auth=Signer(), timeout=REQUEST_TIMEOUT_S)
    assert create.status_code == 201, create.text


def run_spec_cases(base_url: str, mode: schemathesis.GenerationMode, examples: int) -> int:
    """Every agent operation in the spec, `examples` cases each; returns the cases sent."""
    schema = schemathesis.openapi.from_path(SPEC_PATH).include(tag="agent")
    sent = 0
    with requests.Session() as http:
        for result in schema.get_all_operations():
            operation = result.ok()
            if mode == schemathesis.GenerationMode.NEGATIVE and not list(
                    operation.iter_parameters()) and not list(operation.body):
                continue  # nothing to get wrong
            # Random session ids mostly miss; the live session reaches the code behind them.
            pins = [None, {"session_id": SESSION_ID}] if "{session_id}" in operation.path \
                else [None]
            for pinned in pins:
                if pinned is not None:
                    create_session(http, base_url)
                strategy = operation.as_strategy(generation_mode=mode, path_parameters=pinned)

                @settings(FUZZ, max_examples=examples)
                @given(case=strategy)
                def send(case: schemathesis.Case) -> None:
                    nonlocal sent
                    sent += 1
                    sendable(case)
                    response = case.call(base_url=base_url, session=http, auth=Signer(),
                                         timeout=REQUEST_TIMEOUT_S)
                    case.validate_response(response, checks=CHECKS)
                    check_answer(response)
                    created = response.json() if response.status_code == 201 else {}
                    if created.get("session_id") not in (None, SESSION_ID):
                        # Free the slot: the agent keeps at most max_sessions.
                        http.delete(f"{base_url}/v1/sessions/{quote(created['session_id'])}",
                                    auth=Signer(), timeout=REQUEST_TIMEOUT_S)

                send()
    return sent


async def test_spec_cases_get_documented_answers_and_never_a_500(agent: AgentProcess) -> None:
    sent = await asyncio.to_thread(run_spec_cases, agent.url,
                                   schemathesis.GenerationMode.POSITIVE, 15)
    sent += await asyncio.to_thread(run_spec_cases, agent.url,
                                    schemathesis.GenerationMode.NEGATIVE, 25)
    assert sent > 100
    still_up(agent)


# --- raw hostile requests ------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
FIELDS = ["job_id", "language", "code", "timeout_ms", "max_output_bytes", "stdin", "session_id",
          "context", "llm_callback", "cell_id", "url", "token", "depth"]
NEAR_MISS = st.dictionaries(st.sampled_from(FIELDS), JSON | st.text(max_size=300), max_size=6)
BODIES: st.SearchStrategy[bytes] = st.one_of(
    JSON.map(msgspec.json.encode),
    NEAR_MISS.map(msgspec.json.encode),
    st.binary(max_size=300),
    st.integers(1, 2 * MAX_BODY_BYTES).map(lambda n: b'{"code": "' + b"x" * n + b'"}'),
    st.sampled_from([1_000, 200_000]).map(lambda depth: b"[" * depth + b"]" * depth),
    st.sampled_from([1_000, 60_000]).map(lambda depth: b'{"a":' * depth + b"1" + b"}" * depth),
    st.builds(lambda junk: b'{"job_id": "j", "language": "python", "code": "' + junk + b'"}',
              st.sampled_from([b"\xff\xfe", b"\xed\xa0\x80", b"\xc0\xaf", b"\\ud800", b"\x00"])),
    st.just(b'{"job_id": "j", "language": "python", "code": "print(1)", "timeout_ms": 1e999}'),
    st.just(b'{"session_id": "s", "context": ' + b"[" * 5_000 + b"]" * 5_000 + b"}"),
    st.just(b""),
)
CONTENT_TYPES = st.sampled_from([
    "application/json", "application/octet-stream", "", "text/plain", "application/xml",
    "multipart/form-data; boundary=zz", "application/json; charset=latin-1", "\u00e9/\u00e8",
    "application/x-www-form-urlencoded",
])
SEGMENTS = st.one_of(st.sampled_from([SESSION_ID, "..", ".", "%2e%2e", "a" * 2000, "%00", ""]),
                     st.text(max_size=40).map(lambda text: quote(text, safe="")))
PATHS = st.one_of(
    st.sampled_from(["/healthz", "/v1/heartbeat", "/v1/metrics", "/v1/jobs", "/v1/sessions"]),
    SEGMENTS.map(lambda s: f"/v1/sessions/{s}"),
    SEGMENTS.map(lambda s: f"/v1/sessions/{s}/exec"),
    st.tuples(SEGMENTS, SEGMENTS).map(lambda p: f"/v1/sessions/{p[0]}/vars/{p[1]}"),
    st.lists(SEGMENTS, max_size=4).map(lambda parts: "/" + "/".join(parts)),
)
QUERIES = st.one_of(
    st.just(""),
    st.text(max_size=30).map(lambda text: "?max_chars=" + quote(text, safe="")),
    st.sampled_from(["?max_chars=-5", "?max_chars=99999999999999999999999", "?max_chars=1e3",
                     "?max_chars=%ff", "?&&==&", "?max_chars=1&max_chars=2"]),
)
METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
AUTH: st.SearchStrategy[Callable[[], requests.auth.AuthBase | None]] = st.sampled_from(
    [Signer, Signer, Signer, lambda: None, lambda: _WrongSigner()])


class _WrongSigner(requests.auth.AuthBase):
    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers.update({"X-Kowalski-Timestamp": "nan", "X-Kowalski-Nonce": "\u00e9",
                                "X-Kowalski-Signature": "0" * 64})
        return request


def run_raw_requests(base_url: str, examples: int) -> None:
    with requests.Session() as http:

        @settings(FUZZ, max_examples=examples)
        @given(method=METHODS, path=PATHS, query=QUERIES, body=BODIES,
               content_type=CONTENT_TYPES, auth=AUTH)
        def send(method: str, path: str, query: str, body: bytes, content_type: str,
                 auth: Callable[[], requests.auth.AuthBase | None]) -> None:
            headers = {"Content-Type": content_type} if content_type else {}
            response = http.request(method, base_url + path + query, data=body, headers=headers,
                                    auth=auth(), timeout=REQUEST_TIMEOUT_S)
            check_answer(response)

        send()


async def test_hostile_raw_requests_get_json_errors_and_the_agent_stays_up(
    agent: AgentProcess,
) -> None:
    await asyncio.to_thread(run_raw_requests, agent.url, 300)
    still_up(agent)


def _exchange(port: int, request: bytes) -> bytes:
    """One raw HTTP exchange; the answer or b"" when the server hangs up."""
    with socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT_S) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


BROKEN_HTTP = [
    b"GET /v1/sessions/\xff\xfe/vars/\xc0 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 99999\r\n\r\n{\"job_id\"",
    b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
    b"GARBAGE\r\n\r\n",
    b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
]


async def test_broken_http_is_refused_without_a_500(agent: AgentProcess) -> None:
    assert agent.port is not None
    for request_bytes in BROKEN_HTTP:
        answer = await asyncio.to_thread(_exchange, agent.port, request_bytes)
        assert not answer.startswith(b"HTTP/1.1 500"), (request_bytes[:80], answer[:500])
    still_up(agent)


# What an unauthenticated peer can send to flood the log; each once, then all again.
MALFORMED_HTTP = [
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00\x00\x00\x00\x00",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
    + b"".join(b"X-H%d: v\r\n" % i for i in range(10_000)) + b"\r\n",
    b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\nzz\r\nabc\r\n",
]


def malformed_http_lines(log_text: str) -> list[str]:
    return [line for line in log_text.splitlines() if "malformed HTTP request from" in line]


async def test_malformed_http_is_one_warning_per_peer_and_never_a_traceback(
    agent: AgentProcess,
) -> None:
    assert agent.port is not None
    for request_bytes in MALFORMED_HTTP * 2:
        answer = await asyncio.to_thread(_exchange, agent.port, request_bytes)
        assert not answer.startswith(b"HTTP/1.1 500"), (request_bytes[:80], answer[:500])
    still_up(agent)
    lines = malformed_http_lines((agent.dir / "agent.log").read_text(errors="replace"))
    assert len(lines) == 1, lines
    assert " WARNING aiohttp.server: malformed HTTP request from 127.0.0.1: " in lines[0]


# Bodies that are not UTF-8 (inside a string, and a UTF-16 body) or not JSON at all.
UNDECODABLE = [b'{"job_id": "a\xff", "session_id": "s\xfe", "code": "\xc0"}',
               '{"session_id": "x"}'.encode("utf-16"), b"\xff\xfe\xfd", b"{\"a\": \x00}"]


async def test_undecodable_bodies_get_400_parse_error_on_every_route(
    agent: AgentProcess,
) -> None:
    with requests.Session() as http:
        create_session(http, agent.url)
        for path in ("/v1/jobs", "/v1/sessions", f"/v1/sessions/{SESSION_ID}/exec"):
            for body in UNDECODABLE:
                answer = await asyncio.to_thread(
                    http.post, agent.url + path, data=body, auth=Signer(),
                    headers={"Content-Type": "application/json"}, timeout=REQUEST_TIMEOUT_S)
                assert answer.status_code == 400, (path, body, answer.text)
                assert answer.json()["error"]["code"] == "parse_error", answer.text
    still_up(agent)


async def test_a_signature_made_with_a_time_that_is_not_now_is_refused(
    agent: AgentProcess,
) -> None:
    for sent_at in (float("nan"), float("inf"), -1.0, 1e300):
        # Signed with the right secret, so only the timestamp check stands in the way.
        headers = sign(SECRET.encode(), "GET", "/v1/heartbeat", now=sent_at)
        answer = await asyncio.to_thread(requests.get, agent.url + "/v1/heartbeat",
                                         headers=headers, timeout=REQUEST_TIMEOUT_S)
        assert answer.status_code == 401, (sent_at, answer.text)
        assert "signature timestamp" in answer.json()["error"]["message"]


# --- sessions with hostile contexts ------------------------------------------------------

CONTEXTS = st.one_of(
    JSON,
    st.integers(1, 900).map(lambda depth: msgspec.json.decode(b"[" * depth + b"]" * depth)),
    st.integers(2**64, 2**300),
    st.text(min_size=1, max_size=50_000),
    st.binary(max_size=200).map(lambda data: data.decode("latin-1")),
)
CELLS = [
    "print(type(context).__name__, len(str(context)))",
    "import sys\nsys.stdout.buffer.write(b'\\xff\\xfe')",
    "raise SystemExit(3)",
    "import os\nos._exit(9)",
    "while True: pass",
    "print(llm_query('no controller behind this session'))",
    "context = None\nimport gc; gc.collect()",
]


def run_hostile_sessions(base_url: str, examples: int) -> int:
    created = 0
    with requests.Session() as http:

        @settings(FUZZ, max_examples=examples)
        @given(context=CONTEXTS, code=st.sampled_from(CELLS),
               max_chars=st.integers(-(2**70), 2**70))
        def send(context: Any, code: str, max_chars: int) -> None:
            nonlocal created
            session = f"hostile-{created}"
            answer = http.post(base_url + "/v1/sessions", auth=Signer(), timeout=REQUEST_TIMEOUT_S,
                               json={"session_id": session, "context": context})
            check_answer(answer)
            if answer.status_code != 201:
                return
            created += 1
            cell = http.post(f"{base_url}/v1/sessions/{session}/exec", auth=Signer(),
                             json={"cell_id": "c1", "code": code, "timeout_ms": 500},
                             timeout=REQUEST_TIMEOUT_S)
            check_answer(cell)
            value = http.get(f"{base_url}/v1/sessions/{session}/vars/context",
                             params={"max_chars": max_chars}, auth=Signer(),
                             timeout=REQUEST_TIMEOUT_S)
            check_answer(value)
            gone = http.delete(f"{base_url}/v1/sessions/{session}", auth=Signer(),
                               timeout=REQUEST_TIMEOUT_S)
            assert gone.json() == {"deleted": True}

        send()
    return created


async def test_sessions_with_hostile_contexts_and_cells_never_crash_the_agent(
    agent: AgentProcess,
) -> None:
    assert await asyncio.to_thread(run_hostile_sessions, agent.url, 25) >= 15
    still_up(agent)


# --- hostile code that runs --------------------------------------------------------------

PROGRAMS = [
    ("python", "import sys\nsys.stdout.buffer.write(b'\\xff\\xfe\\xc0\\x00 bad')"),
    ("python", "import sys\nsys.stderr.buffer.write(bytes(range(256)) * 100)"),
    ("python", "print('\\u00e9' * 100000)"),
    ("python", "print('\\ud800')"),
    ("python", "import os\nos.write(1, b'x' * 10_000_000)"),
    ("python", "import time\nwhile True: time.sleep(0.1)"),
    ("python", "import os, sys\nos.close(1)\nos.close(2)\nsys.exit(3)"),
    ("python", "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)"),
    ("python", "x = [0] * 10**9"),
    ("python", "import sys\nprint(sys.stdin.read()[:10])"),
    ("bash", "printf '\\xff\\xfe\\x00'; echo; exit 7"),
    ("bash", "yes | head -c 5000000"),
    ("bash", "sleep 30 & sleep 30 & echo forked"),
    ("bash", "cat /dev/urandom | head -c 100000"),
]
JOB_IDS = st.from_regex(r"\A[A-Za-z0-9_.:-]{1,128}\Z", fullmatch=True)


def run_hostile_jobs(base_url: str, examples: int) -> list[JobResult]:
    results: list[JobResult] = []
    numbers = itertools.count()
    with requests.Session() as http:

        @settings(FUZZ, max_examples=examples)
        @given(program=st.sampled_from(PROGRAMS), job_id=JOB_IDS,
               stdin=st.text(max_size=2000), max_output=st.none() | st.integers(1, 100_000),
               timeout_ms=st.none() | st.integers(1, 1500))
        def send(program: tuple[str, str], job_id: str, stdin: str, max_output: int | None,
                 timeout_ms: int | None) -> None:
            language, code = program
            # A fresh id each time: a repeated id would only return the first result.
            body: dict[str, Any] = {"job_id": f"{job_id[:100]}-{next(numbers)}",
                                    "language": language,
                                    "code": code, "stdin": stdin,
                                    "max_output_bytes": max_output, "timeout_ms": timeout_ms}
            response = http.post(base_url + "/v1/jobs", json=body, auth=Signer(),
                                 timeout=REQUEST_TIMEOUT_S)
            check_answer(response)
            if response.status_code == 200:
                result = msgspec.json.decode(response.content, type=JobResult)
                if max_output is not None:
                    assert len(result.stdout.encode()) <= max_output + 64
                results.append(result)

        send()
    return results


async def test_hostile_code_comes_back_as_a_result_not_a_crash(agent: AgentProcess) -> None:
    results = await asyncio.to_thread(run_hostile_jobs, agent.url, 30)
    assert len(results) >= 20
    assert {r.status for r in results} >= {"ok", "error"}
    still_up(agent)
