"""A session's context kept for the jobs that run beside it, without holding it in memory.

The session's driver deletes its context file once it has read it. Before that, the agent
makes a hard link to it in a directory beside the work dirs that no job sees: no copy is
made, and a job naming the session gets the context as `context.txt` (text) or
`context.json` (anything else) from there. A context received as a request's body is
written in that directory to begin with and linked into the work dir the other way round.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any, Literal

import msgspec

from kowalski.agent.incoming_context import ReceivedContext
from kowalski.agent.jail import SandboxedProcess, read_back
from kowalski.common.errors import ExecutionError

__all__ = ["CONTEXT_JSON_FILE", "CONTEXT_TEXT_FILE", "KEPT_DIR", "KeptContext"]

# The context as a job working beside the session finds it: text as is, the rest as JSON.
CONTEXT_TEXT_FILE = "context.txt"
CONTEXT_JSON_FILE = "context.json"
# Beside the work dirs, out of every job's sight: the contexts of live sessions.
KEPT_DIR = ".contexts"
# The file the session's driver reads, by the context's format: text is read without JSON.
DRIVER_FILES = {"text": "context.txt", "json": "context.json"}
# A context's JSON up to this many bytes is written without a thread.
_INLINE_CONTEXT_BYTES = 64 * 1024


class KeptContext:
    """One session's context file, linked aside before its driver deletes it."""

    def __init__(self) -> None:
        self._path: Path | None = None
        # text: UTF-8 as it is; json: JSON; json_string: a JSON string, the text inside it.
        self._kind: Literal["text", "json", "json_string"] = "json"
        self._size = 0

    @staticmethod
    def _kept_path(workdir: Path) -> Path:
        # The directory is the sandbox's: made when it starts, removed when it closes.
        return workdir.parent / KEPT_DIR / workdir.name

    async def place(self, process: SandboxedProcess, context: Any, session_id: str
                    ) -> tuple[str | None, Literal["text", "json"]]:
        """Put the context in a driver's work dir, kept for jobs: its file's name and format.

        context is a received file, JSON text (msgspec.Raw), a value or None (no file).
        """
        if isinstance(context, ReceivedContext):
            name = DRIVER_FILES[context.format]
            await self._io(session_id, self.take, context, process.workdir, name)
            return name, context.format
        data = await context_json(context)
        if data is None:
            return None, "json"
        name = DRIVER_FILES["json"]

        def write() -> None:
            process.add_file(name, data)
            self.keep(process.workdir, name, data)

        # A short one is written at once: a thread hop would cost more.
        await self._io(session_id, write, inline=len(data) <= _INLINE_CONTEXT_BYTES)
        return name, "json"

    @staticmethod
    async def _io(session_id: str, work: Any, *args: Any, inline: bool = False) -> None:
        try:
            if inline:
                work(*args)
            else:
                await asyncio.to_thread(work, *args)
        except OSError as exc:
            raise ExecutionError(f"cannot write the context of session {session_id!r}: "
                                 f"{exc.strerror or exc}") from None

    def keep(self, workdir: Path, name: str, data: bytes) -> None:
        """Link workdir/name aside (blocking I/O): the context's JSON, `data`, it holds."""
        kept = self._kept_path(workdir)
        kept.unlink(missing_ok=True)
        os.link(workdir / name, kept, follow_symlinks=False)
        self._path, self._size = kept, len(data)
        # JSON text starts at its first byte here: the encoder and the API's decoder leave
        # no white space in front of a string.
        self._kind = "json_string" if data[:64].lstrip()[:1] == b'"' else "json"

    def take(self, received: ReceivedContext, workdir: Path, name: str) -> None:
        """Link a received context into workdir as name and keep it (blocking I/O)."""
        kept = self._kept_path(workdir)
        kept.unlink(missing_ok=True)
        # Never through a link, never over a file: the work dir is the job user's.
        os.link(received.path, workdir / name, follow_symlinks=False)
        os.rename(received.path, kept)
        self._path, self._size, self._kind = kept, received.size_bytes, received.format

    async def files(self, session_id: str) -> dict[str, bytes]:
        """The context as files for a job beside the session (none without a context)."""
        if self._path is None:
            return {}
        return await asyncio.to_thread(self._read, self._path, session_id)

    def _read(self, path: Path, session_id: str) -> dict[str, bytes]:
        try:
            data = read_back(path, self._size)
        except (OSError, ValueError) as exc:
            raise ExecutionError(f"a job beside session {session_id!r} cannot read its context: "
                                 f"{exc.strerror if isinstance(exc, OSError) else exc}") from None
        if self._kind == "json":
            return {CONTEXT_JSON_FILE: data}
        if self._kind == "text":
            return {CONTEXT_TEXT_FILE: data}
        return {CONTEXT_TEXT_FILE: msgspec.json.decode(data, type=str).encode(errors="replace")}

    async def drop(self) -> None:
        """Remove the link once the session has ended."""
        path, self._path = self._path, None
        if path is not None:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(path.unlink, True)


async def context_json(context: Any) -> bytes | None:
    """The context as the JSON its file holds; None for no context (or JSON null)."""
    if isinstance(context, msgspec.Raw):
        # As the agent's API hands it over: JSON text already, checked by the decoder.
        return None if len(context) <= 8 and bytes(context).strip() == b"null" else bytes(context)
    if context is None:
        return None
    if isinstance(context, str) and len(context) <= _INLINE_CONTEXT_BYTES:
        return msgspec.json.encode(context)
    return await asyncio.to_thread(msgspec.json.encode, context)
