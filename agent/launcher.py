"""The job's first process: joins the job's cgroup, sets rlimits, execs the command.

A separate process rather than preexec_fn, which is unsafe in a threaded parent. It execs
the command only once it is in the job's cgroup, so no job code runs outside it
(membership is inherited). On cgroup v1 it joins by itself; on v2 it waits on a gate fd
for the agent, which makes the move while the launcher starts.
A small C program where a C compiler is found at start-up (about 1 ms to start); else
Python with -I -S (about 7 ms), taking the same arguments (see launcher_args).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from kowalski.agent.languages import SYSTEM_PATH

log = logging.getLogger("kowalski.agent.launcher")

# The launcher's exit code and stderr prefix when it cannot start the job.
LAUNCH_FAILED = 125
LAUNCH_MARK = b"kowalski-launcher:"
# The resources a job's rlimits name; the C launcher knows exactly these.
RLIMITS = ("RLIMIT_CORE", "RLIMIT_NOFILE", "RLIMIT_FSIZE", "RLIMIT_CPU", "RLIMIT_AS",
           "RLIMIT_NPROC")
_BUILD_TIMEOUT_S = 60.0

# Its spec comes as plain arguments: importing json cost as much as starting the
# interpreter itself.
PYTHON_SOURCE = """
import os, resource, sys
args = sys.argv
try:
    gate = int(args[2])
    if gate >= 0:
        if os.read(gate, 1) != b"1":
            raise OSError("the agent could not move the job into its cgroup")
        os.close(gate)
    start = 4 + int(args[3])
    for path in args[4:start]:
        try:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
        except OSError as exc:
            raise OSError(f"cannot join the cgroup {path}: {exc.strerror}") from None
    end = start + 1 + 2 * int(args[start])
    for index in range(start + 1, end, 2):
        kind = getattr(resource, args[index])
        value = int(args[index + 1])
        hard = resource.getrlimit(kind)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(kind, (value, value))
    try:
        os.execv(args[end], args[end:])
    except OSError as exc:
        raise OSError(f"cannot run {args[end]}: {exc.strerror}") from None
except OSError as exc:
    os.write(2, b"%s %s\\n" % (args[1].encode(), str(exc).encode()))
    os._exit(125)
"""

C_SOURCE = r"""
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

static const char *mark = "kowalski-launcher:";

static int fail(const char *what, const char *detail) {
    dprintf(2, "%s %s%s\n", mark, what, detail);
    return 125;
}

static int resource_named(const char *name) {
    static const struct { const char *name; int kind; } known[] = {
        {"RLIMIT_CORE", RLIMIT_CORE}, {"RLIMIT_NOFILE", RLIMIT_NOFILE},
        {"RLIMIT_FSIZE", RLIMIT_FSIZE}, {"RLIMIT_CPU", RLIMIT_CPU},
        {"RLIMIT_AS", RLIMIT_AS}, {"RLIMIT_NPROC", RLIMIT_NPROC},
    };
    for (size_t i = 0; i < sizeof known / sizeof known[0]; i++)
        if (strcmp(known[i].name, name) == 0) return known[i].kind;
    return -1;
}

