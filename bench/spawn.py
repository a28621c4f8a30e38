"""Baselines for the round trip: bare process spawns, and the sandbox's own set-up cost."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from kowalski.agent.cgroups import CgroupManager
from kowalski.agent.jail import INNER_WORKDIR
from kowalski.agent.languages import SYSTEM_PATH, Toolchain, program_for
from kowalski.agent.launcher import build_launcher, join, launcher_args, python_launcher
from kowalski.agent.sandbox import Sandbox
from kowalski.agent.snippets import Program

DEVNULL = asyncio.subprocess.DEVNULL


async def timed(action: Callable[[], Awaitable[object]], repeats: int, *,
                warmup: int = 1) -> list[float]:
    """Milliseconds per call of action, after `warmup` calls that are not counted."""
    for _ in range(warmup):
        await action()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        await action()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


async def interleaved(actions: dict[str, Callable[[], Awaitable[object]]], repeats: int, *,
                      warmup: int = 1) -> dict[str, list[float]]:
    """Milliseconds per call of each action, taking turns so load drifts hit them alike."""
    samples: dict[str, list[float]] = {name: [] for name in actions}
    for round_number in range(warmup + repeats):
        for name, action in actions.items():
            started = time.perf_counter()
            await action()
            if round_number >= warmup:
                samples[name].append((time.perf_counter() - started) * 1000)
    return samples


async def run_process(argv: list[str], *, cwd: str | Path | None = None,
                      env: dict[str, str] | None = None) -> bytes:
    """Run argv to its end and return its stdout; a non-zero exit is an error."""
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=cwd, env=env)
    out, err = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {process.returncode}: {err.decode()[-500:]}")
    return out


async def sandboxed_true(sandbox: Sandbox) -> None:
    """The whole sandbox life of a process that does nothing: work dir, cgroup, bwrap, clean-up."""
    true = shutil.which("true", path=SYSTEM_PATH)
    assert true is not None
    handle = await sandbox.spawn("bench-true", None, [true], files={}, stdin=DEVNULL,
                                 stdout=DEVNULL, stderr=DEVNULL)
    try:
        code = await handle.wait_exit()
    finally:
        await handle.release()
    if code != 0:
        raise RuntimeError(f"true exited {code} in the sandbox")


# Long enough for the kernel to leave the fast path a cgroup move just took.
IDLE_GAP_S = 0.05


async def step_times(sandbox: Sandbox, repeats: int, work: Path) -> dict[str, list[float]]:
    """Milliseconds of the steps of a sandboxed start that can be timed on their own."""
    true = shutil.which("true", path=SYSTEM_PATH)
    assert true is not None
    samples: dict[str, list[float]] = {}
    await asyncio.to_thread(work.mkdir, parents=True, exist_ok=True)
    launchers = {"Python launcher (`-I -S`)": python_launcher()}
    compiled = await asyncio.to_thread(build_launcher, work)
    if compiled != python_launcher():
        launchers["C launcher"] = compiled

    def add(name: str, started: float) -> None:
        samples.setdefault(name, []).append((time.perf_counter() - started) * 1000)

    manager, _ = await asyncio.to_thread(CgroupManager.detect)
    try:
        for round_number in range(repeats + 1):
            for label, launcher in launchers.items():
                started = time.perf_counter()
                await run_process([*launcher, *launcher_args(-1, [], [true])])
                if round_number:
                    add(f"{label} started, exec of `true`", started)
            if manager is not None:
                await _joins(manager, add if round_number else lambda *_: None, launchers,
                             true)
            started = time.perf_counter()
            handle = await sandbox.spawn("bench-steps", None, [true], files={}, stdin=DEVNULL,
                                         stdout=DEVNULL, stderr=DEVNULL)
            spawned = time.perf_counter()
            await handle.wait_exit()
            exited = time.perf_counter()
            await handle.stop()
            stopped = time.perf_counter()
            await handle.release()
            if round_number:
                add("sandboxed `true`: spawn (work dir, cgroup, launcher started)", started)
                add("sandboxed `true`: until its exit", spawned)
                add("sandboxed `true`: stop (kill the process group and cgroup)", exited)
                add("sandboxed `true`: remove cgroup and work dir", stopped)
    finally:
        if manager is not None:
            manager.close()
    return samples


async def _joins(manager: CgroupManager, add: Callable[[str, float], None],
                 launchers: dict[str, list[str]], true: str) -> None:
    """Time cgroup moves: after an idle gap, right after another, and (v1) a launcher's own."""
    cgroup = manager.create(f"bench-join-{time.monotonic_ns()}", memory_bytes=1 << 28,
                            pids_max=16)
    sleeper = await asyncio.create_subprocess_exec("sleep", "5", stdin=DEVNULL)
    try:
        await asyncio.sleep(IDLE_GAP_S)
        for label in (f"after {IDLE_GAP_S * 1000:.0f} ms idle", "right after another"):
            started = time.perf_counter()
            await asyncio.to_thread(join, cgroup.procs_files, sleeper.pid)
            add(f"cgroup join, {label}", started)
        for name, launcher in launchers.items() if cgroup.join_files else ():
            await asyncio.sleep(IDLE_GAP_S)
            started = time.perf_counter()
            await run_process([*launcher, *launcher_args(-1, [], [true],
                                                         joins=cgroup.join_files)])
            add(f"{name} joining its cgroup itself (v1), after {IDLE_GAP_S * 1000:.0f} ms "
                "idle, exec of `true`", started)
    finally:
        sleeper.kill()
        await sleeper.wait()
        await cgroup.kill_all()
        await cgroup.remove()


def bwrap_argv(bwrap: str, command: list[str]) -> list[str]:
    """bubblewrap alone, with the namespaces and mounts a job gets (no cgroup, no uid drop)."""
    return [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
            "--tmpfs", "/tmp", "--tmpfs", "/run", "--dir", INNER_WORKDIR,
            "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--die-with-parent", "--new-session", "--clearenv", "--", *command]


PROGRAMS = {
    "python": "print(1)\n",
    "bash": "echo 1\n",
    "javascript": "console.log(1);\n",
    "rust": 'fn main() {\n    println!("1");\n}\n',
    "java": "class Main {\n    public static void main(String[] args) {\n"
            "        System.out.println(1);\n    }\n}\n",
}


def bare_argvs(toolchain: Toolchain, program: Program) -> list[list[str]]:
    """The job's command lines (compile, then run) with the toolchain at its host paths."""
    host = {toolchain.inner_executable: toolchain.executable}
    steps = [toolchain.run_argv(program)]
    if toolchain.compiled:
        host[toolchain.inner_compiler] = toolchain.compiler
        steps.insert(0, toolchain.compile_argv(program))
    return [[host.get(part, part) for part in argv] for argv in steps]


async def run_bare(toolchain: Toolchain) -> None:
    """Run the language's one-line program as the agent would, but unconfined."""
    program = program_for(toolchain.language, PROGRAMS[toolchain.language])
    with tempfile.TemporaryDirectory(prefix="kowalski-bench-") as workdir:
        (Path(workdir) / program.source_file).write_text(program.source)
        env = {"PATH": SYSTEM_PATH, "HOME": workdir, "TMPDIR": "/tmp", "LANG": "C.UTF-8"}
        for argv in bare_argvs(toolchain, program):
            out = await run_process(argv, cwd=workdir, env=env)
    if out.strip() != b"1":
        raise RuntimeError(f"{toolchain.language} printed {out[:100]!r}")
