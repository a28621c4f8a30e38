"""Per-job control groups: cgroup v2 where memory and pids are available, else v1."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import signal
import time
from pathlib import Path

from kowalski.agent.cgroup_events import wait_unpopulated
from kowalski.agent.cgroup_mounts import (
    CONTROLLERS,
    CPU,
    locate,
    parse_mountinfo,
    parse_proc_cgroup,
)

log = logging.getLogger("kowalski.agent.cgroups")

# Names of the per-agent parent cgroups; the pid lets a new agent clear a dead one's leftovers.
BASE_PREFIX = "kowalski-"
# The CPU quota is counted per period of this length.
CPU_PERIOD_US = 100_000
# kill_all re-reads the cgroup after this pause, doubling it up to the maximum.
_KILL_FIRST_PAUSE_S = 0.0005
_KILL_MAX_PAUSE_S = 0.01


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _counter(path: Path, key: str) -> int:
    for line in _read(path).splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


class JobCgroup:
    """The cgroup (or pair of v1 cgroups) one job runs in."""

    def __init__(self, version: int, dirs: dict[str, Path]) -> None:
        self.version = version
        # Controller name to directory; in v2 every controller shares one directory.
        self.dirs = dirs

    @property
    def procs_files(self) -> list[str]:
        """The files a process writes its pid to, to join."""
        return sorted({str(path / "cgroup.procs") for path in self.dirs.values()})

    @property
    def join_files(self) -> list[str]:
        """v1: the files a single-threaded process writes "0" to, to join by itself.

        Moving one thread, the writer, skips the kernel's threadgroup lock and with it the
        RCU grace period (about 10 ms) a move by pid waits out after an idle moment. v2
        moves whole processes only (cgroup.threads stays within a domain): none.
        """
        if self.version == 2:
            return []
        return sorted({str(path / "tasks") for path in self.dirs.values()})

    def pids(self) -> set[int]:
        found: set[int] = set()
        for name in self.procs_files:
            found.update(int(pid) for pid in _read(Path(name)).split())
        return found

    def memory_exceeded(self) -> bool:
        """Whether the kernel killed a process here for going over memory.max."""
        memory = self.dirs.get("memory")
        if memory is None:
            return False
        if self.version == 2:
            return _counter(memory / "memory.events", "oom_kill") > 0
        return _counter(memory / "memory.oom_control", "oom_kill") > 0

    def pids_exhausted(self) -> bool:
        """Whether a fork failed here because of pids.max."""
        pids = self.dirs.get("pids")
        return pids is not None and _counter(pids / "pids.events", "max") > 0

    async def kill_all(self, timeout_s: float = 5.0) -> bool:
        """SIGKILL every process until none is left; False if some survived the timeout."""
        kill_file = self.dirs.get("pids", next(iter(self.dirs.values()))) / "cgroup.kill"
        if self.version == 2 and kill_file.exists():
            # One write kills every process, forks under way included; cgroup.events says
            # when the last has gone.
            try:
                kill_file.write_text("1")
                if await wait_unpopulated(kill_file.parent, timeout_s):
                    return True
                log.error("processes %s survived cgroup.kill in %s", sorted(self.pids()),
                          kill_file.parent)
                return False
            except OSError as exc:
                log.warning("cannot kill through %s (%s): killing pid by pid", kill_file, exc)
        deadline = time.monotonic() + timeout_s
        pause_s = _KILL_FIRST_PAUSE_S
        while True:
            pids = self.pids()
            if not pids:
                return True
            # A fork between reading and killing adds a pid; the pids limit bounds the rounds.
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                log.error("processes %s survived SIGKILL in %s", sorted(pids), self.dirs)
                return False
            # Killed processes leave the cgroup within a millisecond or so: a fixed 10 ms
            # pause used to double a short job's clean-up.
            await asyncio.sleep(pause_s)
            pause_s = min(pause_s * 2, _KILL_MAX_PAUSE_S)

    async def remove(self, timeout_s: float = 5.0) -> None:
        """Remove the directories; a cgroup is busy for a moment after its last process dies."""
        deadline = time.monotonic() + timeout_s
        for path in set(self.dirs.values()):
            while True:
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        log.warning("cannot remove cgroup %s: %s", path, exc.strerror)
                        break
                    await asyncio.sleep(0.02)


class CgroupManager:
    """Makes job cgroups under a parent cgroup of its own, below the agent's cgroup."""

    def __init__(self, version: int, bases: dict[str, Path], *, v2_cpu: bool = False,
                 own_procs: Path | None = None) -> None:
        self.version = version
        self._bases = bases
        # Whether the v2 parent enabled the cpu controller for job cgroups.
        self._v2_cpu = v2_cpu
        # The cgroup.procs file of the cgroup the agent itself is in (see prime).
        self._own_procs = own_procs

    @classmethod
    def detect(cls) -> tuple[CgroupManager | None, str]:
        """A manager for this process, or None and the reason none can be used."""
        try:
            mounts = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
            paths = parse_proc_cgroup(Path("/proc/self/cgroup").read_text())
        except OSError as exc:
            return None, f"cannot read /proc: {exc.strerror}"
        found = locate(mounts, paths)
        token = f"{BASE_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        reasons = []
        v2 = found.get("v2")
        if v2 is not None:
            available = set(_read(v2 / "cgroup.controllers").split())
            if set(CONTROLLERS) <= available:
                at_root = any(Path(mount.mount_point) == v2 for mount in mounts)
                cpu = CPU in available
                names = (*CONTROLLERS, CPU) if cpu else CONTROLLERS
                try:
                    base = _make_v2_base(v2, token, at_root=at_root, controllers=names)
                    return cls(2, {"v2": base}, v2_cpu=cpu, own_procs=_own_procs()), (
                        "" if cpu else "cgroup v2 lacks cpu: no per-job CPU quota")
                except OSError as exc:
                    reasons.append(f"cgroup v2 at {v2} is not writable ({exc.strerror})")
            else:
                missing = " and ".join(sorted(set(CONTROLLERS) - available))
                reasons.append(f"cgroup v2 lacks {missing}")
        bases: dict[str, Path] = {}
        for controller in (*CONTROLLERS, CPU):
            own = found.get(controller)
            if own is None:
                reasons.append(f"no cgroup v1 {controller} hierarchy")
                continue
            if own / token in bases.values():
                # Controllers mounted together share one directory.
                bases[controller] = own / token
                continue
            _clear_stale(own)
            try:
                (own / token).mkdir()
            except OSError as exc:
                reasons.append(f"cannot create a cgroup under {own} ({exc.strerror})")
                continue
            bases[controller] = own / token
        if bases:
            return cls(1, bases, own_procs=_own_procs()), "; ".join(reasons)
        return None, "; ".join(reasons) or "no cgroup file system is mounted"

    def prime(self) -> None:
        """Move the agent into its own cgroup again, so that the next job's move is quick.

        After an idle moment the kernel's first cgroup move waits out an RCU grace period
        (about 10 ms) holding the cgroup lock; moves right after it do not wait. Started
        as soon as a job's cgroup exists, that wait overlaps the work dir and the fork
        (neither needs the lock) instead of following them. Blocks: run it in a thread.
        """
        if self._own_procs is not None:
            with contextlib.suppress(OSError):
                _write(self._own_procs, str(os.getpid()))

    @property
    def bases(self) -> list[Path]:
        return sorted(set(self._bases.values()))

    @property
    def controllers(self) -> list[str]:
        if self.version == 2:
            return sorted((*CONTROLLERS, CPU) if self._v2_cpu else CONTROLLERS)
        return sorted(self._bases)

    def create(self, name: str, *, memory_bytes: int, pids_max: int,
               cpu_cores: float | None = None) -> JobCgroup:
        """A fresh cgroup with the limits set; raises OSError if it cannot be made."""
        quota_us = None if cpu_cores is None else max(1000, round(cpu_cores * CPU_PERIOD_US))
        if self.version == 2:
            path = self._bases["v2"] / name
            path.mkdir()
            shared = {"memory": path, "pids": path}
            if self._v2_cpu:
                shared[CPU] = path
            group = JobCgroup(2, shared)
            _write(path / "memory.max", str(memory_bytes))
            # Without swap limits a job could page out instead of hitting memory.max.
            _write(path / "memory.swap.max", "0", required=False)
            _write(path / "pids.max", str(pids_max))
            if self._v2_cpu and quota_us is not None:
                _write(path / "cpu.max", f"{quota_us} {CPU_PERIOD_US}")
            return group
        dirs: dict[str, Path] = {}
        try:
            for controller, base in self._bases.items():
                if base / name not in dirs.values():
                    (base / name).mkdir()
                dirs[controller] = base / name
            if "memory" in dirs:
                _write(dirs["memory"] / "memory.limit_in_bytes", str(memory_bytes))
                _write(dirs["memory"] / "memory.memsw.limit_in_bytes", str(memory_bytes),
                       required=False)
            if "pids" in dirs:
                _write(dirs["pids"] / "pids.max", str(pids_max))
            if CPU in dirs and quota_us is not None:
                _write(dirs[CPU] / "cpu.cfs_period_us", str(CPU_PERIOD_US))
                _write(dirs[CPU] / "cpu.cfs_quota_us", str(quota_us))
        except OSError:
            for path in set(dirs.values()):
                with contextlib.suppress(OSError):
                    path.rmdir()
            raise
        return JobCgroup(1, dirs)

    def close(self) -> None:
        """Remove the parent cgroups (their job cgroups are gone by now)."""
        for base in set(self._bases.values()):
            try:
                base.rmdir()
            except OSError as exc:
                log.warning("cannot remove cgroup %s: %s", base, exc.strerror)


