"""Hostile requests against a live controller, and the published spec kept in step with it."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import msgspec
import pytest
import requests
import schemathesis
import yaml
from controller_env import controller_config, healthy_ids, running_controller, start_agents
from exo_standin import DEFAULT_MODEL, make_exo_app
from hypothesis import given, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR
from test_fuzz_agent import (
    BODIES,
    CHECKS,
    CONTENT_TYPES,
    FUZZ,
    MALFORMED_HTTP,
    METHODS,
    QUERIES,
    REQUEST_TIMEOUT_S,
    SEGMENTS,
    UNDECODABLE,
    Signer,
    _exchange,
    check_answer,
    sendable,
)

from kowalski.agent.app import AgentState
from kowalski.agent.app import make_app as make_agent_app
from kowalski.common import messages
from kowalski.controller.api import dashboard, openai_front, status
from kowalski.controller.api.app import make_app as make_controller_app
from kowalski.controller.rlm import events as rlm_events
from kowalski.controller.rlm import live, resume, runs, trajectory
from kowalski.controller.service import Controller

pytestmark = pytest.mark.timeout(120)

DOCS = Path(__file__).resolve().parent.parent / "docs"
SPEC_PATH = DOCS / "openapi.yaml"
GENERATED = ("    # Generated from the wire structs by `python tests/test_fuzz_controller.py`;"
             " do not edit below.\n")
TOKEN = "fuzz-token-" + "t" * 24
# Pages for people, and streams that never end, are not fuzzed as JSON operations.
NOT_FUZZED = {"/v1/events"}


def wire_schemas() -> dict[str, Any]:
    """JSON Schemas of every struct the two APIs send or take, as the spec names them."""
    kinds: list[Any] = [
        messages.ErrorBody, messages.JobRequest, messages.JobResult, messages.SessionCreate,
        messages.SessionInfo, messages.CellRequest, messages.CellResult, messages.VariableValue,
        messages.Heartbeat, messages.Metrics, messages.LlmQuery, messages.LlmAnswer,
        messages.CancelRequest, messages.CancelResult, messages.SessionOpen,
        runs.RunRequest, resume.ResumeRequest, openai_front.CompletionBody, status.Status,
        status.DeviceStatus, live.LiveRunSummary, trajectory.StoredRunSummary,
        trajectory.Trajectory, messages.JobStreamLine, messages.CellStreamLine,
        rlm_events.RlmResult, dashboard.Snapshot, runs.RunStreamLine, rlm_events.AnyRlmEvent,
    ]
    schemas, components = msgspec.json.schema_components(
        kinds, ref_template="#/components/schemas/{name}")
    components["JobStreamLine"] = {
        "title": "JobStreamLine",
        "description": "One line of a streamed job: output, then its result or error.",
        **schemas[-6]}
    components["CellStreamLine"] = {
        "title": "CellStreamLine",
        "description": "One line of a streamed cell: output, then its result or error.",
        **schemas[-5]}
    components["RlmEvent"] = {"title": "RlmEvent",
                              "description": "One line of a streamed run, before its result.",
                              **schemas[-1]}
    components["RunStreamLine"] = {
        "title": "RunStreamLine",
        "description": "One line of a streamed run; the last is the result or the error.",
        **schemas[-2]}
    loaded: dict[str, Any] = json.loads(json.dumps(components))
    return loaded


def write_generated_schemas() -> None:
    """Rewrite the generated part of docs/openapi.yaml from the structs."""
    head = SPEC_PATH.read_text().split(GENERATED)[0]
    body = yaml.safe_dump(wire_schemas(), sort_keys=False, width=96, allow_unicode=True)
    SPEC_PATH.write_text(head + GENERATED + "".join(
        f"    {line}\n" if line else "\n" for line in body.splitlines()))


def spec() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text())
    return loaded


def spec_operations(tag: str) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in spec()["paths"].items()
            for method, operation in item.items()
            if isinstance(operation, dict) and tag in operation.get("tags", ())}


def api_routes(app: Any) -> set[tuple[str, str]]:
    """(method, path) of an app's API routes; pages and HEAD twins left out."""
    return {(route.method, route.resource.canonical) for route in app.router.routes()
            if route.method != "HEAD" and route.resource is not None
            and (route.resource.canonical.startswith("/v1/")
                 or route.resource.canonical in ("/healthz", "/metrics"))}


