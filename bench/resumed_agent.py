"""A fresh job's latency on an agent just resumed from SIGSTOP with a queue given elsewhere."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from procs import AgentProcess

from bench.cluster import agents, controller, controller_config
from bench.report import Section, Table, Target, p50, spread
from kowalski.common.messages import DeviceId, JobRequest
from kowalski.controller.service import Controller

TARGET_S = 1.0
QUEUED = 50


def _health(running: Controller, agent: AgentProcess, wanted: str) -> bool:
    row = running.cluster.table.devices.get(DeviceId(agent.agent_id))
    return row is not None and row.health == wanted


async def _fresh_job_s(running: Controller, agent: AgentProcess, name: str) -> float:
    sent = time.perf_counter()
    result = await running.dispatcher.agents.run_job(
        agent.url, JobRequest(job_id=name, language="bash", code="echo fresh"), timeout_s=60)
    if result.stdout != "fresh\n":
        raise RuntimeError(f"the fresh job ended {result.status}: {result.stderr[:200]}")
    return time.perf_counter() - sent


async def _trial(running: Controller, victim: AgentProcess, other: AgentProcess,
                 number: int) -> tuple[float, float, float]:
    """(fresh job on the resumed agent, on the other agent, resume → cancel done), seconds."""
    cluster = running.cluster
    other.signal(signal.SIGSTOP)
    try:
        if not await cluster.wait_for(lambda t: _health(running, other, "unhealthy"), 30):
            raise RuntimeError("the paused agent was not judged unhealthy")
        jobs = [JobRequest(job_id=f"trial{number}-{n}", language="bash",
                           code="sleep 0.2; echo queued") for n in range(QUEUED + 1)]
        tasks = [asyncio.create_task(running.dispatcher.run_job(job)) for job in jobs]
        if not await cluster.wait_for(
                lambda t: len(t.devices[DeviceId(victim.agent_id)].in_flight) >= QUEUED, 30):
            raise RuntimeError("the jobs did not queue on one agent")
    finally:
        other.signal(signal.SIGCONT)
    if not await cluster.wait_for(lambda t: _health(running, other, "healthy"), 30):
        raise RuntimeError("the resumed agent did not come back")
    victim.signal(signal.SIGSTOP)
    try:
        results = await asyncio.wait_for(asyncio.gather(*tasks), 120)
    finally:
        victim.signal(signal.SIGCONT)
        resumed = time.perf_counter()
    if any(r.stdout != "queued\n" for r in results):
        raise RuntimeError("a queued job was not answered")
    if not await cluster.wait_for(
            lambda t: _health(running, victim, "healthy")
            and DeviceId(victim.agent_id) not in running.dispatcher.awaiting_cancel, 30):
        raise RuntimeError("the resumed agent was not cleared")
    cleared = time.perf_counter() - resumed
    on_victim = await _fresh_job_s(running, victim, f"fresh-{number}")
    on_other = await _fresh_job_s(running, other, f"fresh-other-{number}")
    return on_victim, on_other, cleared


async def measure(tmp: Path, quick: bool) -> list[Section]:
    count = 1 if quick else 5
    trials = []
    cancelled = 0
    async with agents(tmp, 2) as (victim, other):
        config = controller_config(tmp, agents=[f"127.0.0.1:{a.port}" for a in (victim, other)])
        for number in range(count):
            # A fresh controller per trial: the moved jobs count against the paused agent's
            # circuit breaker, which would keep it from work in the next trial.
            async with controller(config, expect_agents=2) as running:
                trials.append(await _trial(running, victim, other, number))
                cancelled += running.dispatcher.counters.cancelled_on_return
    fresh = [t[0] for t in trials]
    return [Section(
        key="resumed_agent", title="Fresh work on an agent resumed from SIGSTOP",
        method=(
            "Two real agent processes and the controller at the shipped settings. While one "
            f"agent is paused, {QUEUED + 1} bash jobs of 0.2 s go through the dispatcher and "
            "queue on the other; that one then gets SIGSTOP, the controller judges it down and "
            "answers every job on the first, and it gets SIGCONT once all are answered. "
            "Timed: from SIGCONT until the controller has cancelled the moved attempts there, "
            "then a fresh `echo` job sent straight to the resumed agent, and the same on the "
            f"other agent as the baseline. {count} trials, each with a fresh controller."),
        tables=[Table(headers=["interval", "s: p50 (p90, min-max)"], rows=[
            ["fresh job on the resumed agent", spread(fresh)],
            ["fresh job on the other agent (baseline)", spread([t[1] for t in trials])],
            ["SIGCONT → moved attempts cancelled", spread([t[2] for t in trials])],
        ])],
        targets=[Target("fresh job on an agent just resumed from SIGSTOP p50", p50(fresh),
                        TARGET_S, "s")],
        notes=[f"Queued jobs stopped on the resumed agents by the cancel call: {cancelled} "
               "(the rest were dropped by the agent itself, their callers having hung up)."],
        raw={"fresh job on the resumed agent (s)": fresh})]
