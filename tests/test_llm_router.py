"""The LLM router over several exo endpoints: readiness, spreading, placement, errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from exo_standin import DEFAULT_MODEL, STANDIN, make_exo_app

from kowalski.common.config import ControllerConfig, ExoConfig
from kowalski.common.errors import ExoApiError, NoDevicesAvailableError
from kowalski.controller.circuit import CircuitPolicy
from kowalski.controller.models.chat_types import ChatMessage, ChatRequest
from kowalski.controller.models.router import LlmRouter
from kowalski.controller.retry import RetryPolicy

OTHER = "mlx-community/Qwen3-0.6B-4bit"


def request(model: str = "") -> ChatRequest:
    return ChatRequest(model=model, messages=[ChatMessage(role="user", content="hi")])


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def make_router(urls: list[str], http: aiohttp.ClientSession, **exo: Any) -> LlmRouter:
    controller = ControllerConfig(retry_max_attempts=2, retry_base_delay_ms=10,
                                  retry_max_delay_ms=20, circuit_failure_threshold=2)
    return LlmRouter(config=ExoConfig(endpoints=urls, poll_interval_s=0.1, **exo), urls=urls,
                     session=http, policy=RetryPolicy.from_config(controller),
                     circuit_policy=CircuitPolicy.from_config(controller),
                     load_penalty=controller.load_penalty)


def url(server: Any) -> str:
    return str(server.make_url("")).rstrip("/")


async def test_each_model_goes_to_the_endpoint_that_has_it_ready(
    aiohttp_server: Any, http: aiohttp.ClientSession,
) -> None:
    first = await aiohttp_server(make_exo_app(models=(DEFAULT_MODEL,), reply=lambda b: "one"))
    second = await aiohttp_server(make_exo_app(models=(OTHER,), reply=lambda b: "two"))
    router = make_router([url(first), url(second)], http)
    await router.refresh()
    assert router.ready_models() == sorted([DEFAULT_MODEL, OTHER])
    assert (await router.chat(request(DEFAULT_MODEL))).text == "one"
    assert (await router.chat(request(OTHER))).text == "two"
    with pytest.raises(NoDevicesAvailableError, match="no healthy exo endpoint has 'absent'"):
        await router.chat(request("absent"))
    await router.close()


async def test_a_failing_endpoint_is_skipped_and_its_circuit_opens(
    aiohttp_server: Any, http: aiohttp.ClientSession,
) -> None:
    bad_app = make_exo_app(models=(DEFAULT_MODEL,), reply=lambda b: "bad")
    good_app = make_exo_app(models=(DEFAULT_MODEL,), reply=lambda b: "good")
    bad, good = await aiohttp_server(bad_app), await aiohttp_server(good_app)
    router = make_router([url(bad), url(good)], http)
    await router.refresh()
    # Make the failing endpoint the preferred one, so that it is the one tried first.
    router.endpoints[0].latency_ms, router.endpoints[1].latency_ms = 0.1, 50.0
    bad_app[STANDIN].fail("http_500")
    answers = [(await router.chat(request(DEFAULT_MODEL))).text for _ in range(6)]
    assert answers == ["good"] * 6
    views = {view.url: view for view in router.views()}
    assert views[url(bad)].circuit == "open"
    assert views[url(good)].circuit == "closed"
    await router.close()


async def test_every_endpoint_failing_ends_in_a_clear_error(
    aiohttp_server: Any, http: aiohttp.ClientSession,
) -> None:
    app = make_exo_app(models=(DEFAULT_MODEL,))
    server = await aiohttp_server(app)
    router = make_router([url(server)], http)
    await router.refresh()
    app[STANDIN].fail("http_500")
    # Two attempts, two failures: the circuit opens and the endpoint's own error comes back.
    with pytest.raises(ExoApiError, match="HTTP 500"):
        await router.chat(request(DEFAULT_MODEL))
    with pytest.raises(NoDevicesAvailableError, match="circuit open"):
        await router.chat(request(DEFAULT_MODEL))
    await router.close()


async def test_a_model_without_an_instance_is_placed_when_the_config_allows(
    aiohttp_server: Any, http: aiohttp.ClientSession,
) -> None:
    app = make_exo_app(models=(), reply=lambda b: "placed", load_delay_s=0.2)
    # Listed (downloaded) but with no instance: exo v1 answers 404 for it until placed.
    app[STANDIN].set_model(DEFAULT_MODEL, None)
    server = await aiohttp_server(app)
    strict = make_router([url(server)], http)
    await strict.refresh()
    with pytest.raises(NoDevicesAvailableError):
        await strict.chat(request(DEFAULT_MODEL))
    router = make_router([url(server)], http, place_instances=True, request_timeout_s=10)
    await router.refresh()
    assert (await router.chat(request(DEFAULT_MODEL))).text == "placed"
    # exo's placement first (a refusal comes back at once), then exactly that instance.
    assert app[STANDIN].counts["/instance/placement"] == 1
    assert app[STANDIN].counts["/instance"] == 1
    assert app[STANDIN].counts["/place_instance"] == 0
    assert DEFAULT_MODEL in router.ready_models()
    await strict.close()
    await router.close()


async def test_no_endpoint_configured_says_so(http: aiohttp.ClientSession) -> None:
    router = make_router([], http, default_model="m")
    with pytest.raises(NoDevicesAvailableError, match="no exo endpoint configured"):
        await router.chat(request())
