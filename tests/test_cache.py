"""The result cache: keys, TTL with a fake clock, LRU bound, single-flight, the stand-in."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import pytest
from exo_standin import DEFAULT_MODEL, ExoStandin
from hypothesis import given
from hypothesis import strategies as st

from kowalski.common.config import ExoConfig
from kowalski.common.errors import NetworkError
from kowalski.controller.batch.runner import ExoClientBackend
from kowalski.controller.models.cache import CachedBackend, ResultCache, cache_key
from kowalski.controller.models.chat_types import ChatMessage, ChatRequest, ChatResult
from kowalski.controller.models.exo_client import ExoClient

Serve = Callable[..., Awaitable[tuple[ExoStandin, str]]]


def ask(text: str = "hello", **kwargs: Any) -> ChatRequest:
    """A deterministic request (temperature 0) unless kwargs say otherwise."""
    model = kwargs.pop("model", DEFAULT_MODEL)
    kwargs.setdefault("temperature", 0)
    return ChatRequest(model=model, messages=[ChatMessage(role="user", content=text)], **kwargs)


def answer(text: str = "hi") -> ChatResult:
    return ChatResult(text=text, finish_reason="stop", usage=None, latency_ms=1.0,
                      endpoint="http://e", id="c1")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class CountingBackend:
    """Answers after `release` is set, counting the calls that reach it."""

    def __init__(self, *, fail: Exception | None = None) -> None:
        self.calls = 0
        self.cancelled = 0
        self.fail = fail
        self.release = asyncio.Event()

    async def chat(self, request: ChatRequest, *, operation: str = "llm_inference") -> ChatResult:
        self.calls += 1
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.fail is not None:
            raise self.fail
        return answer(request.messages[-1].content)


@pytest.fixture
async def clients() -> AsyncIterator[list[ExoClient]]:
    made: list[ExoClient] = []
    yield made
    for client in made:
        await client.close()


# --- keys ----------------------------------------------------------------------------------


def test_key_ignores_spelling_that_does_not_change_the_request() -> None:
    assert cache_key(ask(temperature=1)) == cache_key(ask(temperature=1.0))
    assert cache_key(ask(stop="END")) == cache_key(ask(stop=["END"]))
    decoded = msgspec.json.decode(msgspec.json.encode(ask(seed=3)), type=ChatRequest)
    assert cache_key(decoded) == cache_key(ask(seed=3))


@pytest.mark.parametrize("change", [
    {"model": "other"}, {"text": "hello!"}, {"temperature": 0.5}, {"max_tokens": 9},
    {"top_p": 0.9}, {"seed": 1}, {"stop": "x"},
])
def test_key_changes_with_model_messages_and_sampling(change: dict[str, Any]) -> None:
    assert cache_key(ask(**change)) != cache_key(ask())


@given(st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]), st.text()),
                min_size=1, max_size=4),
       st.none() | st.floats(0, 2), st.none() | st.integers(1, 4096))
def test_key_is_stable_across_an_encode_decode_round_trip(
    turns: list[tuple[str, str]], temperature: float | None, max_tokens: int | None,
) -> None:
    messages = [ChatMessage(role=role, content=text) for role, text in turns]
    request = ChatRequest(model="m", messages=messages, temperature=temperature,
                          max_tokens=max_tokens)
    again = msgspec.json.decode(msgspec.json.encode(request), type=ChatRequest)
    assert cache_key(again) == cache_key(request)


# --- storage -------------------------------------------------------------------------------


def test_entries_expire_after_the_ttl() -> None:
    clock = FakeClock()
    cache = ResultCache(ttl_s=10.0, max_entries=8, clock=clock)
    cache.put("k", answer())
    clock.now = 9.9
    assert cache.get("k") == answer()
    clock.now = 10.0
    assert cache.get("k") is None
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.expirations, stats.entries) == (1, 1, 1, 0)


def test_least_recently_used_entry_is_evicted_at_the_bound() -> None:
    cache = ResultCache(ttl_s=60.0, max_entries=2, clock=FakeClock())
    cache.put("a", answer("a"))
    cache.put("b", answer("b"))
    assert cache.get("a") is not None  # a is now more recent than b
    cache.put("c", answer("c"))
    assert cache.get("b") is None
    assert [cache.get(key).text for key in ("a", "c")] == ["a", "c"]
    assert cache.stats().evictions == 1
    assert len(cache) == 2


@pytest.mark.parametrize(("ttl_s", "max_entries"), [(0.0, 100), (60.0, 0)])
async def test_zero_ttl_or_size_turns_the_cache_off(ttl_s: float, max_entries: int) -> None:
    cache = ResultCache.from_config(ExoConfig(cache_ttl_s=ttl_s, cache_max_entries=max_entries))
    assert not cache.enabled
    backend = CountingBackend()
    backend.release.set()
    cached = CachedBackend(backend, cache)
    outcomes = [await cached.chat_outcome(ask()) for _ in range(3)]
    assert backend.calls == 3
    assert not any(outcome.cached for outcome in outcomes)
    assert len(cache) == 0


def test_negative_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        ResultCache(ttl_s=-1, max_entries=1)


# --- single-flight -------------------------------------------------------------------------


async def test_concurrent_identical_requests_share_one_call() -> None:
    cache = ResultCache(ttl_s=60.0, max_entries=8)
    backend = CountingBackend()
    cached = CachedBackend(backend, cache)
    waiting = [asyncio.create_task(cached.chat_outcome(ask("same"))) for _ in range(5)]
    await asyncio.sleep(0)
    backend.release.set()
    outcomes = await asyncio.gather(*waiting)
    assert backend.calls == 1
    assert [outcome.cached for outcome in outcomes] == [False, True, True, True, True]
    assert {outcome.result.text for outcome in outcomes} == {"same"}
    later = await cached.chat_outcome(ask("same"))
    assert later.cached
    assert backend.calls == 1
    stats = cache.stats()
    assert (stats.misses, stats.shared, stats.hits, stats.in_flight) == (1, 4, 1, 0)


async def test_a_failed_call_is_shared_and_not_stored() -> None:
    cache = ResultCache(ttl_s=60.0, max_entries=8)
    backend = CountingBackend(fail=NetworkError("peer went away"))
    cached = CachedBackend(backend, cache)
    waiting = [asyncio.create_task(cached.chat(ask())) for _ in range(3)]
    await asyncio.sleep(0)
    backend.release.set()
    errors = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(error, NetworkError) for error in errors)
    assert backend.calls == 1
    assert len(cache) == 0
    backend.fail = None
    assert (await cached.chat_outcome(ask())).cached is False
    assert backend.calls == 2


async def test_a_cancelled_caller_does_not_cancel_the_call_for_the_others() -> None:
    cache = ResultCache(ttl_s=60.0, max_entries=8)
    backend = CountingBackend()
    cached = CachedBackend(backend, cache)
    leader = asyncio.create_task(cached.chat(ask()))
    await asyncio.sleep(0)
    follower = asyncio.create_task(cached.chat(ask()))
    await asyncio.sleep(0)
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    backend.release.set()
    assert (await follower).text == "hello"
    assert (backend.calls, backend.cancelled) == (1, 0)
    assert len(cache) == 1


async def test_the_call_is_cancelled_when_every_caller_has_gone() -> None:
    cache = ResultCache(ttl_s=60.0, max_entries=8)
    backend = CountingBackend()
    cached = CachedBackend(backend, cache)
    waiting = [asyncio.create_task(cached.chat(ask())) for _ in range(2)]
    await asyncio.sleep(0.01)
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    for _ in range(100):
        if cache.stats().in_flight == 0:
            break
        await asyncio.sleep(0.001)
    assert (backend.calls, backend.cancelled) == (1, 1)
    assert cache.stats().in_flight == 0
    assert len(cache) == 0


async def test_a_cached_backend_inside_one_on_the_same_cache_does_not_wait_for_itself() -> None:
    cache = ResultCache(ttl_s=60.0, max_entries=8)
    backend = CountingBackend()
    backend.release.set()
    outer = CachedBackend(CachedBackend(backend, cache), cache)
    first = await asyncio.wait_for(outer.chat_outcome(ask()), timeout=5)
    second = await outer.chat_outcome(ask())
    assert (first.cached, second.cached, backend.calls) == (False, True, 1)


# --- only deterministic requests -----------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.7, None])
async def test_sampled_requests_reach_the_backend_every_time(temperature: float | None) -> None:
    cache = ResultCache(ttl_s=60.0, max_entries=8)
    backend = CountingBackend()
    cached = CachedBackend(backend, cache)
    waiting = [asyncio.create_task(cached.chat_outcome(ask("same", temperature=temperature)))
               for _ in range(6)]
    await asyncio.sleep(0)
    backend.release.set()
    outcomes = await asyncio.gather(*waiting)
    later = await cached.chat_outcome(ask("same", temperature=temperature))
    assert backend.calls == 7
    assert not any(outcome.cached for outcome in [*outcomes, later])
    assert len(cache) == 0


async def test_a_call_may_opt_in_to_the_cache_at_any_temperature() -> None:
    cache = ResultCache(ttl_s=60.0, max_entries=8)
    backend = CountingBackend()
    backend.release.set()
    cached = CachedBackend(backend, cache)
    first = await cached.chat_outcome(ask("same", temperature=0.7), cache=True)
    again = await cached.chat_outcome(ask("same", temperature=0.7), cache=True)
    fresh = await cached.chat_outcome(ask("same", temperature=0.7))
    assert (first.cached, again.cached, fresh.cached, backend.calls) == (False, True, False, 2)


# --- against the exo stand-in --------------------------------------------------------------


async def test_repeated_request_reaches_the_server_once(
    serve: Serve, clients: list[ExoClient],
) -> None:
    standin, url = await serve(reply=lambda body: "forty two")
    clients.append(ExoClient(url))
    cache = ResultCache(ttl_s=60.0, max_entries=8)
    cached = CachedBackend(ExoClientBackend(clients[0]), cache)
    first = await cached.chat_outcome(ask("six times seven"))
    second = await cached.chat_outcome(ask("six times seven"))
    other = await cached.chat_outcome(ask("six times seven", temperature=0.7))
    assert (first.cached, second.cached, other.cached) == (False, True, False)
    assert second.result == first.result
    assert first.result.text == "forty two"
    assert standin.counts["/v1/chat/completions"] == 2
    assert cache.stats().hits == 1
