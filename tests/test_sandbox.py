"""The sandbox runs real jobs: languages, limits, containment, and that nothing outlives a job."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import leftovers
import psutil
import pytest

from kowalski.agent.cgroup_mounts import locate, parse_mountinfo, parse_proc_cgroup
from kowalski.agent.cgroups import CgroupManager
from kowalski.agent.job_result import MEMORY_LIMIT, OUTPUT_LIMIT
from kowalski.agent.proc_tree import boot_ticks, group_outlived
from kowalski.agent.sandbox import Sandbox
from kowalski.common.config import SandboxConfig
from kowalski.common.errors import ConfigError, UnsupportedLanguageError
from kowalski.common.messages import LANGUAGES, JobRequest

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="bubblewrap mode needs root")

HELLO = {
    "python": "import sys\nprint('hello from python')\nprint('warn', file=sys.stderr)\n"
              "sys.exit(3)\n",
    "bash": "echo 'hello from bash'\necho warn >&2\nexit 3\n",
    "javascript": "console.log('hello from javascript');\nconsole.error('warn');\n"
                  "process.exit(3);\n",
    "rust": 'fn main() {\n    println!("hello from rust");\n    eprintln!("warn");\n'
            "    std::process::exit(3);\n}\n",
    "java": 'public class Main {\n  public static void main(String[] args) {\n'
            '    System.out.println("hello from java");\n    System.err.println("warn");\n'
            "    System.exit(3);\n  }\n}\n",
}


def small_config(**overrides: Any) -> SandboxConfig:
    values: dict[str, Any] = {
        "mode": "bwrap", "memory_limit_mb": 256, "pids_limit": 64, "max_output_bytes": 4096,
        "timeout_ms_python": 2000, "timeout_ms_bash": 2000, "timeout_ms_javascript": 2000,
        "pool_size": 0,
    }
    values.update(overrides)
    return SandboxConfig(**values)


def job(language: Any, code: str, **fields: Any) -> JobRequest:
    return JobRequest(job_id=f"t-{uuid.uuid4().hex[:8]}", language=language, code=code,
                      **fields)


def marker() -> str:
    return leftovers.marker(4000)


async def assert_nothing_left(sandbox: Sandbox, text: str | None = None) -> None:
    """No process matching text outlives the job's result; no job cgroup outlives its cleanup.

    The pool's sandboxes, ready or being made, wait for the next job: they are not left.
    """
    if text is not None:
        assert leftovers.processes_with(text) == []
    await sandbox.settled()
    idle = set() if sandbox.pool is None else sandbox.pool.idle_names()
    for base in sandbox.cgroup_dirs:
        assert [path.name for path in base.iterdir()
                if path.is_dir() and not any(path.name.startswith(name) for name in idle)] == []
        assert (base / "cgroup.procs").read_text() == ""


# Python jobs run in a ready sandbox from the pool or in one made for them: the same tests
# hold both ways.
POOL_SIZES = [pytest.param(0, id="unpooled"), pytest.param(2, id="pooled")]


@pytest.fixture(params=POOL_SIZES)
async def sandbox(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Sandbox]:
    if os.geteuid() != 0:
        pytest.skip("bubblewrap mode needs root")
    box = Sandbox(small_config(pool_size=request.param), work_root=tmp_path / "jobs")
    await box.start()
    if box.pool is not None:
        await box.pool.wait_ready()
    yield box
    await box.close()
    assert list((tmp_path / "jobs").iterdir()) == []


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A work root the unprivileged uid can enter, which rlimit mode needs."""
    path = Path(tempfile.mkdtemp(prefix="kowalski-test-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# --- languages -------------------------------------------------------------------------


@pytest.mark.parametrize("language", LANGUAGES)
async def test_each_language_reports_stdout_stderr_and_exit_code(
        sandbox: Sandbox, language: str) -> None:
    if language in sandbox.unavailable:
        pytest.skip(f"{language} is not installed here: {sandbox.unavailable[language]}")
    result = await sandbox.run_job(job(language, HELLO[language], timeout_ms=60_000))
    assert (result.stdout, result.stderr, result.exit_code) == (
        f"hello from {language}\n", "warn\n", 3)
    assert result.status == "error"
    assert result.error is not None
    assert result.error.code == "repl_error"
    assert result.wall_time_ms > 0
    await assert_nothing_left(sandbox)


async def test_languages_are_advertised_sorted_with_their_own_timeouts(
        sandbox: Sandbox) -> None:
    assert sandbox.mode == "bwrap"
    assert sandbox.languages == sorted(sandbox.languages)
    assert "python" in sandbox.languages
    assert set(sandbox.languages) | set(sandbox.unavailable) == set(LANGUAGES)
    assert sandbox.default_timeout_ms("python") == 2000
    assert sandbox.default_timeout_ms("rust") == SandboxConfig().timeout_ms_rust
    assert sandbox.job_user == (65534, 65534)


async def test_a_successful_job_reads_stdin(sandbox: Sandbox) -> None:
    result = await sandbox.run_job(job("python", "print(input()[::-1])", stdin="olleh\n"))
    assert (result.status, result.stdout, result.exit_code, result.error) == (
        "ok", "hello\n", 0, None)


async def test_toolchains_are_looked_up_on_the_given_path_only(
        tmp_path: Path, reachable_dir: Path) -> None:
    box = Sandbox(small_config(mode="none"), work_root=reachable_dir,
                  search_path=str(tmp_path))
    await box.start()
    try:
        assert "python" not in box.languages
        assert "no python3 on" in box.unavailable["python"]
        with pytest.raises(UnsupportedLanguageError, match="python"):
            await box.run_job(job("python", "print(1)"))
    finally:
        await box.close()


@needs_root
async def test_a_toolchain_that_fails_its_probe_is_not_offered(tmp_path: Path) -> None:
    # Under the private tmp_path: the probe also shows the relocation bind at work.
    fake = tmp_path / "toolchain" / "bin" / "python3"
    fake.parent.mkdir(parents=True)
    fake.parent.parent.chmod(0o755)
    fake.write_text("#!/bin/sh\necho broken >&2\nexit 7\n")
    fake.chmod(0o755)
    box = Sandbox(small_config(python_path=str(fake)), work_root=tmp_path / "jobs")
    await box.start()
    try:
        assert "python" not in box.languages
        assert "--version failed in the sandbox: broken" in box.unavailable["python"]
    finally:
        await box.close()


async def test_bwrap_mode_without_bubblewrap_refuses_to_start(tmp_path: Path) -> None:
    box = Sandbox(small_config(), work_root=tmp_path, search_path=str(tmp_path))
    with pytest.raises(ConfigError, match='mode = "rlimit"') as caught:
        await box.start()
    assert caught.value.key == "sandbox.mode"
    await box.close()


# --- privileges and file system ------------------------------------------------------------


async def test_jobs_run_unprivileged_without_capabilities(sandbox: Sandbox) -> None:
    result = await sandbox.run_job(job("bash", "id -u; id -g; grep -E '^Cap(Eff|Bnd)' "
                                              "/proc/self/status; hostname"))
    lines = result.stdout.split()
    assert lines[:2] == ["65534", "65534"]
    assert "CapEff:\t0000000000000000" in result.stdout
    assert "CapBnd:\t0000000000000000" in result.stdout
    assert lines[-1] == "sandbox"


async def test_writing_outside_the_job_dir_fails(sandbox: Sandbox, tmp_path: Path) -> None:
    name = f"kowalski-escape-{uuid.uuid4().hex}"
    code = (f"for dir in / /etc /usr {tmp_path}; do\n"
            f"  touch $dir/{name} 2>/dev/null && echo wrote $dir || echo denied $dir\ndone\n"
            f"echo private > /tmp/{name} && echo tmp-ok\necho here > ./{name} && echo job-ok\n")
    result = await sandbox.run_job(job("bash", code))
    assert result.stdout.split("\n")[:4] == [
        f"denied {directory}" for directory in ("/", "/etc", "/usr", tmp_path)]
    assert result.stdout.endswith("tmp-ok\njob-ok\n")
    for directory in ("/", "/etc", "/usr", str(tmp_path), tempfile.gettempdir()):
        assert not (Path(directory) / name).exists()


async def test_reading_etc_shadow_is_denied(sandbox: Sandbox) -> None:
    result = await sandbox.run_job(job("python", "print(open('/etc/shadow').read())"))
    assert result.status == "error"
    assert "PermissionError" in result.stderr
    assert result.stdout == ""


async def test_a_job_cannot_see_another_jobs_files() -> None:
    if os.geteuid() != 0:
        pytest.skip("bubblewrap mode needs root")
    # Outside /tmp, which every job gets a private copy of anyway: the default work
    # dir (/var/lib/kowalski/jobs) is such a place.
    root = Path(tempfile.mkdtemp(prefix="kowalski-test-", dir="/var/tmp"))
    root.chmod(0o711)
    box = Sandbox(small_config(), work_root=root / "jobs")
    await box.start()
    try:
        secret = marker()
        holder = asyncio.create_task(box.run_job(job(
            "python", f"open('secret.txt', 'w').write('{secret}')\nimport time\ntime.sleep(1)")))
        deadline = time.monotonic() + 10
        while not any(p.name == "secret.txt" for p in (root / "jobs").rglob("*")):
            assert time.monotonic() < deadline, "the first job never wrote its file"
            await asyncio.sleep(0.05)
        peek = await box.run_job(job("bash", f"ls -a {root / 'jobs'}; "
                                             f"cat {root / 'jobs'}/*/secret.txt; true"))
        assert secret not in peek.stdout
        # The work root is not in the job's view at all (nor is the rest of /var).
        assert peek.stdout.split() == []
        assert "No such file or directory" in peek.stderr
        assert (await holder).status == "ok"
    finally:
        await box.close()
        shutil.rmtree(root, ignore_errors=True)


async def test_jobs_have_no_network(sandbox: Sandbox) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        code = (
            "import socket\n"
            f"for host, port in (('127.0.0.1', {port}), ('1.1.1.1', 443)):\n"
            "    try:\n"
            "        socket.create_connection((host, port), timeout=1).close()\n"
            "        print(host, 'connected')\n"
            "    except OSError as exc:\n"
            "        print(host, 'failed', exc.errno)\n")
        result = await sandbox.run_job(job("python", code))
    assert result.status == "ok"
    assert "connected" not in result.stdout
    assert result.stdout.count("failed") == 2


async def test_a_job_that_deletes_its_own_cwd_ends_cleanly(sandbox: Sandbox) -> None:
    code = ("mkdir inner && cd inner && rmdir ../inner && echo gone\n"
            "touch x 2>/dev/null || echo cannot-write\n"
            'rm -rf "$OLDPWD"/* ; echo wiped\n')
    result = await sandbox.run_job(job("bash", code))
    assert result.stdout.split() == ["gone", "cannot-write", "wiped"]
    await assert_nothing_left(sandbox)
    again = await sandbox.run_job(job("bash", "echo still-works"))
    assert again.stdout == "still-works\n"


# --- limits ----------------------------------------------------------------------------------


async def test_an_infinite_loop_times_out_and_is_killed(sandbox: Sandbox) -> None:
    started = time.monotonic()
    result = await sandbox.run_job(job("python", "while True: pass", timeout_ms=1000))
    assert time.monotonic() - started < 5
    assert (result.status, result.exit_code) == ("timeout", None)
    assert result.error is not None
    assert result.error.code == "repl_timeout"
    assert "exceeded the 1 s limit" in result.error.message
    await assert_nothing_left(sandbox)


async def test_a_fork_bomb_hits_the_process_limit_and_dies(sandbox: Sandbox) -> None:
    tag = marker()
    # Through -c so every copy carries the tag in its command line.
    code = (f'exec python3 -c "import os, time  # {tag}\n'
            'while True:\n'
            '    try:\n'
            '        os.fork()\n'
            '    except OSError:\n'
            '        time.sleep(0.01)\n"\n')
    result = await sandbox.run_job(job("bash", code, timeout_ms=1500))
    assert result.status == "timeout"
    assert result.error is not None
    assert "limit of 64 processes" in result.error.message
    await assert_nothing_left(sandbox, tag)


@pytest.mark.parametrize(("language", "code"), [
    ("python", "chunks = []\nwhile True:\n    chunks.append(b'x' * 10**7)\n"),
    ("javascript", "const chunks = [];\nwhile (true) { chunks.push(Buffer.alloc(1e7, 1)); }\n"),
], ids=["python", "javascript"])
async def test_a_memory_hog_is_killed_at_the_memory_limit(
        sandbox: Sandbox, language: str, code: str) -> None:
    if sandbox.cgroup_version is None:
        pytest.skip("no memory cgroup here")
    result = await sandbox.run_job(job(language, code, timeout_ms=10_000))
    assert result.status == "killed"
    assert result.error is not None
    assert result.error.code == MEMORY_LIMIT
    assert "256 MB" in result.error.message
    await assert_nothing_left(sandbox)


async def test_an_output_flood_is_capped_then_killed(sandbox: Sandbox) -> None:
    tag = marker()
    started = time.monotonic()
    result = await sandbox.run_job(job("bash", f"yes {tag}", timeout_ms=20_000))
    assert time.monotonic() - started < 10
    assert result.status == "killed"
    assert result.error is not None
    assert result.error.code == OUTPUT_LIMIT
    assert "output limit exceeded" in result.error.message
    assert result.stdout_truncated
    assert len(result.stdout) == 4096
    assert result.stdout.startswith(f"{tag}\n{tag}\n")
    await assert_nothing_left(sandbox, f"yes {tag}")


async def test_output_past_the_cap_is_truncated_but_the_job_finishes(sandbox: Sandbox) -> None:
    code = "import sys\nsys.stdout.write('a' * 50_000)\nsys.stderr.write('b' * 10)\n"
    result = await sandbox.run_job(job("python", code, max_output_bytes=100))
    assert result.status == "ok"
    assert (result.stdout, result.stdout_truncated) == ("a" * 100, True)
    assert (result.stderr, result.stderr_truncated) == ("b" * 10, False)


async def test_a_request_cannot_raise_the_output_cap(sandbox: Sandbox) -> None:
    result = await sandbox.run_job(job("python", "print('a' * 10_000)", max_output_bytes=10**9))
    assert len(result.stdout) == 4096
    assert result.stdout_truncated


async def test_a_detached_child_ignoring_sigterm_does_not_outlive_the_job(
        sandbox: Sandbox) -> None:
    tag = marker()
    code = (f"setsid bash -c 'trap \"\" TERM HUP INT; exec sleep {tag}' </dev/null "
            ">/dev/null 2>&1 &\nsleep 0.2\necho started\n")
    result = await sandbox.run_job(job("bash", code))
    assert (result.status, result.stdout) == ("ok", "started\n")
    await assert_nothing_left(sandbox, tag)


async def test_cancelling_a_running_job_kills_it(sandbox: Sandbox) -> None:
    tag = marker()
    task = asyncio.create_task(sandbox.run_job(job("bash", f"sleep {tag}", timeout_ms=30_000)))
    deadline = time.monotonic() + 10
    while not leftovers.processes_with(tag):
        assert time.monotonic() < deadline, "the job never started"
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await assert_nothing_left(sandbox, tag)


@needs_root
async def test_the_result_comes_before_the_cleanup_and_a_slow_cleanup_holds_the_next_job(
        tmp_path: Path) -> None:
    box = Sandbox(small_config(), work_root=tmp_path / "jobs", job_slots=1)
    await box.start()
    try:
        many = job("python", "for n in range(20000):\n    open(f'f{n}', 'w').close()\n")
        assert (await box.run_job(many)).status == "ok"
        # The result came first: the work dir, all its files, is still there.
        [left] = [path for path in (tmp_path / "jobs").iterdir()
                  if path.name.startswith(f"job-{many.job_id}-")]
        assert (await box.run_job(job("python", "print(1)\n"))).stdout == "1\n"
        # One job slot, so one cleanup at a time: the next job waited for this removal.
        assert not left.exists()
        await assert_nothing_left(box)
    finally:
        await box.close()
    assert list((tmp_path / "jobs").iterdir()) == []


@needs_root
async def test_a_spawn_cancelled_at_any_step_ends_at_once_and_leaves_nothing(
        tmp_path: Path) -> None:
    box = Sandbox(small_config(), work_root=tmp_path / "jobs")
    await box.start()
    try:
        toolchain = box.toolchain("python")
        tag = marker()
        pipe = asyncio.subprocess.PIPE
        # From before the cgroup exists to after the pipes are connected (about 2 ms).
        for step in range(40):
            spawning = asyncio.create_task(box.spawn(
                "cancelled", toolchain,
                [toolchain.inner_executable, "-c", f"import time; time.sleep({tag})"],
                files={}, stdin=pipe, stdout=pipe, stderr=pipe))
            await asyncio.sleep(step * 0.0001)
            spawning.cancel()
            done, _ = await asyncio.wait([spawning], timeout=10)
            assert done, f"a spawn cancelled after {step * 0.1:.1f} ms never ended"
            if not spawning.cancelled():
                await spawning.result().release()
        await assert_nothing_left(box, tag)
        assert [path for path in (tmp_path / "jobs").iterdir()
                if path.name.startswith("cancelled-")] == []
    finally:
        await box.close()


async def test_close_is_idempotent_and_refuses_new_jobs(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("bubblewrap mode needs root")
    box = Sandbox(small_config(), work_root=tmp_path)
    await box.start()
    bases = box.cgroup_dirs
    await box.close()
    await box.close()
    assert all(not base.exists() for base in bases)
    result = await box.run_job(job("python", "print(1)"))
    assert result.status == "failed"
    assert result.error is not None
    assert result.error.retryable


async def test_closing_the_sandbox_fails_running_jobs_and_kills_them(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("bubblewrap mode needs root")
    box = Sandbox(small_config(), work_root=tmp_path)
    await box.start()
    tag = marker()
    task = asyncio.create_task(box.run_job(job("bash", f"sleep {tag}", timeout_ms=30_000)))
    deadline = time.monotonic() + 10
    while not leftovers.processes_with(tag):
        assert time.monotonic() < deadline, "the job never started"
        await asyncio.sleep(0.02)
    await box.close()
    result = await task
    assert result.status == "failed"
    assert result.error is not None
    assert "shut down" in result.error.message
    assert leftovers.processes_with(tag) == []


@needs_root
async def test_start_kills_what_a_dead_agent_left_in_its_cgroups(tmp_path: Path) -> None:
    first = Sandbox(small_config(), work_root=tmp_path / "first")
    await first.start()
    owners = [base.parent for base in first.cgroup_dirs]
    await first.close()
    if not owners:
        pytest.skip("no cgroups here")
    gone = await asyncio.create_subprocess_exec("true")
    await gone.wait()
    tag = marker()
    stale = [owner / f"kowalski-{gone.pid}-dead00" / "job-x" for owner in owners]
    for path in stale:
        path.mkdir(parents=True)
    joins = " ".join(f"echo $$ > {path}/cgroup.procs;" for path in stale)
    orphan = await asyncio.create_subprocess_exec("sh", "-c", f"{joins} exec sleep {tag}")
    deadline = time.monotonic() + 10
    while not leftovers.processes_with(tag):
        assert time.monotonic() < deadline, "the stand-in job never started"
        await asyncio.sleep(0.02)
    second = Sandbox(small_config(), work_root=tmp_path / "second")
    await second.start()
    try:
        assert await asyncio.wait_for(orphan.wait(), 10) == -9
        assert not any(path.parent.exists() for path in stale)
    finally:
        await second.close()


# --- other modes -------------------------------------------------------------------------------


async def test_rlimit_mode_contains_a_detached_child_and_a_timeout(reachable_dir: Path) -> None:
    box = Sandbox(small_config(mode="rlimit"), work_root=reachable_dir)
    await box.start()
    try:
        assert box.mode == "rlimit"
        tag = marker()
        code = (f"setsid bash -c 'trap \"\" TERM HUP INT; exec sleep {tag}' </dev/null "
                ">/dev/null 2>&1 &\nid -u\nsleep 30\n")
        result = await box.run_job(job("bash", code, timeout_ms=1000))
        assert result.status == "timeout"
        expected_uid = "65534" if os.geteuid() == 0 else str(os.geteuid())
        assert result.stdout == f"{expected_uid}\n"
        if box.cgroup_version is not None:
            await assert_nothing_left(box, tag)
        else:
            for process in leftovers.processes_with(tag):
                process.kill()
    finally:
        await box.close()


def take_pid(pid: int, argv: list[str]) -> subprocess.Popen[bytes]:
    """Start argv as a session leader that gets the freed number pid, as a recycled pid would."""
    for _ in range(50):
        # The kernel hands out the number after the last one it gave (root only).
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
        process = subprocess.Popen(argv, start_new_session=True)
        if process.pid == pid:
            return process
        process.kill()
        process.wait()
    pytest.skip(f"other processes kept taking pid {pid}")


@needs_root
@pytest.mark.parametrize("cgroups", [True, False], ids=["cgroup", "no-cgroup"])
@pytest.mark.parametrize("mode", ["bwrap", "rlimit"])
async def test_stopping_a_reaped_job_spares_whoever_has_its_pid_now(
        mode: str, cgroups: bool, reachable_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not cgroups:
        # A host without usable cgroups: the process group is all the agent has.
        monkeypatch.setattr(CgroupManager, "detect", classmethod(
            lambda cls: (None, "no cgroups in this test")))
    box = Sandbox(small_config(mode=mode), work_root=reachable_dir)
    await box.start()
    assert (box.cgroup_version is not None) == cgroups
    try:
        toolchain = box.toolchain("python")
        pipe = asyncio.subprocess.PIPE
        handle = await box.spawn("reaped", toolchain, [toolchain.inner_executable, "-c", "pass"],
                                 files={}, stdin=pipe, stdout=pipe, stderr=pipe)
        await handle.wait_exit()
        # Reaped: its number is free, and a stranger gets it, leading a group of its own.
        stranger = take_pid(handle.process.pid, ["sleep", marker()])
        try:
            await handle.release()
            assert stranger.poll() is None, "stopping the job killed the pid's next owner"
        finally:
            stranger.kill()
            stranger.wait()
    finally:
        await box.close()


def test_a_group_outlives_its_leader_only_through_a_member_from_before_the_reap() -> None:
    tag = marker()
    leader = subprocess.Popen(["sh", "-c", f"sleep {tag} & exit 0"], start_new_session=True)
    try:
        leader.wait()
        # The sleep, started before the reap (a tick before, at least), keeps the group.
        time.sleep(0.05)
        assert group_outlived(leader.pid, boot_ticks())
        # Seen from a moment before it started, the group has no member from then.
        assert not group_outlived(leader.pid, 0)
    finally:
        os.killpg(leader.pid, signal.SIGKILL)
    _, alive = psutil.wait_procs(leftovers.processes_with(tag), timeout=5)
    assert alive == []


@needs_root
async def test_rlimit_mode_needs_a_work_dir_the_job_user_can_enter(tmp_path: Path) -> None:
    private = tmp_path / "private" / "jobs"
    private.parent.mkdir(mode=0o700)
    box = Sandbox(small_config(mode="rlimit"), work_root=private)
    with pytest.raises(ConfigError, match="not reachable by uid 65534"):
        await box.start()
    await box.close()


async def test_none_mode_warns_loudly_but_still_enforces_the_timeout(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    box = Sandbox(small_config(mode="none"), work_root=tmp_path)
    with caplog.at_level(logging.WARNING, logger="kowalski.agent.sandbox"):
        await box.start()
    try:
        assert "SANDBOX DISABLED" in caplog.text
        assert box.job_user is None
        tag = marker()
        result = await box.run_job(job("bash", f"sleep {tag} & sleep {tag}", timeout_ms=500))
        assert result.status == "timeout"
        assert leftovers.processes_with(tag) == []
    finally:
        await box.close()


# --- cgroup discovery (pure) -----------------------------------------------------------------

V1_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V1_CGROUP = "8:pids:/\n4:memory:/box/inner\n1:cpu:/\n0::/\n"


def test_v1_hierarchies_are_found_under_the_process_own_cgroup() -> None:
    found = locate(parse_mountinfo(V1_MOUNTINFO), parse_proc_cgroup(V1_CGROUP))
    assert found == {"memory": Path("/sys/fs/cgroup/memory/box/inner"),
                     "pids": Path("/sys/fs/cgroup/pids"), "v2": Path("/sys/fs/cgroup/unified")}


def test_v2_in_a_container_strips_the_mount_root() -> None:
    mountinfo = "30 22 0:26 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n"
    found = locate(parse_mountinfo(mountinfo),
                   parse_proc_cgroup("0::/kubepods/pod1/app.service\n"))
    assert found == {"v2": Path("/sys/fs/cgroup/app.service")}
