"""mDNS discovery across real hosts: agents and a controller in their own namespaces."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from netns import Lan, make_lan, require_netns
from procs import SECRET, AgentProcess

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]


@pytest.fixture
def lan() -> Iterator[Lan]:
    require_netns()
    network = make_lan(3)
    yield network
    network.close()


async def _controller(lan: Lan, tmp: Path) -> tuple[asyncio.subprocess.Process, int]:
    """kowalski-ctl serve on host 0, its log in tmp."""
    config = {
        "controller": {"host": lan.address(0), "port": 0, "discover_mdns": True,
                       "heartbeat_interval_s": 0.3, "failure_timeout_s": 1.5,
                       "state_dir": str(tmp / "state")},
        "exo": {"embedded": False},
        "security": {"allow_open_api": True},
    }
    path = tmp / "controller.toml"
    path.write_text(tomli_w.dumps(config))
    port_file = tmp / "controller.port"
    with (tmp / "controller.log").open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *lan.exec_argv(0, sys.executable, "-m", "kowalski.controller", "--config",
                           str(path), "serve", "--port-file", str(port_file)),
            stdout=log, stderr=log, env={**os.environ, "KOWALSKI_SECRET": SECRET})
    deadline = time.monotonic() + 20
    while not port_file.exists() or not port_file.read_text().strip():
        assert process.returncode is None, (tmp / "controller.log").read_text()
        assert time.monotonic() < deadline, "controller did not start"
        await asyncio.sleep(0.05)
    return process, int(port_file.read_text())


async def _devices(lan: Lan, port: int) -> list[dict[str, Any]]:
    process = await asyncio.create_subprocess_exec(
        *lan.exec_argv(0, sys.executable, "-m", "kowalski.controller", "devices", "--json",
                       "--url", f"http://{lan.address(0)}:{port}"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    devices: list[dict[str, Any]] = json.loads(out)
    return devices


async def _wait(lan: Lan, port: int, predicate: Any, timeout_s: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        devices = await _devices(lan, port)
        if predicate(devices) or time.monotonic() > deadline:
            return devices
        await asyncio.sleep(0.3)


async def test_agents_on_other_hosts_are_found_over_mdns_and_lost_when_they_go(
    lan: Lan, tmp_path: Path,
) -> None:
    agents = [
        AgentProcess(tmp_path, name=f"node{i}", netns=lan.names[i], host="0.0.0.0",
                     agent={"advertise_mdns": True, "advertise_address": lan.address(i)})
        for i in (1, 2)
    ]
    controller, port = await _controller(lan, tmp_path)
    try:
        for agent in agents:
            await agent.start()
        devices = await _wait(lan, port, lambda ds: len(ds) == 2 and all(
            d["health"] == "healthy" for d in ds), timeout_s=30)
        assert {d["device_id"] for d in devices} == {a.agent_id for a in agents}, devices
        assert {d["source"] for d in devices} == {"mdns"}
        assert {d["url"] for d in devices} == {
            f"http://{lan.address(i)}:{a.port}" for i, a in zip((1, 2), agents, strict=True)}
        # A clean stop sends an mDNS goodbye: the row is marked lost at once.
        await agents[0].stop()
        devices = await _wait(lan, port, lambda ds: any(
            d["device_id"] == agents[0].agent_id and d["lost"] for d in ds), timeout_s=15)
        gone = next(d for d in devices if d["device_id"] == agents[0].agent_id)
        assert gone["lost"]
        assert gone["health"] == "unhealthy"
        # Unplugging a host's cable is a partition: heartbeats stop, the device turns unhealthy.
        lan.set_link(2, up=False)
        devices = await _wait(lan, port, lambda ds: any(
            d["device_id"] == agents[1].agent_id and d["health"] == "unhealthy" for d in ds),
            timeout_s=15)
        assert next(d for d in devices if d["device_id"] == agents[1].agent_id)[
            "health"] == "unhealthy"
        lan.set_link(2, up=True)
        devices = await _wait(lan, port, lambda ds: any(
            d["device_id"] == agents[1].agent_id and d["health"] == "healthy" for d in ds),
            timeout_s=15)
        assert next(d for d in devices if d["device_id"] == agents[1].agent_id)[
            "health"] == "healthy"
    finally:
        for agent in agents:
            await agent.stop()
        controller.send_signal(signal.SIGTERM)
        await asyncio.wait_for(controller.wait(), 20)