def test_the_spec_is_valid_openapi_3_1() -> None:
    problems = [f"{'.'.join(map(str, error.instance_path))}: {error.message}"
                for error in OPENAPI_31_VALIDATOR.iter_errors(spec())]
    assert not problems, problems[:10]


def test_published_schemas_are_the_wire_structs() -> None:
    published = spec()["components"]["schemas"]
    expected = wire_schemas()
    stale = sorted(name for name, schema in expected.items() if published.get(name) != schema)
    assert not stale, (f"docs/openapi.yaml is out of date for {stale}; "
                       "run `python tests/test_fuzz_controller.py` to regenerate it")


async def test_every_api_route_is_in_the_spec_and_the_reference(controller: Controller) -> None:
    agent_app = make_agent_app(cast(AgentState, None), verifier=None, max_body_bytes=1)
    controller_app = make_controller_app(controller.state, max_body_bytes=1)
    assert api_routes(agent_app) == spec_operations("agent")
    assert api_routes(controller_app) == spec_operations("controller")
    reference = (DOCS / "API.md").read_text()
    documented = set(re.findall(r"^### `(GET|POST|PUT|DELETE) (\S+)`", reference, re.M))
    assert documented == spec_operations("agent") | spec_operations("controller")


# --- a live controller -------------------------------------------------------------------


@pytest.fixture
async def controller(aiohttp_server: Any, tmp_path: Path) -> AsyncIterator[Controller]:
    exo = await aiohttp_server(make_exo_app(models=(DEFAULT_MODEL,)))
    agents = await start_agents(tmp_path, 1, sandbox={"timeout_ms_python": 3000,
                                                      "timeout_ms_bash": 3000})
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    config = controller_config(
        agents, [str(exo.make_url("")).rstrip("/")], tmp_path,
        controller={"retry_max_attempts": 2, "retry_base_delay_ms": 10,
                    "retry_max_delay_ms": 20, "max_body_bytes": 256 * 1024},
        exo={"request_timeout_s": 10.0, "default_model": DEFAULT_MODEL},
        rlm={"max_iterations": 2, "run_timeout_s": 15.0, "max_context_length": 50_000,
             "max_depth": 1},
        security={"api_token_file": str(token_file), "rate_limit_per_s": 10_000.0,
                  "rate_limit_burst": 100_000})
    try:
        async with running_controller(config) as running:
            assert await running.cluster.wait_for(lambda t: len(healthy_ids(t)) == 1,
                                                   timeout_s=15)
            yield running
    finally:
        for agent in agents:
            await agent.stop()


