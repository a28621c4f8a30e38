"""Discovery over mDNS at default settings: two agents on other hosts until both are healthy.

Also the watcher that runs on the controller's host: `python -m bench.mdns_discovery URL N`
prints one JSON line per device when the controller first reports it healthy.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import tomli_w
from netns import Lan, make_lan, netns_unavailable
from procs import SECRET, AgentProcess

from bench import REPO_ROOT
from bench.report import Section, Table, Target, fmt, p50, spread

TITLE = "Discovery over mDNS at default settings"
TARGET_S = 3.0
AGENTS = 2
WATCH_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Trial:
    """Seconds, all from one fresh start of a controller and two agents."""

    # From an agent listening to its row being healthy, per agent.
    listening_to_healthy: list[float]
    # From spawning both agent processes to both rows healthy.
    spawn_to_all_healthy: float
    # Rows whose URL is not the agent's own host address (loopback, or another's).
    wrong_rows: int


async def _controller(lan: Lan, tmp: Path) -> tuple[asyncio.subprocess.Process, int]:
    """kowalski-ctl serve on host 0 with the shipped settings, bar where it listens."""
    config = {
        "controller": {"host": lan.address(0), "port": 0, "state_dir": str(tmp / "state")},
        "exo": {"embedded": False},
        # The benchmark's controller takes no writes; it only lists devices.
        "security": {"allow_open_api": True},
    }
    path = tmp / "controller.toml"
    path.write_text(tomli_w.dumps(config))
    port_file = tmp / "controller.port"
    port_file.unlink(missing_ok=True)
    with (tmp / "controller.log").open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            *lan.exec_argv(0, sys.executable, "-m", "kowalski.controller", "--config", str(path),
                           "serve", "--port-file", str(port_file)),
            stdout=log, stderr=log, env={**os.environ, "KOWALSKI_SECRET": SECRET})
    deadline = time.monotonic() + 30
    while not port_file.exists() or not port_file.read_text().strip():
        if process.returncode is not None or time.monotonic() > deadline:
            raise RuntimeError("the controller did not start:\n"
                               + (tmp / "controller.log").read_text()[-2000:])
        await asyncio.sleep(0.05)
    return process, int(port_file.read_text())


async def _trial(lan: Lan, tmp: Path) -> Trial:
    controller, port = await _controller(lan, tmp)
    # Every agent at the shipped network settings: all interfaces, port 7070, mDNS on.
    agents = [AgentProcess(tmp, name=f"node{i}", netns=lan.names[i], host="0.0.0.0",
                           port=7070, agent={"advertise_mdns": True})
              for i in range(1, AGENTS + 1)]
    watcher = await asyncio.create_subprocess_exec(
        *lan.exec_argv(0, sys.executable, "-m", "bench.mdns_discovery",
                       f"http://{lan.address(0)}:{port}", str(AGENTS)),
        cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        spawned = time.monotonic()
        listening: dict[str, float] = {}

        async def start(agent: AgentProcess) -> None:
            await agent.start(timeout_s=60)
            listening[agent.agent_id] = time.monotonic()

        await asyncio.gather(*(start(agent) for agent in agents))
        out, err = await asyncio.wait_for(watcher.communicate(), WATCH_TIMEOUT_S + 10)
        if watcher.returncode != 0:
            raise RuntimeError(f"not every agent became healthy: {err.decode()[-2000:]}")
    finally:
        if watcher.returncode is None:
            watcher.kill()
            await watcher.wait()
        for agent in agents:
            await agent.stop()
        controller.send_signal(signal.SIGTERM)
        await asyncio.wait_for(controller.wait(), 30)
    # CLOCK_MONOTONIC is one clock for every process on the machine, namespaces included.
    rows = [json.loads(line) for line in out.decode().splitlines()]
    healthy_at = {row["device_id"]: row["at"] for row in rows}
    expected = {agent.agent_id: f"http://{lan.address(i)}:7070"
                for i, agent in enumerate(agents, start=1)}
    wrong = sum(1 for row in rows if expected.get(row["device_id"]) != row["url"])
    return Trial(listening_to_healthy=[healthy_at[a] - listening[a] for a in expected],
                 spawn_to_all_healthy=max(healthy_at.values()) - spawned, wrong_rows=wrong)


async def measure(tmp: Path, quick: bool) -> list[Section]:
    reason = netns_unavailable()
    if reason is not None:
        return [Section(key="mdns", title=TITLE, method="", skipped=reason)]
    count = 2 if quick else 12
    lan = make_lan(AGENTS + 1)
    trials: list[Trial] = []
    try:
        for number in range(count):
            work = tmp / f"trial{number}"
            work.mkdir()
            trials.append(await _trial(lan, work))
    finally:
        lan.close()
    each = [s for trial in trials for s in trial.listening_to_healthy]
    spawn = [trial.spawn_to_all_healthy for trial in trials]
    wrong = sum(trial.wrong_rows for trial in trials)
    return [Section(
        key="mdns", title=TITLE,
        method=(
            f"Three network namespaces joined by a bridge: a controller (`kowalski-ctl serve`, "
            "shipped settings: mDNS browsing on, no static agents, heartbeat every 1 s) and "
            f"{AGENTS} agents (`kowalski-agent`, shipped network settings: every interface, "
            "port 7070 on both, mDNS on, no `advertise_address`), each namespace also having "
            "its own loopback. Per trial the controller and the agents start fresh; a watcher "
            "on the controller's host polls `GET /v1/devices` every 20 ms and notes when each "
            "row first turns healthy. Timed from an agent listening on its port (its port file "
            "seen, polled every 50 ms) to its row healthy, and from spawning both agents to "
            f"both rows healthy. {count} trials."),
        tables=[Table(headers=["interval", "s: p50 (p90, min-max)"], rows=[
            ["agent listening → its row healthy", spread(each)],
            ["both agents spawned → both rows healthy", spread(spawn)],
        ]), Table(headers=["rows", "count"], rows=[
            ["healthy rows at the agent's own address", str(len(each) - wrong)],
            ["rows at another address (loopback, a shared one)", str(wrong)],
        ])],
        targets=[Target("agent listening → row healthy p50", p50(each), TARGET_S, "s"),
                 Target("rows filed at a wrong address", float(wrong), 0.0, "rows")],
        notes=[f"Median time from listening to healthy: {fmt(p50(each))} s. The agent "
               "announces its record once it listens; the controller resolves it, asks "
               "every advertised address for a signed heartbeat at once and keeps the first "
               "in its order of preference that answers."],
        raw={"listening → healthy (s)": each, "spawned → all healthy (s)": spawn},
    )]


def watch(url: str, count: int) -> int:
    """Print each device when it first turns healthy; 0 once count are, 1 on timeout."""
    seen: set[str] = set()
    deadline = time.monotonic() + WATCH_TIMEOUT_S
    while len(seen) < count:
        if time.monotonic() > deadline:
            print(f"only {len(seen)} of {count} devices turned healthy", file=sys.stderr)
            return 1
        with urllib.request.urlopen(f"{url}/v1/devices", timeout=5) as answer:
            devices = json.load(answer)
        now = time.monotonic()
        for device in devices:
            if device["health"] == "healthy" and device["device_id"] not in seen:
                seen.add(device["device_id"])
                print(json.dumps({"device_id": device["device_id"], "url": device["url"],
                                  "at": now}), flush=True)
        time.sleep(0.02)
    return 0


if __name__ == "__main__":
    sys.exit(watch(sys.argv[1], int(sys.argv[2])))