int main(int argc, char **argv) {
    if (argc < 5) return fail("bad arguments", "");
    mark = argv[1];
    int gate = atoi(argv[2]);
    if (gate >= 0) {
        char go = 0;
        if (read(gate, &go, 1) != 1 || go != '1')
            return fail("the agent could not move the job into its cgroup", "");
        close(gate);
    }
    int joins = atoi(argv[3]);
    int start = 4 + joins;
    if (joins < 0 || start >= argc) return fail("bad arguments", "");
    for (int i = 4; i < start; i++) {
        /* "0" moves the writing thread alone: the kernel skips the wait a move of a
           whole process has (see join_files in cgroups.py). */
        int fd = open(argv[i], O_WRONLY | O_CLOEXEC);
        if (fd < 0 || write(fd, "0", 1) != 1) {
            dprintf(2, "%s cannot join the cgroup %s: %s\n", mark, argv[i], strerror(errno));
            return 125;
        }
        close(fd);
    }
    int count = atoi(argv[start]);
    int end = start + 1 + 2 * count;
    if (count < 0 || end >= argc) return fail("bad arguments", "");
    for (int i = start + 1; i < end; i += 2) {
        int kind = resource_named(argv[i]);
        if (kind < 0) return fail("unknown resource ", argv[i]);
        rlim_t value = (rlim_t)strtoull(argv[i + 1], NULL, 10);
        struct rlimit limit;
        if (getrlimit(kind, &limit) != 0) return fail("getrlimit: ", strerror(errno));
        if (limit.rlim_max != RLIM_INFINITY && value > limit.rlim_max) value = limit.rlim_max;
        limit.rlim_cur = limit.rlim_max = value;
        if (setrlimit(kind, &limit) != 0) return fail("setrlimit: ", strerror(errno));
    }
    execv(argv[end], argv + end);
    dprintf(2, "%s cannot run %s: %s\n", mark, argv[end], strerror(errno));
    return 125;
}
"""


def python_launcher() -> list[str]:
    """The command line that starts the Python launcher."""
    return [sys.executable, "-I", "-S", "-c", PYTHON_SOURCE]


def cache_dir() -> Path:
    """Where the agent keeps the C launcher it built, across restarts."""
    # systemd's CacheDirectory= (the shipped unit's home is read-only), else the XDG place.
    given = os.environ.get("CACHE_DIRECTORY", "").split(":")[0]
    if given:
        return Path(given)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kowalski"


def build_launcher(directory: Path, search_path: str = SYSTEM_PATH) -> list[str]:
    """The C launcher, compiled into directory once per source; Python's without a compiler."""
    compiler = shutil.which("cc", path=search_path) or shutil.which("gcc", path=search_path)
    if compiler is None:
        log.info("no C compiler: jobs start through the Python launcher (about 6 ms slower)")
        return python_launcher()
    digest = hashlib.sha256(C_SOURCE.encode()).hexdigest()[:16]
    binary = directory / f"launcher-{digest}"
    if _trusted(directory) and _trusted(binary):
        return [str(binary)]
    partial = directory / f"launcher-{digest}.{os.getpid()}"
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not _trusted(directory):
            raise OSError(f"{directory} is not owned by this user or others can write to it")
        subprocess.run([compiler, "-O2", "-o", str(partial), "-x", "c", "-"],
                       input=C_SOURCE.encode(), capture_output=True, check=True,
                       timeout=_BUILD_TIMEOUT_S, env={"PATH": search_path, "LANG": "C"})
        partial.chmod(0o755)
        partial.replace(binary)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        log.warning("cannot build the C launcher (%s%s): jobs start through the Python "
                    "launcher", exc, f": {detail.decode(errors='replace')[-300:]}" if detail
                    else "")
        with contextlib.suppress(OSError):
            partial.unlink()
        return python_launcher()
    return [str(binary)]


def _trusted(path: Path) -> bool:
    """Whether path is ours and writable by no one else."""
    try:
        status = path.stat()
    except OSError:
        return False
    return status.st_uid == os.geteuid() and not status.st_mode & 0o022


def launcher_args(gate_fd: int, rlimits: list[tuple[str, int]], argv: list[str], *,
                  joins: list[str] | None = None) -> list[str]:
    """The launcher's arguments: mark, gate fd (-1: none), joins, rlimits, command.

    joins: the cgroup files (v1 `tasks`) the launcher writes "0" to, joining them itself.
    """
    joins = joins or []
    limits = [str(part) for pair in rlimits for part in pair]
    return [LAUNCH_MARK.decode(), str(gate_fd), str(len(joins)), *joins, str(len(rlimits)),
            *limits, *argv]


def join(procs_files: list[str], pid: int) -> None:
    """Move pid into the cgroup whose cgroup.procs files these are."""
    for path in procs_files:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, str(pid).encode())
        finally:
            os.close(fd)
