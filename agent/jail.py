"""One confined process: its work dir, cgroup, rlimits, uid and bubblewrap command line."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from kowalski.agent import seccomp
from kowalski.agent.cgroups import CgroupManager, JobCgroup
from kowalski.agent.languages import SYSTEM_PATH, SYSTEM_ROOTS, TOOLCHAIN_MOUNT, Toolchain
from kowalski.agent.launcher import join, launcher_args, python_launcher
from kowalski.agent.proc_tree import boot_ticks, descendants, group_outlived
from kowalski.agent.teardown import finish
from kowalski.common.config import SandboxConfig
from kowalski.common.errors import ExecutionError

log = logging.getLogger("kowalski.agent.jail")

# Where the job's own directory appears inside bubblewrap.
INNER_WORKDIR = "/run/job"
# Where the job's own cgroup appears (read-only, in a cgroup namespace rooted at it).
INNER_CGROUP = "/sys/fs/cgroup"
# After the last process dies its pipes close at once; this bounds orphans outside a cgroup.
_PIPE_CLOSE_TIMEOUT_S = 2.0
_STREAM_LIMIT = 1 << 16

def read_back(path: Path, size: int) -> bytes:
    """A file the agent wrote into a work dir, read back: the job owns that directory.

    Never through a link, never a pipe or a device, never a file of another size than the
    one written (blocking I/O).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as file:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode) or found.st_size != size:
            raise ValueError(f"{path.name} is no longer the file written there")
        return file.read(size)


class _Protocol(asyncio.subprocess.SubprocessStreamProtocol):
    """Tells when the process exits; Process.wait() returns only once its pipes close too."""

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=limit, loop=loop)
        self.exited = asyncio.Event()
        # When the process was reaped, in the clock ticks since boot of /proc/PID/stat.
        self.exited_ticks = 0

    def process_exited(self) -> None:
        self.exited_ticks = boot_ticks()
        super().process_exited()
        self.exited.set()


def exit_code(returncode: int) -> int:
    """Death by signal N is 128 + N, as bubblewrap and shells report it."""
    return 128 - returncode if returncode < 0 else returncode


class SandboxedProcess:
    """A process started in its own work dir and cgroup; stop() ends everything it started."""

    def __init__(self, process: asyncio.subprocess.Process,
                 transport: asyncio.SubprocessTransport, protocol: _Protocol, workdir: Path,
                 cgroup: JobCgroup | None, jail: Jail) -> None:
        self.process = process
        self.workdir = workdir
        self.cgroup = cgroup
        self._transport = transport
        self._protocol = protocol
        self._jail = jail
        self._release: asyncio.Future[None] | None = None

    @property
    def returncode(self) -> int | None:
        """The exit code once the first process has exited."""
        code = self.process.returncode
        return None if code is None else exit_code(code)

    async def wait_exit(self) -> int:
        """Wait for the first process to exit, even if descendants still hold its pipes."""
        await self._protocol.exited.wait()
        code = self.returncode
        assert code is not None
        return code

    def memory_exceeded(self) -> bool:
        return self.cgroup is not None and self.cgroup.memory_exceeded()

    def pids_exhausted(self) -> bool:
        return self.cgroup is not None and self.cgroup.pids_exhausted()

    def add_file(self, name: str, data: bytes) -> None:
        """Write one more file into the work dir, as spawn would have (blocking I/O)."""
        self._jail.write_file(self.workdir, name, data)

    async def stop(self) -> None:
        """SIGKILL the process group and every process in the cgroup, then reap."""
        pid = self.process.pid
        # Until the first process is reaped its pid, and the group it leads, are this job's.
        # After, the number is free: signalling it could hit whoever has it now (the kernel
        # hands pids out in a cycle, within seconds on a busy host with a small pid_max).
        # Then the cgroup holds what is left; without one, the group only while a member
        # from before the reap keeps its number in use. (Python's child watcher sets
        # returncode a moment after its waitpid; a number is not handed out again that soon.)
        if self.process.returncode is None or (
                self.cgroup is None and group_outlived(pid, self._protocol.exited_ticks)):
            # Without a cgroup, descendants that left the group are only found through the tree.
            stray = descendants(pid) if self.cgroup is None else []
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            for child in stray:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(child, signal.SIGKILL)
        if self.cgroup is not None:
            await self.cgroup.kill_all()
        await self._protocol.exited.wait()
        try:
            await asyncio.wait_for(self.process.wait(), _PIPE_CLOSE_TIMEOUT_S)
        except TimeoutError:
            # An orphan outside any cgroup still holds a pipe: stop listening to it.
            self._transport.close()

    async def release(self) -> None:
        """Stop, then remove the cgroup and the work dir; every caller waits for the end."""
        if self._release is None:
            self._release = asyncio.ensure_future(self._cleanup())
        await asyncio.shield(self._release)

    async def _cleanup(self) -> None:
        try:
            await self.stop()
            if self.cgroup is not None:
                await self.cgroup.remove()
            await asyncio.to_thread(shutil.rmtree, self.workdir, True)
        finally:
            self._jail.live.discard(self)


