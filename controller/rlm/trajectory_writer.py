"""Appends a run's events to its trajectory file (trajectory.py reads it back).

Most events are written before the run goes on: `write` returns once the line is in the
file. Sub-call records are the exception: a batch of hundreds answers over a few hundred
milliseconds, and waiting for the disk after each answer cost more controller time than
the HTTP call behind it. They are `post`ed instead: queued, written within `LINGER_S`
together with whatever else came in meanwhile, and always before any line written after
them, so the cell's own record (a `write`) lands after its sub-calls. A controller that
dies loses at most the last `LINGER_S` of sub-call records; a resume never needs those,
since it replays whole iterations only and the unfinished one is asked again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

import msgspec

from kowalski.controller.rlm.events import LIVE_ONLY, RlmEvent, SubCallAnswered
from kowalski.controller.rlm.trajectory import SUFFIX, run_dir

__all__ = ["LINGER_S", "TrajectoryWriter", "flush_queued"]

log = logging.getLogger(__name__)

# How long a posted line may wait before it is written.
LINGER_S = 0.05
_encoder = msgspec.json.Encoder()
# Writers with posted lines not yet written, by file: a reader flushes them first.
_queued: dict[Path, TrajectoryWriter] = {}


async def flush_queued(directory: str | os.PathLike[str], run_id: str) -> None:
    """Write what the files of a run and of the runs below it have queued, before a read."""
    base = run_dir(directory)
    for path, writer in list(_queued.items()):
        if path.parent == base and (path.name == f"{run_id}{SUFFIX}"
                                    or path.name.startswith(f"{run_id}-s")):
            await writer.flush()


class TrajectoryWriter:
    """Appends a run's events to its file, one JSON line each, off the event loop."""

    def __init__(self, directory: str | os.PathLike[str], run_id: str) -> None:
        self.path = run_dir(directory) / f"{run_id}{SUFFIX}"
        self._lock = asyncio.Lock()
        # Lines waiting for the writer; whoever holds the lock writes all of them at once.
        self._pending: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None
        self._flushes: set[asyncio.Task[None]] = set()

    def _append(self, lines: bytes) -> None:
        """Append lines whole or not at all: a failed write is cut off again."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            size = os.fstat(fd).st_size
            try:
                view = memoryview(lines)
                while view:
                    view = view[os.write(fd, view):]
            except OSError:
                # A disk that filled up mid-way keeps no part line to glue the retry to.
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)

    async def write(self, event: RlmEvent) -> None:
        """Append the event; returns once it, and every line before it, is in the file."""
        self._pending.append(_encoder.encode(event) + b"\n")
        await self.flush()

    async def record(self, event: RlmEvent) -> None:
        """Store an event as its kind asks; what is written is, even if the caller is cancelled.

        Sub-call records are posted. Streamed pieces are live only: the ModelReplied or
        CodeExecuted after them stores the whole. The rest is written, the run's end too
        when the run is being cancelled.
        """
        if isinstance(event, SubCallAnswered):
            self.post(event)
        elif not isinstance(event, LIVE_ONLY):
            await asyncio.shield(self.write(event))

    def post(self, event: RlmEvent) -> None:
        """Queue the event's line and return at once; it is written within LINGER_S."""
        self._pending.append(_encoder.encode(event) + b"\n")
        _queued[self.path] = self
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(LINGER_S, self._linger_over)

    async def flush(self) -> None:
        """Write every line queued so far; returns once they are in the file."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        async with self._lock:
            # Many events at once (a batch of sub-calls ending together) make one write,
            # not one thread hop and file open each; a line already written returns at once.
            lines, self._pending = self._pending, []
            _queued.pop(self.path, None)
            if lines:
                try:
                    await asyncio.to_thread(self._append, b"".join(lines))
                except Exception:
                    # Not written: they go first in the next try, so no line is lost or
                    # written out of order. (Callers shield a write from cancellation.)
                    self._pending[:0] = lines
                    _queued[self.path] = self
                    raise

    def _linger_over(self) -> None:
        self._timer = None
        flush = asyncio.ensure_future(self._flush_posted())
        self._flushes.add(flush)
        flush.add_done_callback(self._flushes.discard)

    async def _flush_posted(self) -> None:
        try:
            await self.flush()
        except OSError as exc:
            # The lines stay queued for the next write, which raises to the run if the
            # disk is still failing.
            log.warning("could not write to the trajectory %s: %s", self.path, exc)
