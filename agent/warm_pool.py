"""Sessions started ahead of need, without a context, each handed to one new session."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from kowalski.agent.repl_client import ReplSession

log = logging.getLogger("kowalski.agent.sessions")
# Back-off after a warm session failed to start, doubled up to the maximum.
_RETRY_FIRST_S = 1.0
_RETRY_MAX_S = 60.0


class WarmPool:
    """Keeps up to `size` context-less sessions ready, refilled one at a time.

    `room` says how many more sessions the agent may hold, the pool's own counted: warm
    sessions take from the same limit as the others and never push it over.
    """

    def __init__(self, *, size: int, start: Callable[[], Awaitable[ReplSession]],
                 room: Callable[[], int]) -> None:
        self.size = size
        self._start = start
        self._room = room
        self._ready: list[ReplSession] = []
        self._starting: asyncio.Task[None] | None = None
        self._wanted = asyncio.Event()
        self._wanted.set()
        self._closed = False

    def __len__(self) -> int:
        """Ready sessions."""
        self._ready = [session for session in self._ready if not session.lost]
        return len(self._ready)

    @property
    def held(self) -> int:
        """Sessions the pool holds against the limit: the ready ones and one starting."""
        return len(self) + (self._starting is not None)

    def wake(self) -> None:
        """Look again whether a session is missing (one was adopted, or room was made)."""
        self._wanted.set()

    async def run(self) -> None:
        """Refill until cancelled; a session that cannot start is tried again later."""
        retry_s = _RETRY_FIRST_S
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            while not self._closed and len(self) < self.size and self._room() > 0:
                task = self._starting = asyncio.create_task(self._start_one(),
                                                            name="warm-session")
                try:
                    await asyncio.wait({task})
                except asyncio.CancelledError:
                    # Left in place for close(), which waits for the start to unwind.
                    task.cancel()
                    raise
                self._starting = None
                failure = None if task.cancelled() else task.exception()
                if failure is not None:
                    log.warning("a warm session did not start (next try in %g s): %s",
                                retry_s, failure)
                    await asyncio.sleep(retry_s)
                    retry_s = min(retry_s * 2, _RETRY_MAX_S)
                    continue
                retry_s = _RETRY_FIRST_S

    async def _start_one(self) -> None:
        session = await self._start()
        # Ready as soon as it is up: a caller waiting for this start finds it here.
        self._ready.append(session)

    async def take(self) -> ReplSession | None:
        """A ready session, or the one starting once it is up; None when the pool is empty."""
        if not len(self) and self._starting is not None:
            # No slower than starting a session of one's own, and it keeps within the limit.
            await asyncio.wait({self._starting})
        if not len(self):
            return None
        return self._ready.pop(0)

    async def give_back(self, session: ReplSession) -> None:
        """Return a session taken but not used (killed if the pool has closed since)."""
        if self._closed:
            await session.kill("the agent shut down")
        else:
            self._ready.insert(0, session)

    def make_room(self) -> bool:
        """Give up the session starting now, so a session asked for can take its place."""
        if self._starting is None:
            return False
        self._starting.cancel()
        return True

    async def close(self) -> None:
        """Kill every warm session; safe to call twice."""
        self._closed = True
        starting = self._starting
        if starting is not None:
            starting.cancel()
            await asyncio.wait({starting})
        sessions, self._ready = self._ready, []
        await asyncio.gather(*(session.kill("the agent shut down") for session in sessions))
