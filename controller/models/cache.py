"""A result cache for chat calls: TTL, LRU size bound, single-flight, and counters.

Only deterministic requests are served from it: temperature 0, or a call that opts in.
A request at any other temperature (or the server's default) is a fresh sample every time.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgspec

from kowalski.common.config import ExoConfig
from kowalski.controller.models.chat_types import ChatBackend, ChatRequest, ChatResult

# Fields that change how an answer is delivered, not what it says.
_NON_SEMANTIC = ("stream", "stream_options", "user")

# Keys whose call the current task is making; a call that reaches the same cache again for
# the same key (a cached backend inside a cached backend) must not wait for itself.
_leading: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "kowalski_cache_leading", default=frozenset(),
)


def cache_key(request: ChatRequest) -> str:
    """A stable hash of the request's canonical JSON: model, messages and sampling params."""
    body: dict[str, Any] = msgspec.to_builtins(request)
    for name in _NON_SEMANTIC:
        body.pop(name, None)
    # 1 and 1.0 ask for the same sampling; "x" and ["x"] for the same stop.
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            body[name] = float(body[name])
    if isinstance(body.get("stop"), str):
        body["stop"] = [body["stop"]]
    return hashlib.sha256(msgspec.json.encode(body, order="sorted")).hexdigest()


def is_deterministic(request: ChatRequest) -> bool:
    """Whether the request asks for the same answer every time (temperature 0)."""
    return request.temperature is not None and float(request.temperature) == 0.0


class CacheStats(msgspec.Struct, frozen=True, kw_only=True):
    hits: int
    misses: int
    # Callers that joined a call already in flight for the same request.
    shared: int
    evictions: int
    expirations: int
    entries: int
    in_flight: int


class CacheOutcome(NamedTuple):
    result: ChatResult
    # True when no backend call was made for this caller (a hit, or a shared call).
    cached: bool


@dataclass(eq=False)
class _Flight:
    task: asyncio.Task[ChatResult]
    waiters: int = 0


class ResultCache:
    """Finished chat results by request key; a TTL or size of 0 turns it off."""

    def __init__(
        self, *, ttl_s: float, max_entries: int, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_s < 0 or max_entries < 0:
            raise ValueError("ttl_s and max_entries must not be negative")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        # key -> (expiry time, result), least recently used first.
        self._entries: OrderedDict[str, tuple[float, ChatResult]] = OrderedDict()
        self._in_flight: dict[str, _Flight] = {}
        self._hits = self._misses = self._shared = self._evictions = self._expirations = 0

    @classmethod
    def from_config(
        cls, config: ExoConfig, *, clock: Callable[[], float] = time.monotonic,
    ) -> ResultCache:
        """A cache sized by exo.cache_ttl_s and exo.cache_max_entries."""
        return cls(ttl_s=config.cache_ttl_s, max_entries=config.cache_max_entries, clock=clock)

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0 and self.max_entries > 0

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> CacheStats:
        return CacheStats(
            hits=self._hits, misses=self._misses, shared=self._shared,
            evictions=self._evictions, expirations=self._expirations,
            entries=len(self._entries), in_flight=len(self._in_flight),
        )

    def get(self, key: str) -> ChatResult | None:
        """The stored result, or None (counted as a miss) when absent or expired."""
        entry = self._entries.get(key) if self.enabled else None
        if entry is not None and entry[0] <= self._clock():
            del self._entries[key]
            self._expirations += 1
            entry = None
        if entry is None:
            self._misses += 1
            return None
        self._entries.move_to_end(key)
        self._hits += 1
        return entry[1]

    def put(self, key: str, result: ChatResult) -> None:
        """Store a result, evicting the least recently used entries past the size bound."""
        if not self.enabled:
            return
        self._entries[key] = (self._clock() + self.ttl_s, result)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self._evictions += 1

    def clear(self) -> None:
        self._entries.clear()

    async def get_or_call(
        self, key: str, call: Callable[[], Awaitable[ChatResult]],
    ) -> CacheOutcome:
        """The stored result, or the answer of a call shared by every concurrent caller.

        A failed call is shared too and is not stored. The call runs in its own task,
        so one caller being cancelled does not cancel it for the others; it is
        cancelled when no caller waits for it any more.
        """
        if not self.enabled or key in _leading.get():
            return CacheOutcome(await call(), False)
        flight = self._in_flight.get(key)
        if flight is not None:
            self._shared += 1
            shared = True
        else:
            stored = self.get(key)
            if stored is not None:
                return CacheOutcome(stored, True)
            flight = self._start(key, call)
            shared = False
        flight.waiters += 1
        try:
            result = await asyncio.shield(flight.task)
        finally:
            flight.waiters -= 1
            if flight.waiters == 0 and not flight.task.done():
                flight.task.cancel()
        return CacheOutcome(result, shared)

    def _start(self, key: str, call: Callable[[], Awaitable[ChatResult]]) -> _Flight:
        async def lead() -> ChatResult:
            _leading.set(_leading.get() | {key})
            result = await call()
            self.put(key, result)
            return result

        flight = _Flight(asyncio.create_task(lead(), name=f"cache-call-{key[:12]}"))
        self._in_flight[key] = flight

        def landed(task: asyncio.Task[ChatResult]) -> None:
            if self._in_flight.get(key) is flight:
                del self._in_flight[key]
            # Mark the error retrieved: the callers that wanted it have already seen it.
            if not task.cancelled():
                task.exception()

        flight.task.add_done_callback(landed)
        return flight


class CachedBackend:
    """Wraps any chat backend so repeated identical requests are answered from the cache."""

    def __init__(self, backend: ChatBackend, cache: ResultCache) -> None:
        self.backend = backend
        self.cache = cache

    async def chat(
        self, request: ChatRequest, *, operation: str = "llm_inference", cache: bool = False,
    ) -> ChatResult:
        """One completion, from the cache when an identical deterministic request was answered."""
        return (await self.chat_outcome(request, operation=operation, cache=cache)).result

    async def chat_outcome(
        self, request: ChatRequest, *, operation: str = "llm_inference", cache: bool = False,
    ) -> CacheOutcome:
        """Like chat, and says whether the answer came without a call of its own.

        Only a request at temperature 0 uses the cache, unless cache=True opts this call in;
        any other request reaches the backend every time, even when an identical one is in
        flight, so repeated samples stay independent.
        """
        async def call() -> ChatResult:
            return await self.backend.chat(request, operation=operation)

        if not (cache or is_deterministic(request)):
            return CacheOutcome(await call(), False)
        return await self.cache.get_or_call(cache_key(request), call)


async def chat_outcome(
    backend: ChatBackend, request: ChatRequest, *, operation: str = "llm_inference",
    cache: bool = False,
) -> CacheOutcome:
    """One completion through any backend, and whether the cache answered it."""
    if isinstance(backend, CachedBackend):
        return await backend.chat_outcome(request, operation=operation, cache=cache)
    return CacheOutcome(await backend.chat(request, operation=operation), False)
