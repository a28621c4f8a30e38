"""No stale work: a paused agent that comes back starts nothing that was given elsewhere."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from controller_env import controller_config, running_controller
from procs import SECRET, AgentProcess

from kowalski.common.client import SignedClient
from kowalski.common.config import Config
from kowalski.common.errors import NetworkError, RemoteError
from kowalski.common.messages import CellRequest, DeviceId, JobRequest, SessionCreate
from kowalski.controller.fleet.agent_client import AgentClient

pytestmark = pytest.mark.timeout(150)
QUEUED = 50
_STARTED = re.compile(r"DEBUG kowalski\.agent\.jobs: starting job (\S+) ")


def started_jobs(agent: AgentProcess) -> list[str]:
    return _STARTED.findall((agent.dir / "agent.log").read_text(errors="replace"))


@pytest.fixture
async def one_slot(tmp_path: Path) -> AsyncIterator[tuple[AgentProcess, AgentClient]]:
    """An agent that runs one job at a time, and a signed client for it."""
    agent = await AgentProcess(tmp_path, name="one-slot", log_level="DEBUG",
                               agent={"max_concurrent_jobs": 1}).start()
    try:
        async with aiohttp.ClientSession() as http:
            yield agent, AgentClient(SignedClient(http, secret=SECRET.encode()))
    finally:
        assert await agent.stop() == 0, agent.read_log()


def blocker(seconds: float) -> JobRequest:
    return JobRequest(job_id="blocker", language="bash", code=f"sleep {seconds}; echo done")


async def test_job_past_its_deadline_is_not_started(
        one_slot: tuple[AgentProcess, AgentClient]) -> None:
    agent, agents = one_slot
    late = JobRequest(job_id="late", language="bash", code="echo late", attempt_id="a1",
                      deadline=time.time() - 1)
    with pytest.raises(RemoteError) as caught:
        await agents.run_job(agent.url, late, timeout_s=10)
    assert (caught.value.status, caught.value.remote_code) == (409, "cancelled")
    assert "deadline has passed" in caught.value.message
    assert "late" not in started_jobs(agent)


async def test_cancelled_attempt_is_stopped_and_refused_but_a_new_attempt_runs(
        one_slot: tuple[AgentProcess, AgentClient]) -> None:
    agent, agents = one_slot
    running = asyncio.create_task(agents.run_job(agent.url, blocker(2), timeout_s=30))
    queued_job = JobRequest(job_id="queued", language="bash", code="echo queued",
                            attempt_id="first", deadline=time.time() + 60)
    queued = asyncio.create_task(agents.run_job(agent.url, queued_job, timeout_s=30))
    await asyncio.sleep(0.5)
    answer = await agents.cancel(agent.url, ["first", "never-seen"], timeout_s=5)
    assert (answer.stopped, answer.refused) == (["first"], 2)
    with pytest.raises(RemoteError, match="cancelled") as caught:
        await queued
    assert caught.value.status == 409
    # The same attempt again is refused; the controller's next attempt is not.
    with pytest.raises(RemoteError, match="cancelled"):
        await agents.run_job(agent.url, queued_job, timeout_s=30)
    retried = JobRequest(job_id="queued", language="bash", code="echo queued",
                         attempt_id="second", deadline=time.time() + 60)
    assert (await agents.run_job(agent.url, retried, timeout_s=30)).stdout == "queued\n"
    assert (await running).stdout == "done\n"
    assert started_jobs(agent) == ["blocker", "queued"]


async def test_queued_attempt_whose_caller_hung_up_is_not_started(
        one_slot: tuple[AgentProcess, AgentClient]) -> None:
    agent, agents = one_slot
    running = asyncio.create_task(agents.run_job(agent.url, blocker(1.5), timeout_s=30))
    await asyncio.sleep(0.3)
    abandoned = JobRequest(job_id="abandoned", language="bash", code="echo no",
                           attempt_id="gone", deadline=time.time() + 60)
    with pytest.raises(NetworkError):
        await agents.run_job(agent.url, abandoned, timeout_s=0.5)
    assert (await running).stdout == "done\n"
    fresh = JobRequest(job_id="fresh", language="bash", code="echo fresh")
    assert (await agents.run_job(agent.url, fresh, timeout_s=30)).stdout == "fresh\n"
    assert started_jobs(agent) == ["blocker", "fresh"]
    assert "not starting job abandoned" in agent.read_log()


async def test_cell_past_its_deadline_or_cancelled_is_refused(
        one_slot: tuple[AgentProcess, AgentClient]) -> None:
    agent, agents = one_slot
    session = SessionCreate(session_id="s1")
    await agents.create_session(agent.url, session, timeout_s=30)
    late = CellRequest(cell_id="c1", code="print(1)", attempt_id="c1a",
                       deadline=time.time() - 1)
    with pytest.raises(RemoteError, match="deadline has passed"):
        await agents.execute(agent.url, session.session_id, late, timeout_s=30)
    await agents.cancel(agent.url, ["c2a"], timeout_s=5)
    cancelled = CellRequest(cell_id="c2", code="print(2)", attempt_id="c2a")
    with pytest.raises(RemoteError, match="cancelled"):
        await agents.execute(agent.url, session.session_id, cancelled, timeout_s=30)
    fine = CellRequest(cell_id="c3", code="print(3)", attempt_id="c3a",
                       deadline=time.time() + 60)
    result = await agents.execute(agent.url, session.session_id, fine, timeout_s=30)
    assert result.stdout == "3\n"
    with contextlib.suppress(RemoteError):
        await agents.delete_session(agent.url, session.session_id, timeout_s=10)


@pytest.mark.parametrize("why", ["cancelled", "deadline", "hung_up"])
async def test_cell_cancelled_or_expired_while_queued_in_its_session_never_runs(
        one_slot: tuple[AgentProcess, AgentClient], tmp_path: Path, why: str) -> None:
    agent, agents = one_slot
    session = SessionCreate(session_id="queued-cells")
    await agents.create_session(agent.url, session, timeout_s=30)
    long_cell = CellRequest(cell_id="long", code="import time\ntime.sleep(1.5)\nprint('long')",
                            attempt_id="long-a", deadline=time.time() + 60)
    running = asyncio.create_task(
        agents.execute(agent.url, session.session_id, long_cell, timeout_s=30))
    await asyncio.sleep(0.3)
    # It would leave a mark in the session and a file beside the agent's log.
    mark = tmp_path / "queued-cell-ran"
    queued_cell = CellRequest(
        cell_id="queued", code=f"ran = True\nopen({str(mark)!r}, 'w').close()",
        attempt_id="queued-a", deadline=time.time() + (0.6 if why == "deadline" else 60))
    queued = asyncio.create_task(agents.execute(
        agent.url, session.session_id, queued_cell, timeout_s=0.6 if why == "hung_up" else 30))
    await asyncio.sleep(0.3)
    assert not queued.done()
    if why == "cancelled":
        await agents.cancel(agent.url, ["queued-a"], timeout_s=5)
    if why == "hung_up":
        with pytest.raises(NetworkError):
            await queued
    else:
        with pytest.raises(RemoteError) as caught:
            await queued
        assert (caught.value.status, caught.value.remote_code) == (409, "cancelled")
        assert ("was cancelled by the controller" if why == "cancelled"
                else "its deadline has passed") in caught.value.message
    assert (await running).stdout == "long\n"
    check = CellRequest(cell_id="check", code="print(globals().get('ran', False))")
    assert (await agents.execute(agent.url, session.session_id, check,
                                 timeout_s=30)).stdout == "False\n"
    assert not mark.exists()
    await agents.delete_session(agent.url, session.session_id, timeout_s=10)


async def victim_and_other(tmp_path: Path, max_queued_jobs: int, log_level: str = "INFO"
                           ) -> tuple[AgentProcess, AgentProcess, Config]:
    """Two started agents, the victim running one job at a time, and a controller's config."""
    victim = AgentProcess(tmp_path, name="victim", log_level=log_level,
                          agent={"max_concurrent_jobs": 1, "max_queued_jobs": max_queued_jobs})
    other = AgentProcess(tmp_path, name="other")
    for agent in (victim, other):
        await agent.start()
    return victim, other, controller_config([victim, other], [], tmp_path,
                                            exo={"embedded": False},
                                            controller={"retry_max_attempts": 6})