def still_up(base_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """The controller answers and logged no error or traceback through the barrage."""
    answer = requests.get(base_url + "/v1/status", timeout=5)
    assert answer.status_code == 200, answer.text
    assert answer.json()["version"]
    errors = [f"{record.name}: {record.getMessage()}" for record in caplog.records
              if record.levelno >= logging.ERROR
              or (record.exc_info and record.name.startswith(("kowalski", "aiohttp")))]
    assert not errors, errors


def bounded(case: schemathesis.Case) -> None:
    """Bounded work per case: small runs, cheap jobs, models the stand-in serves."""
    sendable(case)
    body = case.body
    if not isinstance(body, dict):
        return
    if case.path == "/v1/runs":
        for key, limit in (("max_iterations", 2), ("max_depth", 1), ("run_timeout_s", 5.0)):
            if isinstance(body.get(key), int | float) and body[key] > limit:
                body[key] = limit
    if case.path == "/v1/chat/completions" and isinstance(body.get("model"), str):
        choices = ["", DEFAULT_MODEL, "rlm:" + DEFAULT_MODEL, body["model"]]
        body["model"] = choices[len(body["model"]) % len(choices)]


def run_spec_cases(base_url: str, mode: schemathesis.GenerationMode, examples: int) -> int:
    """Every controller operation in the spec, `examples` cases each; returns the cases sent."""
    schema = schemathesis.openapi.from_path(SPEC_PATH).include(tag="controller")
    sent = 0
    headers = {"Authorization": f"Bearer {TOKEN}"}

    def fuzz(operation: Any, http: requests.Session) -> None:
        # Agents sign their llm_query calls; the controller's other paths are unsigned.
        auth = Signer() if operation.path == "/v1/llm/query" else None

        @settings(FUZZ, max_examples=examples)
        @given(case=operation.as_strategy(generation_mode=mode))
        def send(case: schemathesis.Case) -> None:
            nonlocal sent
            sent += 1
            bounded(case)
            response = case.call(base_url=base_url, session=http, headers=headers, auth=auth,
                                 timeout=REQUEST_TIMEOUT_S)
            case.validate_response(response, checks=CHECKS)
            check_answer(response)

        send()

    with requests.Session() as http:
        for result in schema.get_all_operations():
            operation = result.ok()
            if operation.path in NOT_FUZZED:
                continue
            if mode == schemathesis.GenerationMode.NEGATIVE and not list(
                    operation.iter_parameters()) and not list(operation.body):
                continue  # nothing to get wrong
            fuzz(operation, http)
    return sent


async def test_spec_cases_get_documented_answers_and_never_a_500(
    controller: Controller, caplog: pytest.LogCaptureFixture,
) -> None:
    sent = await asyncio.to_thread(run_spec_cases, controller.base_url,
                                   schemathesis.GenerationMode.POSITIVE, 10)
    sent += await asyncio.to_thread(run_spec_cases, controller.base_url,
                                    schemathesis.GenerationMode.NEGATIVE, 15)
    assert sent > 100
    await asyncio.to_thread(still_up, controller.base_url, caplog)


PATHS = st.one_of(
    st.sampled_from(["/v1/status", "/v1/devices", "/metrics", "/v1/jobs", "/v1/llm/query",
                     "/v1/runs", "/v1/chat/completions", "/v1/models", "/", "/static/x"]),
    SEGMENTS.map(lambda s: f"/v1/runs/{s}"),
    SEGMENTS.map(lambda s: f"/static/{s}"),
    st.lists(SEGMENTS, max_size=4).map(lambda parts: "/" + "/".join(parts)),
)
AUTHORIZATION = st.sampled_from([f"Bearer {TOKEN}", f"Bearer {TOKEN}", "", "Bearer ",
                                 "Bearer wrong", "Basic eDp5", f"bearer {TOKEN}",
                                 "Bearer \u00e9\u00e8"])
CHAT_BODIES = st.fixed_dictionaries(
    {"model": st.sampled_from(["", DEFAULT_MODEL, "rlm:" + DEFAULT_MODEL, "rlm:", "nope"])},
    optional={"messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool", "bogus"])},
        optional={"content": st.none() | st.text(max_size=50) | st.lists(
            st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"])},
                                  optional={"text": st.text(max_size=20)}), max_size=3)}),
        max_size=3),
        "stream": st.booleans(), "max_tokens": st.none() | st.integers(-5, 5),
        "stop": st.none() | st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=2),
        "temperature": st.floats(allow_nan=False) | st.none(),
        "context": st.none() | st.text(max_size=60_000)},
).map(msgspec.json.encode)


def run_raw_requests(base_url: str, examples: int) -> None:
    with requests.Session() as http:

        @settings(FUZZ, max_examples=examples)
        @given(method=METHODS, path=PATHS, query=QUERIES, body=BODIES | CHAT_BODIES,
               content_type=CONTENT_TYPES, authorization=AUTHORIZATION, sign=st.booleans())
        def send(method: str, path: str, query: str, body: bytes, content_type: str,
                 authorization: str, sign: bool) -> None:
            headers = {"Content-Type": content_type} if content_type else {}
            if authorization:
                headers["Authorization"] = authorization
            response = http.request(method, base_url + path + query, data=body, headers=headers,
                                    auth=Signer() if sign else None, timeout=REQUEST_TIMEOUT_S)
            check_answer(response)

        send()


