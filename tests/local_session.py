"""A run's code session over an in-process SessionManager, for loop tests without HTTP."""

from __future__ import annotations

from kowalski.agent.sessions import SessionManager
from kowalski.common.messages import CellRequest, CellResult, VariableValue


class LocalSession:
    """The CodeSession protocol over an in-process SessionManager."""

    def __init__(self, manager: SessionManager, session_id: str) -> None:
        self.device_id = "local-agent"
        self._manager, self._session_id, self._cells = manager, session_id, 0

    async def execute(self, code: str, *, timeout_ms: int | None = None) -> CellResult:
        self._cells += 1
        return await self._manager.execute(self._session_id, CellRequest(
            cell_id=f"{self._session_id}-{self._cells}", code=code, timeout_ms=timeout_ms))

    async def get_variable(self, name: str, max_chars: int = 100_000) -> VariableValue:
        return await self._manager.get_variable(self._session_id, name, max_chars)

    async def close(self) -> None:
        await self._manager.delete(self._session_id)
