"""A controller beside hostile surroundings: a hung exo endpoint, an API open to the network."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import tomli_w
from exo_standin import DEFAULT_MODEL, make_exo_app
from procs import SECRET, stop_process

from kowalski.controller.cli.exit_codes import EXIT_CONFIG

pytestmark = pytest.mark.timeout(60)
# Long enough that a controller which waited for its probes before serving would show it.
HUNG_PROBE_TIMEOUT_S = 30.0


@contextlib.asynccontextmanager
async def hung_endpoint() -> AsyncIterator[str]:
    """A TCP server that accepts every connection and never answers a byte."""
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


def write_config(tmp: Path, sections: dict[str, dict[str, Any]]) -> Path:
    base: dict[str, dict[str, Any]] = {
        "controller": {"host": "127.0.0.1", "port": 0, "discover_mdns": False,
                       "state_dir": str(tmp / "state")},
        "rlm": {"trajectory_dir": str(tmp / "runs")},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    path = tmp / "controller.toml"
    path.write_text(tomli_w.dumps(base))
    return path


async def serve(tmp: Path, config: Path) -> asyncio.subprocess.Process:
    log = (tmp / "controller.log").open("wb")
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kowalski.controller", "--config", str(config), "serve",
            "--port-file", str(tmp / "controller.port"),
            stdout=log, stderr=log, env={**os.environ, "KOWALSKI_SECRET": SECRET})
    finally:
        log.close()



async def first_answer(tmp: Path, process: asyncio.subprocess.Process, timeout_s: float
                       ) -> tuple[str, Any]:
    """Poll the port file and GET /v1/status until it answers; the base URL and the status."""
    port_file = tmp / "controller.port"
    async with asyncio.timeout(timeout_s), aiohttp.ClientSession() as http:
        while True:
            assert process.returncode is None, (tmp / "controller.log").read_text()
            if port_file.exists() and port_file.read_text().strip():
                base = f"http://127.0.0.1:{int(port_file.read_text())}"
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(base + "/v1/status") as response:
                        if response.status == 200:
                            return base, await response.json()
            await asyncio.sleep(0.02)


async def test_serve_answers_at_once_beside_a_hung_endpoint(tmp_path: Path,
                                                            aiohttp_server: Any) -> None:
    good = await aiohttp_server(make_exo_app(models=(DEFAULT_MODEL,),
                                             reply=lambda body: "from the good one"))
    good_url = str(good.make_url("")).rstrip("/")
    async with hung_endpoint() as hung_url:
        config = write_config(tmp_path, {"exo": {
            "endpoints": [hung_url, good_url], "probe_timeout_s": HUNG_PROBE_TIMEOUT_S,
            "probe_slow_s": 0.5, "poll_interval_s": 0.2, "request_timeout_s": 300.0}})
        started = time.monotonic()
        process = await serve(tmp_path, config)
        try:
            # The interpreter's start-up counts here; the probe timeout would dwarf it.
            base, status = await first_answer(tmp_path, process, HUNG_PROBE_TIMEOUT_S / 2)
            assert time.monotonic() - started < HUNG_PROBE_TIMEOUT_S / 2
            states = {e["url"]: e["state"] for e in status["endpoints"]}
            assert states[hung_url] == "probing"
            async with aiohttp.ClientSession() as http:
                # The good endpoint answers while the hung one is still on its first probe.
                body = {"model": DEFAULT_MODEL,
                        "messages": [{"role": "user", "content": "ping"}]}
                async with http.post(base + "/v1/chat/completions", json=body,
                                     timeout=aiohttp.ClientTimeout(total=10)) as response:
                    assert response.status == 200, await response.text()
                    answer = await response.json()
                assert answer["choices"][0]["message"]["content"] == "from the good one"
                async with http.get(base + "/v1/status") as response:
                    endpoints = {e["url"]: e for e in (await response.json())["endpoints"]}
            assert endpoints[good_url]["state"] == "up"
            assert endpoints[hung_url]["state"] == "probing"
        finally:
            await stop_process(process)
    assert "Traceback" not in (tmp_path / "controller.log").read_text()


async def test_hung_probe_marks_endpoint_down_with_reason_and_warns(
        tmp_path: Path) -> None:
    async with hung_endpoint() as hung_url:
        config = write_config(tmp_path, {"exo": {
            "endpoints": [hung_url], "probe_timeout_s": 0.5, "poll_interval_s": 0.2}})
        process = await serve(tmp_path, config)
        try:
            base, _ = await first_answer(tmp_path, process, 20)
            async with asyncio.timeout(10), aiohttp.ClientSession() as http:
                while True:
                    async with http.get(base + "/v1/status") as response:
                        (endpoint,) = (await response.json())["endpoints"]
                    if endpoint["state"] == "down":
                        break
                    await asyncio.sleep(0.05)
            assert "no answer to the health probe within 0.5 s" in endpoint["last_error"]
            await asyncio.sleep(1.0)
        finally:
            await stop_process(process)
    log = (tmp_path / "controller.log").read_text()
    warnings = [line for line in log.splitlines()
                if "WARNING" in line and hung_url in line and "no answer" in line]
    # Once when it went down, not at every poll.
    assert len(warnings) == 1, log
    assert "Traceback" not in log


async def test_open_api_on_the_network_is_refused_with_how_to_make_a_token(
        tmp_path: Path) -> None:
    config = write_config(tmp_path, {"controller": {"host": "0.0.0.0"},
                                     "exo": {"embedded": False}})
    process = await serve(tmp_path, config)
    try:
        assert await asyncio.wait_for(process.wait(), 30) == EXIT_CONFIG
    finally:
        await stop_process(process)
    output = (tmp_path / "controller.log").read_text()
    assert "Traceback" not in output
    assert len(output.strip().splitlines()) <= 2, output
    assert "security.api_token_file" in output
    assert "head -c 32 /dev/urandom" in output
    assert "security.allow_open_api = true" in output
    assert not (tmp_path / "controller.port").exists()


@pytest.mark.parametrize("security", ["allow_open_api", "api_token_file"])
async def test_network_address_serves_with_a_token_or_on_purpose(
        tmp_path: Path, security: str) -> None:
    token = tmp_path / "api-token"
    token.write_text("a-token-of-more-than-sixteen-bytes\n")
    token.chmod(0o600)
    value: object = True if security == "allow_open_api" else str(token)
    config = write_config(tmp_path, {"controller": {"host": "0.0.0.0"},
                                     "exo": {"embedded": False},
                                     "security": {security: value}})
    process = await serve(tmp_path, config)
    try:
        _, status = await first_answer(tmp_path, process, 20)
        assert status["endpoints"] == []
    finally:
        await stop_process(process)
