"""What lets a run outlast its controller: a stored copy of its context, and an owner's lock.

The context of a root run is written under `<trajectory_dir>/contexts/<run_id>.json` once
its first iteration has finished or it has run a second, and the run's `RunStarted` names
that file; it is removed when the run ends in a way no resume can go on from. While a
controller runs a run it holds an flock on `<trajectory_dir>/<run_id>.lock`; the kernel
drops the lock when the process dies, so a run whose file has no end and whose lock can be
taken has lost its controller.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import msgspec

from kowalski.common.errors import KowalskiError, NotFoundError
from kowalski.common.messages import WireError
from kowalski.controller.fleet.context_body import ContextBody
from kowalski.controller.rlm.events import ModelReplied, RlmResult, RunFinished, TokenCount
from kowalski.controller.rlm.trajectory import (
    SUFFIX,
    Trajectory,
    list_runs,
    run_dir,
)
from kowalski.controller.rlm.trajectory_writer import TrajectoryWriter

__all__ = ["CONTEXTS", "ContextCopy", "RunLock", "close_run", "context_name", "drop_context",
           "expire_contexts", "highest_child", "is_held", "load_context", "store_context",
           "unfinished_run_ids"]

log = logging.getLogger(__name__)
CONTEXTS = "contexts"
LOCK_SUFFIX = ".lock"
# A run still in its first iteration after this long gets its context stored anyway.
WRITE_AFTER_S = 1.0


def context_name(run_id: str, context: Any) -> str:
    """Where, under the trajectory directory, a root run's context is kept: text as text."""
    return f"{CONTEXTS}/{run_id}.{'txt' if isinstance(context, str) else 'json'}"


def store_context(directory: str | os.PathLike[str], name: str, context: Any,
                  data: bytes | None = None) -> None:
    """Write the context beside the trajectories under the name its RunStarted gives.

    data is the file's content when the caller has it already.
    """
    # Text is kept as UTF-8, not JSON: several times faster to write and to read back.
    if data is None:
        data = (context.encode("utf-8", errors="surrogatepass") if name.endswith(".txt")
                else msgspec.json.encode(context))
    path = run_dir(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written aside and renamed: a crash mid-write never leaves a short copy under the name.
    partial = path.with_name(f"{path.name}.{os.getpid()}.part")
    partial.write_bytes(data)
    os.replace(partial, path)


def drop_context(directory: str | os.PathLike[str], name: str) -> None:
    """Remove a run's stored context once nothing can resume the run."""
    with contextlib.suppress(FileNotFoundError):
        (run_dir(directory) / name).unlink()


def expire_contexts(directory: str | os.PathLike[str], keep_s: float,
                    now: float | None = None) -> list[str]:
    """Remove the stored contexts that have waited keep_s for a resume; their file names.

    Only those of runs that have an end (stopped at their iteration limit: `runs resume`
    could still take them) or no file any more, idle for keep_s since their file (else the
    copy) last changed, and held by no controller. Runs without an end are left to the
    controller that resumes them.
    """
    base = run_dir(directory)
    try:
        copies = list((base / CONTEXTS).iterdir())
    except FileNotFoundError:
        return []
    cutoff = (time.time() if now is None else now) - keep_s
    # The old enough first: the runs' ends are read only when one is (a look at each file).
    old: list[tuple[Path, str, bool]] = []
    for path in copies:
        # `<run id>.txt`, `.json`, or a copy cut off mid-write, `<run id>.<ext>.<pid>.part`.
        run_id = path.name.split(".", 1)[0]
        try:
            changed, has_file = (base / f"{run_id}{SUFFIX}").stat().st_mtime, True
        except FileNotFoundError:
            try:
                changed, has_file = path.stat().st_mtime, False
            except FileNotFoundError:
                continue
        if changed <= cutoff:
            old.append((path, run_id, has_file))
    ended = {summary.run_id for summary in list_runs(directory)
             if summary.stop_reason is not None} if any(has for *_, has in old) else set()
    removed = []
    for path, run_id, has_file in old:
        if has_file and run_id not in ended:
            continue
        # Held while it goes: never from under a resume, and a resume meanwhile is refused.
        lock = RunLock.take(directory, run_id)
        if lock is None:
            continue
        try:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path.name)
        finally:
            lock.release()
    return removed


