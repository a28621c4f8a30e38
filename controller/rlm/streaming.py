"""The loop's model call, streamed: text pieces go out as they come, the whole reply returns.

Deterministic requests still go through the result cache: a stored answer comes back whole
(no pieces), and a call in flight for the same request is joined, not repeated. A stream
that fails before its first piece is retried as a plain call, which has the router's
failover; once text has flowed, a failure is the call's failure.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol, runtime_checkable

from kowalski.common.errors import KowalskiError
from kowalski.controller.models.cache import (
    CachedBackend,
    CacheOutcome,
    cache_key,
    chat_outcome,
    is_deterministic,
)
from kowalski.controller.models.chat_types import ChatBackend, ChatDelta, ChatRequest, ChatResult
from kowalski.controller.rlm.events import ReplyDelta, RlmEvent

__all__ = ["PieceSink", "StreamingBackend", "ask_streamed", "reply_sink"]

# Pieces that come closer together than this are sent on as one (seconds).
COALESCE_S = 0.1

# Called with the text that arrived since the last call and the pieces counted so far.
PieceSink = Callable[[str, int], Awaitable[None]]


def reply_sink(emit: Callable[[RlmEvent], Awaitable[None]], run_id: str, depth: int,
               iteration: int) -> PieceSink:
    """A sink that sends each piece of one reply on as a `ReplyDelta` event."""
    started = time.monotonic()

    async def piece(text: str, pieces: int) -> None:
        await emit(ReplyDelta(run_id=run_id, depth=depth, iteration=iteration, text=text,
                              pieces=pieces, elapsed_s=time.monotonic() - started))

    return piece


@runtime_checkable
class StreamingBackend(ChatBackend, Protocol):
    """A backend that can also stream (the router)."""

    def chat_stream(self, request: ChatRequest) -> AsyncIterator[ChatDelta]: ...


async def _collect(backend: StreamingBackend, request: ChatRequest, sink: PieceSink
                   ) -> ChatResult:
    """Read one stream to its end, passing its text on in coalesced pieces."""
    started = time.monotonic()
    parts: list[str] = []
    pending: list[str] = []
    pieces, sent_at = 0, 0.0
    last = ChatDelta()
    stream = backend.chat_stream(request)
    try:
        async for delta in stream:
            last = delta if delta.done else ChatDelta(id=delta.id or last.id)
            if not delta.text:
                continue
            parts.append(delta.text)
            pending.append(delta.text)
            pieces += 1
            now = time.monotonic()
            # The first piece goes out at once: it is what a waiting person looks for.
            if pieces == 1 or now - sent_at >= COALESCE_S:
                await sink("".join(pending), pieces)
                pending, sent_at = [], now
    finally:
        close = getattr(stream, "aclose", None)
        if close is not None:
            await close()
    if pending:
        await sink("".join(pending), pieces)
    latency_ms = last.latency_ms if last.latency_ms is not None else (
        (time.monotonic() - started) * 1000)
    return ChatResult(text="".join(parts), finish_reason=last.finish_reason, usage=last.usage,
                      latency_ms=latency_ms, endpoint=last.endpoint, id=last.id,
                      model=request.model)


async def ask_streamed(backend: ChatBackend, request: ChatRequest, sink: PieceSink,
                       *, operation: str = "llm_inference") -> CacheOutcome:
    """One completion, streamed to sink where the backend can; says if the cache answered."""
    inner = backend.backend if isinstance(backend, CachedBackend) else backend
    if not isinstance(inner, StreamingBackend):
        return await chat_outcome(backend, request, operation=operation)
    streamer = inner

    async def call() -> ChatResult:
        flowed = False

        async def counting(text: str, pieces: int) -> None:
            nonlocal flowed
            flowed = True
            await sink(text, pieces)

        try:
            return await _collect(streamer, request, counting)
        except KowalskiError as exc:
            if flowed or not exc.is_recoverable:
                raise
            # Nothing reached the user yet: the plain call can still try another endpoint.
            return await inner.chat(request, operation=operation)

    if isinstance(backend, CachedBackend) and is_deterministic(request):
        return await backend.cache.get_or_call(cache_key(request), call)
    return CacheOutcome(await call(), False)
