"""mDNS discovery across real hosts: agents and a controller in their own namespaces."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
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


def _default_agent(tmp: Path, lan: Lan, index: int, port: int = 0) -> AgentProcess:
    """An agent at the shipped network settings: every interface, mDNS on, no address set."""
    return AgentProcess(tmp, name=f"node{index}", netns=lan.names[index], host="0.0.0.0",
                        port=port, agent={"advertise_mdns": True})


async def _advertised(agent: AgentProcess) -> list[str]:
    """The addresses the agent's log says it put in its mDNS record, once it has."""
    deadline = time.monotonic() + 15
    # The record is announced after the port file is written, so the line may come late.
    while (found := re.search(r"advertising \S+ on \[([^\]]*)\]", agent.read_log())) is None:
        assert time.monotonic() < deadline, agent.read_log()
        await asyncio.sleep(0.1)
    return [part.strip(" '") for part in found.group(1).split(",")]


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
    agents = [_default_agent(tmp_path, lan, i) for i in (1, 2)]
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
        # A peer that dials 127.0.0.1 reaches itself: it is not in the record.
        for i, agent in zip((1, 2), agents, strict=True):
            assert await _advertised(agent) == [lan.address(i)]
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
        row = next(d for d in devices if d["device_id"] == agents[1].agent_id)
        assert row["health"] == "healthy"
        assert row["url"] == f"http://{lan.address(2)}:{agents[1].port}"
    finally:
        for agent in agents:
            await agent.stop()
        controller.send_signal(signal.SIGTERM)
        await asyncio.wait_for(controller.wait(), 20)


async def test_agents_on_one_port_with_a_shared_bridge_address_are_two_healthy_rows(
    lan: Lan, tmp_path: Path,
) -> None:
    # Every host, the controller's too, carries the same extra address, as a container
    # bridge does; an agent listens on the controller's host on the same port, so that
    # address answers the controller, but as another agent.
    shared = f"10.{100 + secrets.randbelow(50)}.{secrets.randbelow(250)}.1"
    for index in range(3):
        lan.add_bridge(index, f"{shared}/24")
    port = 7070
    agents = [_default_agent(tmp_path, lan, i, port=port) for i in (0, 1, 2)]
    controller, api_port = await _controller(lan, tmp_path)
    try:
        for agent in agents:
            await agent.start()
        for agent in agents[1:]:
            # The shared address is in the record: the controller must choose.
            assert sorted(await _advertised(agent)) == sorted(
                [shared, lan.address(agents.index(agent))])
        devices = await _wait(lan, api_port, lambda ds: len(ds) == 3 and all(
            d["health"] == "healthy" for d in ds), timeout_s=30)
        rows = {d["device_id"]: d for d in devices}
        assert set(rows) == {a.agent_id for a in agents}, devices
        assert all(row["health"] == "healthy" for row in rows.values()), devices
        for i in (1, 2):
            assert rows[agents[i].agent_id]["url"] == f"http://{lan.address(i)}:{port}", devices
        assert rows[agents[0].agent_id]["url"] in {
            f"http://{lan.address(0)}:{port}", f"http://{shared}:{port}"}, devices
    finally:
        for agent in agents:
            await agent.stop()
        controller.send_signal(signal.SIGTERM)
        await asyncio.wait_for(controller.wait(), 20)