class Jail:
    """Starts confined processes the way the mode says; keeps them until released."""

    def __init__(self, config: SandboxConfig, *, work_root: Path, bwrap: str, setpriv: str,
                 cgroups: CgroupManager | None, launcher: list[str] | None = None) -> None:
        self._config = config
        self._work_root = work_root
        # Empty when not used (rlimit mode has no bwrap; none mode, or no root, no setpriv).
        self._bwrap = bwrap
        self._setpriv = setpriv
        self._cgroups = cgroups
        self._limits = config.mode != "none"
        # The command line that starts the launcher (see launcher.build_launcher).
        self.launcher = launcher or python_launcher()
        self.live: set[SandboxedProcess] = set()

    @property
    def job_user(self) -> tuple[int, int] | None:
        """The (uid, gid) jobs run as, or None when they keep the agent's."""
        if not self._setpriv:
            return None
        return self._config.unprivileged_uid, self._config.unprivileged_gid

    async def spawn(self, name: str, toolchain: Toolchain | None, argv: list[str], *,
                    files: Mapping[str, bytes], stdin: int | IO[Any] | None,
                    stdout: int | IO[Any] | None, stderr: int | IO[Any] | None,
                    pass_fds: tuple[int, ...] = (), cpu_limit: bool = True) -> SandboxedProcess:
        """Start argv in a fresh work dir (holding files) and cgroup."""
        name = f"{name}-{secrets.token_hex(4)}"
        workdir = self._work_root / name
        cgroup = None
        primer: asyncio.Future[None] | None = None
        prepared: asyncio.Future[None] | None = None
        gate_write = -1
        try:
            try:
                if self._cgroups is not None:
                    cgroup = self._cgroups.create(
                        name, pids_max=self._config.pids_limit,
                        memory_bytes=self._config.memory_limit_mb << 20,
                        cpu_cores=self._config.cpu_limit_cores)
                    if not cgroup.join_files:
                        # The agent makes the move (v2): overlap its wait, see prime.
                        primer = asyncio.ensure_future(asyncio.to_thread(self._cgroups.prime))
            except OSError as exc:
                raise ExecutionError(f"cannot make the job's cgroup: {exc}") from exc
            try:
                prepared = asyncio.ensure_future(
                    asyncio.to_thread(self._prepare, workdir, files))
                await asyncio.shield(prepared)
            except OSError as exc:
                raise ExecutionError(f"cannot prepare the work dir {workdir}: {exc}") from exc
            filter_fd = seccomp.program_fd() if self._bwrap else -1
            # v1: the launcher joins by itself; else the agent moves it, then opens the gate.
            joins = cgroup.join_files if cgroup else []
            procs = cgroup.procs_files if cgroup and not joins else []
            gate_read, gate_write = os.pipe() if procs else (-1, -1)
            try:
                rlimits = self._rlimits(toolchain, cgroup, cpu_limit)
                command = self._command(toolchain, argv, workdir, cgroup, filter_fd)
                if procs or joins or rlimits:
                    command = [*self.launcher,
                               *launcher_args(gate_read, rlimits, command, joins=joins)]
                inherited = tuple(fd for fd in (filter_fd, gate_read) if fd >= 0)
                loop = asyncio.get_running_loop()
                starting = asyncio.ensure_future(loop.subprocess_exec(
                    lambda: _Protocol(_STREAM_LIMIT, loop), *command,
                    stdin=stdin, stdout=stdout, stderr=stderr, pass_fds=(*pass_fds, *inherited),
                    start_new_session=True, cwd=workdir, env=self.environment(workdir)))
                try:
                    transport, protocol = await asyncio.shield(starting)
                except asyncio.CancelledError:
                    await finish(self._abandon(starting, workdir, cgroup),
                                 "stopping a sandbox whose start was cancelled")
                    raise
            finally:
                for fd in (filter_fd, gate_read):
                    if fd >= 0:
                        os.close(fd)
        except BaseException as exc:
            if gate_write >= 0:
                os.close(gate_write)
            # Each step to its end even if cancelled again (pool refill, then shutdown).
            if primer is not None:
                await finish(primer)
            if prepared is not None:
                # Cancelling the wait leaves the thread writing: remove the dir after it.
                await finish(prepared)
            await finish(self._discard(workdir, cgroup), "removing a sandbox that did not start")
            if isinstance(exc, OSError):
                raise ExecutionError(f"cannot start the sandbox: {exc}") from exc
            raise
        process = asyncio.subprocess.Process(transport, protocol, loop)
        handle = SandboxedProcess(process, transport, protocol, workdir, cgroup, self)
        self.live.add(handle)
        try:
            if gate_write >= 0:
                await self._open_gate(handle, procs, gate_write)
        finally:
            if primer is not None:
                await asyncio.shield(primer)
        return handle

    async def _abandon(self, starting: asyncio.Future[tuple[asyncio.SubprocessTransport,
                                                             _Protocol]],
                       workdir: Path, cgroup: JobCgroup | None) -> None:
        """Stop what a cancelled start started, once started: the start is never cancelled,
        as asyncio's clean-up of one cut off while it connects the pipes can hang (3.11)."""
        try:
            transport, protocol = await starting
        except Exception:
            return
        process = asyncio.subprocess.Process(transport, protocol, asyncio.get_running_loop())
        await SandboxedProcess(process, transport, protocol, workdir, cgroup, self).release()

    @staticmethod
    async def _open_gate(handle: SandboxedProcess, procs: list[str], gate_write: int) -> None:
        """Move the launcher into its cgroup, then let it go on; a failed move fails the job."""
        try:
            await asyncio.to_thread(join, procs, handle.process.pid)
            os.write(gate_write, b"1")
        except OSError as exc:
            # The launcher reads end of file and reports the failure as the job's.
            log.warning("cannot move a job into its cgroup %s: %s", procs, exc)
        except BaseException:
            os.close(gate_write)
            await asyncio.shield(handle.release())
            raise
        os.close(gate_write)

    @staticmethod
    async def _discard(workdir: Path, cgroup: JobCgroup | None) -> None:
        if cgroup is not None:
            await cgroup.kill_all()
            await cgroup.remove()
        await asyncio.to_thread(shutil.rmtree, workdir, True)

    def _prepare(self, workdir: Path, files: Mapping[str, bytes]) -> None:
        workdir.mkdir(mode=0o700)
        for file_name, data in files.items():
            (workdir / file_name).write_bytes(data)
        if self.job_user is not None:
            for path in [workdir, *(workdir / file_name for file_name in files)]:
                os.chown(path, *self.job_user)

    def write_file(self, workdir: Path, name: str, data: bytes) -> None:
        """Write one more file into a work dir, owned by the job user (blocking I/O)."""
        # The dir is the job user's: never follow a link there, nor reuse a file.
        fd = os.open(workdir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                     0o600)
        with os.fdopen(fd, "wb") as file:
            if self.job_user is not None:
                os.fchown(fd, *self.job_user)
            file.write(data)

    def add_files(self, handle: SandboxedProcess, files: Mapping[str, bytes]) -> None:
        """Write files into a started process's work dir, owned by the job user."""
        for file_name, data in files.items():
            self.write_file(handle.workdir, file_name, data)

    def environment(self, workdir: Path) -> dict[str, str]:
        home = INNER_WORKDIR if self._bwrap else str(workdir)
        return {"PATH": SYSTEM_PATH, "HOME": home, "TMPDIR": "/tmp", "LANG": "C.UTF-8"}

    def _command(self, toolchain: Toolchain | None, argv: list[str], workdir: Path,
                 cgroup: JobCgroup | None = None, filter_fd: int = -1) -> list[str]:
        if self.job_user is not None:
            uid, gid = self.job_user
            # bwrap run as root keeps every capability; this drops them and the uid for good.
            argv = [self._setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                    "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--", *argv]
        if not self._bwrap:
            return argv
        # Only programs, libraries and configuration, read-only: no /home, /root, /var,
        # /srv, /mnt or host /run, where sockets live (read-only does not stop connect()),
        # and no /sys, which lists every cgroup with its pids.
        command = [self._bwrap]
        for root in SYSTEM_ROOTS:
            if os.path.islink(root):
                command += ["--symlink", os.readlink(root), root]
            elif os.path.isdir(root):
                command += ["--ro-bind", root, root]
        command += ["--dev", "/dev", "--proc", "/proc",
                    "--perms", "1777", "--size", str(self._config.tmpfs_size_mb << 20),
                    "--tmpfs", "/tmp", "--perms", "0755", "--tmpfs", "/run",
                    "--bind", str(workdir), INNER_WORKDIR, "--chdir", INNER_WORKDIR]
        if cgroup is not None:
            # The job's own cgroup only, where java and node read their memory limit; the
            # cgroup namespace (rooted there: the launcher joins it before bwrap starts)
            # makes /proc/self/cgroup and mountinfo agree with it.
            command += ["--unshare-cgroup", "--perms", "0755", "--dir", "/sys",
                        "--perms", "0755", "--dir", "/sys/fs",
                        "--perms", "0755", "--dir", INNER_CGROUP]
            if cgroup.version == 2:
                command += ["--ro-bind", str(cgroup.dirs["memory"]), INNER_CGROUP]
            else:
                for controller, path in sorted(cgroup.dirs.items()):
                    command += ["--ro-bind", str(path), f"{INNER_CGROUP}/{controller}"]
        if toolchain is not None and toolchain.mount:
            command += ["--perms", "0755", "--dir", TOOLCHAIN_MOUNT,
                        "--ro-bind", toolchain.home, toolchain.mount]
        command += ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
                    "--hostname", "sandbox", "--die-with-parent", "--new-session", "--clearenv"]
        if filter_fd >= 0:
            command += ["--seccomp", str(filter_fd)]
        for key, value in self.environment(workdir).items():
            command += ["--setenv", key, value]
        return [*command, "--", *argv]

    def _rlimits(self, toolchain: Toolchain | None, cgroup: JobCgroup | None,
                 cpu_limit: bool) -> list[tuple[str, int]]:
        if not self._limits:
            return []
        config = self._config
        limits = [("RLIMIT_CORE", 0), ("RLIMIT_NOFILE", config.open_files_limit),
                  ("RLIMIT_FSIZE", config.file_size_limit_mb << 20)]
        if cpu_limit:
            limits.append(("RLIMIT_CPU", config.cpu_time_limit_s))
        controllers = cgroup.dirs if cgroup is not None else {}
        if "memory" not in controllers and (toolchain is None
                                            or toolchain.spec.address_space_limit):
            limits.append(("RLIMIT_AS", config.memory_limit_mb << 20))
        # Counts every process of the uid, so only sound for the dedicated job user.
        if "pids" not in controllers and self.job_user is not None:
            limits.append(("RLIMIT_NPROC", config.pids_limit))
        return limits

    async def close(self) -> None:
        """Release every process still live."""
        await asyncio.gather(*(handle.release() for handle in list(self.live)))
