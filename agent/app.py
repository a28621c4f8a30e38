"""The agent's HTTP API: jobs, sessions, heartbeats and metrics under /v1."""

from __future__ import annotations

import base64
import binascii
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import msgspec
from aiohttp import web

from kowalski.agent import incoming_context
from kowalski.agent.incoming_context import ReceivedContext, ReceivedSession
from kowalski.agent.jobs import JobRunner
from kowalski.agent.metrics import MetricsSampler
from kowalski.agent.sandbox import Sandbox
from kowalski.agent.sessions import SessionManager
from kowalski.common import compression
from kowalski.common.errors import BodyTooLargeError, CancelledJobError, ExecutionError, ParseError
from kowalski.common.http import (
    VERIFIED_NONCE,
    compression_middleware,
    errors_middleware,
    json_response,
    rate_limit_middleware,
    read_body,
    sign_responses,
    signature_middleware,
    verify_streamed,
)
from kowalski.common.job_stream import TextListener, stream_job, text_listener
from kowalski.common.messages import (
    FEATURES,
    CancelRequest,
    CellRequest,
    CellResult,
    CellStreamResult,
    Heartbeat,
    Identifier,
    JobRequest,
    JobResult,
    SessionCreateRaw,
    SessionDeleted,
    SessionId,
    SessionOpen,
    decode,
)
from kowalski.common.ratelimit import RateLimiter
from kowalski.common.signing import META_HEADER, Verifier
from kowalski.common.version import VERSION as VERSION

# Liveness for process supervisors and load balancers; carries nothing secret.
OPEN_PATHS = frozenset({"/healthz"})
# Counted per client after the signature check. Sessions are bounded by max_sessions
# and their cells run one at a time, so only job submission needs a rate.
RATE_LIMITED = frozenset({("POST", "/v1/jobs")})
# Bodies read as they arrive, and verified by their handlers: a session's context.
STREAMED = frozenset({("PUT", "/v1/sessions/{session_id}")})


@dataclass
class AgentState:
    """What the handlers reach: the components and the agent's identity."""

    agent_id: str
    name: str
    sandbox: Sandbox
    jobs: JobRunner
    sessions: SessionManager
    metrics: MetricsSampler
    max_code_bytes: int
    started_at: float = field(default_factory=time.time)
    seq: itertools.count[int] = field(default_factory=itertools.count)


STATE = web.AppKey("state", AgentState)
# The shared secret that signs streamed answers (b"" when unsigned).
SECRET = web.AppKey("secret", bytes)
# The largest request body, a streamed one included.
MAX_BODY_BYTES = web.AppKey("max_body_bytes", int)


def _check_code_size(state: AgentState, code: str) -> None:
    size = len(code.encode())
    if size > state.max_code_bytes:
        raise ParseError(f"code is {size} bytes, over the limit of {state.max_code_bytes}")


def heartbeat(state: AgentState) -> Heartbeat:
    return Heartbeat(
        agent_id=state.agent_id,
        name=state.name,
        version=VERSION,
        started_at=state.started_at,
        sent_at=time.time(),
        seq=next(state.seq),
        sandbox_mode=state.sandbox.mode,
        languages=list(state.sandbox.languages),
        metrics=state.metrics.sample(),
        jobs_running=len(state.jobs.running_ids),
        jobs_queued=state.jobs.queued,
        sessions=len(state.sessions),
        warm_sessions=len(state.sessions.pool),
        running_job_ids=state.jobs.running_ids,
        pool_size=0 if state.sandbox.pool is None else state.sandbox.pool.size,
        pool_ready=0 if state.sandbox.pool is None else state.sandbox.pool.ready,
        features=list(FEATURES),
    )


def _session_id(request: web.Request) -> SessionId:
    return SessionId(request.match_info["session_id"])


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def get_heartbeat(request: web.Request) -> web.Response:
    return json_response(heartbeat(request.app[STATE]))


async def get_metrics(request: web.Request) -> web.Response:
    return json_response(request.app[STATE].metrics.sample())


def _client_gone(request: web.Request) -> bool:
    # A controller hangs up on an attempt when it gives the job to another agent.
    transport = request.transport
    return transport is None or transport.is_closing()


async def post_job(request: web.Request) -> web.StreamResponse:
    """Run a job; with "stream": true, NDJSON output lines, the result and a signed end."""
    state = request.app[STATE]
    job = await read_body(request, JobRequest)
    _check_code_size(state, job.code)
    # The session must live here: its context is copied from its own, not sent again.
    files = None if job.session_id is None else await state.sessions.context_files(
        SessionId(job.session_id))
    if not job.stream:
        return json_response(await state.jobs.submit(job, gone=lambda: _client_gone(request),
                                                     files=files))

    def run(listener: TextListener) -> Awaitable[JobResult]:
        return state.jobs.submit(job, gone=lambda: _client_gone(request),
                                 on_output=text_listener(listener), files=files)

    return await stream_job(request, run, secret=request.app[SECRET] or None,
                            nonce=request.get(VERIFIED_NONCE), signed=True)


async def post_cancel(request: web.Request) -> web.Response:
    cancel = await read_body(request, CancelRequest)
    return json_response(request.app[STATE].jobs.cancel(list(cancel.attempt_ids)))


async def post_session(request: web.Request) -> web.Response:
    state = request.app[STATE]
    create = await read_body(request, SessionCreateRaw)
    info = await state.sessions.create(create)
    return json_response(msgspec.structs.replace(info, agent_id=state.agent_id), status=201)


