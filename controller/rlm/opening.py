"""A run's session, opened beside its first model call.

The first prompt needs only the context's description, so the context's trip to an agent
overlaps the model's first reply; the reply's code waits for the session. `SessionOpened`
records when it was ready and how long it took.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from kowalski.common.errors import KowalskiError
from kowalski.controller.rlm.events import (
    CodeSession,
    RlmEvent,
    RunHandle,
    SessionFactory,
    SessionOpened,
)
from kowalski.controller.rlm.ledger import RunLedger

__all__ = ["SessionOpening"]

log = logging.getLogger(__name__)


class SessionOpening:
    """Opens the run's session once, in the background; `get` waits for it."""

    def __init__(self, *, factory: SessionFactory, context: Any, run: RunHandle,
                 ledger: RunLedger, emit: Callable[[RlmEvent], Awaitable[None]]) -> None:
        self._factory, self._context, self._run = factory, context, run
        self._ledger, self._emit = ledger, emit
        self._task: asyncio.Task[CodeSession] | None = None

    def start(self) -> None:
        """Begin opening, if not begun."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._open())

    async def _open(self) -> CodeSession:
        started_at, started = time.time(), time.monotonic()
        session = await self._factory(self._context, self._run)
        self._ledger.note_agent(session.device_id)
        await self._emit(SessionOpened(
            run_id=self._run.run_id, depth=self._run.depth, iteration=self._ledger.iteration,
            device_id=session.device_id, started_at=started_at,
            open_ms=(time.monotonic() - started) * 1000))
        return session

    async def get(self) -> CodeSession:
        """The open session; raises why it could not be opened."""
        self.start()
        assert self._task is not None
        # Shielded: a cancelled caller leaves the opening to close(), which ends it.
        return await asyncio.shield(self._task)

    async def close(self, *, cancel: bool) -> None:
        """Close the session; one still opening is cancelled, or with cancel=False awaited.

        Awaiting it spares the agent a session nobody would delete (it would hold a place
        until it idled out) when the run stopped for another reason first.
        """
        task, self._task = self._task, None
        if task is None:
            return
        if cancel:
            task.cancel()
        await asyncio.wait({task})
        if task.cancelled() or task.exception() is not None:
            return
        try:
            await task.result().close()
        except KowalskiError as exc:
            log.info("run %s: closing its session: %s", self._run.run_id, exc)
