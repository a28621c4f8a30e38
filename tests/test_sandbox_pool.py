"""Ready sandboxes from the pool: a job there behaves as in a fresh one and sees nothing of
the job before it."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from test_sandbox import assert_nothing_left, job, marker, small_config

from kowalski.agent.sandbox import Sandbox

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(os.geteuid() != 0, reason="bubblewrap mode needs root")]

# Prints what a Python job can see of how it was started; its stderr starts by telling
# whether it ran in a pooled interpreter (started with -c) or a fresh one.
PROBE = """\
import os, sys
print(sorted(vars()), __name__, __file__, __spec__, __package__, __cached__,
      type(__loader__).__name__)
print(sys.argv, sys.path[0], os.getcwd(), sorted(os.environ.items()))
print(sys.flags.isolated, sys.flags.no_site, sys.stdout.write_through, "site" in sys.modules)
print(open(__file__).read() == open("main.py").read(), os.listdir("."))
print("stdin:", sys.stdin.read())
def fail():
    raise ValueError("from the job")
try:
    fail()
finally:
    print("-c" in sys.orig_argv, file=sys.stderr)
"""
POOLED_MARK = "True\n"


async def make(tmp_path: Path, name: str, job_slots: int | None = None,
               **overrides: Any) -> Sandbox:
    box = Sandbox(small_config(**overrides), work_root=tmp_path / name, job_slots=job_slots)
    await box.start()
    if box.pool is not None:
        await box.pool.wait_ready()
    return box


@pytest.fixture
async def pooled(tmp_path: Path) -> AsyncIterator[Sandbox]:
    box = await make(tmp_path, "pooled", pool_size=2)
    yield box
    await box.close()
    assert list((tmp_path / "pooled").iterdir()) == []


def ran_pooled(stderr: str) -> bool:
    return stderr.startswith(POOLED_MARK)


async def test_a_pooled_job_sees_and_reports_what_a_fresh_one_does(
        pooled: Sandbox, tmp_path: Path) -> None:
    fresh = await make(tmp_path, "fresh", pool_size=0)
    try:
        plain = await fresh.run_job(job("python", PROBE, stdin="given"))
    finally:
        await fresh.close()
    assert pooled.pool is not None
    assert (pooled.pool.size, pooled.pool.ready) == (2, 2)
    taken = await pooled.run_job(job("python", PROBE, stdin="given"))
    assert ran_pooled(taken.stderr)
    assert not ran_pooled(plain.stderr)
    assert "ValueError: from the job" in plain.stderr
    assert taken.stderr.removeprefix(POOLED_MARK) == plain.stderr.removeprefix("False\n")
    assert (taken.stdout, taken.status, taken.exit_code, taken.error) == (
        plain.stdout, plain.status, plain.exit_code, plain.error)
    assert "stdin: given" in taken.stdout
    await assert_nothing_left(pooled)


async def test_a_syntax_error_and_sys_exit_end_a_pooled_job_as_a_fresh_one(
        pooled: Sandbox) -> None:
    broken = await pooled.run_job(job("python", "x = (\n"))
    assert (broken.status, broken.exit_code) == ("error", 1)
    assert broken.stderr.startswith('  File "/run/job/main.py", line 1\n'), broken.stderr
    assert pooled.pool is not None
    await pooled.pool.wait_ready()
    ended = await pooled.run_job(job("python", "import sys\nprint('out')\nsys.exit('bye')\n"))
    assert (ended.status, ended.exit_code, ended.stdout, ended.stderr) == (
        "error", 1, "out\n", "bye\n")


async def test_the_next_job_from_the_pool_sees_nothing_of_the_one_before(
        pooled: Sandbox) -> None:
    sleep = marker()
    first = await pooled.run_job(job("python", f"""\
import os, subprocess, sys
open("left.txt", "w").write("secret")
open("/tmp/left.txt", "w").write("secret")
os.environ["LEFT"] = "secret"
os.putenv("LEFT_TOO", "secret")
subprocess.Popen(["setsid", "sleep", "{sleep}"], start_new_session=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print("-c" in sys.orig_argv)
"""))
    assert (first.status, first.stdout) == ("ok", "True\n"), first
    assert pooled.pool is not None
    await pooled.pool.wait_ready()
    second = await pooled.run_job(job("python", """\
import json, os, sys
print(json.dumps({"cwd": sorted(os.listdir(".")), "tmp": sorted(os.listdir("/tmp")),
                  "env": sorted(os.environ),
                  "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
                  "pooled": "-c" in sys.orig_argv}))
"""))
    assert second.status == "ok", second
    seen = json.loads(second.stdout)
    assert seen["pooled"]
    assert seen["cwd"] == ["main.py"]
    assert seen["tmp"] == []
    assert seen["env"] == ["HOME", "LANG", "PATH", "PWD", "TMPDIR"]
    # bubblewrap's init and the job: nothing else in its pid namespace.
    assert len(seen["pids"]) <= 2, seen["pids"]
    await assert_nothing_left(pooled, sleep)


async def test_an_empty_pool_falls_back_to_a_fresh_sandbox(tmp_path: Path) -> None:
    box = await make(tmp_path, "one", pool_size=1)
    try:
        code = "import sys, time\ntime.sleep(0.3)\nprint('-c' in sys.orig_argv)\n"
        results = await asyncio.gather(*(box.run_job(job("python", code)) for _ in range(3)))
        assert [result.status for result in results] == ["ok"] * 3
        assert sorted(result.stdout for result in results) == ["False\n", "False\n", "True\n"]
        assert box.pool is not None
        await box.pool.wait_ready()
        assert box.pool.ready == 1
    finally:
        await box.close()
    assert list((tmp_path / "one").iterdir()) == []


async def test_ready_sandboxes_and_running_jobs_share_the_job_slots(tmp_path: Path) -> None:
    box = await make(tmp_path, "slots", pool_size=2, job_slots=2)
    try:
        assert box.pool is not None
        assert (box.pool.size, box.pool.ready) == (2, 2)
        running = asyncio.ensure_future(box.run_job(job("python", "import time\n"
                                                                  "time.sleep(1.5)\n")))
        # The job takes its sandbox in its first step.
        await asyncio.sleep(0)
        box.pool.refill()
        await box.pool.wait_ready()
        # One slot runs the job, so the pool keeps one ready sandbox, not two.
        assert box.pool.ready == 1
        assert not running.done()
        assert (await running).status == "ok"
        await box.pool.wait_ready()
        assert box.pool.ready == 2
    finally:
        await box.close()


async def test_a_pooled_job_keeps_the_time_memory_and_output_limits(pooled: Sandbox) -> None:
    assert pooled.pool is not None
    slow = await pooled.run_job(job("python", "import time\ntime.sleep(30)\n",
                                    timeout_ms=500))
    assert (slow.status, slow.error and slow.error.code) == ("timeout", "repl_timeout"), slow
    await pooled.pool.wait_ready()
    hungry = await pooled.run_job(job("python", "x = bytearray(400 << 20)\nx[::4096] = "
                                                "b'1' * len(x[::4096])\n"))
    assert hungry.status == "killed", hungry
    await pooled.pool.wait_ready()
    loud = await pooled.run_job(job("python", "print('x' * 10000)\n", max_output_bytes=100))
    assert (loud.status, loud.stdout_truncated, len(loud.stdout)) == ("ok", True, 100)
    await assert_nothing_left(pooled)
