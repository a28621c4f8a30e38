"""A run's reply on a terminal as it is generated, under a one-line status; code output live.

On a terminal the root run's reply streams in as the model writes it; the last screen line
is a status (iteration, tokens so far, tokens/s, elapsed) redrawn in place. Output that is
not a terminal gets no reply pieces from here: it stays one block per reply, for scripts.
Either way a running block's output is printed line by line as it arrives (`CellEcho`).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from typing import TextIO

from kowalski.controller.rlm.events import (
    CellOutput,
    CodeExecuted,
    IterationStarted,
    ModelReplied,
    ReplyDelta,
    RlmEvent,
    RunFinished,
)

__all__ = ["CellEcho", "LiveReply"]

# Seconds between redraws of the status while nothing arrives.
TICK_S = 0.5
_CLEAR = "\r\x1b[K"


class LiveReply:
    """Streams the root reply to a terminal; `handle` says whether it printed the event."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._iteration = 0
        self._asked_at = self._first_at = 0.0
        self._pieces = 0
        self._partial = ""
        self._waiting = self._streamed = False
        self._drawn = False

    def status(self, now: float) -> str:
        """The status line: iteration, tokens so far, tokens/s, elapsed."""
        elapsed = now - self._asked_at
        if self._pieces == 0:
            return f"⋯ iteration {self._iteration} · waiting for the model · {elapsed:.1f} s"
        generating = now - self._first_at
        rate = self._pieces / generating if generating > 0.05 else 0.0
        return (f"⋯ iteration {self._iteration} · {self._pieces} tokens · {rate:.1f} tok/s · "
                f"{elapsed:.1f} s")

    def clear(self) -> None:
        """Take the status line off the screen (before other output)."""
        if self._drawn:
            self._out.write(_CLEAR)
            self._drawn = False

    def draw(self) -> None:
        """Redraw the status line, after the unfinished line of the reply."""
        if not self._waiting:
            return
        width = shutil.get_terminal_size().columns
        status = self.status(time.monotonic())
        room = max(width - len(status) - 3, 0)
        shown = self._partial[-room:] if room else ""
        self._out.write(f"{_CLEAR}{shown}   \x1b[2m{status}\x1b[0m"[: width + 10])
        self._out.flush()
        self._drawn = True

    def handle(self, event: RlmEvent) -> bool:
        """Show a root-run event live; False when the caller should print it its own way."""
        if event.depth != 0:
            return False
        if isinstance(event, IterationStarted):
            self._iteration, self._asked_at = event.iteration, time.monotonic()
            self._pieces, self._partial = 0, ""
            self._waiting, self._streamed = True, False
            return False
        if isinstance(event, ReplyDelta):
            self._reply_delta(event)
            return True
        if isinstance(event, ModelReplied):
            self._waiting = False
            self.clear()
            if not self._streamed:
                return False
            self._out.write(f"{self._partial}\n" if self._partial else "")
            self._partial = ""
            cached = " · from the cache" if event.cached else ""
            self._out.write(f"\x1b[2m── model {event.model_ms:.0f} ms · "
                            f"{event.tokens.total_tokens} tokens{cached}\x1b[0m\n")
            self._out.flush()
            return True
        if isinstance(event, RunFinished):
            self._waiting = False
            self.clear()
        return False

    def _reply_delta(self, event: ReplyDelta) -> None:
        self.clear()
        if not self._streamed:
            self._streamed = True
            self._first_at = time.monotonic()
            self._out.write(f"── iteration {event.iteration}\n")
        self._pieces = event.pieces
        *lines, self._partial = (self._partial + event.text).split("\n")
        for line in lines:
            self._out.write(line + "\n")
        self.draw()

    async def tick(self) -> None:
        """Keep the status's clock moving while the model is silent; cancel to stop."""
        while True:
            await asyncio.sleep(TICK_S)
            if self._waiting:
                self.draw()


class CellEcho:
    """Prints a running block's output as whole lines arrive, under one header per block."""

    def __init__(self) -> None:
        self._block: tuple[str, int, int] | None = None
        self._partial = ""
        self._streamed: set[tuple[str, int, int]] = set()

    def output(self, event: CellOutput, out: TextIO) -> None:
        """Print the lines of a piece of output that are complete."""
        key, indent = (event.run_id, event.iteration, event.block), "  " * event.depth
        if key != self._block:
            self._flush(out, indent)
            self._block = key
            self._streamed.add(key)
            out.write(f"{indent}▶ block {event.block} ({event.language}) running:\n")
        *lines, self._partial = (self._partial + event.text).split("\n")
        for line in lines:
            out.write(f"{indent}│ {line}\n")

    def shown(self, event: CodeExecuted, out: TextIO) -> bool:
        """Whether this block's output was printed as it ran (its last partial line now)."""
        key = (event.run_id, event.iteration, event.block)
        if key == self._block:
            self._flush(out, "  " * event.depth)
            self._block = None
        if key in self._streamed:
            self._streamed.discard(key)
            return True
        return False

    def _flush(self, out: TextIO, indent: str) -> None:
        if self._partial:
            out.write(f"{indent}│ {self._partial}\n")
            self._partial = ""
