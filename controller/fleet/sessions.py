"""A persistent Python session on some agent, rebuilt elsewhere by replay when it is lost.

Jobs in other languages run beside it, on the same agent, reading its context from there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec

from kowalski.common.errors import KowalskiError, NetworkError, RemoteError, SessionLostError
from kowalski.common.job_stream import TextListener
from kowalski.common.messages import (
    FEATURE_CONTEXT_BODY,
    CellRequest,
    CellResult,
    DeviceId,
    JobId,
    JobRequest,
    JobResult,
    Language,
    LlmCallback,
    SessionCreate,
    SessionId,
    VariableValue,
)
from kowalski.controller.fleet.context_body import ContextBody
from kowalski.controller.fleet.device_table import DeviceRow
from kowalski.controller.fleet.dispatch import (
    CALL_MARGIN_S,
    COMPILE_MARGIN_S,
    DEFAULT_JOB_TIMEOUT_S,
    Dispatcher,
)

log = logging.getLogger(__name__)
# Replayed cells skip what did not finish the first time: re-running them would only
# hit the same limit again.
_REPLAYABLE = frozenset({"ok", "error"})
_LOST_CODES = frozenset({"session_not_found", "session_lost"})


class RemoteSession:
    """Cells run in order on one agent; if it fails, a new agent replays them first."""

    def __init__(self, *, dispatcher: Dispatcher, session_id: str, context: Any,
                 llm_callback: LlmCallback | None, timeout_s: float = 300.0,
                 on_close: Callable[[], None] | None = None,
                 body: asyncio.Future[ContextBody] | None = None) -> None:
        """body: the context's bytes when the caller is making them already (once a run)."""
        self._dispatcher = dispatcher
        self._agents = dispatcher.agents
        self.session_id = SessionId(session_id)
        self._context = context
        # Made once and kept: a move or a rebuild sends the same bytes again.
        self._body = body
        self._callback = llm_callback
        self._timeout_s = timeout_s
        self._cells: list[CellRequest] = []
        self._statuses: list[str] = []
        self.device_id: str = ""
        self.devices_used: list[str] = []
        self.rebuilds = 0
        # Whether the agent gave this session one it had started before it was asked.
        self.warm = False
        self._jobs = 0
        self._on_close = on_close

    async def _open_on(self, row: DeviceRow) -> None:
        if FEATURE_CONTEXT_BODY in row.features:
            if self._body is None:
                self._body = asyncio.ensure_future(ContextBody.of(self._context))
            info = await self._agents.open_session(row.url, self.session_id, await self._body,
                                                   self._callback, timeout_s=self._timeout_s)
        else:
            # An agent from before the context went as the body: the JSON request it knows.
            info = await self._agents.create_session(row.url, SessionCreate(
                session_id=self.session_id, context=self._context,
                llm_callback=self._callback), timeout_s=self._timeout_s)
        self.warm = info.warm
        for cell, status in zip(self._cells, self._statuses, strict=True):
            if status in _REPLAYABLE:
                await self._agents.execute(row.url, self.session_id, cell,
                                           timeout_s=self._timeout_s)
        if self._cells:
            self.rebuilds += 1
            log.warning("session %s rebuilt on %s by replaying %d cells", self.session_id,
                        row.device_id, len(self._cells))
        self.device_id = row.device_id
        if row.device_id not in self.devices_used:
            self.devices_used.append(row.device_id)

    async def _on_session_device(self, job_id: str, call: Any) -> Any:
        """Run call where the session lives, moving it (with replay) when that fails."""
        async def attempt(row: DeviceRow) -> Any:
            if row.device_id != self.device_id:
                await self._open_on(row)
            try:
                return await call(row)
            except RemoteError as exc:
                if exc.remote_code in _LOST_CODES:
                    # The agent restarted or killed the session: its state is gone.
                    self.device_id = ""
                    raise SessionLostError(f"session {self.session_id} lost on "
                                           f"{row.device_id}: {exc.message}") from exc
                raise

        if self.device_id and self.device_id in self._dispatcher.cluster.table.devices:
            try:
                return await self._dispatcher.on_device(DeviceId(self.device_id), job_id,
                                                        attempt)
            except KowalskiError as exc:
                if not exc.retry_elsewhere:
                    raise
                log.warning("session %s: %s; moving it", self.session_id, exc)
        self.device_id = ""
        return await self._dispatcher.with_failover("code_execution", job_id, attempt,
                                                    language="python")

    async def open(self) -> None:
        """Create the session on the best agent for code."""
        await self._on_session_device(f"{self.session_id}-open", lambda row: _noop())

    async def execute(self, code: str, *, timeout_ms: int | None = None,
                      on_output: TextListener | None = None) -> CellResult:
        """Run a cell; with on_output its output is passed on while it runs."""
        cell = CellRequest(cell_id=f"{self.session_id}-{len(self._cells)}", code=code,
                           timeout_ms=timeout_ms)
        relay = None if on_output is None else _Relay(on_output)

        async def run(row: DeviceRow) -> CellResult:
            attempt = msgspec.structs.replace(cell, attempt_id=self._dispatcher.new_attempt(),
                                              deadline=time.time() + self._timeout_s)
            try:
                if relay is not None:
                    relay.starting(row.device_id)
                    return await self._agents.execute_streamed(
                        row.url, self.session_id, attempt, on_output=relay,
                        timeout_s=self._timeout_s)
                return await self._agents.execute(row.url, self.session_id, attempt,
                                                  timeout_s=self._timeout_s)
            except (asyncio.CancelledError, NetworkError):
                self._dispatcher.moved(row.device_id, str(attempt.attempt_id))
                raise

        result: CellResult = await self._on_session_device(cell.cell_id, run)
        self._cells.append(cell)
        self._statuses.append(result.status)
        return result

    async def run_job(self, language: Language, code: str, *, timeout_ms: int | None = None,
                      on_output: TextListener | None = None) -> JobResult:
        """Run a one-shot job on the session's agent, its context beside it as a file."""
        self._jobs += 1
        job = JobRequest(job_id=JobId(f"{self.session_id}-job-{self._jobs}"), language=language,
                         code=code, timeout_ms=timeout_ms, session_id=self.session_id)
        call_timeout_s = ((timeout_ms / 1000 if timeout_ms else DEFAULT_JOB_TIMEOUT_S)
                          + COMPILE_MARGIN_S.get(language, 0.0) + CALL_MARGIN_S)
        relay = None if on_output is None else _Relay(on_output)

        async def run(row: DeviceRow) -> JobResult:
            attempt = msgspec.structs.replace(job, attempt_id=self._dispatcher.new_attempt(),
                                              deadline=time.time() + call_timeout_s)
            try:
                if relay is not None:
                    relay.starting(row.device_id)
                    return await self._agents.run_job_streamed(
                        row.url, attempt, on_output=relay, timeout_s=call_timeout_s)
                return await self._agents.run_job(row.url, attempt, timeout_s=call_timeout_s)
            except (asyncio.CancelledError, NetworkError):
                self._dispatcher.moved(row.device_id, str(attempt.attempt_id))
                raise

        result: JobResult = await self._on_session_device(job.job_id, run)
        return result

    async def get_variable(self, name: str, max_chars: int = 100_000) -> VariableValue:
        async def read(row: DeviceRow) -> VariableValue:
            return await self._agents.get_variable(row.url, self.session_id, name,
                                                   max_chars=max_chars,
                                                   timeout_s=self._timeout_s)

        value: VariableValue = await self._on_session_device(f"{self.session_id}-var", read)
        return value

    async def close(self) -> None:
        """End the session on its agent; idempotent, and quiet if the agent is gone."""
        device_id, self.device_id = self.device_id, ""
        if self._on_close is not None:
            self._on_close()
        row = self._dispatcher.cluster.table.devices.get(DeviceId(device_id))
        if row is None:
            return
        try:
            await self._agents.delete_session(row.url, self.session_id, timeout_s=10)
        except KowalskiError as exc:
            log.info("closing session %s on %s: %s", self.session_id, device_id, exc)


async def _noop() -> None:
    return None


class _Relay:
    """Passes streamed output on; when the code starts over on another agent, says so first.

    The output heard from the lost agent stays with the listener: without the note, the
    same lines would seem to come twice. The result holds only the last run's output.
    """

    def __init__(self, listener: TextListener) -> None:
        self._listener = listener
        self._heard = False

    def __call__(self, stream: str, text: str) -> None:
        self._heard = True
        self._listener(stream, text)

    def starting(self, device_id: str) -> None:
        if self._heard:
            self._heard = False
            self._listener("stderr", f"\n[the agent running this was lost; it runs again from "
                                     f"the start on {device_id}]\n")
