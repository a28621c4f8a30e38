"""Persistent Python sessions against real sandboxed driver processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import leftovers
import pytest

from kowalski.agent.sandbox import Sandbox
from kowalski.agent.sessions import SessionManager
from kowalski.common.config import SandboxConfig
from kowalski.common.errors import BusyError, SessionLostError, SessionNotFoundError
from kowalski.common.messages import CellRequest, CellResult, LlmCallback, SessionCreate

CALLBACK = LlmCallback(url="http://127.0.0.1:1/v1/llm", token="run-token", depth=1)

Factory = Callable[..., Awaitable[SessionManager]]


class RecordingHandler:
    """Answers llm_query() calls from the test, remembering what it was asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[LlmCallback, list[str]]] = []
        self.fail = False

    async def __call__(self, callback: LlmCallback, prompts: list[str]) -> list[str]:
        self.calls.append((callback, prompts))
        if self.fail:
            raise ConnectionError("controller unreachable")
        # Later prompts answer first, so order comes from the protocol, not timing.
        await asyncio.sleep(0.01 * (10 - min(len(prompts), 10)))
        return [f"answer to {prompt}" for prompt in prompts]


def marker() -> str:
    return leftovers.marker(5000)


def job_cgroups(sandbox: Sandbox) -> list[str]:
    """Names of the live job cgroups (v1 has one per controller, under the same name)."""
    return sorted({path.name for base in sandbox.cgroup_dirs for path in base.iterdir()
                   if path.is_dir()})


@pytest.fixture
def handler() -> RecordingHandler:
    return RecordingHandler()


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[Sandbox]:
    if os.geteuid() != 0:
        pytest.skip("bubblewrap mode needs root")
    box = Sandbox(SandboxConfig(mode="bwrap", memory_limit_mb=256, pids_limit=64, pool_size=0,
                                max_output_bytes=4096, timeout_ms_python=2000),
                  work_root=tmp_path / "work")
    await box.start()
    yield box
    await box.close()
    assert list((tmp_path / "work").iterdir()) == []


@pytest.fixture
async def make_manager(sandbox: Sandbox, handler: RecordingHandler
                       ) -> AsyncIterator[Factory]:
    managers: list[SessionManager] = []

    async def make(**options: Any) -> SessionManager:
        settings: dict[str, Any] = {"max_sessions": 4, "idle_timeout_s": 60.0,
                                    "interrupt_grace_s": 5.0}
        settings.update(options)
        manager = SessionManager(sandbox, llm_handler=handler, **settings)
        managers.append(manager)
        return manager

    yield make
    for manager in managers:
        await manager.close()
    assert job_cgroups(sandbox) == []


@pytest.fixture
async def manager(make_manager: Factory) -> SessionManager:
    return await make_manager()


async def run(manager: SessionManager, session_id: str, code: str, **fields: Any) -> CellResult:
    cell_id = fields.pop("cell_id", f"c-{uuid.uuid4().hex[:8]}")
    return await manager.execute(session_id, CellRequest(cell_id=cell_id, code=code, **fields))


async def test_variables_persist_and_a_last_expression_is_echoed(
        manager: SessionManager) -> None:
    info = await manager.create(SessionCreate(session_id="s1"))
    assert (info.session_id, info.cells_run) == ("s1", 0)
    first = await run(manager, "s1", "x = 40\nprint('set')")
    assert (first.status, first.stdout, first.stderr, first.error) == ("ok", "set\n", "", None)
    second = await run(manager, "s1", "x += 2\nx")
    assert (second.status, second.stdout) == ("ok", "42\n")
    third = await run(manager, "s1", "import sys\nprint('out')\nprint('err', file=sys.stderr)")
    assert (third.stdout, third.stderr) == ("out\n", "err\n")
    assert len(manager) == 1
    assert (await manager.create(SessionCreate(session_id="s1"))).cells_run == 3


async def test_a_million_line_context_is_loaded_before_the_first_cell(
        manager: SessionManager) -> None:
    context = "\n".join(f"line {index}" for index in range(1_000_000))
    started = time.monotonic()
    await manager.create(SessionCreate(session_id="big", context=context))
    result = await run(manager, "big", "lines = context.splitlines()\n(len(lines), lines[-1])")
    assert time.monotonic() - started < 15
    assert result.stdout == "(1000000, 'line 999999')\n"


