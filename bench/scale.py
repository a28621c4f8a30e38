"""Scale: the controller daemon polling many agents, device selection, an idle agent's memory."""

from __future__ import annotations

import asyncio
import random
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from procs import SECRET

from bench.cluster import ServerProcess, agents, controller_config
from bench.fleet import SERVED_PATH
from bench.report import Section, Table, Target, fmt, p50, percentile
from kowalski.common import config as config_module
from kowalski.common.config import AgentConfig, ControllerConfig
from kowalski.common.messages import DeviceId, Heartbeat, Metrics
from kowalski.controller.fleet.device_table import (
    DeviceDiscovered,
    DeviceTable,
    HeartbeatReceived,
    TableSettings,
    apply,
)
from kowalski.controller.fleet.selection import select

CPU_TARGET_CORES = 0.5
SELECT_TARGET_MS = 1.0
RSS_TARGET_MIB = 40.0
MIB = 1 << 20


async def _get(url: str) -> Any:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        response.raise_for_status()
        return await response.json()


class _Daemon:
    """`kowalski-ctl serve` as a child process, with static agents and default timers."""

    def __init__(self, tmp: Path, name: str, ports: list[int]) -> None:
        self.tmp = tmp
        self.process = ServerProcess(tmp, name)
        self.ports = ports
        self.url = ""

    async def start(self) -> None:
        config = controller_config(self.tmp / self.process.name,
                                   agents=[f"127.0.0.1:{port}" for port in self.ports])
        path = self.tmp / f"{self.process.name}.toml"
        path.write_text(config_module.dumps(config))
        ports = await self.process.start(
            ["-m", "kowalski.controller", "--config", str(path), "serve", "--port-file",
             str(self.process.port_file), "--log-level", "WARNING"],
            env={"KOWALSKI_SECRET": SECRET})
        self.url = f"http://127.0.0.1:{ports[0]}"

    async def healthy(self) -> int:
        devices = await _get(self.url + "/v1/devices")
        return sum(1 for device in devices if device["health"] == "healthy")

    async def usage(self, window_s: float) -> tuple[float, float]:
        """(CPU cores used over the window, RSS in MiB at its end)."""
        process = psutil.Process(self.process.pid)
        before, started = process.cpu_times(), time.perf_counter()
        await asyncio.sleep(window_s)
        after, elapsed = process.cpu_times(), time.perf_counter() - started
        used = (after.user + after.system) - (before.user + before.system)
        return used / elapsed, process.memory_info().rss / MIB


async def _wait_healthy(daemon: _Daemon, count: int, timeout_s: float) -> float:
    started = time.perf_counter()
    deadline = started + timeout_s
    while (healthy := await daemon.healthy()) < count:
        if time.perf_counter() > deadline:
            devices = await _get(daemon.url + "/v1/devices")
            errors = sorted({str(device.get("last_error", "")) for device in devices})[:3]
            raise RuntimeError(f"only {healthy} of {count} simulated agents became healthy "
                               f"within {timeout_s:g} s ({len(devices)} in the table; errors: "
                               f"{errors}); the controller logged: "
                               f"{daemon.process.log_path.read_text()[-1500:]}")
        await asyncio.sleep(0.5)
    return time.perf_counter() - started


