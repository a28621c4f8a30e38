"""A session's context sent as a request's own body: written to a file while it arrives.

The bytes are hashed and written in a worker thread while the event loop takes in the
next ones, so checking the signature and writing the file overlap the transfer. Until the
caller has verified the hash, the file is only a candidate: any failure removes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kowalski.common import compression
from kowalski.common.errors import BodyTooLargeError, ExecutionError
from kowalski.common.messages import LlmCallback, SessionId

__all__ = ["ReceivedContext", "ReceivedSession", "decode", "receive", "remove"]

# Bytes handed to the worker thread at a time: fewer thread hops than one per chunk.
_BATCH_BYTES = 1024 * 1024


@dataclass(frozen=True)
class ReceivedContext:
    """A context on disk, in the agent's own directory, as the session's driver reads it."""

    path: Path
    # text: a str as UTF-8; json: any other value as JSON.
    format: Literal["text", "json"]
    size_bytes: int


@dataclass(frozen=True)
class ReceivedSession:
    """A session asked for with its context received as a file (none without a context)."""

    session_id: SessionId
    context: ReceivedContext | None
    llm_callback: LlmCallback | None


class _Sink:
    """The file and the running hash, fed from one thread at a time."""

    def __init__(self, path: Path, owner: tuple[int, int] | None) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        # The session's driver reads it as the job user.
        if owner is not None:
            os.fchown(fd, *owner)
        self.file = os.fdopen(fd, "wb", buffering=0)
        self.digest = hashlib.sha256()

    def take(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.digest.update(chunk)
            self.file.write(chunk)


async def receive(chunks: AsyncIterator[bytes], directory: Path, *, max_bytes: int,
                  owner: tuple[int, int] | None) -> tuple[Path, int, str]:
    """Write chunks to a new file in directory; its path, size and sha256 (hex).

    BodyTooLargeError past max_bytes; the file is removed on any failure.
    """
    path = directory / f"incoming-{secrets.token_hex(8)}"
    try:
        sink = await asyncio.to_thread(_Sink, path, owner)
    except OSError as exc:
        raise ExecutionError(f"cannot store the session's context: {exc.strerror or exc}"
                             ) from None
    size = 0
    writing: asyncio.Future[None] | None = None
    try:
        batch: list[bytes] = []
        batched = 0
        async for chunk in chunks:
            size += len(chunk)
            if size > max_bytes:
                raise BodyTooLargeError(size, max_bytes, "the session's context")
            batch.append(chunk)
            batched += len(chunk)
            # One batch in the thread at a time, so the hash sees the bytes in order.
            if batched >= _BATCH_BYTES and (writing is None or writing.done()):
                if writing is not None:
                    await writing
                writing = asyncio.ensure_future(asyncio.to_thread(sink.take, batch))
                batch, batched = [], 0
        if writing is not None:
            await writing
        if batch:
            await asyncio.to_thread(sink.take, batch)
    except OSError as exc:
        await asyncio.shield(_discard(sink, writing, path))
        raise ExecutionError(f"cannot store the session's context: {exc.strerror or exc}"
                             ) from None
    except BaseException:
        await asyncio.shield(_discard(sink, writing, path))
        raise
    sink.file.close()
    return path, size, sink.digest.hexdigest()


async def _discard(sink: _Sink, writing: asyncio.Future[None] | None, path: Path) -> None:
    """Let a batch in the thread finish, then close and remove the file."""
    if writing is not None:
        await asyncio.wait({writing})
        if not writing.cancelled():
            writing.exception()
    sink.file.close()
    await remove(path)


async def decode(path: Path, encoding: str, *, max_bytes: int,
                 owner: tuple[int, int] | None) -> tuple[Path, int]:
    """A verified compressed body's file decoded into a new one, and its size.

    The old file is removed; nothing is decoded before the caller verified it.
    """
    def run() -> tuple[Path, int]:
        decoded = compression.decompress(path.read_bytes(), encoding, max_bytes=max_bytes)
        target = path.with_name(f"incoming-{secrets.token_hex(8)}")
        sink = _Sink(target, owner)
        with sink.file:
            sink.file.write(decoded)
        return target, len(decoded)

    try:
        return await asyncio.to_thread(run)
    finally:
        await asyncio.shield(remove(path))


async def remove(path: Path) -> None:
    """Remove a candidate file; quiet if it was taken (renamed) or is gone."""
    with contextlib.suppress(OSError):
        await asyncio.to_thread(path.unlink, True)
