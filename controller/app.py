"""The controller's HTTP API: status, metrics, jobs, and the llm_query callback."""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from kowalski.common.errors import AuthError, KowalskiError
from kowalski.common.http import (
    errors_middleware,
    json_response,
    read_body,
)
from kowalski.common.messages import (
    JobRequest,
    LlmAnswer,
    LlmQuery,
    WireError,
)
from kowalski.common.signing import Verifier
from kowalski.controller.cluster import Cluster
from kowalski.controller.dispatch import Dispatcher
from kowalski.controller.llm_router import LlmRouter
from kowalski.controller.status import (
    JobCounters,
    RunSummary,
    Status,
    device_statuses,
    prometheus_text,
)

VERSION = "0.1.0"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SubCallHandler = Callable[[list[str]], Awaitable[list[str]]]


@dataclass
class ControllerState:
    """What the handlers reach."""

    cluster: Cluster
    dispatcher: Dispatcher
    router: LlmRouter
    verifier: Verifier | None
    api_token: bytes | None
    jobs: JobCounters = field(default_factory=JobCounters)
    # Run token -> the run's sub-call handler, for llm_query() from sessions.
    sub_calls: dict[str, SubCallHandler] = field(default_factory=dict)
    runs: Callable[[], list[RunSummary]] = field(default=lambda: [])
    cache_stats: Callable[[], dict[str, int]] = field(default=lambda: {})

    def status(self) -> Status:
        return Status(
            version=VERSION, time=time.time(),
            devices=device_statuses(self.cluster.table, self.cluster.clock()),
            endpoints=self.router.views(), jobs=self.jobs, runs=self.runs(),
            cache=self.cache_stats(),
        )


STATE = web.AppKey("state", ControllerState)


def require_token(request: web.Request) -> None:
    """Writes need the bearer token when one is configured."""
    token = request.app[STATE].api_token
    if token is None:
        return
    given = request.headers.get("Authorization", "")
    if not given.startswith("Bearer "):
        raise AuthError("this controller needs 'Authorization: Bearer <token>' for writes")
    if not hmac.compare_digest(given.removeprefix("Bearer ").strip().encode(), token):
        raise AuthError("wrong bearer token")


async def get_status(request: web.Request) -> web.Response:
    return json_response(request.app[STATE].status())


async def get_devices(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return json_response(device_statuses(state.cluster.table, state.cluster.clock()))


async def get_metrics(request: web.Request) -> web.Response:
    body = prometheus_text(request.app[STATE].status)
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


async def post_job(request: web.Request) -> web.Response:
    require_token(request)
    state = request.app[STATE]
    job = await read_body(request, JobRequest)
    state.jobs.submitted += 1
    try:
        result = await state.dispatcher.run_job(job)
    except KowalskiError:
        state.jobs.failed += 1
        raise
    state.jobs.succeeded += 1
    return json_response(result)


async def post_llm_query(request: web.Request) -> web.Response:
    """llm_query() from a session: signed by the agent, naming its run by token."""
    state = request.app[STATE]
    body = await request.read()
    if state.verifier is not None:
        state.verifier.verify(request.method, request.path_qs, request.headers, body)
    query = await read_body(request, LlmQuery)
    handler = state.sub_calls.get(query.token)
    if handler is None:
        raise AuthError("unknown or finished run token")
    try:
        answers = await handler(query.prompts)
    except KowalskiError as exc:
        error = WireError(code=exc.code, message=exc.user_message(),
                          retryable=exc.is_recoverable)
        return json_response(LlmAnswer(answers=[], error=error))
    return json_response(LlmAnswer(answers=answers))


def make_app(state: ControllerState, *, max_body_bytes: int) -> web.Application:
    app = web.Application(client_max_size=max_body_bytes, middlewares=[errors_middleware])
    app[STATE] = state
    app.router.add_get("/v1/status", get_status)
    app.router.add_get("/v1/devices", get_devices)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_post("/v1/jobs", post_job)
    app.router.add_post("/v1/llm/query", post_llm_query)
    return app
