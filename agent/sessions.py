"""Persistent Python sessions: one sandboxed driver process each, spoken to over two pipes."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kowalski.agent.incoming_context import ReceivedSession
from kowalski.agent.job_result import OUTPUT_LIMIT
from kowalski.agent.repl_client import LlmHandler, OutputListener, ReplSession
from kowalski.agent.sandbox import Sandbox
from kowalski.agent.teardown import finish
from kowalski.agent.warm_pool import WarmPool
from kowalski.common.errors import (
    BusyError,
    ExecutionError,
    ReplError,
    ReplTimeoutError,
    SessionLostError,
    SessionNotFoundError,
)
from kowalski.common.messages import (
    CellRequest,
    CellResult,
    JobStatus,
    LlmCallback,
    SessionCreate,
    SessionCreateRaw,
    SessionId,
    SessionInfo,
    VariableValue,
    WireError,
)

__all__ = ["LlmHandler", "SessionManager"]

log = logging.getLogger("kowalski.agent.sessions")

# Results kept per session for repeated cell ids.
_MAX_CACHED_CELLS = 10_000


class SessionManager:
    """Creates, runs and expires sessions; at most max_sessions at once, warm ones counted.

    With warm_sessions, that many sessions are kept started without a context; a new
    session adopts one (and loads its context into it) instead of starting a process.
    """

    def __init__(self, sandbox: Sandbox, *, max_sessions: int, idle_timeout_s: float,
                 llm_handler: LlmHandler, interrupt_grace_s: float = 2.0,
                 start_timeout_s: float = 60.0, agent_id: str = "",
                 warm_sessions: int = 0, contexts_dir: Path | None = None) -> None:
        self._sandbox = sandbox
        # Where contexts sent as request bodies arrive: the sandbox's kept-context dir,
        # beside the work dirs, so a session takes its file by a link, not a copy.
        self.contexts_dir = contexts_dir
        # Stamped on results; empty leaves it to the caller.
        self._agent_id = agent_id
        self._max_sessions = max_sessions
        self._idle_timeout_s = idle_timeout_s
        self._handler = llm_handler
        self._grace_s = interrupt_grace_s
        self._start_timeout_s = start_timeout_s
        # Lost sessions stay until they expire, so their users learn why.
        self._sessions: dict[SessionId, ReplSession] = {}
        self._closed = False
        # Warm sessions are named outside the id alphabet: no client id can clash with one.
        self._warm_names = (SessionId(f"warm+{number}") for number in itertools.count(1))
        self.pool = WarmPool(size=warm_sessions, start=self._start_warm, room=self._room)

    @property
    def sandbox(self) -> Sandbox:
        """Where the sessions run; jobs beside them run there too."""
        return self._sandbox

    def __len__(self) -> int:
        return sum(1 for session in self._sessions.values() if not session.lost)

    def _room(self) -> int:
        return self._max_sessions - len(self) - self.pool.held

    async def run(self) -> None:
        """Expire idle sessions and keep the warm ones ready, until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self.pool.run(), name="warm-sessions")
            interval = min(max(self._idle_timeout_s / 4, 0.05), 30.0)
            while True:
                await asyncio.sleep(interval)
                await self.expire_idle()
                # Lost sessions free their room too: a look now and then finds it.
                self.pool.wake()

    def _new_session(self, session_id: SessionId, callback: LlmCallback | None
                     ) -> ReplSession:
        return ReplSession(session_id, callback, self._handler,
                           stray_cap=self._sandbox.output_cap(None),
                           memory_limit_mb=self._sandbox.config.memory_limit_mb)

    async def _start_warm(self) -> ReplSession:
        session = self._new_session(next(self._warm_names), None)
        try:
            await session.start(self._sandbox, None, self._start_timeout_s)
        except BaseException:
            await finish(session.kill("it could not start"), "killing a session")
            raise
        session.ready.set()
        return session

    async def expire_idle(self) -> int:
        """End sessions unused for idle_timeout_s; returns how many."""
        now = time.monotonic()
        idle = [session for session in self._sessions.values()
                if not session.lock.locked() and session.ready.is_set()
                and now - session.last_used > self._idle_timeout_s]
        # Killed before they leave the table: if this is cancelled, close() still finds them.
        await asyncio.gather(*(session.kill("it was idle too long") for session in idle))
        for session in idle:
            if self._sessions.get(session.id) is session:
                del self._sessions[session.id]
        if idle:
            self.pool.wake()
        return len(idle)

    async def create(self, request: SessionCreate | SessionCreateRaw | ReceivedSession
                     ) -> SessionInfo:
        """Start a session; an id that is already live returns its info.

        A received context's file is taken (moved) only when a session is started with it.
        """
        if self._closed:
            raise ExecutionError("the agent is shutting down")
        existing = self._live(request.session_id)
        if existing is None:
            warm = await self.pool.take()
            # Another call may have made this session while this one waited.
            existing = self._live(request.session_id)
            if warm is not None and (existing is not None or self._closed):
                await self.pool.give_back(warm)
                if self._closed:
                    raise ExecutionError("the agent is shutting down")
            elif warm is not None:
                try:
                    return await self._adopt(warm, request)
                except SessionLostError as exc:
                    # It died between being taken and handed over: start one as if no
                    # session had been warm.
                    log.info("warm session for %s was lost (%s); starting one",
                             request.session_id, exc.message)
        if existing is not None:
            await existing.ready.wait()
            existing.check()
            return existing.info(self._agent_id)
        if len(self) + self.pool.held >= self._max_sessions:
            await self.expire_idle()
        if len(self) + self.pool.held >= self._max_sessions:
            # A warm session on its way yields its place to one asked for.
            self.pool.make_room()
        if len(self) >= self._max_sessions:
            raise BusyError(f"this agent already runs its limit of {self._max_sessions} "
                            "sessions; delete one or wait for idle ones to expire",
                            retry_after_s=min(self._idle_timeout_s, 30.0))
        session = self._new_session(request.session_id, request.llm_callback)
        self._sessions[session.id] = session
        try:
            await session.start(self._sandbox, request.context, self._start_timeout_s)
        except BaseException:
            if self._sessions.get(session.id) is session:
                del self._sessions[session.id]
            await finish(session.kill("it could not start"), "killing a session")
            raise
        finally:
            session.ready.set()
        return session.info(self._agent_id)

    def _live(self, session_id: SessionId) -> ReplSession | None:
        session = self._sessions.get(session_id)
        return None if session is None or session.lost else session

    async def _adopt(self, session: ReplSession,
                     request: SessionCreate | SessionCreateRaw | ReceivedSession
                     ) -> SessionInfo:
        """Give a warm session the request's id, callback and context."""
        self._sessions[request.session_id] = session
        # A second create for this id waits until the context is in.
        session.ready.clear()
        try:
            await session.adopt(request.session_id, request.llm_callback, request.context,
                                self._start_timeout_s)
        except BaseException:
            if self._sessions.get(request.session_id) is session:
                del self._sessions[request.session_id]
            await finish(session.kill("it could not load its context"), "killing a session")
            raise
        finally:
            session.ready.set()
            # Refilled only now: a process starting beside it would slow the adoption down.
            self.pool.wake()
        return session.info(self._agent_id)

    def _get(self, session_id: SessionId) -> ReplSession:
        session = self._sessions.get(session_id)
        if session is None:
            raise SessionNotFoundError(session_id)
        session.check()
        return session

    async def context_files(self, session_id: SessionId) -> dict[str, bytes]:
        """The session's context as files for a job beside it (none when it has none)."""
        return await self._get(session_id).job_files()

    async def execute(self, session_id: SessionId, request: CellRequest, *,
                      on_output: OutputListener | None = None,
                      still_wanted: Callable[[], None] | None = None) -> CellResult:
        """Run a cell; a repeated cell id returns the first result without running again.

        With on_output its output is passed on as it comes; a repeated id streams nothing.
        still_wanted raises when the cell must not start after all: it is called once the
        cells queued before it in the session are done.
        """
        session = self._get(session_id)
        async with session.lock:
            if still_wanted is not None:
                still_wanted()
            cached = session.cells.get(request.cell_id)
            if cached is not None:
                return cached
            session.check()
            timeout_ms = request.timeout_ms or self._sandbox.default_timeout_ms("python")
            started = time.monotonic()
            reply, killed = await session.run_cell(
                request.cell_id, request.code, timeout_s=timeout_ms / 1000, grace_s=self._grace_s,
                cap=self._sandbox.output_cap(request.max_output_bytes), on_output=on_output)
            result = _cell_result(session.id, request.cell_id, reply, killed, timeout_ms,
                                  (time.monotonic() - started) * 1000, self._agent_id)
            session.cells[request.cell_id] = result
            if len(session.cells) > _MAX_CACHED_CELLS:
                session.cells.popitem(last=False)
            session.cells_run += 1
            session.last_used = time.monotonic()
            return result

    async def get_variable(self, session_id: SessionId, name: str,
                           max_chars: int = 100_000) -> VariableValue:
        """str() of a session variable, cut at max_chars; found=False if it is not set."""
        session = self._get(session_id)
        async with session.lock:
            timeout_s = self._sandbox.default_timeout_ms("python") / 1000
            reply = await session.get_variable(name, max(0, max_chars), timeout_s)
            session.last_used = time.monotonic()
        if reply.get("op") != "var":
            raise ExecutionError(f"session {session_id!r} could not read {name!r}: "
                                 f"{reply.get('message', reply)}")
        return VariableValue(name=name, found=bool(reply["found"]), value=str(reply["value"]),
                             truncated=bool(reply["truncated"]))

    async def delete(self, session_id: SessionId) -> bool:
        """End a session and its process; False if there was none."""
        session = self._sessions.pop(session_id, None)
        if session is None:
            return False
        await session.kill()
        self.pool.wake()
        return True

    async def close(self) -> None:
        """Kill every session; safe to call twice."""
        self._closed = True
        sessions = list(self._sessions.values())
        self._sessions.clear()
        await asyncio.gather(self.pool.close(),
                             *(session.kill("the agent shut down") for session in sessions))