async def test_resumed_agent_starts_no_job_given_elsewhere_and_answers_fresh_work_at_once(
        tmp_path: Path) -> None:
    victim, other, config = await victim_and_other(tmp_path, QUEUED + 8, log_level="DEBUG")
    try:
        async with running_controller(config) as controller:
            cluster = controller.cluster

            def health(agent: AgentProcess, wanted: str) -> bool:
                row = cluster.table.devices.get(DeviceId(agent.agent_id))
                return row is not None and row.health == wanted

            assert await cluster.wait_for(
                lambda t: health(victim, "healthy") and health(other, "healthy"), 15)
            # Everything queues on the victim while the other agent is away.
            other.signal(signal.SIGSTOP)
            assert await cluster.wait_for(lambda t: health(other, "unhealthy"), 15)
            jobs = [JobRequest(job_id=f"queued-{n}", language="bash",
                               code=f"sleep 0.3; echo {n}") for n in range(QUEUED + 1)]
            tasks = [asyncio.create_task(controller.dispatcher.run_job(job)) for job in jobs]
            assert await cluster.wait_for(
                lambda t: len(t.devices[DeviceId(victim.agent_id)].in_flight) >= QUEUED, 15)
            other.signal(signal.SIGCONT)
            assert await cluster.wait_for(lambda t: health(other, "healthy"), 15)

            victim.signal(signal.SIGSTOP)
            try:
                results = await asyncio.wait_for(asyncio.gather(*tasks), 90)
                # Every job was answered once; those the victim had not run went elsewhere.
                assert [r.stdout for r in results] == [f"{n}\n" for n in range(QUEUED + 1)]
                moved = {r.job_id for r in results if r.agent_id != victim.agent_id}
                assert len(moved) >= QUEUED - 5
                assert victim.agent_id in controller.dispatcher.awaiting_cancel
                started_before = started_jobs(victim)
            finally:
                victim.signal(signal.SIGCONT)

            assert await cluster.wait_for(
                lambda t: health(victim, "healthy")
                and victim.agent_id not in controller.dispatcher.awaiting_cancel, 15)
            sent = time.monotonic()
            fresh = await controller.dispatcher.agents.run_job(
                victim.url, JobRequest(job_id="fresh", language="bash", code="echo fresh"),
                timeout_s=30)
            latency_s = time.monotonic() - sent
            assert fresh.stdout == "fresh\n"
            # Behind 50 stale jobs of 0.3 s it would wait about 15 s.
            assert latency_s < 3.0, latency_s
            await asyncio.sleep(1.0)
            started_after = started_jobs(victim)[len(started_before):]
            assert started_after == ["fresh"], started_after
    finally:
        for agent in (victim, other):
            await agent.stop()


