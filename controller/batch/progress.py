"""A batch's progress counts, and a terminal bar (or occasional plain lines) drawn from them."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from typing import TextIO

import msgspec

# Characters of the bar itself, between its brackets.
BAR_WIDTH = 30


class Progress(msgspec.Struct, frozen=True, kw_only=True):
    total: int
    done: int = 0
    ok: int = 0
    failed: int = 0
    cached: int = 0
    # Finished by an earlier run and taken from its output or journal.
    resumed: int = 0
    retries: int = 0
    completion_tokens: int = 0
    elapsed_s: float = 0.0

    def rate_per_s(self) -> float:
        """Items finished per second by this run (resumed items left out)."""
        return (self.done - self.resumed) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def eta_s(self) -> float | None:
        """Seconds left at the current rate, or None before there is a rate."""
        rate = self.rate_per_s()
        return (self.total - self.done) / rate if rate > 0 else None


def format_duration(seconds: float) -> str:
    """1:02:03 or 2:05."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def describe(progress: Progress) -> str:
    """The counts as one line of text, without a bar."""
    percent = 100 * progress.done // progress.total if progress.total else 100
    parts = [f"{progress.done}/{progress.total} ({percent}%)", f"ok {progress.ok}"]
    if progress.failed:
        parts.append(f"failed {progress.failed}")
    if progress.cached:
        parts.append(f"cached {progress.cached}")
    if progress.retries:
        parts.append(f"retries {progress.retries}")
    speed = f"{progress.rate_per_s():.1f}/s"
    if progress.completion_tokens and progress.elapsed_s > 0:
        speed += f" {progress.completion_tokens / progress.elapsed_s:.0f} tok/s"
    parts.append(speed)
    eta = progress.eta_s()
    if progress.done < progress.total and eta is not None:
        parts.append(f"ETA {format_duration(eta)}")
    else:
        parts.append(f"in {format_duration(progress.elapsed_s)}")
    return "  ".join(parts)


def render_bar(progress: Progress, columns: int) -> str:
    """The counts after a bar, all within ``columns``."""
    text = describe(progress)
    # A bar of steady width, unless the line is too narrow for it.
    room = min(BAR_WIDTH, columns - len(text) - 3)
    if room < 10:
        return text[:columns]
    filled = room * progress.done // progress.total if progress.total else room
    return f"[{'#' * filled}{'.' * (room - filled)}] {text}"


class ProgressBar:
    """Draws progress on a terminal; elsewhere writes a plain line now and then, or nothing."""

    def __init__(
        self,
        stream: TextIO,
        *,
        min_interval_s: float = 0.1,
        plain_interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        columns: int | None = None,
    ) -> None:
        """On a non-terminal, plain_interval_s=0 writes nothing at all."""
        self.stream = stream
        self.is_tty = stream.isatty()
        self._interval_s = min_interval_s if self.is_tty else plain_interval_s
        self._clock = clock
        self._columns = columns
        self._last_drawn: float | None = None
        self._latest: Progress | None = None
        self._shown: Progress | None = None
        self._closed = False

    def update(self, progress: Progress) -> None:
        """Record the latest counts; redraw when enough time has passed or the batch is done."""
        if self._closed:
            return
        self._latest = progress
        if not self.is_tty and self._interval_s <= 0:
            return
        now = self._clock()
        if self._last_drawn is None and not self.is_tty:
            # A log gets its first line one interval in: a short batch adds no noise.
            self._last_drawn = now
            return
        due = self._last_drawn is None or now - self._last_drawn >= self._interval_s
        # A terminal shows the last item land; a log gets no extra line for it.
        if due or (self.is_tty and progress.done >= progress.total):
            self._draw(progress)
            self._last_drawn = now

    def close(self) -> None:
        """Show the final counts and end the bar's line; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if not self.is_tty or self._latest is None:
            return
        if self._latest is not self._shown:
            self._draw(self._latest)
        self.stream.write("\n")
        self.stream.flush()

    def _draw(self, progress: Progress) -> None:
        self._shown = progress
        if self.is_tty:
            columns = self._columns or self._terminal_columns()
            # Carriage return and erase-to-end-of-line redraw the bar in place.
            self.stream.write(f"\r{render_bar(progress, columns - 1)}\x1b[K")
        else:
            self.stream.write(f"batch: {describe(progress)}\n")
        self.stream.flush()

    def _terminal_columns(self) -> int:
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError):
            columns = 0
        # A pseudo-terminal nobody sized reports 0 columns.
        return columns or shutil.get_terminal_size(fallback=(80, 24)).columns
