"""Time from `kowalski-ctl serve` to its first API answer beside an exo endpoint that hangs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import tomli_w
from procs import SECRET

from bench.report import Section, Table, Target, p50, spread

TARGET_S = 2.0


@contextlib.asynccontextmanager
async def _hung_endpoint() -> AsyncIterator[str]:
    """Accepts every TCP connection and never sends a byte."""
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def _first_answer_s(tmp: Path, endpoints: list[str]) -> float:
    """Seconds from spawning `serve` to a 200 from GET /v1/status."""
    config, port_file = tmp / "controller.toml", tmp / "controller.port"
    port_file.unlink(missing_ok=True)
    config.write_text(tomli_w.dumps({
        "controller": {"host": "127.0.0.1", "port": 0, "discover_mdns": False,
                       "state_dir": str(tmp / "state")},
        "exo": {"endpoints": endpoints, "embedded": False}}))
    started = time.perf_counter()
    with (tmp / "controller.log").open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kowalski.controller", "--config", str(config), "serve",
            "--port-file", str(port_file), stdout=log, stderr=log,
            env={**os.environ, "KOWALSKI_SECRET": SECRET})
    try:
        async with asyncio.timeout(60), aiohttp.ClientSession() as http:
            while True:
                if process.returncode is not None:
                    raise RuntimeError((tmp / "controller.log").read_text()[-2000:])
                if port_file.exists() and port_file.read_text().strip():
                    url = f"http://127.0.0.1:{int(port_file.read_text())}/v1/status"
                    with contextlib.suppress(aiohttp.ClientError):
                        async with http.get(url) as response:
                            if response.status == 200:
                                return time.perf_counter() - started
                await asyncio.sleep(0.01)
    finally:
        process.terminate()
        await process.wait()


async def measure(tmp: Path, quick: bool) -> list[Section]:
    count = 1 if quick else 7
    hung: list[float] = []
    bare: list[float] = []
    async with _hung_endpoint() as url:
        for _ in range(count):
            hung.append(await _first_answer_s(tmp, [url]))
            bare.append(await _first_answer_s(tmp, []))
    return [Section(
        key="hung_endpoint", title="Controller start beside a hung exo endpoint",
        method=(
            "`python -m kowalski.controller serve` as a subprocess whose only exo endpoint "
            "accepts TCP connections and never answers. Timed from the spawn (the "
            "interpreter's start-up and imports included) until `GET /v1/status` answers "
            f"200; the baseline is the same controller with no endpoint at all. {count} "
            "starts of each, alternating."),
        tables=[Table(headers=["start", "s: p50 (p90, min-max)"], rows=[
            ["beside a hung endpoint", spread(hung)],
            ["with no endpoint (baseline)", spread(bare)],
        ])],
        targets=[Target("spawn → first API answer beside a hung endpoint p50", p50(hung),
                        TARGET_S, "s")],
        raw={"beside a hung endpoint (s)": hung, "no endpoint (s)": bare})]