async def test_a_json_context_keeps_its_structure(manager: SessionManager) -> None:
    await manager.create(SessionCreate(session_id="j", context={"docs": ["a", "b"], "n": 2}))
    result = await run(manager, "j", "context['docs'][1], context['n'] + 1")
    assert result.stdout == "('b', 3)\n"
    no_context = await manager.create(SessionCreate(session_id="empty"))
    assert no_context.session_id == "empty"
    assert (await run(manager, "empty", "context")).stdout == ""


async def test_an_exception_returns_its_traceback_and_the_session_lives_on(
        manager: SessionManager) -> None:
    await manager.create(SessionCreate(session_id="e"))
    await run(manager, "e", "kept = 'yes'")
    result = await run(manager, "e", "def f():\n    return 1 / 0\nf()", cell_id="boom")
    assert result.status == "error"
    assert result.error is not None
    assert result.error.code == "repl_error"
    assert "ZeroDivisionError: division by zero" in result.error.message
    assert 'File "<cell boom>", line 2, in f' in result.stderr
    assert "repl_driver" not in result.stderr
    syntax = await run(manager, "e", "def (")
    assert syntax.status == "error"
    assert "SyntaxError" in syntax.stderr
    assert (await run(manager, "e", "kept")).stdout == "'yes'\n"


async def test_a_timeout_interrupts_the_cell_and_keeps_the_state(
        manager: SessionManager) -> None:
    await manager.create(SessionCreate(session_id="t"))
    code = "import time\nstep = 1\ntry:\n    time.sleep(60)\nfinally:\n    step = 2"
    started = time.monotonic()
    result = await run(manager, "t", code, timeout_ms=500)
    assert time.monotonic() - started < 5
    assert result.status == "timeout"
    assert result.error is not None
    assert result.error.code == "repl_timeout"
    assert "keeps its variables" in result.error.message
    assert "KeyboardInterrupt" in result.stderr
    assert (await run(manager, "t", "step")).stdout == "2\n"


async def test_a_cell_that_ignores_the_interrupt_loses_the_session(
        make_manager: Factory, sandbox: Sandbox) -> None:
    manager = await make_manager(interrupt_grace_s=0.5)
    await manager.create(SessionCreate(session_id="stubborn"))
    tag = marker()
    code = ("import signal, subprocess\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
            f"subprocess.run(['sleep', '{tag}'])")
    result = await run(manager, "stubborn", code, timeout_ms=500)
    assert result.status == "timeout"
    assert result.error is not None
    assert result.error.code == "session_lost"
    assert leftovers.processes_with(tag) == []
    assert job_cgroups(sandbox) == []
    with pytest.raises(SessionLostError, match="did not stop"):
        await run(manager, "stubborn", "1")
    assert len(manager) == 0


async def test_a_memory_blow_up_loses_the_session(
        manager: SessionManager, sandbox: Sandbox) -> None:
    if sandbox.cgroup_version is None:
        pytest.skip("no memory cgroup here")
    await manager.create(SessionCreate(session_id="hog"))
    with pytest.raises(SessionLostError, match="memory limit of 256 MB"):
        await run(manager, "hog", "chunks = []\nwhile True:\n    chunks.append(b'x' * 10**7)",
                  timeout_ms=20_000)
    with pytest.raises(SessionLostError, match="memory limit"):
        await manager.get_variable("hog", "chunks")
    assert job_cgroups(sandbox) == []
    assert len(manager) == 0


async def test_a_repeated_cell_id_returns_the_first_result_without_running(
        manager: SessionManager) -> None:
    await manager.create(SessionCreate(session_id="i"))
    await run(manager, "i", "n = 0")
    first = await run(manager, "i", "n += 1\nn", cell_id="inc")
    again = await run(manager, "i", "n += 1\nn", cell_id="inc")
    assert first == again
    assert first.stdout == "1\n"
    assert (await manager.get_variable("i", "n")).value == "1"


