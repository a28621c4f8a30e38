"""The pieces benchmarks share: agents, a controller at default settings, helper servers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
from procs import SECRET, AgentProcess

from bench import REPO_ROOT
from kowalski.common.config import Config, SandboxConfig
from kowalski.controller.fleet.device_table import DeviceTable
from kowalski.controller.service import Controller

# The shipped defaults, spelled out so that a change of default shows in the report.
DEFAULT_HEARTBEAT_INTERVAL_S = 1.0
DEFAULT_FAILURE_TIMEOUT_S = 3.0


def agent_sandbox() -> dict[str, object]:
    """The shipped sandbox limits, which the test helper lowers for tests."""
    defaults = SandboxConfig()
    return {"memory_limit_mb": defaults.memory_limit_mb,
            "timeout_ms_python": defaults.timeout_ms_python}


def controller_config(tmp: Path, *, agents: Sequence[str] = (), exo_urls: Sequence[str] = (),
                      embedded: bool = False) -> Config:
    """A controller on 127.0.0.1 with static agents ("host:port") and the default timers."""
    data: dict[str, dict[str, Any]] = {
        "controller": {"host": "127.0.0.1", "port": 0, "discover_mdns": False,
                       "static_agents": list(agents), "state_dir": str(tmp / "state")},
        "exo": {"endpoints": list(exo_urls), "embedded": embedded},
        "rlm": {"trajectory_dir": str(tmp / "runs")},
    }
    return msgspec.convert(data, Config)


def default_timers(config: Config) -> bool:
    """Whether the config keeps the shipped heartbeat interval and failure timeout."""
    settings = config.controller
    return (settings.heartbeat_interval_s == DEFAULT_HEARTBEAT_INTERVAL_S
            and settings.failure_timeout_s == DEFAULT_FAILURE_TIMEOUT_S)


def healthy_count(table: DeviceTable) -> int:
    return sum(1 for row in table.devices.values() if row.health == "healthy")


@asynccontextmanager
async def controller(config: Config, *, expect_agents: int = 0,
                     embedded_model: bool = False) -> AsyncIterator[Controller]:
    """A controller in this process, once expect_agents agents are healthy."""
    async with Controller(config=config, secret=SECRET.encode(),
                          embedded_model=embedded_model) as running:
        if expect_agents and not await running.cluster.wait_for(
                lambda table: healthy_count(table) >= expect_agents, timeout_s=60):
            raise RuntimeError(f"only {healthy_count(running.cluster.table)} of "
                               f"{expect_agents} agents became healthy")
        yield running


@asynccontextmanager
async def agents(tmp: Path, count: int, *, prefix: str = "bench",
                 agent_settings: dict[str, object] | None = None,
                 **sandbox: object) -> AsyncIterator[list[AgentProcess]]:
    """Real agent processes with the shipped sandbox limits (sandbox overrides them)."""
    started: list[AgentProcess] = []
    try:
        for number in range(count):
            agent = AgentProcess(tmp, name=f"{prefix}{number}",
                                 sandbox={**agent_sandbox(), **sandbox},
                                 **({"agent": agent_settings} if agent_settings else {}))
            started.append(agent)
            await agent.start(timeout_s=60)
        yield started
    finally:
        for agent in started:
            await agent.stop()


async def wait_until(condition: Callable[[], bool], timeout_s: float,
                     interval_s: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval_s)
    return True


class ServerProcess:
    """A helper server (`python ARGS`) that writes its ports to a file; stopped by SIGTERM."""

    def __init__(self, tmp: Path, name: str) -> None:
        self.name = name
        self.port_file = tmp / f"{name}.port"
        self.log_path = tmp / f"{name}.log"
        self.process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self, args: list[str], *, env: dict[str, str] | None = None,
                    timeout_s: float = 60.0) -> list[int]:
        """Start and wait for the port file, which args must name; returns the ports."""
        self.port_file.unlink(missing_ok=True)
        environment = {**os.environ, **(env or {})}
        environment["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT), *filter(None, [environment.get("PYTHONPATH", "")])])
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, *args, stdin=asyncio.subprocess.DEVNULL, stdout=log,
                stderr=log, env=environment, cwd=REPO_ROOT)
        ready = await wait_until(lambda: self._ready() or self._exited(), timeout_s, 0.02)
        if not ready or self._exited():
            await self.stop()
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} did not start:\n{tail}")
        return [int(line) for line in self.port_file.read_text().split()]

    def _ready(self) -> bool:
        return self.port_file.exists() and self.port_file.read_text().endswith("\n")

    def _exited(self) -> bool:
        return self.process is not None and self.process.returncode is not None

    async def stop(self, timeout_s: float = 10.0) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


async def start_standin(tmp: Path, *, latency_ms: float = 0.0) -> tuple[ServerProcess, str]:
    """The exo stand-in in its own process; returns it and its base URL."""
    standin = ServerProcess(tmp, "standin")
    ports = await standin.start(["-m", "bench.standin", "--port-file", str(standin.port_file),
                                 "--latency-ms", str(latency_ms)])
    return standin, f"http://127.0.0.1:{ports[0]}"