async def _controller_rows(tmp: Path, count: int, window_s: float
                           ) -> tuple[list[list[str]], list[Target], dict[str, list[float]],
                                      list[str]]:
    idle = _Daemon(tmp, "controller-idle", [])
    await idle.start()
    try:
        idle_cpu, idle_rss = await idle.usage(window_s)
    finally:
        await idle.process.stop()
    fleet = ServerProcess(tmp, "fleet")
    ports = await fleet.start(["-m", "bench.fleet", "--port-file", str(fleet.port_file),
                               "--count", str(count)], env={"KOWALSKI_SECRET": SECRET})
    daemon = _Daemon(tmp, "controller", ports)
    try:
        await daemon.start()
        ramp_s = await _wait_healthy(daemon, count, 120)
        served_url = f"http://127.0.0.1:{ports[0]}{SERVED_PATH}"
        served_before = (await _get(served_url))["served"]
        fleet_before = psutil.Process(fleet.pid).cpu_times()
        started = time.perf_counter()
        cpu, rss = await daemon.usage(window_s)
        fleet_after = psutil.Process(fleet.pid).cpu_times()
        rate = ((await _get(served_url))["served"] - served_before) / (
            time.perf_counter() - started)
        still_healthy = await daemon.healthy()
    finally:
        await daemon.process.stop()
        await fleet.stop()
    fleet_cpu = ((fleet_after.user + fleet_after.system)
                 - (fleet_before.user + fleet_before.system)) / window_s
    rows = [
        ["controller, no agents (baseline)", fmt(idle_cpu, 3), fmt(idle_rss, 1), "", ""],
        [f"controller, {count} simulated agents", fmt(cpu, 3), fmt(rss, 1), fmt(rate, 0),
         f"{still_healthy} / {count}"],
        ["the simulated agents' process (for scale)", fmt(fleet_cpu, 3), "", "", ""],
    ]
    notes = [f"All {count} agents were healthy {ramp_s:.1f} s after the controller started.",
             f"Controller CPU per heartbeat: {fmt((cpu - idle_cpu) / max(rate, 1) * 1e6, 0)} µs."]
    raw = {"controller cores": [cpu], "controller idle cores": [idle_cpu],
           "heartbeats/s": [rate]}
    targets = [Target(f"controller CPU with {count} agents", cpu, CPU_TARGET_CORES, "cores",
                      "<")]
    return rows, targets, raw, notes


def _table(count: int) -> DeviceTable:
    """A device table of `count` healthy agents with varied latency and free memory."""
    rng = random.Random(3)
    table = DeviceTable(settings=TableSettings.from_config(ControllerConfig()))
    for n in range(count):
        device_id = DeviceId(f"sim-{n}")
        table = apply(table, DeviceDiscovered(device_id=device_id, name=device_id,
                                              url=f"http://127.0.0.1:{10000 + n}",
                                              source="static", at=0.0))
        metrics = Metrics(memory_total_bytes=16 << 30,
                          memory_available_bytes=int((16 << 30) * rng.uniform(0.2, 0.9)),
                          cpu_percent=rng.uniform(0, 100), cpu_count=8, load_1m=1.0,
                          load_5m=1.0, load_15m=1.0)
        beat = Heartbeat(agent_id=device_id, name=device_id, version="0.1.0", started_at=0.0,
                         sent_at=0.0, seq=0, sandbox_mode="bwrap",
                         languages=["bash", "python"] if n % 2 else ["java", "python"],
                         metrics=metrics, jobs_running=0, jobs_queued=0, sessions=0)
        table = apply(table, HeartbeatReceived(device_id=device_id, heartbeat=beat,
                                               rtt_ms=rng.uniform(0.2, 5.0), at=0.5))
    return table


def _selection(count: int, repeats: int) -> list[float]:
    """Milliseconds per `select` over `count` rows, for code jobs in one language."""
    table = _table(count)
    samples = []
    for n in range(repeats):
        language = "bash" if n % 2 else "python"
        started = time.perf_counter()
        select(table, "code_execution", language=language, now=1.0)
        samples.append((time.perf_counter() - started) * 1000)
    return samples


async def _agent_rss(tmp: Path, settle_s: float
                     ) -> tuple[float, float, float, float, float]:
    """(agent RSS, agent USS, bare interpreter RSS, interpreter with the agent's imports,
    the warm sessions' processes RSS) MiB."""
    # Without the sandbox pool, whose ready sandboxes are the agent's children (bench/pool.py
    # measures the agent with it).
    async with agents(tmp, 1, pool_size=0) as started:
        assert started[0].process is not None
        await asyncio.sleep(settle_s)
        process = psutil.Process(started[0].process.pid)
        children = process.children(recursive=True)
        drivers = [child for child in children
                   if "python" in child.name() and "repl_driver.py" in child.cmdline()]
        # Its warm sessions (agent.warm_sessions, shipped at 1) are all an idle agent runs.
        if len(drivers) != AgentConfig().warm_sessions or (children and not drivers):
            raise RuntimeError(f"the idle agent runs {len(children)} child processes, "
                               f"{len(drivers)} of them session drivers")
        rss, uss = process.memory_info().rss / MIB, process.memory_full_info().uss / MIB
        warm = sum(child.memory_info().rss for child in children) / MIB
    bare = await _interpreter_rss("import time; time.sleep(30)")
    imports = await _interpreter_rss("import kowalski.agent.main, time; time.sleep(30)")
    return rss, uss, bare, imports, warm


