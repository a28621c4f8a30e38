"""Jobs that try to get out: namespaces and other denied system calls, host sockets, other
jobs' cgroups, more CPU than their quota."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pyseccomp
import pytest
from test_sandbox import POOL_SIZES, job, small_config

from kowalski.agent.cgroups import CPU_PERIOD_US
from kowalski.agent.sandbox import Sandbox
from kowalski.agent.seccomp import DENIED

pytestmark = pytest.mark.timeout(60)

CPU_CORES = 0.25
# Calls an unprivileged process may make without a filter, each with arguments that would
# give it anything but EPERM (a keyring id, 0, EFAULT, EBADF, EINVAL): only the filter
# answers EPERM. clone3 is answered ENOSYS so that glibc falls back to clone.
CALLS = {
    "unshare": (0x10000000,),  # CLONE_NEWUSER
    "clone": (0x10000000 | 17, 0, 0, 0, 0),  # CLONE_NEWUSER | SIGCHLD
    "setns": (-1, 0),
    "keyctl": (0, -3, 0),  # KEYCTL_GET_KEYRING_ID of the session keyring
    "add_key": (0, 0, 0, 0, 0),
    "ptrace": (0, 0, 0, 0),  # PTRACE_TRACEME
    "perf_event_open": (0, 0, -1, -1, 0),
    "bpf": (-1, 0, 0),
    "io_uring_setup": (1, 0),
    "userfaultfd": (0,),
    "mount": (0, 0, 0, 0, 0),
    "kexec_load": (0, 0, 0, 0),
    "clone3": (0, 0),
}
PROBE = """
import ctypes, json
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
calls = json.loads({calls!r})
found = {{}}
for name, (number, args) in calls.items():
    ctypes.set_errno(0)
    result = libc.syscall(ctypes.c_long(number), *(ctypes.c_long(arg) for arg in args))
    found[name] = ctypes.get_errno() if result == -1 else 0
