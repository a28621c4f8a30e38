"""A controller in the test process, wired to real agent processes and a stand-in exo."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from procs import SECRET, AgentProcess

from kowalski.common import config as config_module
from kowalski.common.config import Config
from kowalski.controller.fleet.device_table import DeviceTable
from kowalski.controller.service import Controller


def controller_config(agents: list[AgentProcess], exo_urls: list[str], tmp: Path,
                      **sections: dict[str, Any]) -> Config:
    """Fast timers so failure detection takes under two seconds, not three."""
    base: dict[str, dict[str, Any]] = {
        "controller": {
            "host": "127.0.0.1", "port": 0, "discover_mdns": False,
            "static_agents": [f"127.0.0.1:{agent.port}" for agent in agents],
            "heartbeat_interval_s": 0.2, "failure_timeout_s": 1.5,
            "heartbeat_timeout_s": 1.0, "retry_base_delay_ms": 50,
            "retry_max_delay_ms": 500, "state_dir": str(tmp / "state"),
        },
        "exo": {"endpoints": exo_urls, "poll_interval_s": 0.5},
        "rlm": {"trajectory_dir": str(tmp / "runs")},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    import tomli_w

    return config_module.loads(tomli_w.dumps(base))


def healthy_ids(table: DeviceTable) -> set[str]:
    return {d for d, row in table.devices.items() if row.health == "healthy"}


@asynccontextmanager
async def running_controller(config: Config) -> AsyncIterator[Controller]:
    async with Controller(config=config, secret=SECRET.encode(), embedded_model=False) as running:
        yield running


async def start_agents(tmp: Path, count: int, **sections: dict[str, Any]
                       ) -> list[AgentProcess]:
    agents = [AgentProcess(tmp, name=f"agent{n}", **sections) for n in range(count)]
    for agent in agents:
        await agent.start()
    return agents