# Imported in this order by a fresh interpreter to see what each adds to its memory.
_IMPORTS = ["asyncio", "msgspec", "psutil", "aiohttp.web", "uvloop", "zeroconf.asyncio",
            "kowalski.agent.main"]
_IMPORT_RSS = """
import os, sys
def rss():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
last = rss()
for name in sys.argv[1:]:
    __import__(name)
    print(name, rss() - last)
    last = rss()
"""


async def _import_costs() -> list[tuple[str, float]]:
    """(module, MiB its import adds to a fresh interpreter's RSS), in import order."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _IMPORT_RSS, *_IMPORTS, stdout=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL)
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    costs = []
    for line in out.decode().splitlines():
        name, size = line.split()
        costs.append((name, int(size) / MIB))
    return costs


async def _interpreter_rss(code: str) -> float:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", f"print('up', flush=True); {code}",
        stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    try:
        assert process.stdout is not None
        await asyncio.wait_for(process.stdout.readline(), 30)
        await asyncio.sleep(0.5)
        return psutil.Process(process.pid).memory_info().rss / MIB
    finally:
        process.kill()
        await process.wait()


async def measure(tmp: Path, quick: bool) -> list[Section]:
    count, window_s = (20, 2.0) if quick else (1000, 10.0)
    rows, targets, raw, notes = await _controller_rows(tmp, count, window_s)
    selection = _selection(1000, 200 if quick else 5000)
    rss, uss, bare, imports, warm = await _agent_rss(tmp, 1.0 if quick else 5.0)
    if rss > RSS_TARGET_MIB:
        costs = ", ".join(f"{name} {fmt(mib, 1)}" for name, mib in await _import_costs())
        notes.append(
            f"Why the agent misses {RSS_TARGET_MIB:g} MiB: a bare interpreter takes "
            f"{fmt(bare, 1)} MiB and importing the agent's modules brings it to "
            f"{fmt(imports, 1)} MiB before the agent does anything; running adds "
            f"{fmt(rss - imports, 1)} MiB. What each import adds to a fresh interpreter, in "
            f"order (MiB): {costs}. Part of that is shared library pages (the agent's USS, "
            f"memory no other process shares, is {fmt(uss, 1)} MiB).")
    targets += [
        Target("device selection over 1000 agents p50", p50(selection), SELECT_TARGET_MS, "ms",
               "<"),
        Target("idle agent RSS", rss, RSS_TARGET_MIB, "MiB"),
    ]
    raw[f"selection, the first 50 of {len(selection)} (ms)"] = selection[:50]
    return [Section(
        key="scale", title="Scale: many agents heartbeating",
        method=(
            f"The controller daemon (`kowalski-ctl serve`, its own process, default timers: "
            f"a heartbeat poll of every agent each second) with {count} static agents. The "
            "agents are simulated by one process listening on one port of 127.0.0.1 per "
            "agent; each port answers as a distinct agent with a real `Heartbeat` body. Once "
            "every agent is healthy, the controller's CPU time (user + system, from psutil) is "
            f"read over a {window_s:g} s window; the baseline is the same daemon with no "
            "agents over the same window. Device selection is `scoring.select` for a code "
            "job over a table of 1000 healthy agents, built with `apply` (half the agents "
            "offer the requested language). The idle agent is a real agent process, measured "
            "after it has been up for a few seconds, next to a bare interpreter and one that "
            "only imports the agent's modules; the processes of its warm session (the "
            "shipped `agent.warm_sessions = 1`) are counted apart."),
        tables=[
            Table(headers=["process", "CPU cores", "RSS MiB", "heartbeats/s answered",
                           "healthy at the end"], rows=rows),
            Table(headers=["device selection, 1000 agents", "ms"], rows=[
                ["p50", fmt(p50(selection), 4)], ["p99", fmt(percentile(selection, 0.99), 4)],
                ["max", fmt(max(selection), 4)]]),
            Table(headers=["idle agent memory", "MiB"], rows=[
                ["agent RSS", fmt(rss, 1)], ["agent USS (not shared)", fmt(uss, 1)],
                ["bare interpreter RSS (baseline)", fmt(bare, 1)],
                ["interpreter after importing the agent's modules", fmt(imports, 1)],
                ["its warm session's processes (sandbox and driver), RSS", fmt(warm, 1)]]),
        ],
        targets=targets, raw=raw, notes=notes,
    )]
