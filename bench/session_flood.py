"""An agent's peak memory while every one of its sessions floods its output and control pipe."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import aiohttp
from procs import SECRET

from bench.cluster import agents
from bench.report import Section, Table, Target, fmt
from kowalski.common.client import SignedClient
from kowalski.common.config import AgentConfig, SandboxConfig
from kowalski.common.messages import CellRequest, CellResult, SessionCreate, SessionId
from kowalski.controller.fleet.agent_client import AgentClient

TARGET_MIB = 100.0
SAMPLE_INTERVAL_S = 0.005
# Written by every session, in MiB: captured stdout, raw fd 1, then the control pipe.
FLOOD_MIB = 64
QUICK_FLOOD_MIB = 8
FLOOD = """import os, sys
chunk = 'y' * (1 << 20)
for _ in range({mib}):
    sys.stdout.write(chunk)
    os.write(1, chunk.encode())
fd = int(sys.argv[2])
for _ in range({mib}):
    os.write(fd, b'x' * (1 << 20))
"""


def rss_mib(pid: int) -> float:
    """Resident memory from /proc (VmRSS), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class Sampler:
    """Reads a process's RSS every few milliseconds on a thread until stopped."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(rss_mib(self.pid))
            time.sleep(SAMPLE_INTERVAL_S)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


async def measure(tmp: Path, quick: bool) -> list[Section]:
    sessions = AgentConfig().max_sessions
    cap = SandboxConfig().max_output_bytes
    mib = QUICK_FLOOD_MIB if quick else FLOOD_MIB
    async with agents(tmp, 1) as [agent], aiohttp.ClientSession() as http:
        assert agent.process is not None
        pid = agent.process.pid
        client = AgentClient(SignedClient(http, secret=SECRET.encode()))
        beat = await client.heartbeat(agent.url, timeout_s=30)
        await asyncio.sleep(1.0)
        idle_mib = rss_mib(pid)
        names = [SessionId(f"flood{n}") for n in range(sessions)]
        await asyncio.gather(*(client.create_session(agent.url, SessionCreate(session_id=name),
                                                     timeout_s=60) for name in names))
        sessions_mib = rss_mib(pid)
        started = time.perf_counter()
        with Sampler(pid) as sampler:
            results: list[CellResult] = await asyncio.gather(*(
                client.execute(agent.url, name, CellRequest(cell_id="flood",
                                                            code=FLOOD.format(mib=mib)),
                               timeout_s=120) for name in names))
        flood_s = time.perf_counter() - started
        await asyncio.sleep(1.0)
        after_mib = rss_mib(pid)
        after = await client.create_session(agent.url, SessionCreate(session_id="after"),
                                            timeout_s=60)
        check = await client.execute(agent.url, after.session_id,
                                     CellRequest(cell_id="c1", code="print(6 * 7)"),
                                     timeout_s=60)
    codes = [result.error.code if result.error else result.status for result in results]
    limited = codes.count("output_limit")
    peak_mib = max(sampler.samples)
    written_gib = sessions * mib * 3 / 1024
    rows = [["idle agent, no sessions", fmt(idle_mib, 1)],
            [f"{sessions} idle sessions open", fmt(sessions_mib, 1)],
            [f"peak while {sessions} sessions flood ({len(sampler.samples)} samples)",
             fmt(peak_mib, 1)],
            ["1 s after the flood", fmt(after_mib, 1)]]
    outcome = [[str(code), str(codes.count(code))] for code in sorted(set(codes))]
    method = (
        f"One real agent process (sandbox mode `{beat.sandbox_mode}`, shipped limits: "
        f"`max_sessions` {sessions}, `max_output_bytes` {cap:,}). {sessions} persistent "
        f"sessions each run one cell, all at once, that writes {mib} MiB through "
        f"`sys.stdout`, {mib} MiB straight to the driver's fd 1, then {mib} MiB to its "
        "control pipe (the reply fd, a line with no end), 1 MiB per write: "
        f"{fmt(written_gib, 1)} GiB in all. The agent's RSS is read from "
        f"`/proc/PID/status` every {SAMPLE_INTERVAL_S * 1000:g} ms on a thread of the "
        "harness while the cells run.")
    notes = [f"The flood took {fmt(flood_s, 2)} s. Each cell should end with the error "
             f"`output_limit` (the session is killed); {limited} of {sessions} did. A new "
             f"session afterwards printed {check.stdout.strip()!r}.",
             f"The agent's own ceiling: per session its stream reader holds at most twice "
             f"the longest control line (2 x `max_output_bytes` + 64 KiB) before it stops "
             f"reading the pipe, and it keeps at most `max_output_bytes` of stray output per "
             f"stream (fd 1 and fd 2), so {sessions} sessions may buffer about "
             f"{fmt(sessions * (2 * (2 * cap + 65536) + 2 * cap) / 2**20, 0)} MiB at worst "
             "on top of the idle agent."]
    return [Section(
        key="session_flood",
        title=f"Agent memory while {sessions} sessions flood their pipes",
        method=method,
        tables=[Table(headers=["agent", "RSS MiB"], rows=rows),
                Table(headers=["cell error code", "sessions"], rows=outcome)],
        targets=[Target(f"agent peak RSS, {sessions} sessions flooding", peak_mib,
                        TARGET_MIB, "MiB"),
                 Target("flooding cells not ended by output_limit", float(sessions - limited),
                        0.0, "cells")],
        raw={"agent RSS (MiB), every 20th sample": sampler.samples[::20]},
        notes=notes)]

