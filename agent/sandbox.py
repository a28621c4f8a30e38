"""Runs code jobs in the sandbox; finds, probes and advertises the languages."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

from kowalski.agent import seccomp
from kowalski.agent.cgroups import CgroupManager
from kowalski.agent.jail import Jail, SandboxedProcess
from kowalski.agent.job_output import Flood, OutputListener, drain, feed, flood_limit
from kowalski.agent.job_result import Outcome, job_result, wire_error
from kowalski.agent.kept_context import KEPT_DIR
from kowalski.agent.languages import (
    SPECS,
    SYSTEM_PATH,
    Toolchain,
    program_for,
    reachable_by,
    resolve,
)
from kowalski.agent.launcher import build_launcher, cache_dir
from kowalski.agent.sandbox_pool import SandboxPool
from kowalski.common.config import SandboxConfig
from kowalski.common.errors import ConfigError, ExecutionError, UnsupportedLanguageError
from kowalski.common.messages import JobRequest, JobResult

log = logging.getLogger("kowalski.agent.sandbox")
_PROBE_TIMEOUT_S = 60.0
_DRAIN_TIMEOUT_S = 2.0
_POOL_FILL_TIMEOUT_S = 10.0


class Sandbox:
    """Runs jobs in the configured mode: bwrap, rlimit or none."""

    def __init__(self, config: SandboxConfig, *, work_root: Path,
                 search_path: str = SYSTEM_PATH, job_slots: int | None = None) -> None:
        self._config = config
        # Jobs that may run at once; the pool stays within them (see SandboxPool).
        self._job_slots = job_slots
        self._jobs_running = 0
        self.pool: SandboxPool | None = None
        self._work_root = Path(work_root)
        self._search_path = search_path
        self.mode: str = config.mode
        self.languages: list[str] = []
        # Language to the reason it is not offered.
        self.unavailable: dict[str, str] = {}
        self._toolchains: dict[str, Toolchain] = {}
        self._cgroups: CgroupManager | None = None
        self._jail: Jail | None = None
        self._setpriv = ""
        self._closed = False
        # Removals of finished jobs' cgroups and work dirs, running after their results.
        self._cleanups: set[asyncio.Task[None]] = set()

    @property
    def config(self) -> SandboxConfig:
        return self._config

    @property
    def cgroup_version(self) -> int | None:
        """1 or 2 when jobs get their own cgroup, else None."""
        return None if self._cgroups is None else self._cgroups.version

    @property
    def cgroup_controllers(self) -> list[str]:
        """The controllers each job's cgroup has (memory, pids, and cpu where available)."""
        return [] if self._cgroups is None else self._cgroups.controllers

    @property
    def cgroup_dirs(self) -> list[Path]:
        """The parent cgroups under which each job gets its own."""
        return [] if self._cgroups is None else self._cgroups.bases

    @property
    def job_user(self) -> tuple[int, int] | None:
        """The (uid, gid) jobs run as, or None when they keep the agent's."""
        return None if self._jail is None else self._jail.job_user

    async def start(self) -> None:
        """Check the mode can work, find cgroups, resolve and probe the toolchains."""
        is_root = os.geteuid() == 0
        bwrap = ""
        if self.mode == "bwrap":
            if not is_root:
                raise ConfigError('mode "bwrap" needs root to drop jobs to an unprivileged '
                                  'uid; run the agent as root or set mode = "rlimit"',
                                  key="sandbox.mode")
            bwrap = self._require("bwrap", "bubblewrap")
            try:
                await asyncio.to_thread(seccomp.program)
            except seccomp.SeccompUnavailableError as exc:
                raise ConfigError(f'mode "bwrap" loads a seccomp filter: {exc}; or set '
                                  'mode = "rlimit"', key="sandbox.mode") from None
        if self.mode != "none" and is_root:
            self._setpriv = self._require("setpriv", "util-linux")
        if self.mode == "none":
            log.warning("SANDBOX DISABLED (sandbox.mode = \"none\"): jobs run as uid %d with "
                        "no isolation and no limit but their timeout", os.geteuid())
        await asyncio.to_thread(self._work_root.mkdir, parents=True, exist_ok=True)
        # Where sessions keep their contexts for the jobs beside them (agent/kept_context.py).
        await asyncio.to_thread((self._work_root / KEPT_DIR).mkdir, mode=0o700, exist_ok=True)
        uid, gid = self._config.unprivileged_uid, self._config.unprivileged_gid
        if self._setpriv and not bwrap and not reachable_by(self._work_root, uid, gid):
            # Without bubblewrap the job sees its dir at its real path (runtimes resolve it).
            raise ConfigError(f"the work dir {self._work_root} is not reachable by uid {uid}; "
                              "let it enter every directory on the way (chmod o+x) or use "
                              'mode = "bwrap"', key="agent.work_dir")
        if self.mode != "none":
            self._cgroups, reason = await asyncio.to_thread(CgroupManager.detect)
            if self._cgroups is None:
                log.warning("no usable cgroup (%s): memory and process limits fall back to "
                            "rlimits", reason)
            elif reason:
                log.info("cgroup v%d %s (%s)", self._cgroups.version,
                         "+".join(self._cgroups.controllers), reason)
        launcher = (await asyncio.to_thread(build_launcher, cache_dir(), self._search_path)
                    if self.mode != "none" else None)
        self._jail = Jail(self._config, work_root=self._work_root, bwrap=bwrap,
                          setpriv=self._setpriv, cgroups=self._cgroups, launcher=launcher)
        if bwrap:
            await self._check_bwrap()
        results = await asyncio.gather(*(self._probe(name) for name in SPECS))
        for name, outcome in zip(SPECS, results, strict=True):
            if isinstance(outcome, Toolchain):
                self._toolchains[name] = outcome
                log.info("%s: %s (%s)", name, outcome.version, outcome.executable)
            else:
                self.unavailable[name] = outcome
                log.warning("%s is not offered: %s", name, outcome)
        self.languages = sorted(self._toolchains)
        self._start_pool()
        await self._fill_pool()

    def _start_pool(self) -> None:
        pooled: dict[str, Toolchain] = {
            name: self._toolchains[name] for name in self._config.pool_languages
            if name in self._toolchains}
        if self._config.pool_size == 0 or not pooled:
            return

        async def spawn(name: str, toolchain: Toolchain, argv: list[str],
                        gate: int) -> SandboxedProcess:
            pipe = asyncio.subprocess.PIPE
            return await self.spawn(name, toolchain, argv, files={}, stdin=pipe, stdout=pipe,
                                    stderr=pipe, pass_fds=(gate,))

        assert self._jail is not None
        self.pool = SandboxPool(toolchains=pooled, size=self._config.pool_size, spawn=spawn,
                                prepare=self._jail.add_files, slots=self._job_slots,
                                busy=lambda: self._jobs_running)
        self.pool.start()

    async def _fill_pool(self) -> None:
        # Before the agent answers: a pool filling beside its first jobs and heartbeats
        # would slow both, and make the agent look slower to the controller than it is.
        if self.pool is None:
            return
        try:
            await asyncio.wait_for(self.pool.wait_ready(), _POOL_FILL_TIMEOUT_S)
        except TimeoutError:
            log.warning("the sandbox pool is not full after %g s; filling on in the "
                        "background", _POOL_FILL_TIMEOUT_S)

    def _require(self, binary: str, package: str) -> str:
        found = shutil.which(binary, path=self._search_path)
        if found is None:
            raise ConfigError(f'mode "{self.mode}" needs {binary}, which is not installed '
                              f'(apt-get install {package}); or set mode = "rlimit"',
                              key="sandbox.mode")
        return found

    async def _check_bwrap(self) -> None:
        outcome = await self._run("check", None, [self._setpriv, "--dump"], files={},
                                  timeout_s=_PROBE_TIMEOUT_S, cap=65536)
        uid_line = f"uid: {self._config.unprivileged_uid}"
        if outcome.returncode != 0 or uid_line not in outcome.stdout.decode(errors="replace"):
            detail = (outcome.stderr or outcome.stdout).decode(errors="replace").strip()
            raise ExecutionError(f"bubblewrap cannot build a sandbox here ({detail or 'no output'})"
                                 '; fix that or set sandbox.mode = "rlimit"')

    async def _probe(self, language: str) -> Toolchain | str:
        try:
            toolchain = await resolve(language, self._config, search_path=self._search_path,
                                      relocate=self.mode == "bwrap", job_user=self.job_user)
        except LookupError as exc:
            return str(exc)
        outcome = await self._run(f"probe-{language}", toolchain, toolchain.probe_argv(),
                                  files={}, timeout_s=_PROBE_TIMEOUT_S, cap=65536)
        text = (outcome.stdout + outcome.stderr).decode(errors="replace").strip()
        if outcome.returncode != 0:
            return f"{toolchain.inner_executable} --version failed in the sandbox: " + (
                text.splitlines()[-1] if text else f"exit {outcome.returncode}")
        return replace(toolchain, version=text.splitlines()[0])

    def toolchain(self, language: str) -> Toolchain:
        found = self._toolchains.get(language)
        if found is None:
            raise UnsupportedLanguageError(language, self.languages)
        return found

    def default_timeout_ms(self, language: str) -> int:
        timeout: int = getattr(self._config, f"timeout_ms_{language}")
        return timeout

    def compile_timeout_ms(self, language: str) -> int:
        timeout: int = getattr(self._config, f"compile_timeout_ms_{language}")
        return timeout

    def output_cap(self, requested: int | None) -> int:
        """A request may lower the configured output cap, not raise it."""
        cap = self._config.max_output_bytes
        return cap if requested is None else min(requested, cap)

    async def run_job(self, request: JobRequest, *, on_output: OutputListener | None = None,
                      extra_files: Mapping[str, bytes] | None = None) -> JobResult:
        """Run one job (on_output hears its run's output live); failures come back as data.

        extra_files are put beside the program for its run (not for its compilation).
        """
        toolchain = self.toolchain(request.language)
        self._jobs_running += 1
        try:
            return await self._run_job(request, toolchain, on_output, extra_files)
        finally:
            self._jobs_running -= 1
            if self.pool is not None:
                self.pool.refill()

    async def _run_job(self, request: JobRequest, toolchain: Toolchain,
                       on_output: OutputListener | None,
                       extra_files: Mapping[str, bytes] | None) -> JobResult:
        timeout_ms = request.timeout_ms or self.default_timeout_ms(request.language)
        cap = self.output_cap(request.max_output_bytes)
        compile_ms = 0.0
        try:
            if toolchain.compiled:
                program = program_for(request.language, request.code)
                compile_timeout_ms = self.compile_timeout_ms(request.language)
                built = await self._run(
                    f"build-{request.job_id}", toolchain, toolchain.compile_argv(program),
                    files={program.source_file: program.source.encode()},
                    timeout_s=compile_timeout_ms / 1000, cap=cap, keep=toolchain.spec.artifacts)
                if built.returncode != 0 or not built.artifacts:
                    return job_result(request, built, compile_timeout_ms, self._config,
                                       phase="compile")
                compile_ms = built.wall_time_ms
                argv, files = toolchain.run_argv(program), built.artifacts
            else:
                argv = toolchain.run_argv()
                files = {toolchain.spec.source_file: request.code.encode()}
            outcome = await self._run(
                f"job-{request.job_id}", toolchain, argv, files={**(extra_files or {}), **files},
                stdin=request.stdin.encode(), timeout_s=timeout_ms / 1000, cap=cap,
                on_output=on_output, pooled=not toolchain.compiled)
        except ExecutionError as exc:
            return JobResult(job_id=request.job_id, status="failed", exit_code=None,
                             stdout="", stderr="", error=wire_error(exc))
        # The caller waited for both steps.
        outcome.wall_time_ms += compile_ms
        return job_result(request, outcome, timeout_ms, self._config)

    async def spawn(self, name: str, toolchain: Toolchain | None, argv: list[str], *,
                    files: Mapping[str, bytes], stdin: int | IO[Any] | None,
                    stdout: int | IO[Any] | None, stderr: int | IO[Any] | None,
                    pass_fds: tuple[int, ...] = (), cpu_limit: bool = True) -> SandboxedProcess:
        """Start argv confined, in a fresh work dir holding files; the caller releases it."""
        if self._jail is None or self._closed:
            raise ExecutionError("the sandbox is not running")
        return await self._jail.spawn(name, toolchain, argv, files=files, stdin=stdin,
                                      stdout=stdout, stderr=stderr, pass_fds=pass_fds,
                                      cpu_limit=cpu_limit)

    async def _run(self, name: str, toolchain: Toolchain | None, argv: list[str], *,
                   files: Mapping[str, bytes], timeout_s: float, cap: int,
                   stdin: bytes = b"", keep: str = "", pooled: bool = False,
                   on_output: OutputListener | None = None) -> Outcome:
        """Run argv to its end or timeout_s; keep: a glob of work dir files to return.

        pooled: a ready sandbox of the toolchain's language may run it instead, if any.
        """
        pipe = asyncio.subprocess.PIPE
        started = time.monotonic()
        await self._limit_cleanups()
        handle = None
        if pooled and self.pool is not None and toolchain is not None:
            handle = await self.pool.take(toolchain.language, files)
        if handle is None:
            handle = await self.spawn(name, toolchain, argv, files=files, stdin=pipe,
                                      stdout=pipe, stderr=pipe)
        process = handle.process
        assert process.stdin is not None
        assert process.stdout is not None
        assert process.stderr is not None
        flood = Flood()
        ended = False
        limit = flood_limit(cap)
        feeder = asyncio.create_task(feed(process.stdin, stdin))
        drains = [asyncio.create_task(drain(reader, name, cap, limit, flood, on_output))
                  for reader, name in ((process.stdout, "stdout"), (process.stderr, "stderr"))]
        exited = asyncio.create_task(handle.wait_exit())
        flooded = asyncio.create_task(flood.event.wait())
        try:
            await asyncio.wait([exited, flooded], timeout=timeout_s,
                               return_when=asyncio.FIRST_COMPLETED)
            wall_time_ms = (time.monotonic() - started) * 1000
            if self._closed:
                raise ExecutionError("the agent shut down while the job ran")
            returncode = handle.returncode if exited.done() else None
            # Background children must not outlive the job, even after a clean exit.
            await handle.stop()
            drained, _ = await asyncio.wait(drains, timeout=_DRAIN_TIMEOUT_S)
            out, out_truncated = drains[0].result() if drains[0] in drained else (b"", True)
            err, err_truncated = drains[1].result() if drains[1] in drained else (b"", True)
            artifacts = (await asyncio.to_thread(_collect, handle.workdir, keep)
                         if keep and returncode == 0 else {})
            ended = True
            return Outcome(
                returncode=returncode,
                stdout=out, stderr=err, stdout_truncated=out_truncated,
                stderr_truncated=err_truncated, wall_time_ms=wall_time_ms,
                timed_out=returncode is None and not flood.stream,
                flooded="" if returncode is not None else flood.stream, flood_limit=limit,
                memory_exceeded=handle.memory_exceeded(), pids_exhausted=handle.pids_exhausted(),
                artifacts=artifacts)
        finally:
            for task in [feeder, *drains, exited, flooded]:
                task.cancel()
            if ended:
                # Every process is gone and the output is read: the result need not wait
                # for the removals (close() and settled() do).
                self._clean_up_later(handle)
            else:
                await asyncio.shield(handle.release())

    def _clean_up_later(self, handle: SandboxedProcess) -> None:
        task = asyncio.ensure_future(handle.release())
        self._cleanups.add(task)
        task.add_done_callback(self._cleaned_up)

    def _cleaned_up(self, task: asyncio.Task[None]) -> None:
        self._cleanups.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("cannot clean up after a job: %r", task.exception())

    async def _limit_cleanups(self) -> None:
        # A job slot frees before its cleanup ends; past one cleanup per slot a new job
        # waits, so slow removals (a work dir of many files) cannot pile up.
        while len(self._cleanups) >= (self._job_slots or 1):
            await asyncio.wait(self._cleanups, return_when=asyncio.FIRST_COMPLETED)

    async def settled(self) -> None:
        """Wait until the cgroups and work dirs of every finished job are removed."""
        while self._cleanups:
            await asyncio.wait(self._cleanups)

    async def close(self) -> None:
        """Kill everything still running and remove the cgroups; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self.pool is not None:
            await self.pool.close()
        if self._jail is not None:
            await self._jail.close()
        if self._cgroups is not None:
            self._cgroups.close()
        await asyncio.to_thread(shutil.rmtree, self._work_root / KEPT_DIR, True)


def _collect(workdir: Path, pattern: str) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in workdir.glob(pattern) if path.is_file()}
