"""The controller's HTTP API: status, metrics, jobs, RLM runs, the OpenAI front."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import web

from kowalski.common.errors import AuthError, KowalskiError, ParseError
from kowalski.common.http import (
    errors_middleware,
    json_response,
    rate_limit_middleware,
    read_body,
    remote_address,
    sign_responses,
    verify_request,
)
from kowalski.common.job_stream import stream_job
from kowalski.common.messages import JobRequest, LlmAnswer, LlmQuery, WireError
from kowalski.common.ratelimit import RateLimiter
from kowalski.controller.api.dashboard import add_dashboard_routes
from kowalski.controller.api.openai_front import chat_completions, list_models
from kowalski.controller.api.state import STATE, ControllerState, require_token
from kowalski.controller.api.status import device_statuses, prometheus_text
from kowalski.controller.rlm.events import RlmEvent, RlmResult
from kowalski.controller.rlm.resume import ResumeRequest
from kowalski.controller.rlm.runs import (
    EventListener,
    RunRequest,
    RunStreamError,
    RunStreamResult,
)
from kowalski.controller.rlm.trajectory import list_runs, read_trajectory, run_dir
from kowalski.controller.rlm.trajectory_writer import flush_queued

log = logging.getLogger(__name__)
# How often a streamed run with nothing to send checks that its caller is still there.
_GONE_CHECK_S = 0.5
_encoder = msgspec.json.Encoder()
# Writes that start work, counted per client. llm_query callbacks are not: they come
# from agents, signed, and each run's budget and sub-call concurrency bound them.
RATE_LIMITED = frozenset({("POST", "/v1/jobs"), ("POST", "/v1/runs"),
                          ("POST", "/v1/chat/completions")})


def client_key(request: web.Request) -> str:
    """Rate-limit key: the remote address, and the bearer token once it is known good."""
    # A bad token is a 401 before any bucket is spent, and a made-up token cannot buy
    # a fresh bucket: it only counts once the controller has checked it.
    require_token(request)
    if request.app[STATE].api_token is None:
        return remote_address(request)
    token = request.headers["Authorization"].removeprefix("Bearer ").strip()
    digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()
    return f"{remote_address(request)} {digest[:16]}"


async def get_status(request: web.Request) -> web.Response:
    return json_response(request.app[STATE].status())


async def get_devices(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return json_response(device_statuses(state.cluster.table, state.cluster.clock()))


async def get_metrics(request: web.Request) -> web.Response:
    body = prometheus_text(request.app[STATE].status)
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


async def post_job(request: web.Request) -> web.StreamResponse:
    """Run a code job; with "stream": true, NDJSON output lines and then the result."""
    require_token(request)
    job = await read_body(request, JobRequest)
    if job.session_id is not None:
        # Sessions belong to the controller's own runs: a caller may not read their contexts.
        raise ParseError("session_id is for jobs of the controller's own RLM runs; leave it out "
                         "and send what the job needs in its code or stdin")
    dispatcher = request.app[STATE].dispatcher
    if not job.stream:
        return json_response(await dispatcher.run_job(job))
    return await stream_job(request, lambda listener: dispatcher.run_job(job, on_output=listener))


async def post_llm_query(request: web.Request) -> web.Response:
    """llm_query() from a session: signed by the agent, naming its run by token."""
    state = request.app[STATE]
    if state.verifier is not None:
        await verify_request(state.verifier, request)
    query = await read_body(request, LlmQuery)
    try:
        answers = await state.runs.answer(query.token, query.prompts, query.model)
    except KowalskiError as exc:
        error = WireError(code=exc.code, message=exc.user_message(),
                          retryable=exc.retry_elsewhere)
        return json_response(LlmAnswer(answers=[], error=error))
    if answers is None:
        raise AuthError("unknown or finished run token")
    return json_response(LlmAnswer(answers=answers))


def _caller_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def post_run(request: web.Request) -> web.StreamResponse:
    """Run one RLM job; with "stream": true, NDJSON events and then the result."""
    require_token(request)
    state = request.app[STATE]
    run = await read_body(request, RunRequest)
    if not run.stream:
        return json_response(await state.runs.run(run))
    return await _stream_run(request, lambda observer: state.runs.run(run, observer=observer))


async def post_resume(request: web.Request) -> web.StreamResponse:
    """Go on with a stopped run; with "stream": true, NDJSON events and then the result."""
    require_token(request)
    state = request.app[STATE]
    run_id = request.match_info["run_id"]
    body = await read_body(request, ResumeRequest) if request.can_read_body else ResumeRequest()
    if not body.stream:
        return json_response(await state.runs.resume(run_id, max_iterations=body.max_iterations))
    # What is wrong before the run goes on (unknown id, finished, limit) is a plain answer.
    await state.runs.check_resume(run_id, max_iterations=body.max_iterations)
    return await _stream_run(request, lambda observer: state.runs.resume(
        run_id, max_iterations=body.max_iterations, observer=observer))


async def _stream_run(request: web.Request,
                      start: Callable[[EventListener], Awaitable[RlmResult]]
                      ) -> web.StreamResponse:
    """A run's events as NDJSON lines, then its result or its error."""
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    events: asyncio.Queue[RlmEvent] = asyncio.Queue()
    task = asyncio.ensure_future(start(events.put_nowait))
    try:
        while not task.done() or not events.empty():
            getter = asyncio.ensure_future(events.get())
            await asyncio.wait({getter, task}, timeout=_GONE_CHECK_S,
                               return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                await response.write(_encoder.encode(getter.result()) + b"\n")
                continue
            getter.cancel()
            if not task.done() and _caller_gone(request):
                # Nobody reads the events any more: the run stops now, not at its next event
                # (which a hung model call could put off for minutes).
                log.info("a streamed run was cancelled: its caller hung up")
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, KowalskiError):
                    await task
                return response
        last: RunStreamResult | RunStreamError = RunStreamResult(result=task.result())
    except KowalskiError as exc:
        last = RunStreamError(error=WireError(
            code=exc.code, message=exc.user_message(), retryable=exc.retry_elsewhere))
    finally:
        if not task.done():
            task.cancel()
    await response.write(_encoder.encode(last) + b"\n")
    await response.write_eof()
    return response


