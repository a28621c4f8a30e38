"""The one-machine default: a local agent process plus an in-process controller."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec

from kowalski.common.config import Config
from kowalski.common.errors import ExecutionError
from kowalski.controller.service import Controller

# Time the local agent gets to probe its toolchains and bind.
AGENT_START_TIMEOUT_S = 60.0


def _sandbox_mode() -> str:
    """bwrap where it can work (root + bubblewrap), else rlimits."""
    return "bwrap" if os.geteuid() == 0 and shutil.which("bwrap") else "rlimit"


def _prepare(config: Config) -> Path:
    """A private directory holding the local agent's config, jobs and log."""
    workdir = Path(tempfile.mkdtemp(prefix="kowalski-local-"))
    # The unprivileged job user must be able to enter the job directories.
    workdir.chmod(0o755)
    agent = msgspec.structs.replace(
        config.agent, host="127.0.0.1", port=0, advertise_mdns=False, name="local",
        work_dir=str(workdir / "jobs"))
    sandbox = msgspec.structs.replace(config.sandbox, mode=_sandbox_mode())
    security = msgspec.structs.replace(config.security, allow_unsigned=False)
    agent_config = msgspec.structs.replace(config, agent=agent, sandbox=sandbox,
                                           security=security)
    (workdir / "agent.toml").write_bytes(msgspec.toml.encode(agent_config))
    return workdir


def _read_port(port_file: Path) -> int | None:
    try:
        text = port_file.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text else None


@asynccontextmanager
async def local_agent(config: Config, secret: bytes) -> AsyncIterator[str]:
    """Start kowalski-agent on 127.0.0.1 and yield its address; stop it on exit."""
    workdir = await asyncio.to_thread(_prepare, config)
    config_path = workdir / "agent.toml"
    port_file = workdir / "agent.port"
    log_path = workdir / "agent.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kowalski.agent", "--config", str(config_path),
            "--port-file", str(port_file), stdout=log, stderr=log,
            env={**os.environ, "KOWALSKI_SECRET": secret.decode()})
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + AGENT_START_TIMEOUT_S
        while (port := _read_port(port_file)) is None:
            if process.returncode is not None or loop.time() > deadline:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise ExecutionError(f"the local agent did not start:\n{tail}")
            await asyncio.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()
        shutil.rmtree(workdir, ignore_errors=True)


@asynccontextmanager
async def local_cluster(config: Config) -> AsyncIterator[Controller]:
    """A local agent and a controller on 127.0.0.1 sharing a fresh secret."""
    secret = secrets.token_hex(32).encode()
    async with local_agent(config, secret) as address:
        controller = msgspec.structs.replace(
            config.controller, host="127.0.0.1", port=0, discover_mdns=False,
            static_agents=[address])
        local = msgspec.structs.replace(config, controller=controller)
        async with Controller(config=local, secret=secret) as running:
            healthy = await running.cluster.wait_for(
                lambda table: any(row.health == "healthy" for row in table.devices.values()),
                timeout_s=AGENT_START_TIMEOUT_S)
            if not healthy:
                raise ExecutionError(f"the local agent at {address} never answered heartbeats")
            yield running
