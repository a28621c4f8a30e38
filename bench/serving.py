"""How the helper server processes (stand-in exo, simulated agents) run until SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from aiohttp import web

from kowalski.common.tls import loop_factory


def write_ports(path: Path, ports: list[int]) -> None:
    """One port per line, renamed into place so a reader never sees half the list."""
    partial = path.with_suffix(".partial")
    partial.write_text("".join(f"{port}\n" for port in ports))
    os.replace(partial, path)


async def serve_sites(app: web.Application | web.Server, count: int, port_file: Path) -> None:
    """Serve app (or a low-level server) on `count` ports of 127.0.0.1 until SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runner: web.BaseRunner = (web.AppRunner(app, handle_signals=False, access_log=None)
                              if isinstance(app, web.Application) else
                              web.ServerRunner(app, handle_signals=False))
    await runner.setup()
    try:
        ports = []
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
            await web.SockSite(runner, sock, backlog=1024).start()
        write_ports(port_file, ports)
        await stop.wait()
    finally:
        await runner.cleanup()


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> int:
    """Run main on the event loop the daemons use."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(main())
    return 0