def _own_procs() -> Path | None:
    """The cgroup.procs file of this process's own cgroup in one hierarchy, if found."""
    try:
        mounts = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
        paths = parse_proc_cgroup(Path("/proc/self/cgroup").read_text())
    except OSError:
        return None
    found = locate(mounts, paths)
    for key in ("v2", *CONTROLLERS, CPU):
        if key in found:
            return found[key] / "cgroup.procs"
    return None


def _write(path: Path, value: str, *, required: bool = True) -> None:
    try:
        path.write_text(value)
    except OSError:
        if required:
            raise


def _make_v2_base(own: Path, token: str, *, at_root: bool,
                  controllers: tuple[str, ...] = CONTROLLERS) -> Path:
    """A parent for job cgroups with the controllers enabled for its children."""
    _clear_stale(own)
    enable = " ".join(f"+{name}" for name in controllers)
    subtree = set(_read(own / "cgroup.subtree_control").split())
    if not set(controllers) <= subtree:
        if not at_root:
            # The no-internal-processes rule: a cgroup enables controllers for its children
            # only once no process sits in it, so the agent (and any process sharing its
            # cgroup) moves into a leaf first. The root cgroup is exempt.
            leaf = own / f"{BASE_PREFIX}agent"
            leaf.mkdir(exist_ok=True)
            for pid in _read(own / "cgroup.procs").split():
                with contextlib.suppress(ProcessLookupError):
                    _write(leaf / "cgroup.procs", pid)
        (own / "cgroup.subtree_control").write_text(enable)
    base = own / token
    base.mkdir()
    (base / "cgroup.subtree_control").write_text(enable)
    return base


def _clear_stale(own: Path) -> None:
    """Kill what agents that died left behind (rlimit mode has no --die-with-parent)."""
    try:
        entries = list(own.glob(f"{BASE_PREFIX}*-*"))
    except OSError:
        return
    for entry in entries:
        pid = entry.name[len(BASE_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or Path(f"/proc/{pid}").exists():
            continue
        log.warning("removing cgroup %s left by agent process %s, which is gone", entry, pid)
        for path in [*sorted(entry.glob("*/"), reverse=True), entry]:
            # Killed processes keep the cgroup busy until their parent reaps them.
            deadline = time.monotonic() + 2.0
            while True:
                for stale in _read(path / "cgroup.procs").split():
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(int(stale), signal.SIGKILL)
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if time.monotonic() > deadline:
                        log.warning("cannot remove cgroup %s: %s", path, exc.strerror)
                        break
                time.sleep(0.01)
