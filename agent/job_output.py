"""A job's pipes: stdin fed, stdout and stderr drained under a cap, a flood of output flagged."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

# Hears each kept piece of a job's output as it arrives: (stream name, bytes).
OutputListener = Callable[[str, bytes], None]

# Past this much output beyond the cap (at least FLOOD_MIN_BYTES) a job is killed.
FLOOD_FACTOR = 16
FLOOD_MIN_BYTES = 16 * 1024 * 1024


def flood_limit(cap: int) -> int:
    """Bytes of output at which a job with this cap counts as flooding."""
    return max(cap * FLOOD_FACTOR, FLOOD_MIN_BYTES)


async def feed(stream: asyncio.StreamWriter, data: bytes) -> None:
    # A job need not read its stdin.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        if data:
            stream.write(data)
            await stream.drain()
        stream.close()


class Flood:
    """Set by the first stream to pass the flood limit."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.stream = ""


async def drain(stream: asyncio.StreamReader, name: str, cap: int, limit: int,
                 flood: Flood, on_output: OutputListener | None) -> tuple[bytes, bool]:
    """Keep the first cap bytes (passing each piece on) and discard the rest; flag a flood."""
    kept = bytearray()
    total = 0
    while chunk := await stream.read(1 << 16):
        total += len(chunk)
        if len(kept) < cap:
            piece = chunk[: cap - len(kept)]
            kept += piece
            if on_output is not None:
                on_output(name, piece)
        if total > limit and not flood.stream:
            flood.stream = name
            flood.event.set()
    return bytes(kept), total > cap