async def test_hostile_raw_requests_get_json_errors_and_the_controller_stays_up(
    controller: Controller, caplog: pytest.LogCaptureFixture,
) -> None:
    await asyncio.to_thread(run_raw_requests, controller.base_url, 250)
    await asyncio.to_thread(still_up, controller.base_url, caplog)


async def test_malformed_http_is_one_warning_per_peer_and_never_a_traceback(
    controller: Controller, caplog: pytest.LogCaptureFixture,
) -> None:
    for request_bytes in MALFORMED_HTTP * 2:
        answer = await asyncio.to_thread(_exchange, controller.port, request_bytes)
        assert not answer.startswith(b"HTTP/1.1 500"), (request_bytes[:80], answer[:500])
    await asyncio.to_thread(still_up, controller.base_url, caplog)
    lines = [record for record in caplog.records
             if record.getMessage().startswith("malformed HTTP request from 127.0.0.1: ")]
    assert len(lines) == 1, [record.getMessage() for record in lines]
    assert lines[0].levelno == logging.WARNING
    assert lines[0].exc_info is None


async def test_undecodable_bodies_get_400_parse_error_on_every_route(
    controller: Controller, caplog: pytest.LogCaptureFixture,
) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    with requests.Session() as http:
        for path in ("/v1/jobs", "/v1/runs", "/v1/chat/completions", "/v1/llm/query"):
            for body in UNDECODABLE:
                answer = await asyncio.to_thread(
                    http.post, controller.base_url + path, data=body, headers=headers,
                    auth=Signer() if path == "/v1/llm/query" else None,
                    timeout=REQUEST_TIMEOUT_S)
                assert answer.status_code == 400, (path, body, answer.text)
                assert answer.json()["error"]["code"] == "parse_error", answer.text
    await asyncio.to_thread(still_up, controller.base_url, caplog)


RUN_LIMITS: list[dict[str, Any]] = [
    {"max_iterations": 0}, {"max_iterations": -3}, {"max_depth": -1}, {"token_budget": 0},
    {"token_budget": -10}, {"run_timeout_s": 0}, {"run_timeout_s": -1.0},
    {"run_timeout_s": 1e308}, {"stream": True, "max_iterations": -1},
    {"context": "x" * 60_000}, {"context": {"deep": [[[[["a" * 10]]]]]}, "stream": True},
]


async def test_run_limits_out_of_range_are_refused_or_bounded(
    controller: Controller, caplog: pytest.LogCaptureFixture,
) -> None:
    def post(overrides: dict[str, Any]) -> requests.Response:
        body = {"query": "say hi", "max_iterations": 1, "run_timeout_s": 5.0, **overrides}
        return requests.post(controller.base_url + "/v1/runs", json=body,
                             headers={"Authorization": f"Bearer {TOKEN}"},
                             timeout=REQUEST_TIMEOUT_S)

    for overrides in RUN_LIMITS:
        response = await asyncio.to_thread(post, overrides)
        check_answer(response)
        assert response.status_code in (200, 400, 413), (overrides, response.text)
        if response.status_code == 200 and overrides.get("stream"):
            lines = [json.loads(line) for line in response.text.splitlines()]
            assert lines[-1]["kind"] in ("result", "error"), lines[-1]
    await asyncio.to_thread(still_up, controller.base_url, caplog)


async def test_event_stream_opens_and_a_garbage_query_does_not_break_it(
    controller: Controller,
) -> None:
    def first_event(query: str) -> bytes:
        with requests.get(controller.base_url + "/v1/events" + query, stream=True,
                          timeout=REQUEST_TIMEOUT_S) as response:
            assert response.status_code == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            seen = b""
            for chunk in response.iter_content(chunk_size=None):
                seen += chunk
                if b"event: snapshot" in seen and seen.endswith(b"\n\n"):
                    return seen
        return seen

    for query in ("", "?x=%ff", "?" + "a" * 5000):
        seen = await asyncio.to_thread(first_event, query)
        data = next(line for line in seen.split(b"\n") if line.startswith(b"data: "))
        assert "status" in json.loads(data.removeprefix(b"data: "))


if __name__ == "__main__":
    write_generated_schemas()
    print(f"wrote {SPEC_PATH}", file=sys.stderr)