def _cell_result(session_id: SessionId, cell_id: str, reply: dict[str, Any], killed: bool,
                 timeout_ms: int, wall_time_ms: float, agent_id: str) -> CellResult:
    status = reply.get("status")
    error: WireError | None = None
    stderr = str(reply.get("stderr", ""))
    if killed and status == "output_limit":
        error = WireError(code=OUTPUT_LIMIT, message=(
            f"output limit exceeded: the session was killed because {reply.get('message')}; "
            "its variables are lost. Print less, or write large results to a file"),
            retryable=False)
    elif killed:
        lost = SessionLostError(f"the cell ran past its {timeout_ms} ms limit and ignored the "
                                "interrupt, so the session was killed and its variables are lost")
        error = WireError(code=lost.code, message=lost.message, retryable=False)
    elif status == "interrupted":
        timeout = ReplTimeoutError("python", timeout_ms)
        error = WireError(code=timeout.code, message=timeout.message + (
            "; the cell was interrupted and the session keeps its variables"))
    elif status == "error":
        last = stderr.strip().splitlines()[-1] if stderr.strip() else "an exception"
        error = WireError(code=ReplError.code, message=f"the cell raised {last}")
    elif status != "ok":
        error = WireError(code=ExecutionError.code,
                          message=f"the session answered {reply.get('message', reply)!r}")
    outcome: JobStatus = "ok"
    if killed and status == "output_limit":
        outcome = "killed"
    elif killed or status == "interrupted":
        outcome = "timeout"
    elif error is not None:
        outcome = "error"
    return CellResult(
        cell_id=cell_id, session_id=session_id, status=outcome,
        stdout=str(reply.get("stdout", "")), stderr=stderr,
        stdout_truncated=bool(reply.get("stdout_truncated")),
        stderr_truncated=bool(reply.get("stderr_truncated")),
        wall_time_ms=round(wall_time_ms, 3), agent_id=agent_id, error=error,
        answer=str(reply["answer"]) if reply.get("answer") is not None else None,
        answer_truncated=bool(reply.get("answer_truncated")))
