"""Durable runs: a run goes on after its controller dies, and `runs resume` continues one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from controller_env import controller_config
from exo_standin import DEFAULT_MODEL, make_exo_app
from local_session import LocalSession
from procs import SECRET, AgentProcess, stop_process

from kowalski.agent.sandbox import Sandbox
from kowalski.agent.sessions import SessionManager
from kowalski.common import config as config_module
from kowalski.common.config import RlmConfig, SandboxConfig
from kowalski.common.errors import ParseError, RunNotResumableError
from kowalski.common.messages import LlmCallback, SessionCreate
from kowalski.controller.cli.exit_codes import EXIT_FAILED, EXIT_OK
from kowalski.controller.models.chat_types import ChatRequest, ChatResult
from kowalski.controller.models.exo_client import ExoClient
from kowalski.controller.rlm import durable
from kowalski.controller.rlm.durable import (
    ContextCopy,
    context_name,
    load_context,
    store_context,
)
from kowalski.controller.rlm.events import (
    IterationFinished,
    RlmEvent,
    RunFinished,
    RunResumed,
    SubCallAnswered,
    TokenCount,
)
from kowalski.controller.rlm.loop import RlmRun
from kowalski.controller.rlm.resume import RecordedAnswers, plan_resume
from kowalski.controller.rlm.trajectory import read_trajectory
from kowalski.controller.service import Controller

pytestmark = pytest.mark.timeout(180)

LAST = 10
QUERY = "join the step answers"
CONTEXT = "some context\n" * 7
EXPECTED = "|".join(f"a{n}" for n in range(1, LAST)) + f"|{len(CONTEXT)}"


class ScriptedModel:
    """A ten-iteration run: each turn asks one sub-call, the tenth joins their answers.

    The iteration is read from the conversation's length, so a resumed run that rebuilt it
    gets the reply the uninterrupted run would have got. Every request is logged.
    """

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.sub_prefix = "a"
        # Set: the second reply also runs a bash block, a job beside the session.
        self.with_bash = False
        # While set, a root request for this iteration waits until the event is set.
        self.hold_at = 0
        self.release = asyncio.Event()
        # Set once a request waits at hold_at.
        self.held = asyncio.Event()

    async def __call__(self, body: dict[str, Any]) -> str:
        messages = body["messages"]
        if messages[0]["role"] != "system":
            step = messages[-1]["content"].split()[-1]
            self.asked.append(f"sub {step}")
            return f"{self.sub_prefix}{step}"
        n = len(messages) // 2
        self.asked.append(f"root {n}")
        if n == self.hold_at and not self.release.is_set():
            self.held.set()
            await self.release.wait()
        if n == 1:
            return "```repl\nacc = [llm_query('step 1')]\nprint(len(acc))\n```"
        if n < LAST:
            bash = "```bash\necho step two\n```\n" if self.with_bash and n == 2 else ""
            return f"{bash}```repl\nacc.append(llm_query('step {n}'))\nprint(len(acc))\n```"
        return "```repl\nanswer = '|'.join(acc) + f'|{len(context)}'\n```\nFINAL_VAR(answer)"


def iterations_asked(asked: list[str]) -> set[int]:
    return {int(entry.split()[1]) for entry in asked}


# --- the replay, in one process ------------------------------------------------------------


class Backend:
    def __init__(self, client: ExoClient) -> None:
        self.client = client

    async def chat(self, request: ChatRequest, *, operation: str = "llm_inference"
                   ) -> ChatResult:
        return await self.client.chat(request)


class Rig:
    """RlmRuns over an in-process session manager and a scripted model on loopback."""

    def __init__(self, model: ScriptedModel, backend: Backend, runs_dir: Path) -> None:
        self.model, self.backend, self.runs_dir = model, backend, runs_dir
        self.manager: SessionManager | None = None
        self.runs: dict[str, RlmRun] = {}
        self.sessions = 0

    async def relay(self, callback: LlmCallback, prompts: list[str]) -> list[str]:
        return await self.runs[callback.token].answer_sub_calls(prompts)

    async def factory(self, context: Any, run: RlmRun) -> LocalSession:
        assert self.manager is not None
        self.runs[run.run_id] = run
        self.sessions += 1
        session_id = f"{run.run_id}-{self.sessions}"
        await self.manager.create(SessionCreate(
            session_id=session_id, context=context,
            llm_callback=LlmCallback(url="local", token=run.run_id, depth=run.depth + 1)))
        return LocalSession(self.manager, session_id)

    def new_run(self, run_id: str, observer: Any = None) -> RlmRun:
        config = RlmConfig(trajectory_dir=str(self.runs_dir), max_iterations=LAST)
        return RlmRun(QUERY, CONTEXT, backend=self.backend, session_factory=self.factory,
                      config=config, model=DEFAULT_MODEL, run_id=run_id, observer=observer,
                      context_file=_stored_context(self.runs_dir, run_id))



def _stored_context(runs_dir: Path, run_id: str) -> str:
    name = context_name(run_id, CONTEXT)
    store_context(runs_dir, name, CONTEXT)
    return name

@pytest.fixture
async def rig(aiohttp_server: Any, tmp_path: Path) -> AsyncIterator[Rig]:
    model = ScriptedModel()
    server = await aiohttp_server(make_exo_app(models=(DEFAULT_MODEL,), reply=model))
    client = ExoClient(str(server.make_url("")))
    mode = "bwrap" if os.geteuid() == 0 else "rlimit"
    box = Sandbox(SandboxConfig(mode=mode, memory_limit_mb=512, pids_limit=64),
                  work_root=tmp_path / "jobs")
    await box.start()
    made = Rig(model, Backend(client), tmp_path / "runs")
    made.manager = SessionManager(box, max_sessions=4, idle_timeout_s=60, llm_handler=made.relay)
    yield made
    await made.manager.close()
    await box.close()
    await client.close()


@pytest.mark.parametrize("with_bash", [False, True], ids=["python", "python-and-bash"])
async def test_resume_replays_cells_with_recorded_sub_call_answers(
    rig: Rig, with_bash: bool,
) -> None:
    # A bash block ran as a job beside the session: replaying it into the Python session
    # would fail, so only the Python cells are replayed.
    rig.model.hold_at, rig.model.with_bash = 4, with_bash
    finished: list[int] = []

    def observe(event: RlmEvent) -> None:
        if isinstance(event, IterationFinished):
            finished.append(event.iteration)

    first = rig.new_run("rlm-durable-unit", observe)
    task = asyncio.create_task(first.run())
    await asyncio.wait_for(rig.model.held.wait(), 60)
    # The controller stops here: the run keeps no end, as after a crash.
    first.suspended = True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    rig.model.release.set()
    assert finished == [1, 2, 3]
    trajectory = read_trajectory("rlm-durable-unit", rig.runs_dir)
    assert trajectory.finished is None
    plan = plan_resume(trajectory, reason="by hand")
    assert (plan.next_iteration, len(plan.sub_calls)) == (4, 3)

    # Were the model asked again, its sub-call answers would now differ.
    rig.model.sub_prefix, rig.model.asked = "b", []
    result = await rig.new_run("rlm-durable-unit").resume(plan)
    assert result.stop_reason == "final_var"
    assert result.answer == "a1|a2|a3|" + "|".join(f"b{n}" for n in range(4, LAST)) + (
        f"|{len(CONTEXT)}")
    assert min(iterations_asked(rig.model.asked)) == 4
    assert result.iterations == LAST
    assert result.sub_calls == LAST - 1
    events = read_trajectory("rlm-durable-unit", rig.runs_dir).events
    [seam] = [event for event in events if isinstance(event, RunResumed)]
    assert (seam.iteration, seam.replayed_cells, seam.replayed_sub_calls) == (4, 3, 3)
    assert isinstance(events[-1], RunFinished)


def _call(iteration: int, prompt: str, answer: str) -> SubCallAnswered:
    return SubCallAnswered(run_id="r", depth=0, iteration=iteration, prompt_chars=len(prompt),
                           answer_chars=len(answer), latency_ms=1.0, tokens=TokenCount(),
                           prompt=prompt, answer=answer)


def test_recorded_answers_match_by_prompt_and_notice_a_different_replay() -> None:
    calls = [_call(1, "x", "first x"), _call(1, "y", "y"), _call(1, "x", "second x"),
             _call(2, "x", "x of 2")]
    answers = RecordedAnswers(calls)
    # A batch answered out of order is still matched prompt by prompt.
    assert answers.answer(1, ["y", "x"]) == ["y", "first x"]
    assert answers.answer(1, ["x"]) == ["second x"]
    assert answers.diverged == ""
    assert "1 recorded sub-call" in answers.unused()
    assert answers.answer(1, ["z"]) == ["Error: this sub-call is not in the run's record"]
    assert "'z'" in answers.diverged
    assert "iteration 1" in answers.diverged


async def test_plan_refuses_finished_runs_and_too_low_limits(rig: Rig) -> None:
    result = await rig.new_run("rlm-durable-done").run()
    assert result.answer == EXPECTED
    trajectory = read_trajectory("rlm-durable-done", rig.runs_dir)
    with pytest.raises(RunNotResumableError, match="has finished"):
        plan_resume(trajectory, reason="by hand")
    rig.model.hold_at = 3
    run = rig.new_run("rlm-durable-cut")
    task = asyncio.create_task(run.run())
    await asyncio.wait_for(rig.model.held.wait(), 60)
    run.suspended = True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    rig.model.release.set()
    with pytest.raises(ParseError, match="too low"):
        plan_resume(read_trajectory("rlm-durable-cut", rig.runs_dir), reason="by hand",
                    max_iterations=2)


# --- a real controller, killed mid-run ------------------------------------------------------


def _write_config(tmp: Path, agents: list[AgentProcess], exo_url: str) -> Path:
    config = controller_config(agents, [exo_url], tmp, rlm={"max_iterations": LAST})
    path = tmp / "controller.toml"
    path.write_text(config_module.dumps(config))
    return path


async def _serve(tmp: Path, config: Path, name: str) -> tuple[asyncio.subprocess.Process, str]:
    port_file = tmp / f"{name}.port"
    with (tmp / f"{name}.log").open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kowalski.controller", "--config", str(config), "serve",
            "--port-file", str(port_file), stdout=log, stderr=log,
            env={**os.environ, "KOWALSKI_SECRET": SECRET})
    async with asyncio.timeout(30):
        while not (port_file.exists() and port_file.read_text().strip()):
            assert process.returncode is None, (tmp / f"{name}.log").read_text()
            await asyncio.sleep(0.05)
    return process, f"http://127.0.0.1:{int(port_file.read_text())}"



async def _wait_healthy(http: aiohttp.ClientSession, base: str) -> None:
    async with asyncio.timeout(30):
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(base + "/v1/devices") as response:
                    devices = await response.json()
                    if any(row["health"] == "healthy" for row in devices):
                        return
            await asyncio.sleep(0.1)


@pytest.fixture
def agent_count() -> int:
    return 1


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "stopped"])
async def test_a_run_killed_with_its_controller_finishes_after_the_restart(
    agents: list[AgentProcess], aiohttp_server: Any, tmp_path: Path, signum: int,
) -> None:
    model = ScriptedModel()
    exo = await aiohttp_server(make_exo_app(models=(DEFAULT_MODEL,), reply=model))
    config = _write_config(tmp_path, agents, str(exo.make_url("")).rstrip("/"))
    process, base = await _serve(tmp_path, config, "first")
    try:
        async with aiohttp.ClientSession() as http:
            await _wait_healthy(http, base)
            run_id = ""
            async with http.post(base + "/v1/runs", json={
                    "query": QUERY, "context": CONTEXT, "stream": True}) as response:
                assert response.status == 200, await response.text()
                # Read on to the stream's end: a client that hangs up cancels its run.
                with contextlib.suppress(aiohttp.ClientError):
                    async for line in response.content:
                        event = json.loads(line)
                        run_id = run_id or event["run_id"]
                        if event["kind"] == "iteration_finished" and event["iteration"] == 4:
                            process.send_signal(signum)
            await process.wait()
    finally:
        await stop_process(process)
    cut = read_trajectory(run_id, tmp_path / "runs")
    assert cut.finished is None
    asked_before = list(model.asked)
    assert max(iterations_asked(asked_before)) < LAST

    process, base = await _serve(tmp_path, config, "second")
    try:
        async with aiohttp.ClientSession() as http:
            async with asyncio.timeout(90):
                while True:
                    async with http.get(f"{base}/v1/runs/{run_id}") as response:
                        assert response.status == 200, await response.text()
                        stored = await response.json()
                    if stored["events"][-1]["kind"] == "run_finished":
                        break
                    await asyncio.sleep(0.2)
            asked_after = model.asked[len(asked_before):]
            # The uninterrupted run, for comparison.
            async with http.post(base + "/v1/runs",
                                 json={"query": QUERY, "context": CONTEXT}) as response:
                assert response.status == 200, await response.text()
                uninterrupted = await response.json()
    finally:
        await stop_process(process)
    result = stored["events"][-1]["result"]
    assert (result["stop_reason"], result["answer"]) == ("final_var", EXPECTED)
    assert uninterrupted["answer"] == result["answer"]
    [seam] = [event for event in stored["events"] if event["kind"] == "resumed"]
    assert seam["reason"] == "controller restart"
    assert seam["iteration"] >= 5
    assert seam["replayed_cells"] == seam["iteration"] - 1
    # Nothing already done went to the model again: not its replies, not its sub-calls.
    assert min(iterations_asked(asked_after)) == seam["iteration"]
    assert result["iterations"] == LAST
    assert result["sub_calls"] == LAST - 1
    log = (tmp_path / "second.log").read_text()
    assert f"resuming 1 run(s) left unfinished: {run_id}" in log


# --- kowalski-ctl runs resume ---------------------------------------------------------------


@pytest.fixture
def exo_reply() -> ScriptedModel:
    return ScriptedModel()


async def _ctl(*argv: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kowalski.controller", *argv, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_runs_resume_goes_past_an_iteration_limit_and_says_what_is_wrong(
    controller: Controller, tmp_path: Path,
) -> None:
    base = controller.base_url
    async with aiohttp.ClientSession() as http, http.post(base + "/v1/runs", json={
            "query": QUERY, "context": CONTEXT, "max_iterations": 3}) as response:
        stopped = await response.json()
    assert stopped["stop_reason"] == "max_iterations"
    run_id = stopped["run_id"]
    # A run that can still go on keeps its context; one that has ended for good does not.
    stored_context = tmp_path / "runs" / context_name(run_id, CONTEXT)
    assert stored_context.is_file()
    for argv, message in (
        (["rlm-nope"], "no run rlm-nope"),
        ([run_id], "stopped at its iteration limit of 3; give a higher one with "
                   "--max-iterations"),
        ([run_id, "--max-iterations", "3"], "--max-iterations 3 is too low"),
        ([run_id, "--max-iterations", "21"], "over this controller's limit of 20"),
    ):
        code, _, err = await _ctl("--url", base, "runs", "resume", *argv)
        assert (code, err.count("\n")) == (EXIT_FAILED, 1), err
        assert message in err
    code, out, err = await _ctl("runs", "resume", run_id, "--max-iterations", "10", "--url",
                                base, "--json")
    assert code == EXIT_OK, err
    result = json.loads(out)
    assert (result["stop_reason"], result["answer"]) == ("final_var", EXPECTED)
    assert result["iterations"] == LAST
    assert not stored_context.exists()
    code, _, err = await _ctl("runs", "resume", run_id, "--url", base)
    assert code == EXIT_FAILED
    assert f"run {run_id} has finished (final_var)" in err
    code, out, err = await _ctl("runs", "--dir", str(tmp_path / "runs"), "show", run_id)
    assert code == EXIT_OK, err
    assert "── Resumed at iteration 4 (by hand," in out
    assert "replayed 3 cell(s) and 3 sub-call answer(s) from the record; limit 10" in out
    assert "── Finished: final_var ── after 10 iterations" in out
    # The call tree marks the seam between the iterations before and after it.
    code, out, err = await _ctl("runs", "--dir", str(tmp_path / "runs"), "show", run_id,
                                "--tree")
    assert code == EXIT_OK, err
    rows = [line.lstrip("├└─│ ").split(" · ")[0] for line in out.splitlines()[1:]
            if not line.startswith(("│  ", "   "))]
    # The final request at the old limit stays where it was; the resume goes on after it.
    assert rows == [*(f"Iteration {n}" for n in range(1, 4)), "Final request",
                    "Resumed at iteration 4", *(f"Iteration {n}" for n in range(4, 11))], out
    assert "Resumed at iteration 4 · by hand · replayed 3 cell(s) and 3 sub-call answer(s)" in out


async def test_a_run_that_cannot_be_resumed_is_closed_with_the_reason(
    controller: Controller, rig: Rig, tmp_path: Path,
) -> None:
    rig.model.hold_at = 2
    run = rig.new_run("rlm-durable-lost")
    task = asyncio.create_task(run.run())
    await asyncio.wait_for(rig.model.held.wait(), 60)
    run.suspended = True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    rig.model.release.set()
    for stored in (tmp_path / "runs" / "contexts").iterdir():
        stored.unlink()
    await controller.state.runs.resume_unfinished()
    finished = read_trajectory("rlm-durable-lost", tmp_path / "runs").finished
    assert finished is not None
    result = finished.result
    assert result.stop_reason == "error"
    assert result.error is not None
    assert result.error.code == "not_found"
    assert "the run could not be resumed: the run's stored context" in result.detail
    assert "is gone" in result.detail
    # Closed once: a second look at start finds nothing left to do.
    await controller.state.runs.resume_unfinished()
    events = read_trajectory("rlm-durable-lost", tmp_path / "runs").events
    assert sum(isinstance(event, RunFinished) for event in events) == 1


@pytest.mark.parametrize("context", [None, "", "text ünï \U0001f600\nline two", {"k": [1, "v"]}],
                         ids=["none", "empty", "text", "dict"])
async def test_a_stored_context_reads_back_as_it_was_given(tmp_path: Path, context: Any) -> None:
    # A run without a context is resumable too: its copy says so rather than being missing.
    copy = ContextCopy(tmp_path, "rlm-copy", context=context)
    await copy.settle(None, suspended=True)
    assert copy.name.endswith(".txt" if isinstance(context, str) else ".json")
    assert load_context(tmp_path / "rlm-copy.jsonl", copy.name) == context
    done = ContextCopy(tmp_path, "rlm-copy", stored=copy.name)
    await done.settle(None, suspended=False)
    assert not (tmp_path / copy.name).exists()


async def test_a_copy_is_stored_once_a_run_goes_on_a_while_and_never_for_a_quick_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(durable, "WRITE_AFTER_S", 0.2)
    quick = ContextCopy(tmp_path, "rlm-quick", context="abc")
    await quick.settle(None, suspended=False)
    # A long first iteration: nothing says the first iteration is over, time does.
    slow = ContextCopy(tmp_path, "rlm-slow", context="abc")
    stored = tmp_path / slow.name
    deadline = time.monotonic() + 10
    while not stored.exists():
        assert time.monotonic() < deadline, "the copy was never stored"
        await asyncio.sleep(0.02)
    assert load_context(tmp_path / "rlm-slow.jsonl", slow.name) == "abc"
    await slow.settle(None, suspended=False)
    assert sorted(path.name for path in (tmp_path / "contexts").iterdir()) == []
    assert not (tmp_path / quick.name).exists()