def _session_open(request: web.Request) -> tuple[SessionId, SessionOpen]:
    """The new session's id and what its signed metadata header says."""
    try:
        session_id = msgspec.convert(request.match_info["session_id"], Identifier)
    except msgspec.ValidationError as exc:
        raise ParseError(f"invalid session id: {exc}") from None
    header = request.headers.get(META_HEADER, "")
    try:
        meta = decode(base64.urlsafe_b64decode(header), SessionOpen)
    except (binascii.Error, ValueError, msgspec.MsgspecError) as exc:
        raise ParseError(f"header {META_HEADER} must be base64url of a SessionOpen JSON object "
                         f"(version 1): {exc}") from None
    return SessionId(session_id), meta


async def put_session(request: web.Request) -> web.Response:
    """Start a session whose context is the body as it is, written to disk as it arrives."""
    state = request.app[STATE]
    session_id, meta = _session_open(request)
    limit = request.app[MAX_BODY_BYTES]
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLargeError(request.content_length, limit, "the session's context")
    directory = state.sessions.contexts_dir
    if directory is None:
        raise ExecutionError("this agent takes no context as a request body")
    path, size, digest = await incoming_context.receive(
        request.content.iter_any(), directory, max_bytes=limit, owner=state.sandbox.job_user)
    try:
        # Before anything of the body is used: a bad signature leaves nothing behind.
        verify_streamed(request, digest)
        context = None
        if meta.context == "none" and size:
            raise ParseError('a session opened with context "none" must have an empty body')
        if meta.context != "none":
            encoding = compression.encoding_of(request.headers)
            if encoding:
                path, size = await incoming_context.decode(path, encoding, max_bytes=limit,
                                                           owner=state.sandbox.job_user)
            context = ReceivedContext(path=path, format=meta.context, size_bytes=size)
        info = await state.sessions.create(ReceivedSession(
            session_id=session_id, context=context, llm_callback=meta.llm_callback))
    finally:
        # Gone already when the session took it.
        await incoming_context.remove(path)
    return json_response(msgspec.structs.replace(info, agent_id=state.agent_id), status=201)


def _check_cell_wanted(state: AgentState, cell: CellRequest,
                       gone: Callable[[], bool] = lambda: False) -> None:
    """Refuse a cell whose attempt was cancelled or hung up on, or whose deadline passed."""
    if state.jobs.refuses(cell.attempt_id):
        raise CancelledJobError(f"attempt {cell.attempt_id} of cell {cell.cell_id!r} was "
                                "cancelled by the controller")
    # As for jobs: only an attempt is given up by hanging up; other callers may come back.
    if cell.attempt_id is not None and gone():
        raise CancelledJobError(f"attempt {cell.attempt_id} of cell {cell.cell_id!r} was "
                                "not started: its caller hung up")
    if cell.deadline is not None and cell.deadline <= time.time():
        raise CancelledJobError(f"cell {cell.cell_id!r} was not started: its deadline has "
                                "passed")


async def post_cell(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    cell = await read_body(request, CellRequest)
    _check_code_size(state, cell.code)
    _check_cell_wanted(state, cell)
    session_id = _session_id(request)

    def still_wanted() -> None:
        # Again once the cells before it in the session are done: it may have waited long.
        _check_cell_wanted(state, cell, lambda: _client_gone(request))

    if not cell.stream:
        result = await state.sessions.execute(session_id, cell, still_wanted=still_wanted)
        return json_response(msgspec.structs.replace(result, agent_id=state.agent_id))

    async def run(listener: TextListener) -> CellResult:
        result = await state.sessions.execute(session_id, cell, on_output=listener,
                                              still_wanted=still_wanted)
        return msgspec.structs.replace(result, agent_id=state.agent_id)

    return await stream_job(request, run, secret=request.app[SECRET] or None,
                            nonce=request.get(VERIFIED_NONCE), signed=True,
                            result_line=lambda result: CellStreamResult(result=result))


async def get_variable(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        max_chars = int(request.query.get("max_chars", "100000"))
    except ValueError:
        raise ParseError("max_chars must be a whole number") from None
    value = await state.sessions.get_variable(
        _session_id(request), request.match_info["name"], max_chars
    )
    return json_response(value)


async def delete_session(request: web.Request) -> web.Response:
    deleted = await request.app[STATE].sessions.delete(_session_id(request))
    return json_response(SessionDeleted(deleted=deleted))


def make_app(state: AgentState, *, verifier: Verifier | None, max_body_bytes: int,
             secret: bytes | None = None, rate_limiter: RateLimiter | None = None
             ) -> web.Application:
    app = web.Application(
        client_max_size=max_body_bytes,
        middlewares=[errors_middleware,
                     signature_middleware(verifier, open_paths=OPEN_PATHS, streamed=STREAMED),
                     compression_middleware(max_body_bytes=max_body_bytes, streamed=STREAMED),
                     rate_limit_middleware(rate_limiter, limited=RATE_LIMITED)],
    )
    app[STATE] = state
    app[SECRET] = secret or b""
    app[MAX_BODY_BYTES] = max_body_bytes
    sign_responses(app, secret)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/v1/heartbeat", get_heartbeat)
    app.router.add_get("/v1/metrics", get_metrics)
    app.router.add_post("/v1/jobs", post_job)
    app.router.add_post("/v1/cancel", post_cancel)
    app.router.add_post("/v1/sessions", post_session)
    app.router.add_put("/v1/sessions/{session_id}", put_session)
    app.router.add_post("/v1/sessions/{session_id}/exec", post_cell)
    app.router.add_get("/v1/sessions/{session_id}/vars/{name}", get_variable)
    app.router.add_delete("/v1/sessions/{session_id}", delete_session)
    return app
