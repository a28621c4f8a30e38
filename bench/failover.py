"""Failure detection at default settings: SIGKILL an agent mid-job, time the way back."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from pathlib import Path

from procs import AgentProcess

from bench.cluster import agents, controller, controller_config, default_timers
from bench.report import Section, Table, Target, fmt, p50, spread
from kowalski.common.messages import JobRequest
from kowalski.controller.service import Controller

TARGET_S = 3.0
JOB_S = 1.0


@dataclass(frozen=True)
class Trial:
    """Seconds, all from one kill."""

    detected: float
    finished: float
    # The re-run's own time on the other agent.
    rerun: float
    # How old the last good heartbeat was at the kill, and at the verdict.
    beat_age_at_kill: float
    beat_age_at_verdict: float


async def _trial(running: Controller, victims: dict[str, AgentProcess], number: int,
                 rng: random.Random) -> Trial:
    cluster = running.cluster
    job_id = f"failover-{number}"
    job = JobRequest(job_id=job_id, language="python",
                     code=f"import time\ntime.sleep({JOB_S})\nprint('done')")
    # A random phase against the heartbeat rounds, which start with the controller.
    await asyncio.sleep(rng.uniform(0, running.config.controller.heartbeat_interval_s))
    task = asyncio.create_task(running.dispatcher.run_job(job))
    # The result may land before the detector gives up on the agent: note when it does.
    landed: list[float] = []
    task.add_done_callback(lambda _: landed.append(time.perf_counter()))
    try:
        if not await cluster.wait_for(
                lambda t: any(job_id in row.in_flight for row in t.devices.values()), 10):
            raise RuntimeError("the job was not assigned to any agent")
        victim_id = next(d for d, row in cluster.table.devices.items() if job_id in row.in_flight)
        victim = victims[victim_id]
        # A random moment within the job, so the kill falls anywhere between two heartbeats.
        await asyncio.sleep(rng.uniform(0.1, JOB_S * 0.6))
        killed_at, killed_clock = time.perf_counter(), cluster.clock()
        await victim.kill()
        if not await cluster.wait_for(
                lambda t: t.devices[victim_id].health == "unhealthy", timeout_s=15):
            raise RuntimeError(f"{victim_id} was not judged unhealthy within 15 s")
        detected_s, verdict_clock = time.perf_counter() - killed_at, cluster.clock()
        last_beat = cluster.table.devices[victim_id].last_heartbeat_at or killed_clock
        result = await asyncio.wait_for(task, 60)
        finished_s = landed[0] - killed_at
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if result.status != "ok" or result.agent_id == victim_id:
        raise RuntimeError(f"the job ended {result.status} on {result.agent_id}")
    await victim.start(timeout_s=60)
    if not await cluster.wait_for(lambda t: t.devices[victim_id].health == "healthy", 30):
        raise RuntimeError(f"{victim_id} did not come back")
    return Trial(detected=detected_s, finished=finished_s,
                 rerun=(result.wall_time_ms or 0.0) / 1000,
                 beat_age_at_kill=killed_clock - last_beat,
                 beat_age_at_verdict=verdict_clock - last_beat)


async def measure(tmp: Path, quick: bool) -> list[Section]:
    count = 1 if quick else 9
    rng = random.Random(7)
    trials: list[Trial] = []
    async with agents(tmp, 2) as started:
        config = controller_config(tmp, agents=[f"127.0.0.1:{a.port}" for a in started])
        if not default_timers(config):
            raise RuntimeError("the shipped heartbeat defaults changed; update the benchmark")
        victims = {agent.agent_id: agent for agent in started}
        for number in range(count):
            # A fresh controller per trial: kills count against the agent's circuit breaker,
            # which a restarted agent would otherwise inherit from the trials before.
            async with controller(config, expect_agents=2) as running:
                trials.append(await _trial(running, victims, number, rng))
    detected = [trial.detected for trial in trials]
    moved = [trial.finished - trial.rerun for trial in trials]
    verdict_ages = [trial.beat_age_at_verdict for trial in trials]
    settings = config.controller
    targets = [Target("kill → unhealthy p50", p50(detected), TARGET_S, "s"),
               Target("kill → job moved to another agent p50", p50(moved), TARGET_S, "s")]
    notes = [
        "Detection over the failure timeout (p50): "
        f"{fmt(p50(detected) / settings.failure_timeout_s)}. The job does not wait for the "
        "verdict: the agent's death resets the job's connection, and the dispatcher retries "
        "it on the other agent at once.",
    ]
    late = [age for age in verdict_ages
            if age >= settings.failure_timeout_s + settings.heartbeat_interval_s / 2]
    if late:
        notes.append(
            f"Why detection can pass {TARGET_S:g} s: in {len(late)} of {count} trials the "
            f"verdict came {fmt(p50(late))} s after the last good heartbeat, one poll round "
            f"later than the {settings.failure_timeout_s:g} s timeout. The detector checks "
            "staleness only at the end of each poll round (every "
            f"{settings.heartbeat_interval_s:g} s), and it compares the round's time with the "
            "moment the last good heartbeat *arrived*, so the round that falls exactly "
            f"{settings.failure_timeout_s:g} s later can miss by the heartbeat's own round-trip "
            "(milliseconds); the agent is then judged a whole round later.")
    return [Section(
        key="failover", title="Failure detection at default settings",
        method=(
            f"Two real agent processes and the controller at the shipped settings "
            f"(heartbeat every {settings.heartbeat_interval_s:g} s, unhealthy after "
            f"{settings.failure_timeout_s:g} s without one, heartbeat timeout "
            f"{settings.heartbeat_timeout_s:g} s, retry base delay "
            f"{settings.retry_base_delay_ms} ms). A {JOB_S:g} s Python job goes through the "
            "dispatcher at a random moment of the heartbeat round; at a random moment within "
            "the job the agent running it gets SIGKILL. "
            "Timed from the kill: until the device table marks the agent unhealthy, and until "
            "the job's result arrives from the other agent (also shown less the re-run's own "
            f"time there). {count} trials, each with a fresh controller; the killed agent is "
            "restarted between them."),
        tables=[Table(headers=["interval", "s: p50 (p90, min-max)"], rows=[
            ["SIGKILL → agent marked unhealthy", spread(detected)],
            ["SIGKILL → job result from the other agent", spread([t.finished for t in trials])],
            ["  less the re-run's own time (job moved elsewhere)", spread(moved)],
            ["age of the last good heartbeat at the kill",
             spread([t.beat_age_at_kill for t in trials])],
            ["last good heartbeat → unhealthy", spread(verdict_ages)],
        ])],
        targets=targets, notes=notes,
        raw={"kill → unhealthy (s)": detected,
             "kill → result (s)": [trial.finished for trial in trials],
             "re-run time (s)": [trial.rerun for trial in trials],
             "last heartbeat → unhealthy (s)": verdict_ages},
    )]
