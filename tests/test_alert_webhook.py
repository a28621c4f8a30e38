"""The alert webhook: the Prometheus rules' events, signed, sent on change, retried."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web
from controller_env import controller_config, healthy_ids, running_controller
from procs import SECRET, AgentProcess

from kowalski.common import config as config_module
from kowalski.common.config import AlertsConfig
from kowalski.common.errors import ConfigError
from kowalski.common.signing import Verifier
from kowalski.controller.api.alerts import Alerter, AlertNotice, changes, firing
from kowalski.controller.api.status import DeviceStatus, Status
from kowalski.controller.fleet.dispatch import JobCounters
from kowalski.controller.models.router import EndpointView
from kowalski.controller.rlm.live import LiveRunSummary

pytestmark = pytest.mark.timeout(90)
Server = Any  # pytest-aiohttp's TestServer


def device(device_id: str, *, health: str = "healthy", circuit: str = "closed") -> DeviceStatus:
    return DeviceStatus(
        device_id=device_id, name=device_id, url="http://127.0.0.1:1", source="static",
        health=health, lost=False, excluded=None, scores={}, latency_ms=None, metrics=None,
        languages=["python"], sandbox_mode="rlimit", in_flight=[], circuit=circuit,
        seconds_since_heartbeat=None, last_error="" if health == "healthy" else "refused",
        history=[])


def endpoint(url: str, *, healthy: bool = True, circuit: str = "closed") -> EndpointView:
    return EndpointView(url=url, state="up" if healthy else "down", healthy=healthy,
                        flavour="v1", latency_ms=None,
                        ready_models=[], nodes=1, in_flight=0, circuit=circuit, requests=0,
                        errors=0, prompt_tokens=0, completion_tokens=0,
                        last_error="" if healthy else "connection refused")


def run(run_id: str, status: str) -> LiveRunSummary:
    return LiveRunSummary(run_id=run_id, query="q", status=status, iterations=1, sub_calls=0,
                          tokens=0, started_at=0.0, devices=[])


def status(devices: list[DeviceStatus] | None = None,
           endpoints: list[EndpointView] | None = None,
           runs: list[LiveRunSummary] | None = None, busy: int = 0) -> Status:
    return Status(version="0", time=0.0, devices=devices or [], endpoints=endpoints or [],
                  jobs=JobCounters(busy=busy), runs=runs or [], cache={})


def test_each_rule_fires_on_its_condition_and_names_its_subject() -> None:
    calm = status([device("a"), device("b")], [endpoint("http://exo:1")],
                  [run("r1", "failed"), run("r2", "finished")])
    assert firing(calm, busy_recently=False, runs_failing_min=3) == {}
    stormy = status(
        [device("a", health="unhealthy"), device("b", circuit="open")],
        [endpoint("http://exo:1", healthy=False), endpoint("http://exo:2", circuit="open")],
        [run("r1", "failed"), run("r2", "failed"), run("r3", "failed"), run("r4", "finished")],
        busy=7)
    found = firing(stormy, busy_recently=True, runs_failing_min=3)
    assert set(found) == {
        ("KowalskiAgentDown", "a"), ("KowalskiAgentCircuitOpen", "b"),
        ("KowalskiEndpointDown", "http://exo:1"),
        ("KowalskiEndpointCircuitOpen", "http://exo:2"),
        ("KowalskiRunsFailing", ""), ("KowalskiQueueFull", ""),
    }
    assert "refused" in found["KowalskiAgentDown", "a"].summary
    assert found["KowalskiEndpointDown", "http://exo:1"].severity == "critical"
    assert "7 refusals" in found["KowalskiQueueFull", ""].summary
    none_up = firing(status([device("a", health="unhealthy")]), busy_recently=False,
                     runs_failing_min=3)
    assert ("KowalskiNoAgentUp", "") in none_up
    # An endpoint not yet probed is not down: a controller that just started raises nothing.
    probing = msgspec.structs.replace(endpoint("http://exo:3", healthy=False), state="probing")
    assert firing(status([device("a")], [probing]), busy_recently=False,
                  runs_failing_min=3) == {}


def test_changes_are_what_began_and_what_ended() -> None:
    before = firing(status([device("a", health="unhealthy"), device("b")]),
                    busy_recently=False, runs_failing_min=3)
    after = firing(status([device("a"), device("b", health="unhealthy")]),
                   busy_recently=False, runs_failing_min=3)
    assert [(c.state, c.alert.subject) for c in changes(before, after)] == [
        ("resolved", "a"), ("firing", "b")]
    assert changes(after, after) == []


def test_a_webhook_url_that_is_not_http_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"alerts\.webhook_url: expected an http:// or "):
        config_module.loads('[alerts]\nwebhook_url = "hooks.example.com/x"\n')
    assert config_module.loads("").alerts.webhook_url == ""


# --- a real receiver ---------------------------------------------------------------------


class Receiver:
    """A webhook on 127.0.0.1 that checks signatures and can fail on purpose."""

    def __init__(self) -> None:
        self.verifier = Verifier(SECRET.encode())
        self.notices: list[AlertNotice] = []
        self.attempts = 0
        # Statuses to answer before accepting, in order.
        self.failures: list[int] = []

    def app(self) -> web.Application:
        async def hook(request: web.Request) -> web.Response:
            body = await request.read()
            self.attempts += 1
            self.verifier.verify(request.method, request.path_qs, request.headers, body)
            if self.failures:
                return web.Response(status=self.failures.pop(0), text="not now")
            self.notices.append(msgspec.json.decode(body, type=AlertNotice))
            return web.Response(status=204)

        app = web.Application()
        app.router.add_post("/hooks/kowalski", hook)
        return app


@pytest.fixture
async def receiver(aiohttp_server: Callable[..., Awaitable[Server]]
                   ) -> tuple[Receiver, str]:
    hook = Receiver()
    server = await aiohttp_server(hook.app())
    return hook, str(server.make_url("/hooks/kowalski?team=ops"))


def fast(url: str, **values: Any) -> AlertsConfig:
    return AlertsConfig(webhook_url=url, check_interval_s=0.1, webhook_attempts=4,
                        webhook_retry_base_delay_ms=20, webhook_retry_max_delay_ms=50,
                        webhook_timeout_s=5, **values)


async def test_a_failing_webhook_is_retried_and_a_refusal_is_sent_again_next_check(
    receiver: tuple[Receiver, str],
) -> None:
    hook, url = receiver
    current = status([device("a", health="unhealthy")])
    async with aiohttp.ClientSession() as http:
        alerter = Alerter(config=fast(url), snapshot=lambda: current, http=http,
                          secret=SECRET.encode(), controller_url="http://ctl:7080")
        hook.failures = [503, 502]
        sent = await alerter.check()
        assert hook.attempts == 3
        assert [(c.state, c.alert.name) for c in sent] == [
            ("firing", "KowalskiAgentDown"), ("firing", "KowalskiNoAgentUp")]
        assert hook.notices[0].controller == "http://ctl:7080"
        assert await alerter.check() == []  # nothing changed: nothing sent
        assert hook.attempts == 3
        current = status([device("a")])
        hook.failures = [400]
        assert await alerter.check() == []  # refused: not retried, not forgotten
        assert hook.attempts == 4
        resolved = await alerter.check()
        assert [c.state for c in resolved] == ["resolved", "resolved"]
        assert hook.notices[-1].firing == []
        assert (hook.attempts, alerter.delivered, len(hook.notices)) == (5, 2, 2)


async def test_queue_full_fires_while_refusals_are_recent_then_resolves(
    receiver: tuple[Receiver, str],
) -> None:
    hook, url = receiver
    clock = [100.0]
    busy = [0]
    async with aiohttp.ClientSession() as http:
        alerter = Alerter(config=fast(url, queue_full_window_s=60), http=http,
                          snapshot=lambda: status(busy=busy[0]), secret=SECRET.encode(),
                          controller_url="http://ctl", clock=lambda: clock[0])
        assert await alerter.check() == []
        busy[0] = 2
        assert [c.alert.name for c in await alerter.check()] == ["KowalskiQueueFull"]
        clock[0] += 59
        assert await alerter.check() == []
        clock[0] += 2
        assert [c.state for c in await alerter.check()] == ["resolved"]
    assert len(hook.notices) == 2


async def test_a_controller_tells_the_webhook_once_when_an_agent_goes_down_and_comes_back(
    receiver: tuple[Receiver, str], tmp_path: Path,
) -> None:
    hook, url = receiver
    agent = await AgentProcess(tmp_path, name="watched").start()
    try:
        config = controller_config([agent], [], tmp_path, alerts={
            "webhook_url": url, "check_interval_s": 0.1, "webhook_retry_base_delay_ms": 20,
            "webhook_retry_max_delay_ms": 100})
        async with running_controller(config) as running:
            assert await running.cluster.wait_for(lambda t: len(healthy_ids(t)) == 1,
                                                  timeout_s=15)
            await agent.kill()
            await wait_for_notices(hook, 1)
            down = hook.notices[0]
            assert down.controller == running.base_url
            assert {(c.state, c.alert.name, c.alert.subject) for c in down.changes} == {
                ("firing", "KowalskiAgentDown", agent.agent_id),
                ("firing", "KowalskiNoAgentUp", "")}
            # Many checks later, still one notice: changes are sent, not the state per tick.
            await asyncio.sleep(1.0)
            assert len(hook.notices) == 1
            await agent.start()
            await wait_for_notices(hook, 2)
            assert {c.state for c in hook.notices[1].changes} == {"resolved"}
            assert hook.notices[1].firing == []
    finally:
        await agent.stop()


async def wait_for_notices(hook: Receiver, count: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(hook.notices) < count:
        assert time.monotonic() < deadline, f"{len(hook.notices)} notices, wanted {count}"
        await asyncio.sleep(0.05)
