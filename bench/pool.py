"""Cold Python jobs with the sandbox pool warm and empty, against a bare python spawn."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from pathlib import Path

import aiohttp
import psutil
from procs import SECRET, AgentProcess

from bench.cluster import agents, controller, controller_config
from bench.report import Section, Table, Target, fmt, p50, spread
from bench.spawn import DEVNULL, run_process
from kowalski.agent.sandbox import Sandbox
from kowalski.common.client import SignedClient
from kowalski.common.config import SandboxConfig, SandboxMode
from kowalski.common.messages import Heartbeat, JobRequest
from kowalski.controller.fleet.dispatch import Dispatcher

WARM_TARGET_MS = 20.0
WARM_RATIO_TARGET = 1.2
EMPTY_TARGET_MS = 35.0
RSS_TARGET_MIB = 38.0
MIB = 1 << 20
PROGRAM = "print(1)\n"


async def _job(dispatcher: Dispatcher, name: str, ids: itertools.count[int]) -> float:
    """One cold Python job through the dispatcher; the agent's own wall time for it."""
    request = JobRequest(job_id=f"bench-pool-{name}-{next(ids)}", language="python",
                         code=PROGRAM)
    result = await dispatcher.run_job(request)
    if result.status != "ok" or result.stdout != "1\n":
        raise RuntimeError(f"the job ended {result.status}: {result.stderr[-300:]}")
    return result.wall_time_ms or 0.0


async def _pool_full(client: SignedClient, agent: AgentProcess, timeout_s: float = 30) -> None:
    """Wait until the agent's heartbeat says every sandbox of its pool is ready."""
    deadline = time.monotonic() + timeout_s
    while True:
        beat = await client.call("GET", agent.url + "/v1/heartbeat", Heartbeat, timeout_s=5)
        if beat.pool_size and beat.pool_ready >= beat.pool_size:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the pool holds {beat.pool_ready} of {beat.pool_size}")
        await asyncio.sleep(0.01)


def _rss_mib(agent: AgentProcess) -> tuple[float, float, int]:
    """(agent RSS, RSS of all its children, how many children) in MiB."""
    assert agent.process is not None
    process = psutil.Process(agent.process.pid)
    children = process.children(recursive=True)
    return (process.memory_info().rss / MIB,
            sum(child.memory_info().rss for child in children) / MIB, len(children))


class _Laps:
    """Milliseconds between successive marks, collected by name over the rounds."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {}
        self._last = time.perf_counter()
        self.keep = False

    def start(self) -> None:
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        if self.keep:
            self.samples.setdefault(name, []).append((now - self._last) * 1000)
        self._last = now


async def _steps(tmp: Path, mode: SandboxMode, repeats: int) -> dict[str, list[float]]:
    """The steps of a pooled and of a fresh Python job's sandbox, timed in this process."""
    sandbox = Sandbox(SandboxConfig(mode=mode, pool_size=1), work_root=tmp / "steps")
    await sandbox.start()
    laps = _Laps()
    files = {"main.py": PROGRAM.encode()}
    pipe = asyncio.subprocess.PIPE
    try:
        pool = sandbox.pool
        assert pool is not None
        toolchain = sandbox.toolchain("python")
        for round_number in range(repeats + 1):
            laps.keep = round_number > 0
            await pool.wait_ready()
            laps.start()
            handle = await pool.take("python", files)
            assert handle is not None
            laps.lap("pooled: take (write main.py, send the go)")
            await handle.wait_exit()
            laps.lap("pooled: run until the job's exit")
            await handle.stop()
            laps.lap("pooled: stop (kill the process group and cgroup)")
            await handle.release()
            laps.lap("pooled: remove cgroup and work dir")
            # As the agent does at a job's end; the next job does not wait for it.
            pool.refill()
            await pool.wait_ready()
            laps.lap("pool refill: a new ready sandbox, in the background after the job")
            laps.start()
            fresh = await sandbox.spawn("bench-fresh", toolchain, toolchain.run_argv(),
                                        files=files, stdin=DEVNULL, stdout=pipe, stderr=pipe)
            laps.lap("fresh: spawn (work dir, cgroup, launcher started)")
            await fresh.wait_exit()
            laps.lap("fresh: run until the job's exit (bwrap, setpriv, python)")
            await fresh.stop()
            laps.lap("fresh: stop")
            await fresh.release()
            laps.lap("fresh: remove cgroup and work dir")
    finally:
        await sandbox.close()
    return laps.samples


