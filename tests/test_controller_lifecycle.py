"""The Controller's lifecycle: run() serves until close(), close() is idempotent."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from controller_env import controller_config
from procs import SECRET

from kowalski.common.errors import ConfigError
from kowalski.controller.service import Controller

pytestmark = pytest.mark.timeout(60)


def bare(tmp_path: Path, **sections: dict[str, object]) -> Controller:
    """A controller with no agents and no exo endpoint, on a free port."""
    return Controller(config=controller_config([], [], tmp_path, **sections),
                      secret=SECRET.encode(), embedded_model=False,
                      port_file=tmp_path / "port")


async def wait_for_port(port_file: Path, task: asyncio.Task[None]) -> int:
    async with asyncio.timeout(20):
        while not port_file.exists() or not port_file.read_text().strip():
            assert not task.done(), task
            await asyncio.sleep(0.02)
    return int(port_file.read_text())


async def test_run_serves_until_close_and_close_twice_is_harmless(tmp_path: Path) -> None:
    controller = bare(tmp_path)
    running = asyncio.create_task(controller.run())
    port = await wait_for_port(tmp_path / "port", running)
    assert controller.port == port
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/v1/status") as answer:
            assert answer.status == 200
        await controller.close()
        # The first close waited for run()'s cleanup: nothing is left running.
        assert running.done()
        assert running.exception() is None
        await controller.close()
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(f"http://127.0.0.1:{port}/v1/status")
    assert controller.http.closed
    assert [task for task in asyncio.all_tasks() if task is not asyncio.current_task()] == []


async def test_close_before_run_makes_run_return_at_once(tmp_path: Path) -> None:
    controller = bare(tmp_path)
    await controller.close()
    await asyncio.wait_for(controller.run(), 5)
    await controller.close()
    assert not (tmp_path / "port").exists()
    with pytest.raises(RuntimeError, match="has not started"):
        controller.cluster  # noqa: B018
    with pytest.raises(RuntimeError, match="already called"):
        await controller.run()


async def test_a_start_up_error_is_raised_as_is_from_async_with(tmp_path: Path) -> None:
    controller = bare(tmp_path, security={"api_token_file": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="cannot read the secret file"):
        async with controller:
            pytest.fail("the controller started without its token file")
    await controller.close()


async def test_async_with_runs_the_controller_and_closes_it_on_exit(tmp_path: Path) -> None:
    async with bare(tmp_path) as controller:
        assert await controller.cluster.wait_for(lambda table: not table.devices, timeout_s=1)
        async with controller.http.get(controller.base_url + "/v1/status") as answer:
            assert answer.status == 200
        http = controller.http
    assert http.closed
    await controller.close()