async def test_an_agent_that_died_with_moved_attempts_is_warned_about_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    victim, other, config = await victim_and_other(tmp_path, 20)
    try:
        async with running_controller(config) as controller:
            cluster = controller.cluster
            victim_id = DeviceId(victim.agent_id)
            assert await cluster.wait_for(lambda t: len(t.devices) == 2 and all(
                row.health == "healthy" for row in t.devices.values()), 15)
            jobs = [JobRequest(job_id=f"moving-{n}", language="bash", code=f"sleep 1; echo {n}")
                    for n in range(8)]
            tasks = [asyncio.create_task(controller.dispatcher.run_job(job)) for job in jobs]
            assert await cluster.wait_for(
                lambda t: len(t.devices[victim_id].in_flight) >= 2, 15)
            caplog.set_level("DEBUG", logger="kowalski.controller.fleet.dispatch")
            await victim.kill()
            results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
            assert sorted(r.stdout for r in results) == sorted(f"{n}\n" for n in range(8))
            assert await cluster.wait_for(
                lambda t: (row := t.devices.get(victim_id)) is None or row.health != "healthy",
                15)
            # Every heartbeat of the other agent retried the cancel on the dead one.
            await asyncio.sleep(1.0)
    finally:
        await other.stop()
    failed = [r for r in caplog.records if r.getMessage().startswith("could not cancel")
              and victim.agent_id in r.getMessage()]
    assert [r.levelname for r in failed if r.levelname == "WARNING"] == ["WARNING"]