class ContextCopy:
    """A root run's stored context: written beside the run, dropped once no resume can use it."""

    def __init__(self, directory: str | os.PathLike[str], run_id: str, *, context: Any = None,
                 stored: str = "", body: asyncio.Future[ContextBody] | None = None) -> None:
        """A new run's copy of `context`, or the copy `stored` names of a resumed run.

        body: the context's bytes as its session gets them, made once for both.
        """
        self.directory, self.run_id = directory, run_id
        self.name = stored or context_name(run_id, context)
        self.body = body
        # Written once the run's first iteration has finished (write_now), once it has run
        # WRITE_AFTER_S (a long first iteration is worth resuming too), or when it stops
        # resumable: a large context's copy then neither delays a quick run nor competes
        # with the session's opening for the CPU, and a run answered within that time
        # writes none. A crash before it is written leaves a run that cannot be resumed.
        self._go = asyncio.Event()
        self._writing = None if stored else asyncio.ensure_future(self._store(context, body))
        self._timer = None if stored else asyncio.get_running_loop().call_later(
            WRITE_AFTER_S, self._go.set)

    def write_now(self) -> None:
        """Let the copy be written."""
        self._go.set()

    async def _store(self, context: Any, body: asyncio.Future[ContextBody] | None) -> None:
        await self._go.wait()
        data = None
        if body is not None:
            made = await asyncio.shield(body)
            # The same bytes when the session's body is what the file holds: text as text.
            if (made.format == "text") == self.name.endswith(".txt") and made.format != "none":
                data = made.data
        await asyncio.to_thread(store_context, self.directory, self.name, context, data)

    async def settle(self, result: RlmResult | None, *, suspended: bool) -> None:
        """Once the run has stopped: wait for the copy, and drop it unless it can resume."""
        # Only a run stopped at its iteration limit, or by its controller stopping, resumes.
        resumable = result.stop_reason == "max_iterations" if result is not None else suspended
        if self._timer is not None:
            self._timer.cancel()
        if self._writing is not None and not (resumable or self._go.is_set()):
            # Never begun (the run ended within its first iteration), and not needed.
            self._writing.cancel()
            await asyncio.wait({self._writing})
            return
        if self._writing is not None:
            self.write_now()
            try:
                await asyncio.shield(self._writing)
            except OSError as exc:
                log.warning("run %s: its context could not be stored (%s); it cannot be "
                            "resumed", self.run_id, exc.strerror or exc)
        if not resumable:
            await asyncio.to_thread(drop_context, self.directory, self.name)


def load_context(trajectory_path: str | os.PathLike[str], name: str) -> Any:
    """The context a run's `RunStarted.context_file` names, read back."""
    path = Path(trajectory_path).parent / name
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(
            f"the run's stored context {path} is gone (the contexts of runs stopped at their "
            "iteration limit are removed after rlm.keep_contexts_days)",
            next_step="Start the run again with its context") from None
    if name.endswith(".txt"):
        return data.decode("utf-8", errors="surrogatepass")
    return msgspec.json.decode(data)


class RunLock:
    """An flock held by the controller running a run; released at its end, or by its death."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def take(cls, directory: str | os.PathLike[str], run_id: str) -> RunLock | None:
        """The run's lock, or None when a live process holds it."""
        path = run_dir(directory) / f"{run_id}{LOCK_SUFFIX}"
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            # A holder that just released may have removed the file we opened: lock the new one.
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return cls(path, fd)
            os.close(fd)

    def release(self) -> None:
        """Remove the lock file and let go; safe to call twice."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(fd)


def unfinished_run_ids(directory: str | os.PathLike[str]) -> list[str]:
    """Runs in directory whose file has no end and whose lock nobody holds, oldest first."""
    return [summary.run_id for summary in reversed(list_runs(directory))
            if summary.stop_reason is None and not is_held(directory, summary.run_id)
            and (run_dir(directory) / f"{summary.run_id}{SUFFIX}").is_file()]


def is_held(directory: str | os.PathLike[str], run_id: str) -> bool:
    """Whether a live process holds the run's lock."""
    path = run_dir(directory) / f"{run_id}{LOCK_SUFFIX}"
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def highest_child(directory: str | os.PathLike[str], run_id: str) -> int:
    """The highest N of the run's sub-call run files (`<run_id>-sN.jsonl`), 0 if none."""
    pattern = re.compile(re.escape(run_id) + r"-s(\d+)" + re.escape(SUFFIX))
    numbers = [int(match.group(1)) for path in run_dir(directory).glob(f"{run_id}-s*{SUFFIX}")
               if (match := pattern.fullmatch(path.name))]
    return max(numbers, default=0)


async def close_run(trajectory: Trajectory, error: KowalskiError) -> None:
    """End a run that cannot go on with a failed `run_finished` naming why."""
    start = trajectory.started
    iterations = max((event.iteration for event in trajectory.events
                      if isinstance(event, ModelReplied)), default=0)
    result = RlmResult(
        run_id=start.run_id, answer="", stop_reason="error",
        detail=f"the run could not be resumed: {error.user_message()}",
        iterations=min(iterations, start.config.max_iterations), sub_calls=0,
        tokens=TokenCount(), sub_call_tokens=TokenCount(), steps=[], latency_ms=0.0,
        devices=[], agents=[], endpoints=[], trajectory_path=trajectory.path,
        error=WireError(code=error.code, message=error.user_message(), retryable=False))
    writer = TrajectoryWriter(Path(trajectory.path).parent, start.run_id)
    await asyncio.shield(writer.write(RunFinished(
        run_id=start.run_id, depth=start.depth, result=result, finished_at=time.time())))