async def get_runs(request: web.Request) -> web.Response:
    state = request.app[STATE]
    stored = await asyncio.to_thread(list_runs, state.runs.config.trajectory_dir)
    return json_response({"live": state.runs.summaries(), "stored": stored[:200]})


async def get_run(request: web.Request) -> web.Response:
    state = request.app[STATE]
    run_id = request.match_info["run_id"]
    if not run_id.replace("-", "").isalnum():
        raise ParseError(f"not a run id: {run_id!r}")
    directory = run_dir(state.runs.config.trajectory_dir)
    if not (directory / f"{run_id}.jsonl").is_file():
        raise web.HTTPNotFound(text=f"no run {run_id} in {directory}")
    # ?descendants=1: the child runs its sub-calls started too (the dashboard's call tree).
    below = request.query.get("descendants", "") in ("1", "true")
    # Sub-call records a running run has queued, so the read misses none it was told of.
    await flush_queued(directory, run_id)
    return json_response(await asyncio.to_thread(read_trajectory, run_id, directory,
                                                 descendants=below))


def make_app(state: ControllerState, *, max_body_bytes: int, secret: bytes | None = None,
             rate_limiter: RateLimiter | None = None) -> web.Application:
    app = web.Application(client_max_size=max_body_bytes, middlewares=[
        errors_middleware, rate_limit_middleware(rate_limiter, limited=RATE_LIMITED,
                                                 key=client_key)])
    app[STATE] = state
    # Agents check that llm_query answers come from the controller holding the secret.
    sign_responses(app, secret)
    app.router.add_get("/v1/status", get_status)
    app.router.add_get("/v1/devices", get_devices)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_post("/v1/jobs", post_job)
    app.router.add_post("/v1/llm/query", post_llm_query)
    app.router.add_post("/v1/runs", post_run)
    app.router.add_get("/v1/runs", get_runs)
    app.router.add_get("/v1/runs/{run_id}", get_run)
    app.router.add_post("/v1/runs/{run_id}/resume", post_resume)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    add_dashboard_routes(app)
    return app
