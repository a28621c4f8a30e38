"""The router's choice under load: work in flight against each endpoint's capacity and speed.

The router's state is set by hand (no probes run), so each case is exact; the bench module
`bench/fanout.py` measures the same choice against real stand-in processes.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import pytest

from kowalski.common.config import ControllerConfig, EndpointConfig, ExoConfig
from kowalski.controller.circuit import CircuitPolicy
from kowalski.controller.models.router import LlmRouter
from kowalski.controller.retry import RetryPolicy

MODEL = "m"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def router(http: aiohttp.ClientSession, *endpoints: tuple[int, float]) -> LlmRouter:
    """Healthy endpoints serving MODEL, each (max_concurrency, latency_ms)."""
    entries = [EndpointConfig(url=f"http://127.0.0.1:{9000 + n}", max_concurrency=cap)
               for n, (cap, _) in enumerate(endpoints)]
    controller = ControllerConfig()
    made = LlmRouter(config=ExoConfig(endpoints=list(entries)), urls=list(entries),
                     session=http, policy=RetryPolicy.from_config(controller),
                     circuit_policy=CircuitPolicy.from_config(controller),
                     load_penalty=controller.load_penalty)
    for endpoint, (_, latency_ms) in zip(made.endpoints, endpoints, strict=True):
        endpoint.healthy, endpoint.state = True, "up"
        endpoint.ready_models, endpoint.latency_ms = (MODEL,), latency_ms
    return made


def chosen(made: LlmRouter, *in_flight: int) -> int:
    for endpoint, count in zip(made.endpoints, in_flight, strict=True):
        endpoint.in_flight = count
    return made.endpoints.index(made.choose(MODEL, "llm_inference"))


async def test_equal_endpoints_take_the_one_with_least_work(
        http: aiohttp.ClientSession) -> None:
    made = router(http, (8, 50.0), (8, 50.0))
    assert chosen(made, 8, 3) == 1
    assert chosen(made, 2, 3) == 0


async def test_work_is_counted_against_each_endpoints_capacity(
        http: aiohttp.ClientSession) -> None:
    made = router(http, (32, 50.0), (8, 50.0))
    # 11 of 32 is less work than 5 of 8, though more calls.
    assert chosen(made, 10, 4) == 0
    assert chosen(made, 30, 4) == 1


async def test_a_slow_endpoint_gets_a_call_once_the_fast_one_would_keep_it_longer(
        http: aiohttp.ClientSession) -> None:
    made = router(http, (8, 50.0), (8, 250.0))
    # One more call costs 4/8 of 50 ms at the fast one, 1/8 of 250 ms at the idle slow one.
    assert chosen(made, 3, 0) == 0
    assert chosen(made, 5, 0) == 1
    # Both full: the queue that drains sooner.
    assert chosen(made, 20, 8) == 0


async def test_many_calls_spread_in_proportion_to_speed_and_capacity(
        http: aiohttp.ClientSession) -> None:
    """400 calls, 64 at a time: simulated service times, the router's real choice."""
    specs = [(8, 50.0), (8, 50.0), (8, 50.0), (8, 250.0)]
    made = router(http, *specs)
    served: Counter[int] = Counter()
    busy: list[list[float]] = [[] for _ in specs]  # finish times of the calls in service
    waiting: list[list[float]] = [[] for _ in specs]  # calls queued at a full endpoint
    events: list[tuple[float, int]] = []
    now, sent, total, window = 0.0, 0, 400, 64

    def start(index: int, at: float) -> None:
        finish = at + specs[index][1]
        busy[index].append(finish)
        heapq.heappush(events, (finish, index))

    while sent < total or events:
        while sent < total and sent - sum(served.values()) < window:
            index = made.endpoints.index(made.choose(MODEL, "llm_inference"))
            made.endpoints[index].in_flight += 1
            if len(busy[index]) < specs[index][0]:
                start(index, now)
            else:
                waiting[index].append(now)
            sent += 1
        now, index = heapq.heappop(events)
        busy[index].remove(now)
        made.endpoints[index].in_flight -= 1
        served[index] += 1
        if waiting[index]:
            waiting[index].pop(0)
            start(index, now)
    # Ideal: 3 x 8/50 ms + 8/250 ms = 0.512 calls per ms.
    assert now <= 1.15 * total / 0.512
    assert served[3] < served[0] / 3
    assert sum(served.values()) == total