async def test_llm_query_round_trips_through_the_handler(
        manager: SessionManager, handler: RecordingHandler) -> None:
    await manager.create(SessionCreate(session_id="llm", llm_callback=CALLBACK))
    code = ("one = llm_query('alpha')\n"
            "many = llm_query_batched([f'q{i}' for i in range(5)])\n"
            "print(one)\nprint(many)")
    result = await run(manager, "llm", code)
    assert result.status == "ok", result.stderr
    assert result.stdout == ("answer to alpha\n"
                             "['answer to q0', 'answer to q1', 'answer to q2', 'answer to q3', "
                             "'answer to q4']\n")
    assert handler.calls == [(CALLBACK, ["alpha"]), (CALLBACK, [f"q{i}" for i in range(5)])]


async def test_llm_queries_from_threads_each_get_their_own_answer(
        manager: SessionManager) -> None:
    await manager.create(SessionCreate(session_id="threads", llm_callback=CALLBACK))
    code = ("from concurrent.futures import ThreadPoolExecutor\n"
            "with ThreadPoolExecutor(4) as pool:\n"
            "    answers = list(pool.map(llm_query, ['a', 'b', 'c', 'd']))\n"
            "answers")
    result = await run(manager, "threads", code)
    assert result.stdout == ("['answer to a', 'answer to b', 'answer to c', 'answer to d']\n")


async def test_llm_query_failures_and_missing_callback_raise_in_the_cell(
        manager: SessionManager, handler: RecordingHandler) -> None:
    await manager.create(SessionCreate(session_id="plain"))
    result = await run(manager, "plain", "llm_query('hi')")
    assert result.status == "error"
    assert "RuntimeError: llm_query is not available" in result.stderr
    assert "without an llm_callback" in result.stderr
    assert handler.calls == []
    await manager.create(SessionCreate(session_id="down", llm_callback=CALLBACK))
    handler.fail = True
    failed = await run(manager, "down", "llm_query('hi')")
    assert failed.status == "error"
    assert "RuntimeError: llm_query failed: controller unreachable" in failed.stderr


async def test_get_variable_truncates_and_reports_missing_names(
        manager: SessionManager) -> None:
    await manager.create(SessionCreate(session_id="v"))
    await run(manager, "v", "answer = 'x' * 50\nclass Odd:\n    def __str__(self):\n"
                            "        raise ValueError('no')\nodd = Odd()")
    value = await manager.get_variable("v", "answer", max_chars=10)
    assert (value.found, value.value, value.truncated) == (True, "x" * 10, True)
    missing = await manager.get_variable("v", "nope")
    assert (missing.name, missing.found, missing.value) == ("nope", False, "")
    odd = await manager.get_variable("v", "odd")
    assert odd.found
    assert "ValueError: no" in odd.value


async def test_output_is_capped_and_subprocess_output_is_kept(
        manager: SessionManager) -> None:
    await manager.create(SessionCreate(session_id="o"))
    capped = await run(manager, "o", "print('y' * 10_000)", max_output_bytes=100)
    assert (capped.stdout, capped.stdout_truncated) == ("y" * 100, True)
    mixed = await run(manager, "o", "import os\nprint('from python', flush=True)\n"
                                    "status = os.system('echo from-shell; echo shell-err >&2')")
    assert mixed.stdout.split() == ["from", "python", "from-shell"]
    assert mixed.stderr == "shell-err\n"


async def test_idle_sessions_expire(make_manager: Factory, sandbox: Sandbox) -> None:
    manager = await make_manager(idle_timeout_s=0.3)
    await manager.create(SessionCreate(session_id="idle"))
    await manager.create(SessionCreate(session_id="busy"))
    reaper = asyncio.create_task(manager.run())
    try:
        deadline = time.monotonic() + 10
        while True:
            assert time.monotonic() < deadline, "the idle session was never expired"
            # A session in use does not expire.
            await run(manager, "busy", "1")
            await asyncio.sleep(0.05)
            if len(manager) > 1:
                continue
            # Lost while it is being killed, then gone (asking a live one would use it).
            with contextlib.suppress(SessionLostError):
                try:
                    await manager.get_variable("idle", "x")
                except SessionNotFoundError:
                    break
    finally:
        reaper.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reaper
    assert len(manager) == 1
    assert len(job_cgroups(sandbox)) == 1


