"""Clean-up that runs to its end, even when its caller is cancelled again as it unwinds."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import Any

log = logging.getLogger("kowalski.agent")


async def finish(step: Awaitable[Any], what: str = "") -> BaseException | None:
    """Await step to its end even if cancelled meanwhile; its error (logged when `what`).

    asyncio.shield alone is not enough: a second cancel (a pool refill cancelled, then the
    agent shutting down) ends the await while the step goes on unseen, and whoever waited
    for the caller finds what the step was still removing.
    """
    future = asyncio.ensure_future(step)
    while not future.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([future])
    error = None if future.cancelled() else future.exception()
    if error is not None and what:
        log.warning("%s failed: %s", what, error)
    return error
