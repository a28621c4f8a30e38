"""A session's context kept for the jobs that run beside it, without holding it in memory.

The session's driver deletes its context file once it has read it. Before that, the agent
makes a hard link to it in a directory beside the work dirs that no job sees: no copy is
made, and a job naming the session gets the context as `context.txt` (text) or
`context.json` (anything else) from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Literal

import msgspec

from kowalski.agent.jail import read_back
from kowalski.common.errors import ExecutionError

__all__ = ["CONTEXT_JSON_FILE", "CONTEXT_TEXT_FILE", "KEPT_DIR", "KeptContext"]

# The context as a job working beside the session finds it: text as is, the rest as JSON.
CONTEXT_TEXT_FILE = "context.txt"
CONTEXT_JSON_FILE = "context.json"
# Beside the work dirs, out of every job's sight: the contexts of live sessions.
KEPT_DIR = ".contexts"


class KeptContext:
    """One session's context file, linked aside before its driver deletes it."""

    def __init__(self) -> None:
        self._path: Path | None = None
        self._kind: Literal["text", "json"] = "json"
        self._size = 0

    def keep(self, workdir: Path, name: str, data: bytes) -> None:
        """Link workdir/name aside (blocking I/O): the context's JSON, `data`, it holds."""
        # The directory is the sandbox's: made when it starts, removed when it closes.
        kept = workdir.parent / KEPT_DIR / workdir.name
        kept.unlink(missing_ok=True)
        os.link(workdir / name, kept, follow_symlinks=False)
        self._path, self._size = kept, len(data)
        # JSON text starts at its first byte here: the encoder and the API's decoder leave
        # no white space in front of a string.
        self._kind = "text" if data[:64].lstrip()[:1] == b'"' else "json"

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
        return {CONTEXT_TEXT_FILE: msgspec.json.decode(data, type=str).encode(errors="replace")}

    async def drop(self) -> None:
        """Remove the link once the session has ended."""
        path, self._path = self._path, None
        if path is not None:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(path.unlink, True)