async def measure(tmp: Path, quick: bool) -> list[Section]:
    repeats = 5 if quick else 40
    mode: SandboxMode = "bwrap" if os.geteuid() == 0 else "rlimit"
    settle_s = 1.0 if quick else 5.0
    ids = itertools.count()
    samples: dict[str, list[float]] = {"bare": [], "warm": [], "empty": [],
                                       "warm inside": [], "empty inside": []}
    probe = Sandbox(SandboxConfig(mode=mode, pool_size=0), work_root=tmp / "probe")
    await probe.start()
    python = probe.toolchain("python").executable
    await probe.close()
    # No warm sessions: their processes would count as the pool's (bench/session_open.py).
    quiet = {"warm_sessions": 0}
    async with (agents(tmp, 1, prefix="pooled", agent_settings=quiet) as (pooled,),
                agents(tmp, 1, prefix="unpooled", agent_settings=quiet, pool_size=0) as (plain,),
                aiohttp.ClientSession() as session):
        client = SignedClient(session, secret=SECRET.encode())
        await _pool_full(client, pooled)
        await asyncio.sleep(settle_s)
        rss_on, children_rss, children = _rss_mib(pooled)
        rss_off, _, plain_children = _rss_mib(plain)
        if plain_children:
            raise RuntimeError("the agent without a pool has child processes when idle")
        with_pool = controller_config(tmp / "with", agents=[f"127.0.0.1:{pooled.port}"])
        without = controller_config(tmp / "without", agents=[f"127.0.0.1:{plain.port}"])
        async with (controller(with_pool, expect_agents=1) as warm_controller,
                    controller(without, expect_agents=1) as empty_controller):
            for round_number in range(repeats + 1):
                # Not timed: the pool refills between jobs, as it does between an agent's
                # jobs that are not back to back.
                await _pool_full(client, pooled)
                timings = {}
                started = time.perf_counter()
                await run_process([python, "-c", "print(1)"])
                timings["bare"] = (time.perf_counter() - started) * 1000
                # The fresh sandbox before the pooled job: after that job the first agent
                # refills its pool, a python start that would compete for the same CPUs.
                started = time.perf_counter()
                inside = await _job(empty_controller.dispatcher, "empty", ids)
                timings["empty"] = (time.perf_counter() - started) * 1000
                timings["empty inside"] = inside
                started = time.perf_counter()
                inside = await _job(warm_controller.dispatcher, "warm", ids)
                timings["warm"] = (time.perf_counter() - started) * 1000
                timings["warm inside"] = inside
                if round_number:
                    for name, value in timings.items():
                        samples[name].append(value)
    steps = await _steps(tmp, mode, repeats)
    bare, warm, empty = samples["bare"], samples["warm"], samples["empty"]
    rows = [
        ["bare `python3 -c 'print(1)'` spawn", spread(bare), "1.00"],
        ["cold job `print(1)` via dispatcher, pool warm", spread(warm),
         fmt(p50(warm) / p50(bare))],
        ["  of which inside the agent (its wall_time_ms)", spread(samples["warm inside"]), ""],
        ["cold job `print(1)` via dispatcher, no pool (a fresh sandbox)", spread(empty),
         fmt(p50(empty) / p50(bare))],
        ["  of which inside the agent (its wall_time_ms)", spread(samples["empty inside"]),
         ""],
    ]
    memory = [
        ["idle agent, pool of 2 ready Python sandboxes", fmt(rss_on, 1)],
        ["idle agent, no pool", fmt(rss_off, 1)],
        [f"the pool's {children} processes (launcher, bwrap, setpriv, python; RSS summed, "
         "shared pages counted in each)", fmt(children_rss, 1)],
    ]
    section = Section(
        key="pool", title="Cold Python jobs with the sandbox pool warm and empty",
        method=(
            f"Two real agent processes (sandbox mode `{mode}`, shipped limits): one with the "
            "default pool (`pool_size = 2`, python), one with `pool_size = 0`, each behind "
            "its own controller in the harness process. Each round spawns a bare "
            "`python3 -c 'print(1)'` with the interpreter the agent resolved, then runs a new "
            "Python job `print(1)` through `Dispatcher.run_job` on the agent without a pool, "
            "then on the one with it (whose refill after the job would otherwise compete "
            "with the next measurement); before the "
            "round the harness waits (untimed) until the first agent's heartbeat says its "
            f"pool is full again. {repeats} rounds after one warm-up round. Memory: RSS of "
            f"each idle agent process {settle_s:g} s after its pool filled, and of the pool's "
            "processes. The steps are timed in the harness with the agent's own `Sandbox` "
            "(a pool of one), the same number of rounds."),
        tables=[
            Table(headers=["what", "ms: p50 (p90, min-max)", "ratio to bare python"],
                  rows=rows),
            Table(headers=["memory", "MiB"], rows=memory),
            Table(headers=["step", "ms: p50 (p90, min-max)"],
                  rows=[[name, spread(values)] for name, values in steps.items()]),
        ],
        targets=[
            Target("cold job p50, pool warm", p50(warm), WARM_TARGET_MS, "ms"),
            Target("cold job p50 with the pool warm / bare python spawn p50",
                   p50(warm) / p50(bare), WARM_RATIO_TARGET, "x"),
            Target("cold job p50, pool empty", p50(empty), EMPTY_TARGET_MS, "ms"),
            Target("idle agent RSS with the pool", rss_on, RSS_TARGET_MIB, "MiB"),
        ],
        raw={"bare python (ms)": bare, "cold job, pool warm (ms)": warm,
             "cold job, no pool (ms)": empty,
             "pool warm, inside the agent (ms)": samples["warm inside"],
             "no pool, inside the agent (ms)": samples["empty inside"],
             "idle agent RSS with the pool (MiB)": [rss_on],
             "idle agent RSS without the pool (MiB)": [rss_off],
             **{f"{name} (ms)": values for name, values in steps.items()}},
    )
    return [section]
