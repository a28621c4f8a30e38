"""A session's context as the bytes that carry it to an agent: made and hashed once a run."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import msgspec

from kowalski.common.messages import ContextFormat
from kowalski.common.signing import body_digest

__all__ = ["ContextBody"]

# Below this the work is done on the event loop: a thread hop would cost more.
_INLINE_BYTES = 256 * 1024
CONTENT_TYPES: dict[ContextFormat, str] = {
    "none": "", "text": "text/plain; charset=utf-8", "json": "application/json"}


class ContextBody:
    """A str goes as its UTF-8 bytes, anything else as JSON, None as no body at all."""

    def __init__(self, context_format: ContextFormat, data: bytes) -> None:
        self.format: ContextFormat = context_format
        self.data = data
        self._digest: str | None = None

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.format]

    @classmethod
    async def of(cls, context: Any) -> ContextBody:
        """The body for a context value, hashed too when it is large (in one thread)."""
        if context is None:
            return cls("none", b"")
        if isinstance(context, str) and len(context) <= _INLINE_BYTES:
            return cls.make(context)
        return await asyncio.to_thread(cls.make, context, hashed=True)

    @classmethod
    def make(cls, context: Any, *, hashed: bool = False) -> ContextBody:
        """of() without a thread (blocking for a large context)."""
        body: ContextBody | None = None
        if isinstance(context, str):
            # Lone surrogates have no UTF-8: JSON escapes them, as it always did.
            with contextlib.suppress(UnicodeEncodeError):
                body = cls("text", context.encode())
        if body is None:
            body = cls("none", b"") if context is None else cls(
                "json", msgspec.json.encode(context))
        if hashed:
            body._digest = body_digest(body.data)
        return body

    async def digest(self) -> str:
        """The body's hash as request signatures cover it, computed once."""
        if self._digest is None:
            self._digest = (body_digest(self.data) if len(self.data) <= _INLINE_BYTES
                            else await asyncio.to_thread(body_digest, self.data))
        return self._digest
