"""Real agent processes for tests: start on port 0, stop, kill, pause."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

from kowalski.common import config as config_module
from kowalski.common.config import Config

SECRET = "test-secret-" + "s" * 32


def agent_config_text(work_dir: Path, **sections: dict[str, object]) -> str:
    """A TOML config for a test agent: small limits, no mDNS unless asked."""
    base: dict[str, dict[str, object]] = {
        "agent": {"host": "127.0.0.1", "port": 0, "advertise_mdns": False,
                  "work_dir": str(work_dir), "session_idle_timeout_s": 60.0},
        "sandbox": {"mode": "bwrap" if os.geteuid() == 0 else "rlimit",
                    "memory_limit_mb": 256, "timeout_ms_python": 10_000},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    config = config_module.loads(_to_toml(base))
    return config_module.dumps(config)


def _to_toml(data: dict[str, dict[str, object]]) -> str:
    import tomli_w

    return tomli_w.dumps(data)


class AgentProcess:
    """One kowalski-agent subprocess, addressed as http://127.0.0.1:PORT."""

    def __init__(self, tmp: Path, *, name: str, port: int = 0, netns: str | None = None,
                 host: str = "127.0.0.1", log_level: str = "INFO",
                 **sections: dict[str, object]) -> None:
        self.dir = tmp / name
        self.dir.mkdir(parents=True, exist_ok=True)
        agent_section = {"name": name, "port": port, "host": host,
                         **sections.pop("agent", {})}
        self.config_path = self.dir / "agent.toml"
        self.config_path.write_text(
            agent_config_text(self.dir / "jobs", agent=agent_section, **sections))
        self.netns = netns
        self.host = host
        self.process: asyncio.subprocess.Process | None = None
        self.port: int | None = port or None
        self.name = name
        self.log_level = log_level

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def agent_id(self) -> str:
        return f"{self.name}-{self.port}"

    def config(self) -> Config:
        return config_module.load(self.config_path)

    async def start(self, timeout_s: float = 20.0) -> AgentProcess:
        port_file = self.dir / "port"
        port_file.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "kowalski.agent", "--config", str(self.config_path),
                "--port-file", str(port_file), "--log-level", self.log_level]
        if self.port:
            # A restart keeps its address, and so its agent id, as a service restart would.
            argv += ["--port", str(self.port)]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        env = {**os.environ, "KOWALSKI_SECRET": SECRET}
        self.log = (self.dir / "agent.log").open("ab")
        self.process = await asyncio.create_subprocess_exec(
            *argv, stdout=self.log, stderr=self.log, env=env)
        deadline = time.monotonic() + timeout_s
        while not port_file.exists() or not port_file.read_text().strip():
            if self.process.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"agent {self.name} did not start:\n{self.read_log()}")
            await asyncio.sleep(0.05)
        self.port = int(port_file.read_text())
        return self

    def read_log(self) -> str:
        return (self.dir / "agent.log").read_text(errors="replace")[-4000:]

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code."""
        if self.process is None or self.process.returncode is not None:
            return None if self.process is None else self.process.returncode
        for signum in (signal.SIGCONT, signal.SIGTERM):
            self.signal(signum)
        try:
            await asyncio.wait_for(self.process.wait(), timeout_s)
        except TimeoutError:
            await self.kill()
        self.log.close()
        return self.process.returncode

    async def kill(self) -> None:
        """SIGKILL the agent; its sandboxed jobs must die with it (--die-with-parent)."""
        if self.process is None or self.process.returncode is not None:
            return
        self.signal(signal.SIGKILL)
        await self.process.wait()
        self.log.close()


async def stop_process(process: asyncio.subprocess.Process, timeout_s: float = 15.0) -> None:
    """SIGTERM a child, then SIGKILL it if it does not exit in time."""
    if process.returncode is None:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), timeout_s)
        except TimeoutError:
            process.kill()
            await process.wait()
