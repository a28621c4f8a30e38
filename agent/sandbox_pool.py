"""Sandboxes made ahead of time: an interpreter in its jail, waiting for one job's code."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from kowalski.agent.jail import SandboxedProcess
from kowalski.agent.languages import Toolchain
from kowalski.common.errors import ExecutionError

log = logging.getLogger("kowalski.agent.sandbox_pool")

# What the agent writes on the gate once the job's files are in the work dir.
GO = b"go"
# Run by a pooled interpreter with -c: it waits on the gate fd (argv[1]), then runs
# ./main.py as `python -u main.py` would: same argv, sys.path[0], __main__ module,
# traceback (the bootstrap's frame left out) and exit code.
BOOTSTRAP = """
import sys
def _kowalski_wait():
    import os
    gate = int(sys.argv[1])
    go = os.read(gate, 2)
    os.close(gate)
    if go != b"go":
        os._exit(0)
    path = os.path.join(os.getcwd(), "main.py")
    main = type(sys)("__main__")
    main.__file__, main.__cached__ = path, None
    main.__loader__ = sys.modules["_frozen_importlib_external"].SourceFileLoader(
        "__main__", path)
    main.__builtins__, main.__annotations__ = sys.modules["builtins"], {}
    sys.modules["__main__"] = main
    sys.argv[:] = ["main.py"]
    sys.path[0] = os.path.dirname(path)
    return main, path
def _kowalski_run(main, path):
    try:
        with open(path, "rb") as file:
            source = file.read()
        exec(compile(source, path, "exec"), main.__dict__)
    except SystemExit:
        raise
    except BaseException as exc:
        exc = exc.with_traceback(exc.__traceback__.tb_next)
        sys.excepthook(type(exc), exc, exc.__traceback__)
        sys.exit(1)
_kowalski_run(*_kowalski_wait())
"""
# After a failed refill the pool waits this long, doubling up to the most.
_RETRY_FIRST_S = 1.0
_RETRY_MAX_S = 60.0

# Starts argv confined for the pool: (name, toolchain, argv, gate fd to pass) -> process.
Spawn = Callable[[str, Toolchain, list[str], int], Awaitable[SandboxedProcess]]
# Writes a job's files into a pooled sandbox's work dir (blocking: run in a thread).
Prepare = Callable[[SandboxedProcess, Mapping[str, bytes]], None]


@dataclass
class _Ready:
    handle: SandboxedProcess
    # The agent's end of the pipe the interpreter waits on.
    gate: int


class SandboxPool:
    """Keeps up to size ready sandboxes per language, within the agent's free job slots."""

    def __init__(self, *, toolchains: Mapping[str, Toolchain], size: int, spawn: Spawn,
                 prepare: Prepare, slots: int | None = None,
                 busy: Callable[[], int] = lambda: 0) -> None:
        self._toolchains = dict(toolchains)
        self._size = size
        self._spawn = spawn
        self._prepare = prepare
        # The agent's job slots: ready sandboxes and busy ones (running jobs) stay within
        # them, so the pool adds nothing to the memory the agent's jobs may take.
        self._slots = slots
        self._busy = busy
        self._ready: dict[str, deque[_Ready]] = {name: deque() for name in self._toolchains}
        # Name prefixes of sandboxes being made, whose work dirs and cgroups exist already.
        self._making: set[str] = set()
        self._wanted = asyncio.Event()
        # Set while the pool holds all it may hold (cleared by refill()).
        self._settled = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def size(self) -> int:
        """Sandboxes the pool holds when the agent is idle, over all its languages."""
        wanted = self._size * len(self._toolchains)
        return wanted if self._slots is None else min(wanted, self._slots)

    @property
    def ready(self) -> int:
        """Sandboxes ready now, over all languages."""
        return sum(len(queue) for queue in self._ready.values())

    def idle_names(self) -> set[str]:
        """The work dir (and cgroup) names of sandboxes ready or being made, or their prefix."""
        names = {entry.handle.workdir.name for queue in self._ready.values() for entry in queue}
        return names | self._making

    def start(self) -> None:
        """Start filling the pool in the background."""
        if self._task is None and self._toolchains and self._size > 0:
            self._task = asyncio.create_task(self._fill(), name="sandbox-pool")
            self.refill()

    def refill(self) -> None:
        """Ask the background task to top the pool up (after a job's end)."""
        self._settled.clear()
        self._wanted.set()

    async def wait_ready(self) -> None:
        """Wait until the pool holds all it may hold now, or a try to fill it failed."""
        if self._task is not None and not self._closed:
            await self._settled.wait()

    def _short(self) -> str | None:
        """A language the pool should make a sandbox for now, if any."""
        held = self.ready + len(self._making)
        if held >= self.size or (self._slots is not None
                                 and held + self._busy() >= self._slots):
            return None
        for language, queue in sorted(self._ready.items(), key=lambda item: len(item[1])):
            if len(queue) < self._size:
                return language
        return None

    async def _fill(self) -> None:
        pause_s = _RETRY_FIRST_S
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            while (language := self._short()) is not None:
                try:
                    self._ready[language].append(await self._make(language))
                    pause_s = _RETRY_FIRST_S
                except ExecutionError as exc:
                    log.warning("cannot make a ready %s sandbox (%s); retrying in %g s",
                                language, exc.message, pause_s)
                    # Waiters learn the pool is as full as it gets for now.
                    self._settled.set()
                    await asyncio.sleep(pause_s)
                    pause_s = min(pause_s * 2, _RETRY_MAX_S)
            self._settled.set()

    async def _make(self, language: str) -> _Ready:
        toolchain = self._toolchains[language]
        name = f"pool-{language}-{secrets.token_hex(4)}"
        gate_read, gate_write = os.pipe()
        self._making.add(name)
        try:
            argv = [toolchain.inner_executable, "-u", "-c", BOOTSTRAP, str(gate_read)]
            handle = await self._spawn(name, toolchain, argv, gate_read)
        except BaseException:
            os.close(gate_write)
            raise
        finally:
            os.close(gate_read)
            self._making.discard(name)
        return _Ready(handle, gate_write)

    async def take(self, language: str, files: Mapping[str, bytes]) -> SandboxedProcess | None:
        """A ready sandbox, given files and told to go; None when the pool has none."""
        queue = self._ready.get(language)
        while queue:
            # Refilled when the job ends (the caller's refill()), not now: a new sandbox's
            # start would take CPU from this job's.
            entry = queue.popleft()
            handle = entry.handle
            try:
                if handle.returncode is not None:
                    raise OSError(f"the waiting interpreter exited ({handle.returncode})")
                await asyncio.to_thread(self._prepare, handle, files)
                os.write(entry.gate, GO)
            except OSError as exc:
                log.warning("a ready %s sandbox was lost: %s", language, exc)
                await asyncio.shield(handle.release())
                continue
            except BaseException:
                await asyncio.shield(handle.release())
                raise
            finally:
                os.close(entry.gate)
            return handle
        return None

    async def close(self) -> None:
        """Stop refilling and destroy every ready sandbox; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
        entries = [entry for queue in self._ready.values() for entry in queue]
        for queue in self._ready.values():
            queue.clear()
        for entry in entries:
            os.close(entry.gate)
        await asyncio.gather(*(entry.handle.release() for entry in entries))