async def test_max_sessions_is_enforced(make_manager: Factory) -> None:
    manager = await make_manager(max_sessions=2, agent_id="agent-7")
    assert (await manager.create(SessionCreate(session_id="a"))).agent_id == "agent-7"
    assert (await run(manager, "a", "1")).agent_id == "agent-7"
    await manager.create(SessionCreate(session_id="b"))
    with pytest.raises(BusyError, match="limit of 2 sessions") as caught:
        await manager.create(SessionCreate(session_id="c"))
    assert caught.value.retry_after_s > 0
    assert (await manager.create(SessionCreate(session_id="a"))).session_id == "a"
    assert await manager.delete("a")
    await manager.create(SessionCreate(session_id="c"))
    assert len(manager) == 2


async def test_delete_kills_the_session_and_everything_it_started(
        manager: SessionManager, sandbox: Sandbox) -> None:
    await manager.create(SessionCreate(session_id="d"))
    tag = marker()
    started = await run(manager, "d",
                        f"import subprocess\nchild = subprocess.Popen(['sleep', '{tag}'])")
    assert started.status == "ok", started
    # Popen returns once the child's exec has begun; its command line shows a moment later.
    deadline = time.monotonic() + 10
    while len(leftovers.processes_with(tag)) != 1:
        assert time.monotonic() < deadline, "the session's child never showed up"
        await asyncio.sleep(0.01)
    assert len(job_cgroups(sandbox)) == 1
    assert await manager.delete("d")
    assert leftovers.processes_with(tag) == []
    assert job_cgroups(sandbox) == []
    assert not await manager.delete("d")
    with pytest.raises(SessionNotFoundError):
        await manager.get_variable("d", "child")


async def test_close_kills_every_session_and_is_idempotent(
        make_manager: Factory, sandbox: Sandbox) -> None:
    manager = await make_manager()
    await asyncio.gather(*(manager.create(SessionCreate(session_id=f"s{index}"))
                           for index in range(3)))
    assert len(job_cgroups(sandbox)) == 3
    await manager.close()
    await manager.close()
    assert len(manager) == 0
    assert job_cgroups(sandbox) == []


async def warm_session_ready(manager: SessionManager) -> None:
    """Wait until the manager's pool holds a warm session."""
    deadline = time.monotonic() + 20
    while len(manager.pool) < 1:
        assert time.monotonic() < deadline, "no warm session was started"
        await asyncio.sleep(0.01)


async def test_a_warm_session_takes_a_large_context_and_close_ends_the_pool_too(
        make_manager: Factory, sandbox: Sandbox) -> None:
    manager = await make_manager(warm_sessions=1)
    pool = asyncio.create_task(manager.run())
    try:
        await warm_session_ready(manager)
        # A warm session is a process and a cgroup of its own, but not a live session.
        assert (len(manager), len(job_cgroups(sandbox))) == (0, 1)
        context = "\n".join(f"line {index}" for index in range(1_000_000))
        info = await manager.create(SessionCreate(session_id="big", context=context,
                                                  llm_callback=CALLBACK))
        assert info.warm
        result = await run(manager, "big", "lines = context.splitlines()\n"
                                           "(len(lines), lines[-1], llm_query('q'))")
        assert result.stdout == "(1000000, 'line 999999', 'answer to q')\n"
        await warm_session_ready(manager)  # the adopted one's replacement
        assert len(job_cgroups(sandbox)) == 2
    finally:
        pool.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pool
    await manager.close()
    await manager.close()
    assert (len(manager), len(manager.pool)) == (0, 0)
    assert job_cgroups(sandbox) == []


async def test_a_warm_session_lost_on_its_way_to_a_caller_gives_way_to_a_new_one(
        make_manager: Factory, sandbox: Sandbox) -> None:
    manager = await make_manager(warm_sessions=1)
    pool = asyncio.create_task(manager.run())
    try:
        await warm_session_ready(manager)
        take = manager.pool.take

        async def take_one_that_dies() -> Any:
            # The race this covers: the process ends after the pool hands it out and before
            # the context reaches it (an OOM kill, say).
            session = await take()
            assert session is not None
            await session.kill("killed on its way out of the pool")
            return session

        manager.pool.take = take_one_that_dies  # type: ignore[method-assign]
        info = await manager.create(SessionCreate(session_id="after-loss", context="abc"))
        assert not info.warm
        result = await run(manager, "after-loss", "print(len(context))")
        assert result.stdout == "3\n"
    finally:
        pool.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pool
    await manager.close()
    assert job_cgroups(sandbox) == []
