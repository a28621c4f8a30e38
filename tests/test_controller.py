"""The controller with real agent processes: discovery, health, routing, failover."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from controller_env import controller_config, healthy_ids, running_controller
from exo_standin import DEFAULT_MODEL, STANDIN
from procs import AgentProcess

from kowalski.common.errors import NoDevicesAvailableError
from kowalski.common.messages import FEATURE_CONTEXT_BODY, JobRequest
from kowalski.controller.fleet.sessions import RemoteSession
from kowalski.controller.models.chat_types import ChatMessage, ChatRequest
from kowalski.controller.service import Controller

pytestmark = pytest.mark.timeout(90)


async def test_static_agents_appear_healthy_with_metrics_and_scores(
    controller: Controller, agents: list[AgentProcess],
) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(controller.base_url + "/v1/status") as response:
            status = await response.json()
        async with session.get(controller.base_url + "/metrics") as response:
            metrics = await response.text()
    ids = {device["device_id"] for device in status["devices"]}
    assert ids == {agent.agent_id for agent in agents}
    for device in status["devices"]:
        assert device["health"] == "healthy"
        assert device["source"] == "static"
        assert 0 < device["scores"]["code_execution"] <= 1
        assert device["metrics"]["memory_total_bytes"] > 0
        assert "python" in device["languages"]
        assert device["latency_ms"] is not None
    assert status["endpoints"][0]["healthy"]
    assert status["endpoints"][0]["ready_models"] == [DEFAULT_MODEL]
    for agent in agents:
        assert f'kowalski_device_up{{device="{agent.agent_id}"}} 1.0' in metrics
    assert "kowalski_exo_endpoint_up" in metrics


async def test_status_and_devices_commands_print_the_live_table(
    controller: Controller, agents: list[AgentProcess],
) -> None:
    for command in ("status", "devices"):
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kowalski.controller", command, "--url", controller.base_url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await process.communicate()
        assert process.returncode == 0, err.decode()
        text = out.decode()
        assert "DEVICE" in text
        for agent in agents:
            assert agent.agent_id in text
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kowalski.controller", "devices", "--json",
        "--url", controller.base_url, stdout=asyncio.subprocess.PIPE)
    out, _ = await process.communicate()
    assert {d["health"] for d in json.loads(out)} == {"healthy"}


async def test_status_command_without_a_controller_says_so() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kowalski.controller", "status", "--url", "http://127.0.0.1:9",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await process.communicate()
    assert process.returncode == 4
    assert "no controller answers at http://127.0.0.1:9" in err.decode()


async def test_jobs_spread_over_agents_and_come_back_through_the_api(
    agents: list[AgentProcess], exo: Any, tmp_path: Path,
) -> None:
    # A penalty above any score gap: at the default, an agent whose heartbeats come back
    # faster may rightly take two jobs before a slower one takes any (a loaded machine).
    config = controller_config(agents, [str(exo.make_url("")).rstrip("/")], tmp_path,
                               controller={"load_penalty": 1.0})
    async with running_controller(config) as controller:
        assert await controller.cluster.wait_for(
            lambda t: len(healthy_ids(t)) == len(agents), timeout_s=15)
        jobs = [JobRequest(job_id=f"spread-{n}", language="bash", code="sleep 0.5; echo hi")
                for n in range(4)]
        results = await asyncio.gather(*(controller.dispatcher.run_job(job) for job in jobs))
        assert [r.stdout for r in results] == ["hi\n"] * 4
        per_agent = [r.agent_id for r in results]
        assert sorted(per_agent.count(agent.agent_id) for agent in agents) == [2, 2]
        await _job_through_the_api(controller)


async def _job_through_the_api(controller: Controller) -> None:
    async with aiohttp.ClientSession() as session, session.post(
        controller.base_url + "/v1/jobs",
        json={"job_id": "via-api", "language": "python", "code": "print(6 * 7)"},
    ) as response:
        assert response.status == 200
        assert (await response.json())["stdout"] == "42\n"


async def test_agent_killed_mid_job_reroutes_without_loss_and_comes_back(
    controller: Controller, agents: list[AgentProcess],
) -> None:
    cluster = controller.cluster
    job = JobRequest(job_id="survivor", language="python",
                     code="import time\ntime.sleep(1.5)\nprint('done')")
    task = asyncio.create_task(controller.dispatcher.run_job(job))
    assert await cluster.wait_for(
        lambda t: any("survivor" in row.in_flight for row in t.devices.values()), timeout_s=5)
    victim_id = next(d for d, row in cluster.table.devices.items() if "survivor" in row.in_flight)
    victim = next(a for a in agents if a.agent_id == victim_id)
    killed_at = cluster.clock()
    await victim.kill()
    assert await cluster.wait_for(
        lambda t: t.devices[victim_id].health == "unhealthy", timeout_s=5)
    # Detection bound: failure_timeout_s (1.5 s here) plus one heartbeat interval and slack.
    assert cluster.clock() - killed_at < 3.0
    result = await asyncio.wait_for(task, 30)
    assert result.status == "ok"
    assert result.stdout == "done\n"
    assert result.agent_id != victim_id
    await victim.start()
    assert await cluster.wait_for(lambda t: t.devices[victim_id].health == "healthy",
                                  timeout_s=10)


async def test_paused_agent_is_judged_down_and_its_job_finishes_elsewhere(
    controller: Controller, agents: list[AgentProcess],
) -> None:
    cluster = controller.cluster
    job = JobRequest(job_id="paused", language="bash", code="sleep 1; echo ok")
    task = asyncio.create_task(controller.dispatcher.run_job(job))
    assert await cluster.wait_for(
        lambda t: any("paused" in row.in_flight for row in t.devices.values()), timeout_s=5)
    victim_id = next(d for d, row in cluster.table.devices.items() if "paused" in row.in_flight)
    victim = next(a for a in agents if a.agent_id == victim_id)
    victim.signal(signal.SIGSTOP)
    try:
        result = await asyncio.wait_for(task, 30)
        assert result.agent_id != victim_id
        assert result.stdout == "ok\n"
        assert cluster.table.devices[victim_id].health == "unhealthy"
    finally:
        victim.signal(signal.SIGCONT)
    assert await cluster.wait_for(lambda t: t.devices[victim_id].health == "healthy",
                                  timeout_s=10)


async def test_session_on_a_killed_agent_is_rebuilt_by_replaying_its_cells(
    controller: Controller, agents: list[AgentProcess],
) -> None:
    session = RemoteSession(dispatcher=controller.dispatcher, session_id="replayed",
                            context=["alpha", "beta"], llm_callback=None, timeout_s=30)
    await session.open()
    first = await session.execute("total = len(context)\nseen = []\nprint(total)")
    assert first.stdout == "2\n"
    await session.execute("seen.append('x')")
    original = session.device_id
    victim = next(a for a in agents if a.agent_id == original)
    await victim.kill()
    after = await session.execute("seen.append('y')\nprint(total, seen)")
    assert after.status == "ok"
    assert after.stdout == "2 ['x', 'y']\n"
    assert session.device_id != original
    assert session.rebuilds == 1
    value = await session.get_variable("seen")
    assert value.value == "['x', 'y']"
    await session.close()
    await victim.start()


async def test_a_streamed_cell_rerun_on_another_agent_says_so_before_its_output_repeats(
    controller: Controller, agents: list[AgentProcess],
) -> None:
    session = RemoteSession(dispatcher=controller.dispatcher, session_id="restreamed",
                            context="c", llm_callback=None, timeout_s=30)
    await session.open()
    original = session.device_id
    victim = next(a for a in agents if a.agent_id == original)
    pieces: list[tuple[str, str]] = []
    first_line = asyncio.Event()

    def heard(stream: str, text: str) -> None:
        pieces.append((stream, text))
        first_line.set()

    running = asyncio.create_task(session.execute(
        "import time\nprint('first', flush=True)\ntime.sleep(1)\nprint('last')",
        on_output=heard))
    await asyncio.wait_for(first_line.wait(), 20)
    await victim.kill()
    result = await running
    assert (result.status, result.stdout) == ("ok", "first\nlast\n")
    assert session.device_id != original
    text = "".join(piece for _, piece in pieces)
    notice = f"[the agent running this was lost; it runs again from the start on " \
             f"{session.device_id}]"
    assert text.replace("\n", " ").split() == ["first", *notice.split(), "first", "last"]
    await session.close()
    await victim.start()


async def test_no_agents_gives_a_clear_error(exo: Any, tmp_path: Path) -> None:
    config = controller_config([], [str(exo.make_url("")).rstrip("/")], tmp_path,
                               controller={"retry_max_attempts": 2})
    async with running_controller(config) as running:
        with pytest.raises(NoDevicesAvailableError, match="no devices discovered"):
            await running.dispatcher.run_job(
                JobRequest(job_id="nowhere", language="python", code="print(1)"))


async def test_chat_goes_to_the_endpoint_with_the_model_ready(
    controller: Controller, exo: Any,
) -> None:
    request = ChatRequest(model="", messages=[ChatMessage(role="user", content="ping")])
    result = await controller.router.chat(request)
    assert result.text == "pong"
    assert result.usage is not None
    assert result.usage.total_tokens > 0
    assert exo.app[STANDIN].counts["/v1/chat/completions"] == 1


async def test_a_busy_agent_gets_work_elsewhere_without_opening_its_circuit(
    controller: Controller, agents: list[AgentProcess],
) -> None:
    from kowalski.common.errors import RemoteError
    from kowalski.common.messages import DeviceId

    busy = DeviceId(agents[0].agent_id)

    async def full(row: Any) -> None:
        raise RemoteError(status=503, code="busy", retryable=True,
                          message="agent is running 4 jobs with 64 queued")

    for attempt in range(5):
        with pytest.raises(RemoteError):
            await controller.dispatcher.on_device(busy, f"busy-{attempt}", full)
    row = controller.cluster.table.devices[busy]
    assert row.circuit.state == "closed"
    assert not row.in_flight


async def test_an_agent_without_the_body_feature_gets_the_context_as_json(
    controller: Controller, monkeypatch: pytest.MonkeyPatch,
) -> None:
    row = next(iter(controller.cluster.table.devices.values()))
    assert FEATURE_CONTEXT_BODY in row.features
    # As an agent from before PUT /v1/sessions/{id} reports itself: no features.
    older = msgspec.structs.replace(row, features=())

    async def refused(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the body path was tried on an agent that does not serve it")

    monkeypatch.setattr(controller.dispatcher.agents, "open_session", refused)
    session = RemoteSession(dispatcher=controller.dispatcher, session_id="older-agent",
                            context="héllo\nwörld", llm_callback=None)
    await session._open_on(older)
    try:
        result = await session.execute("print(context)")
        assert (result.status, result.stdout) == ("ok", "héllo\nwörld\n")
        assert session.device_id == row.device_id
    finally:
        await session.close()