print(json.dumps(found))
print(open("/proc/self/status").read().split("Seccomp:")[1].split()[0])
"""


@pytest.fixture(params=POOL_SIZES)
async def sandbox(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Sandbox]:
    if os.geteuid() != 0:
        pytest.skip("bubblewrap mode needs root")
    box = Sandbox(small_config(cpu_limit_cores=CPU_CORES, timeout_ms_python=10_000,
                               pool_size=request.param), work_root=tmp_path / "jobs")
    await box.start()
    if box.pool is not None:
        await box.pool.wait_ready()
    yield box
    await box.close()


def syscall_numbers() -> dict[str, list[int | tuple[int, ...]]]:
    arch = pyseccomp.system_arch()
    return {name: [pyseccomp.resolve_syscall(arch, name), args]
            for name, args in CALLS.items()}


async def test_a_seccomp_filter_denies_namespaces_mounts_ptrace_and_kernel_interfaces(
    sandbox: Sandbox,
) -> None:
    assert set(CALLS) - {"clone", "clone3"} <= set(DENIED)
    result = await sandbox.run_job(job("python", PROBE.format(
        calls=json.dumps(syscall_numbers()))))
    assert result.status == "ok", result
    found_line, mode = result.stdout.split("\n")[:2]
    # 2: a filter applies (0 would be none).
    assert mode == "2"
    found = json.loads(found_line)
    expected = {name: 1 for name in CALLS}  # EPERM
    expected["clone3"] = 38  # ENOSYS
    assert found == expected


async def test_a_job_cannot_make_a_user_namespace_but_still_forks_and_threads(
    sandbox: Sandbox,
) -> None:
    result = await sandbox.run_job(job("bash", "unshare -Ur id -u; echo status $?\n"
                                               "python3 -c 'import threading, os\n"
                                               "t = threading.Thread(target=print, args=(1,))\n"
                                               "t.start(); t.join()\n"
                                               "pid = os.fork()\n"
                                               "os._exit(0) if pid == 0 else "
                                               "print(os.waitpid(pid, 0)[1])'"))
    assert "Operation not permitted" in result.stderr, result
    assert result.stdout.split() == ["status", "1", "1", "0"], result


@pytest.fixture
def host_sockets() -> Iterator[list[str]]:
    """Unix sockets listening, open to every uid, where the host keeps such things."""
    dirs = [Path(tempfile.mkdtemp(prefix="kowalski-test-", dir=parent))
            for parent in ("/var/tmp", "/run", "/tmp")]
    servers, paths = [], []
    try:
        for directory in dirs:
            directory.chmod(0o755)
            path = str(directory / "host.sock")
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(path)
            server.listen()
            os.chmod(path, 0o777)
            servers.append(server)
            paths.append(path)
            # It does accept connections from the host.
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.connect(path)
        yield paths
    finally:
        for server in servers:
            server.close()
        for directory in dirs:
            shutil.rmtree(directory, ignore_errors=True)


async def test_host_unix_sockets_and_private_directories_are_out_of_sight(
    sandbox: Sandbox, host_sockets: list[str],
) -> None:
    code = ("import os, socket\n"
            f"for path in {host_sockets!r}:\n"
            "    s = socket.socket(socket.AF_UNIX)\n"
            "    try:\n"
            "        s.connect(path)\n"
            "        print('connected', path)\n"
            "    except OSError as exc:\n"
            "        print(type(exc).__name__)\n"
            "for path in ('/home', '/root', '/var', '/srv', '/mnt', '/run/systemd',\n"
            "             '/var/run/docker.sock', '/run/dbus/system_bus_socket'):\n"
            "    print(path, os.path.exists(path))\n")
    result = await sandbox.run_job(job("python", code))
    assert result.status == "ok", result
    lines = result.stdout.splitlines()
    assert lines[:3] == ["FileNotFoundError"] * 3, result.stdout
    assert all(line.endswith(" False") for line in lines[3:]), result.stdout


async def test_a_job_sees_only_its_own_cgroup_with_its_limits(sandbox: Sandbox) -> None:
    if sandbox.cgroup_version is None:
        pytest.skip("no cgroup here")
    result = await sandbox.run_job(job("bash", "cat /proc/self/cgroup; echo ---; "
                                               "find /sys/fs/cgroup -maxdepth 2 -type d; "
                                               "echo ---; ls /sys; true"))
    own, dirs, sys_entries = result.stdout.split("---\n")
    # In its cgroup namespace the job's cgroup is the root: no host or agent path shows.
    assert "kowalski" not in own, own
    assert all(line.endswith(":/") for line in own.split()), own
    assert "kowalski" not in dirs, dirs
    assert "job-" not in dirs, dirs
    assert sys_entries.split() == ["fs"]
    if sandbox.cgroup_version == 1:
        limit_file = "/sys/fs/cgroup/memory/memory.limit_in_bytes"
    else:
        limit_file = "/sys/fs/cgroup/memory.max"
    limit = await sandbox.run_job(job("bash", f"cat {limit_file}"))
    # Where java and node read their memory limit from.
    assert limit.stdout.strip() == str(256 << 20), limit


async def test_a_job_gets_no_more_cpu_than_its_quota(sandbox: Sandbox) -> None:
    if "cpu" not in sandbox.cgroup_controllers:
        pytest.skip("no cpu cgroup controller here")
    # Four busy processes for 2 s of wall time: unlimited, they would take every core.
    code = ("import os, time\n"
            "start = time.monotonic()\n"
            "pids = []\n"
            "for _ in range(4):\n"
            "    pid = os.fork()\n"
            "    if pid == 0:\n"
            "        while time.monotonic() - start < 2.0:\n"
            "            pass\n"
            "        os._exit(0)\n"
            "    pids.append(pid)\n"
            "for pid in pids:\n"
            "    os.waitpid(pid, 0)\n"
            "wall = time.monotonic() - start\n"
            "times = os.times()\n"
            "print(wall, times.children_user + times.children_system)\n")
    result = await sandbox.run_job(job("python", code))
    assert result.status == "ok", result
    wall_s, cpu_s = map(float, result.stdout.split())
    assert cpu_s <= CPU_CORES * wall_s * 1.3 + 0.1, (wall_s, cpu_s)
    quota_file = ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us" if sandbox.cgroup_version == 1
                  else "/sys/fs/cgroup/cpu.max")
    quota = await sandbox.run_job(job("bash", f"cat {quota_file}"))
    assert quota.stdout.split()[0] == str(round(CPU_CORES * CPU_PERIOD_US)), quota
