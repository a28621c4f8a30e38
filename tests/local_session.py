"""A run's code session over an in-process SessionManager, for loop tests without HTTP."""

from __future__ import annotations

from kowalski.agent.job_output import OutputListener
from kowalski.agent.sessions import SessionManager
from kowalski.common.job_stream import TextListener, text_listener
from kowalski.common.messages import (
    CellRequest,
    CellResult,
    JobId,
    JobRequest,
    JobResult,
    Language,
    SessionId,
    VariableValue,
)


class LocalSession:
    """The CodeSession protocol over an in-process SessionManager and its sandbox."""

    def __init__(self, manager: SessionManager, session_id: str) -> None:
        self.device_id = "local-agent"
        self._manager, self._session_id, self._cells = manager, SessionId(session_id), 0
        self._jobs = 0

    async def execute(self, code: str, *, timeout_ms: int | None = None,
                      on_output: TextListener | None = None) -> CellResult:
        self._cells += 1
        return await self._manager.execute(self._session_id, CellRequest(
            cell_id=f"{self._session_id}-{self._cells}", code=code, timeout_ms=timeout_ms),
            on_output=on_output)

    async def run_job(self, language: Language, code: str, *, timeout_ms: int | None = None,
                      on_output: TextListener | None = None) -> JobResult:
        self._jobs += 1
        listener: OutputListener | None = (None if on_output is None
                                           else text_listener(on_output))
        return await self._manager.sandbox.run_job(
            JobRequest(job_id=JobId(f"{self._session_id}-job-{self._jobs}"), language=language,
                       code=code, timeout_ms=timeout_ms, session_id=self._session_id),
            on_output=listener,
            extra_files=await self._manager.context_files(self._session_id))

    async def get_variable(self, name: str, max_chars: int = 100_000) -> VariableValue:
        return await self._manager.get_variable(self._session_id, name, max_chars)

    async def close(self) -> None:
        await self._manager.delete(self._session_id)
