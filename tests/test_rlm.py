"""The RLM loop with a scripted model behind a real HTTP server and real sandboxed sessions."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from exo_standin import STANDIN, make_exo_app
from local_session import LocalSession

from kowalski.agent.sandbox import Sandbox
from kowalski.agent.sessions import SessionManager
from kowalski.common.code_blocks import extract_code_blocks
from kowalski.common.config import RlmConfig, SandboxConfig
from kowalski.common.errors import ContextSizeExceededError, NetworkError, ParseError
from kowalski.common.messages import (
    LlmCallback,
    SessionCreate,
)
from kowalski.controller.models.cache import CachedBackend, ResultCache
from kowalski.controller.models.chat_types import ChatRequest, ChatResult
from kowalski.controller.models.exo_client import ExoClient
from kowalski.controller.rlm import prompts as rlm_prompts
from kowalski.controller.rlm.events import (
    CellOutput,
    CodeExecuted,
    CodeSkipped,
    ContextFolded,
    IterationFinished,
    IterationStarted,
    ModelReplied,
    RlmEvent,
    RunFinished,
    RunStarted,
    SessionOpened,
    SubCallAnswered,
)
from kowalski.controller.rlm.final import find_final
from kowalski.controller.rlm.loop import RlmRun
from kowalski.controller.rlm.trajectory import (
    Trajectory,
    list_runs,
    read_trajectory,
    render_trajectory,
)

MODEL = "scripted/model"
Event = TypeVar("Event", bound=RlmEvent)
SUMMARY_PREFIX = "Below are earlier steps of your work"
Step = str | Callable[[list[dict[str, str]]], str]


def last_user(messages: list[dict[str, str]]) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


class ScriptedModel:
    """Replies from a script per query; sub-calls and folding summaries answered by rule."""

    def __init__(self, *replies: Step) -> None:
        self.queues: dict[str, deque[Step]] = {"": deque(replies)}
        self.root_requests: list[list[dict[str, str]]] = []
        # max_tokens of each root request.
        self.root_max_tokens: list[Any] = []
        self.sub_prompts: list[str] = []
        self.summary_requests: list[list[dict[str, str]]] = []
        self.sub_delay: Callable[[str], float] = lambda prompt: 0.0
        self.active_subs = 0
        self.max_active_subs = 0

    def script(self, query: str, *replies: Step) -> None:
        self.queues[query] = deque(replies)

    async def __call__(self, body: dict[str, Any]) -> str:
        messages: list[dict[str, str]] = body["messages"]
        if messages[0]["role"] != "system":
            prompt = messages[-1]["content"]
            self.sub_prompts.append(prompt)
            self.active_subs += 1
            self.max_active_subs = max(self.max_active_subs, self.active_subs)
            try:
                await asyncio.sleep(self.sub_delay(prompt))
            finally:
                self.active_subs -= 1
            return f"answer to {prompt}"
        if messages[-1]["content"].startswith(SUMMARY_PREFIX):
            self.summary_requests.append(messages)
            return "SUMMARY: the first step stored its result in first_var."
        self.root_requests.append(messages)
        self.root_max_tokens.append(body.get("max_tokens"))
        query = messages[1]["content"].split("\n\n", 1)[0].removeprefix("Query: ")
        queue = self.queues.get(query, self.queues[""])
        if not queue:
            return "FINAL(the script ran out of replies)"
        step = queue.popleft()
        return step(messages) if callable(step) else step


class ClientBackend:
    """The ChatBackend protocol over one ExoClient, noting each call's operation."""

    def __init__(self, client: ExoClient) -> None:
        self.client = client
        self.operations: list[str] = []

    async def chat(self, request: ChatRequest, *, operation: str = "llm_inference"
                   ) -> ChatResult:
        self.operations.append(operation)
        return await self.client.chat(request)


class Harness:
    """Runs, their sessions, and the relay from llm_query() back to the run."""

    def __init__(self, model: ScriptedModel, backend: ClientBackend, runs_dir: Path) -> None:
        self.model = model
        self.backend = backend
        self.runs_dir = runs_dir
        self.manager: SessionManager | None = None
        self.runs: dict[str, RlmRun] = {}
        self.events: list[RlmEvent] = []

    async def factory(self, context: Any, run: RlmRun) -> LocalSession:
        assert self.manager is not None
        self.runs[run.run_id] = run
        callback = LlmCallback(url="local", token=run.run_id, depth=run.depth + 1)
        await self.manager.create(SessionCreate(session_id=run.run_id, context=context,
                                                llm_callback=callback))
        return LocalSession(self.manager, run.run_id)

    async def relay(self, callback: LlmCallback, prompts: list[str]) -> list[str]:
        return await self.runs[callback.token].answer_sub_calls(prompts)

    def new_run(self, query: str, context: Any, *, cell_timeout_ms: int | None = None,
                **config: Any) -> RlmRun:
        settings = RlmConfig(trajectory_dir=str(self.runs_dir), **config)
        return RlmRun(query, context, backend=self.backend, session_factory=self.factory,
                      config=settings, model=MODEL, observer=self.events.append,
                      cell_timeout_ms=cell_timeout_ms)


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[Sandbox]:
    mode = "bwrap" if os.geteuid() == 0 else "rlimit"
    config = SandboxConfig(mode=mode, memory_limit_mb=512, pids_limit=64, pool_size=0,
                           max_output_bytes=256 * 1024, timeout_ms_python=10_000)
    box = Sandbox(config, work_root=tmp_path / "jobs")
    await box.start()
    yield box
    await box.close()


@pytest.fixture
async def harness(aiohttp_server: Any, sandbox: Sandbox, tmp_path: Path
                  ) -> AsyncIterator[Harness]:
    model = ScriptedModel()
    server = await aiohttp_server(make_exo_app(flavour="v1", models=(MODEL,), reply=model))
    client = ExoClient(str(server.make_url("")))
    rig = Harness(model, ClientBackend(client), tmp_path / "runs")
    rig.manager = SessionManager(sandbox, max_sessions=4, idle_timeout_s=60,
                                 llm_handler=rig.relay)
    yield rig
    await rig.manager.close()
    await client.close()


def json_lines(path: str | Path) -> list[Any]:
    """The records of a trajectory file; none if it does not exist."""
    file = Path(path)
    return [json.loads(line) for line in file.read_text().splitlines()] if file.exists() else []


def repl(code: str) -> str:
    return f"```repl\n{code}\n```"


def of_kind(trajectory: Trajectory, kind: type[Event]) -> list[Event]:
    """The trajectory's events of one kind, in order."""
    return [event for event in trajectory.events if isinstance(event, kind)]


# --- reading FINAL ----------------------------------------------------------------------------


@pytest.mark.parametrize(("reply", "expected"), [
    ("FINAL(42)", ("final", "42")),
    ("Done.\n  FINAL (42)", ("final", "42")),
    ("FINAL(f(x) = (a + b) * 2)", ("final", "f(x) = (a + b) * 2")),
    ("FINAL(first line\nsecond line\n)", ("final", "first line\nsecond line")),
    ("FINAL(an unclosed ( paren", ("final", "an unclosed ( paren")),
    ('FINAL_VAR("answer")', ("final_var", "answer")),
    ("FINAL_VAR( result )", ("final_var", "result")),
    ("The answer is FINAL(42)", None),
    ("FINALLY(3)", None),
    ("```repl\nFINAL(1)\n```", None),
    ("~~~python\nx = 1\nFINAL_VAR(x)\n~~~", None),
    ("```repl\nx = 1\nFINAL(3)", None),
    ("```\nFINAL(1)\n```\nFINAL(2)", ("final", "2")),
    ("FINAL_VAR(a)\nFINAL(b)", ("final_var", "a")),
])
def test_final_is_read_only_at_a_line_start_outside_code(
        reply: str, expected: tuple[str, str] | None) -> None:
    marker = find_final(reply, extract_code_blocks(reply))
    assert (None if marker is None else (marker.kind, marker.value)) == expected


def test_context_is_described_by_type_length_and_chunks() -> None:
    text = rlm_prompts.context_sentence(rlm_prompts.describe_context("abc" * 10))
    assert "str with 30 total characters" in text
    items = rlm_prompts.describe_context(["ab", "cde", {"k": 1}])
    assert (items.type, items.chunk_chars, items.total_chars) == ("list", [2, 3, 7], 12)
    many = rlm_prompts.context_sentence(rlm_prompts.describe_context(["x"] * 150))
    assert "list of 150 items" in many
    assert "... and 50 more]" in many
    mapping = rlm_prompts.describe_context({"a": "xyz", "bb": "q"})
    assert (mapping.type, mapping.chunk_chars, mapping.total_chars) == ("dict", [3, 1], 7)


# --- the loop ---------------------------------------------------------------------------------


async def test_code_runs_before_final_and_its_output_is_the_next_message(
        harness: Harness) -> None:
    harness.model.script("", repl("print(len(context))\nprint(context[:5])"), "FINAL(12)")
    result = await harness.new_run("how long is it?", "hello world!").run()
    assert (result.answer, result.stop_reason, result.iterations) == ("12", "final", 2)
    first, second = harness.model.root_requests
    assert "str with 12 total characters" in first[0]["content"]
    assert "Query: how long is it?" in first[1]["content"]
    feedback = last_user(second)
    assert feedback.startswith("REPL output:\n12\nhello")
    assert "how long is it?" in feedback
    assert result.agents == ["local-agent"]
    assert result.endpoints == [harness.backend.client.base_url]
    assert [step.iteration for step in result.steps] == [1, 2]
    assert all(step.model_ms > 0 for step in result.steps)
    assert result.steps[0].code_ms > 0
    assert result.tokens.total_tokens > 0
    kinds = [type(event) for event in harness.events if not isinstance(event, CellOutput)]
    # The cell's output went out live too, before its CodeExecuted.
    live = [event.text for event in harness.events if isinstance(event, CellOutput)]
    assert "".join(live) == "12\nhello\n"
    # The session opened beside the first model call: after the first iteration started,
    # before its code ran; whether before or after the reply came is a race.
    opened = kinds.index(SessionOpened)
    assert kinds.index(IterationStarted) < opened < kinds.index(CodeExecuted)
    kinds.remove(SessionOpened)
    assert kinds == [RunStarted, IterationStarted, ModelReplied, CodeExecuted,
                     IterationFinished, IterationStarted, ModelReplied, IterationFinished,
                     RunFinished]
    finished = harness.events[-1]
    assert isinstance(finished, RunFinished)
    assert finished.result == result


async def test_final_in_code_or_mid_line_does_not_end_the_run(harness: Harness) -> None:
    harness.model.script(
        "",
        repl("x = 1\n# FINAL(inside a comment)\nprint('FINAL(printed)')")
        + "\nI think the answer is FINAL(mid-line).",
        "Now I am sure.\nFINAL(f(x) = (x + 1)\nfor every x)",
    )
    result = await harness.new_run("q", "ctx").run()
    assert result.stop_reason == "final"
    assert result.answer == "f(x) = (x + 1)\nfor every x"
    assert result.iterations == 2


async def test_final_var_of_a_missing_variable_is_not_final(harness: Harness) -> None:
    harness.model.script(
        "",
        "FINAL_VAR(missing)",
        # Assigned and returned in the same reply: the code runs before FINAL_VAR is read.
        repl("result = 'found ' + context") + "\nFINAL_VAR(result)",
    )
    result = await harness.new_run("q", "it").run()
    assert (result.answer, result.stop_reason, result.iterations) == ("found it", "final_var", 2)
    feedback = last_user(harness.model.root_requests[1])
    assert "there is no variable named 'missing'" in feedback


async def test_an_empty_final_gets_feedback_instead_of_ending_the_run(harness: Harness) -> None:
    harness.model.script("", "FINAL()", "FINAL(The reasons: 1) cost, 2) speed)")
    result = await harness.new_run("q", "it").run()
    assert (result.answer, result.stop_reason, result.iterations) == (
        "The reasons: 1) cost, 2) speed", "final", 2)
    assert "FINAL() is empty" in last_user(harness.model.root_requests[1])


async def test_long_output_is_cut_with_a_marker(harness: Harness) -> None:
    harness.model.script("", repl("print('x' * 5000)"), "FINAL(done)")
    result = await harness.new_run("q", "c", max_output_chars=200).run()
    assert result.answer == "done"
    feedback = last_user(harness.model.root_requests[1])
    assert "x" * 200 + "\n[... output truncated: 4800 more characters not shown ...]" in feedback
    assert "x" * 201 not in feedback


async def test_errors_in_code_reach_the_model_and_the_loop_goes_on(harness: Harness) -> None:
    harness.model.script(
        "",
        repl("print('before')\n1 / 0"),
        repl("print('after', context)"),
        "FINAL(recovered)",
    )
    result = await harness.new_run("q", "ok").run()
    assert (result.answer, result.iterations) == ("recovered", 3)
    feedback = last_user(harness.model.root_requests[1])
    assert "before" in feedback
    assert "Traceback" in feedback
    assert "ZeroDivisionError" in feedback
    assert "after ok" in last_user(harness.model.root_requests[2])


async def test_a_cell_past_its_time_limit_is_interrupted_and_the_session_lives_on(
        harness: Harness) -> None:
    harness.model.script(
        "",
        repl("before = 'still here'\nimport time\ntime.sleep(30)"),
        "FINAL_VAR(before)",
    )
    started = time.monotonic()
    result = await harness.new_run("q", "c", cell_timeout_ms=300).run()
    assert time.monotonic() - started < 10
    assert (result.answer, result.stop_reason) == ("still here", "final_var")
    feedback = last_user(harness.model.root_requests[1])
    assert "KeyboardInterrupt" in feedback
    assert "exceeded the 0.3 s limit" in feedback


async def test_blocks_in_disabled_languages_or_untagged_are_not_run(harness: Harness) -> None:
    harness.model.script(
        "",
        "```bash\necho hi\n```\n```\nprint('untagged')\n```\n```python\nprint('ran')\n```",
        "Let me think.",
        "FINAL(done)",
    )
    result = await harness.new_run("q", "c", languages=["python"]).run()
    assert result.answer == "done"
    system = harness.model.root_requests[0][0]["content"]
    assert "```bash" not in system.split("For example:")[0]
    feedback = last_user(harness.model.root_requests[1])
    assert ("Block 1 (```bash) was not run: the languages that run here are ```python"
            in feedback)
    assert "hi" not in feedback.split("\n")
    assert "Block 2 has no language tag and was not run" in feedback
    assert "REPL output of block 3:\nran" in feedback
    assert "untagged" not in feedback.replace("Block 2 has no language tag", "")
    assert "no ```repl block and no FINAL" in last_user(harness.model.root_requests[2])


async def test_bash_block_runs_as_a_job_reading_the_context_file(harness: Harness) -> None:
    harness.model.script(
        "",
        "```bash\nwc -c < context.txt; ls\n```\n```bash\nexit 3\n```\n"
        + repl("print(len(context))"),
        "FINAL(done)",
    )
    result = await harness.new_run("q", "hello world").run()
    assert result.answer == "done"
    system = harness.model.root_requests[0][0]["content"]
    assert "`context.txt`" in system
    assert "```bash, ```javascript, ```rust, ```java" in system
    feedback = last_user(harness.model.root_requests[1])
    assert "[bash] output of block 1:\n[bash] stdout:\n11\ncontext.txt" in feedback
    assert "[bash] output of block 2:\n[bash code failed (exit 3)" in feedback
    assert "REPL output of block 3:\n11" in feedback
    executed = [e for e in harness.events if isinstance(e, CodeExecuted)]
    assert [(e.ran_as, e.status) for e in executed] == [
        ("bash", "ok"), ("bash", "error"), ("python", "ok")]
    live = [e for e in harness.events if isinstance(e, CellOutput) and e.block == 1]
    assert {e.language for e in live} == {"bash"}
    assert "".join(e.text for e in live).startswith("11\n")


async def test_a_cell_printing_many_lines_streams_them_in_few_events(harness: Harness) -> None:
    harness.model.script("", repl("for i in range(3000):\n    print(i)"), "FINAL(ok)")
    result = await harness.new_run("q", "c", max_output_chars=100_000).run()
    assert result.answer == "ok"
    live = [e for e in harness.events if isinstance(e, CellOutput)]
    # 6000 writes (each number, then its newline), sent on as they queued up.
    assert "".join(e.text for e in live) == "".join(f"{i}\n" for i in range(3000))
    assert len(live) < 3000, len(live)


async def test_a_list_context_is_json_for_jobs(harness: Harness) -> None:
    harness.model.script(
        "", "```bash\ncat context.json; test -e context.txt || echo no-text\n```", "FINAL(ok)")
    result = await harness.new_run("q", ["a", {"b": 1}]).run()
    assert result.answer == "ok"
    assert "`context.json` (as JSON)" in harness.model.root_requests[0][0]["content"]
    feedback = last_user(harness.model.root_requests[1])
    assert '[bash] stdout:\n["a",{"b":1}]no-text' in feedback


@pytest.mark.parametrize(("last_reply", "answer"), [
    ("The answer is 7.", ""),
    ("FINAL(7)", "7"),
])
async def test_iteration_limit_asks_once_more_for_an_answer(
        harness: Harness, last_reply: str, answer: str) -> None:
    harness.model.script("", repl("a = 1"), repl("b = 2"), last_reply)
    result = await harness.new_run("q", "c", max_iterations=2).run()
    assert (result.answer, result.stop_reason, result.iterations) == (answer, "max_iterations", 2)
    # Without FINAL the run has no answer; the raw reply is kept apart.
    assert result.last_reply == last_reply
    assert len(harness.model.root_requests) == 3
    assert "You have used all 2 steps" in last_user(harness.model.root_requests[2])
    assert "iteration limit of 2" in result.detail


async def test_sub_calls_answer_in_order_within_the_concurrency_bound(
        harness: Harness) -> None:
    # Later prompts answer sooner, so order is only kept if the loop keeps it.
    harness.model.sub_delay = lambda prompt: 0.05 * (5 - int(prompt[-1])) if (
        prompt.startswith("item")) else 0.0
    harness.model.script(
        "",
        repl("answers = llm_query_batched([f'item {i}' for i in range(5)])\n"
             "single = llm_query('single')\nprint(answers)\nprint(single)\n"
             "print(llm_query('z' * 30000))"),
        "FINAL_VAR(answers)",
    )
    result = await harness.new_run("q", "c", sub_call_concurrency=2).run()
    expected = [f"answer to item {i}" for i in range(5)]
    assert result.answer == str(expected)
    assert result.sub_calls == 7
    assert harness.model.max_active_subs == 2
    assert sorted(harness.model.sub_prompts) == sorted([f"item {i}" for i in range(5)]
                                                        + ["single"])
    feedback = last_user(harness.model.root_requests[1])
    assert str(expected) in feedback
    assert "answer to single" in feedback
    assert "Error: the prompt is 30000 characters" in feedback
    assert result.sub_call_tokens.total_tokens > 0
    root_tokens = result.tokens.total_tokens - result.sub_call_tokens.total_tokens
    assert root_tokens > 0
    assert sum(isinstance(e, SubCallAnswered) for e in harness.events) == 7


async def test_token_budget_stops_with_the_last_reply(harness: Harness) -> None:
    first = repl("print(len(context))")
    harness.model.script("", first, "FINAL(never reached)")
    result = await harness.new_run("q", "c", token_budget=100).run()
    assert result.stop_reason == "token_budget"
    assert (result.answer, result.last_reply) == ("", first)
    assert result.iterations == 1
    assert "token budget of 100" in result.detail
    assert result.tokens.total_tokens >= 100
    assert len(harness.model.root_requests) == 1


async def test_sub_calls_stop_when_the_token_budget_is_spent(harness: Harness) -> None:
    # The stand-in counts words: each sub-call costs about 3000 tokens, the first reply ~500.
    harness.model.script(
        "",
        repl("answers = llm_query_batched(['w ' * 1500] * 3)\n"
             "print([a[:20] for a in answers])\nllm_query('one more')"),
        "FINAL(never reached)",
    )
    result = await harness.new_run("q", "c", token_budget=5000, sub_call_concurrency=1).run()
    assert (result.stop_reason, result.iterations) == ("token_budget", 1)
    assert result.sub_calls == 3
    assert result.sub_call_tokens.total_tokens > 5000 - 1000
    [block] = of_kind(read_trajectory(result.run_id, harness.runs_dir), CodeExecuted)
    output = block.output
    assert "['answer to w w w w w ', 'answer to w w w w w ', \"Error: the run's tok\"]" in output
    assert "RuntimeError: llm_query failed:" in output
    assert "spent its token budget of 5000" in output
    assert len(harness.model.sub_prompts) == 2


async def test_run_timeout_stops_a_long_cell_with_the_last_reply(harness: Harness) -> None:
    slow = repl("import time\ntime.sleep(8)")
    harness.model.script("", slow, "FINAL(never reached)")
    started = time.monotonic()
    result = await harness.new_run("q", "c", run_timeout_s=1.0).run()
    assert time.monotonic() - started < 5
    assert (result.stop_reason, result.answer, result.last_reply) == ("timeout", "", slow)
    assert "time limit of 1 s" in result.detail
    assert harness.manager is not None
    assert len(harness.manager) == 0


async def test_a_cancelled_run_still_ends_its_trajectory_and_its_session(
        harness: Harness) -> None:
    harness.model.script("", repl("import time\ntime.sleep(8)"), "FINAL(never reached)")
    run = harness.new_run("q", "c")
    task = asyncio.create_task(run.run())
    deadline = time.monotonic() + 10
    while not any(isinstance(event, ModelReplied) for event in harness.events):
        assert time.monotonic() < deadline, "the model never replied"
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    trajectory = read_trajectory(run.run_id, harness.runs_dir)
    assert trajectory.finished is not None
    assert trajectory.finished.result.stop_reason == "cancelled"
    assert trajectory.events == harness.events
    assert harness.manager is not None
    assert len(harness.manager) == 0


async def test_too_large_context_fails_before_anything_runs(harness: Harness) -> None:
    run = harness.new_run("q", "x" * 11, max_context_length=10)
    with pytest.raises(ContextSizeExceededError) as caught:
        await run.run()
    assert (caught.value.actual, caught.value.maximum) == (11, 10)
    assert harness.runs == {}
    assert harness.model.root_requests == []
    assert json_lines(run.trajectory_path) == []


async def test_depth_below_max_depth_makes_sub_calls_recursive_runs(harness: Harness) -> None:
    harness.model.script("", repl("x = 1") + "\n" + repl("print(llm_query('what is 2+2'))"),
                         "FINAL(parent done)")
    harness.model.script("what is 2+2", repl("four = 2 + 2"), "FINAL_VAR(four)")
    result = await harness.new_run("q", "c", max_depth=2).run()
    assert result.answer == "parent done"
    assert "REPL output of block 2:\n4" in last_user(harness.model.root_requests[-1])
    assert len(harness.runs) == 2
    child_id = next(run_id for run_id in harness.runs if run_id != result.run_id)
    child = read_trajectory(child_id, harness.runs_dir)
    assert child.started.parent_run_id == result.run_id
    assert child.started.depth == 1
    assert child.finished is not None
    assert child.finished.result.stop_reason == "final_var"
    assert {event.run_id for event in child.events} == {child_id}
    parent = read_trajectory(result.run_id, harness.runs_dir)
    call = of_kind(parent, SubCallAnswered)[0]
    assert call.child_run_id == child_id
    # Both name the cell that asked: iteration 1, its second block.
    assert (call.iteration, call.block) == (1, 2)
    assert (child.started.parent_iteration, child.started.parent_block) == (1, 2)
    assert {event.run_id for event in parent.events} == {result.run_id}
    tree = read_trajectory(result.run_id, harness.runs_dir, descendants=True)
    assert tree.events == parent.events
    assert tree.descendants == [child]
    assert parent.descendants == []
    # Listed once, as the root with its one child run; the child is read by its id.
    [listed] = list_runs(harness.runs_dir)
    assert (listed.run_id, listed.child_runs, listed.sub_calls) == (result.run_id, 1, 1)
    assert result.sub_calls == 1
    assert harness.model.sub_prompts == []


async def test_max_depth_zero_is_one_plain_call(harness: Harness) -> None:
    result = await harness.new_run("what?", "some text", max_depth=0).run()
    # No system prompt: the scripted model answers it like any plain prompt.
    assert (result.answer, result.stop_reason, result.iterations) == (
        "answer to some text\n\nwhat?", "direct", 0)
    assert harness.runs == {}
    assert harness.model.root_requests == []


async def test_long_conversations_fold_and_final_var_still_works(harness: Harness) -> None:
    harness.model.script(
        "",
        repl("first_var = 'kept across the fold'\nprint('y' * 3000)"),
        repl("print('z' * 3000)"),
        repl("print('w' * 3000)"),
        "FINAL_VAR(first_var)",
    )
    run = harness.new_run("q", "c", context_window_tokens=1500, keep_last_turns=1)
    result = await run.run()
    assert (result.answer, result.stop_reason) == ("kept across the fold", "final_var")
    assert result.folds >= 1
    assert "context_compression" in harness.backend.operations
    folded = harness.model.root_requests[-1]
    assert len(folded) < 2 + 2 * 3
    assert "SUMMARY: the first step stored its result in first_var." in folded[1]["content"]
    assert "first_var" in folded[1]["content"].rsplit("\n", 1)[-1]
    summary_request = harness.model.summary_requests[0]
    assert "first_var = 'kept across the fold'" in summary_request[-1]["content"]
    trajectory = read_trajectory(result.run_id, harness.runs_dir)
    folds = of_kind(trajectory, ContextFolded)
    # Early on only the newest output is too long: it is cut, nothing is summarised yet.
    assert [(f.method, f.folded_turns > 0) for f in folds][-1] == ("model", True)
    assert all(f.tokens_after < f.tokens_before for f in folds)


async def test_trajectory_file_holds_the_whole_run(harness: Harness) -> None:
    harness.model.script(
        "", "Look:\n```text\nls\n```\n" + repl("r = llm_query('sub')\nprint(r)"),
        "FINAL(all done)")
    result = await harness.new_run("what happened?", ["a", "bb"]).run()
    path = Path(result.trajectory_path)
    assert path.parent == harness.runs_dir
    lines = json_lines(path)
    kinds = [line["kind"] for line in lines]
    assert kinds.index("iteration_started") < kinds.index("session_opened") < kinds.index(
        "sub_call")
    kinds.remove("session_opened")
    assert kinds == [
        "run_started", "iteration_started", "model_replied", "code_skipped", "sub_call",
        "code_executed", "iteration_finished", "iteration_started", "model_replied",
        "iteration_finished", "run_finished"]
    trajectory = read_trajectory(result.run_id, harness.runs_dir)
    assert trajectory == read_trajectory(path)
    # The file holds the very events the observer saw, in the same order, but the live
    # pieces of output (the CodeExecuted after them holds it whole).
    assert trajectory.events == [e for e in harness.events if not isinstance(e, CellOutput)]
    assert any(isinstance(e, CellOutput) for e in harness.events)
    start = trajectory.started
    assert (start.query, start.model, start.context_type, start.context_chars,
            start.context_chunks) == ("what happened?", MODEL, "list", 3, 2)
    assert start.config.trajectory_dir == str(harness.runs_dir)
    assert "list of 2 items" in start.system_prompt
    [skipped] = of_kind(trajectory, CodeSkipped)
    assert (skipped.block, skipped.language, skipped.code) == (1, "text", "ls\n")
    [block] = of_kind(trajectory, CodeExecuted)
    assert (block.block, block.status, block.output) == (2, "ok", "answer to sub")
    [call] = of_kind(trajectory, SubCallAnswered)
    assert (call.prompt, call.answer, call.iteration) == ("sub", "answer to sub", 1)
    assert call.tokens.total_tokens > 0
    first, second = of_kind(trajectory, IterationFinished)
    assert "REPL output of block 2:\nanswer to sub" in first.feedback
    assert (second.final_kind, second.final_value, second.feedback) == ("final", "all done", "")
    assert trajectory.finished is not None
    assert trajectory.finished.result == result
    text = render_trajectory(trajectory)
    for piece in ("what happened?", "Iteration 1", "Iteration 2", "r = llm_query('sub')",
                  "[block 1: ```text not run]", "| answer to sub",
                  "[sub-call 1 from block 2: 3 chars in",
                  "Finished: final", "all done"):
        assert piece in text
    [summary] = list_runs(harness.runs_dir)
    assert (summary.run_id, summary.stop_reason, summary.iterations,
            summary.answer) == (result.run_id, "final", 2, "all done")


def test_a_trajectory_cut_off_mid_write_still_reads(tmp_path: Path) -> None:
    start = {"kind": "run_started", "run_id": "r1", "depth": 0, "query": "q", "model": "m",
             "context_type": "str", "context_chars": 1, "context_chunks": 1, "config": {},
             "started_at": 1.0, "trajectory_path": str(tmp_path / "r1.jsonl")}
    path = tmp_path / "r1.jsonl"
    path.write_text(json.dumps(start) + '\n{"kind": "iteration_started", "run_id": "r1", "it')
    trajectory = read_trajectory("r1", tmp_path)
    assert [type(event) for event in trajectory.events] == [RunStarted]
    assert trajectory.finished is None
    assert "Not finished" in render_trajectory(trajectory)
    [summary] = list_runs(tmp_path)
    assert (summary.run_id, summary.stop_reason) == ("r1", None)


def test_a_damaged_line_mid_file_is_named_with_its_number(tmp_path: Path) -> None:
    start = {"kind": "run_started", "run_id": "r1", "depth": 0, "query": "q", "model": "m",
             "context_type": "str", "context_chars": 1, "context_chunks": 1, "config": {},
             "started_at": 1.0, "trajectory_path": ""}
    (tmp_path / "r1.jsonl").write_text(json.dumps(start) + '\n{"kind": "nonsense"}\n\n')
    with pytest.raises(ParseError, match=r"r1.jsonl:2: not a trajectory line"):
        read_trajectory("r1", tmp_path)


V1_FIXTURE = Path(__file__).parent / "data" / "trajectory"
V1_RUN = "rlm-20260101-120000-0a1b2c3d"


def test_a_trajectory_of_the_first_format_reads_as_events() -> None:
    trajectory = read_trajectory(V1_RUN, V1_FIXTURE)
    assert trajectory.started.query == "what is kept?"
    assert trajectory.started.trajectory_path == str(V1_FIXTURE / f"{V1_RUN}.jsonl")
    assert [event.iteration for event in of_kind(trajectory, IterationStarted)] == [1, 2, 3, 4]
    [skipped] = of_kind(trajectory, CodeSkipped)
    assert (skipped.language, skipped.code) == ("bash", "ls -l\n")
    [call] = of_kind(trajectory, SubCallAnswered)
    assert (call.prompt, call.answer) == ("what is in the box?", "answer to what is in the box?")
    assert [fold.method for fold in of_kind(trajectory, ContextFolded)] == ["truncation", "model"]
    notes = [event.final_note for event in of_kind(trajectory, IterationFinished)]
    assert "FINAL_VAR(missing) is not final" in notes[1]
    assert trajectory.finished is not None
    result = trajectory.finished.result
    assert (result.answer, result.stop_reason, result.iterations, result.sub_calls,
            result.folds) == ("kept across the fold", "final_var", 4, 1, 2)
    assert [step.iteration for step in result.steps] == [1, 2, 3, 4]
    assert result.agents == ["local-agent"]
    # That format had no last_reply: the last model call's reply stands in.
    assert result.last_reply == "FINAL_VAR(first_var)"
    text = render_trajectory(trajectory)
    for piece in ("Run rlm-20260101-120000-0a1b2c3d", "Iteration 4", "[block 1: ```bash not run]",
                  "[context folded by model: 2 turns", "[sub-call 1: 19 chars in",
                  "Finished: final_var", "kept across the fold"):
        assert piece in text
    [summary] = list_runs(V1_FIXTURE)
    assert (summary.run_id, summary.stop_reason, summary.iterations,
            summary.answer) == (V1_RUN, "final_var", 4, "kept across the fold")


def test_a_first_format_trajectory_cut_off_mid_write_still_reads(tmp_path: Path) -> None:
    meta = {"kind": "meta", "run_id": "r1", "query": "q", "model": "m", "context_type": "str",
            "context_chars": 1, "context_chunks": 1, "config": {}, "started_at": 1.0}
    path = tmp_path / "r1.jsonl"
    path.write_text(json.dumps(meta) + '\n{"kind": "iteration", "run_id": "r1", "itera')
    trajectory = read_trajectory("r1", tmp_path)
    assert [type(event) for event in trajectory.events] == [RunStarted]
    assert "Not finished" in render_trajectory(trajectory)
    [summary] = list_runs(tmp_path)
    assert (summary.run_id, summary.stop_reason) == ("r1", None)


async def test_needle_in_a_haystack_of_a_million_lines(harness: Harness) -> None:
    lines = [f"line {i}: filler" for i in range(1_000_000)]
    lines[637_281] = "line 637281: the magic number is 9048213"
    context = "\n".join(lines)
    harness.model.script(
        "",
        repl("hits = [line for line in context.splitlines() if 'magic' in line]\n"
             "print(len(hits), hits)"),
        repl("answer = hits[0].rsplit(' ', 1)[1]\nprint(answer)") + "\nFINAL_VAR(answer)",
    )
    result = await harness.new_run("What is the magic number?", context).run()
    assert (result.answer, result.stop_reason) == ("9048213", "final_var")
    system = harness.model.root_requests[0][0]["content"]
    assert f"str with {len(context)} total characters" in system
    assert "1 ['line 637281: the magic number is 9048213']" in last_user(
        harness.model.root_requests[1])


# --- bounded replies, runs without an answer, the cache -------------------------------------


async def test_every_root_call_sends_the_reply_limit_and_a_cut_reply_is_told_so(
        harness: Harness) -> None:
    rambling = " ".join(f"word{i}" for i in range(40))
    harness.model.script("", rambling, "FINAL(short)")
    result = await harness.new_run("q", "c", max_reply_tokens=12).run()
    assert (result.answer, result.stop_reason) == ("short", "final")
    assert harness.model.root_max_tokens == [12, 12]
    [cut, _] = [event for event in harness.events if isinstance(event, ModelReplied)]
    assert cut.finish_reason == "length"
    feedback = last_user(harness.model.root_requests[1])
    assert "cut off at 12 tokens" in feedback
    assert "Be shorter" in feedback


async def test_an_uncut_reply_gets_no_note_about_its_length(harness: Harness) -> None:
    harness.model.script("", repl("x = 1"), "FINAL(1)")
    await harness.new_run("q", "c").run()
    assert harness.model.root_max_tokens == [RlmConfig().max_reply_tokens] * 2
    assert "cut off" not in last_user(harness.model.root_requests[1])


class DownBackend:
    """A model that is never reached: every endpoint down."""

    async def chat(self, request: ChatRequest, *, operation: str = "llm_inference"
                   ) -> ChatResult:
        raise NetworkError("all 1 exo endpoints are down")


async def test_a_run_that_never_reached_the_model_reports_zero_iterations(
        harness: Harness) -> None:
    run = RlmRun("q", "c", backend=DownBackend(), session_factory=harness.factory,
                 config=RlmConfig(trajectory_dir=str(harness.runs_dir)), model=MODEL)
    result = await run.run()
    assert (result.stop_reason, result.iterations, result.answer, result.last_reply) == (
        "error", 0, "", "")
    assert "endpoints are down" in result.detail


async def test_the_session_opens_while_the_model_writes_its_first_reply(
        harness: Harness) -> None:
    asked = asyncio.Event()

    def first_reply(messages: list[dict[str, str]]) -> str:
        asked.set()
        return repl("print(len(context))")

    harness.model.script("", first_reply, "FINAL(done)")

    async def once_the_model_was_asked(context: Any, run: RlmRun) -> LocalSession:
        # A loop that waited for its session before the first model call never gets here.
        await asyncio.wait_for(asked.wait(), 10)
        return await harness.factory(context, run)

    run = RlmRun("q", "hello", backend=harness.backend, model=MODEL,
                 session_factory=once_the_model_was_asked, observer=harness.events.append,
                 config=RlmConfig(trajectory_dir=str(harness.runs_dir)))
    result = await run.run()
    assert (result.answer, result.agents) == ("done", ["local-agent"])
    assert last_user(harness.model.root_requests[1]).startswith("REPL output:\n5\n")
    [opened] = [event for event in harness.events if isinstance(event, SessionOpened)]
    assert (opened.iteration, opened.device_id) == (1, "local-agent")
    assert opened.open_ms > 0
    kinds = [type(event) for event in harness.events]
    # The reply came before the session was ready, and its code ran only after.
    assert kinds.index(ModelReplied) < kinds.index(SessionOpened) < kinds.index(CodeExecuted)


async def test_a_session_still_opening_when_the_model_fails_is_closed_all_the_same(
        harness: Harness) -> None:
    opened: list[str] = []

    async def slow_open(context: Any, run: RlmRun) -> LocalSession:
        session = await harness.factory(context, run)
        opened.append(run.run_id)
        return session

    run = RlmRun("q", "c", backend=DownBackend(), session_factory=slow_open,
                 config=RlmConfig(trajectory_dir=str(harness.runs_dir)), model=MODEL)
    result = await run.run()
    assert (result.stop_reason, result.iterations) == ("error", 0)
    # The run waited for the opening it had begun, then ended that session too.
    assert opened == [run.run_id]
    assert harness.manager is not None
    assert len(harness.manager) == 0


def cached_run(harness: Harness, cache: ResultCache, *, temperature: float) -> RlmRun:
    return RlmRun("q", "c", backend=CachedBackend(harness.backend, cache),
                  session_factory=harness.factory, model=MODEL, temperature=temperature,
                  config=RlmConfig(trajectory_dir=str(harness.runs_dir)),
                  observer=harness.events.append)


SIX_SAME = repl("answers = llm_query_batched(['same question'] * 6)\nprint(len(answers))")


async def test_sampled_sub_calls_each_reach_the_model(harness: Harness) -> None:
    harness.model.script("", SIX_SAME, "FINAL(done)")
    cache = ResultCache(ttl_s=60, max_entries=64)
    result = await cached_run(harness, cache, temperature=0.7).run()
    assert result.answer == "done"
    assert harness.model.sub_prompts == ["same question"] * 6
    assert result.cached_tokens.total_tokens == 0
    assert len(cache) == 0


async def test_a_deterministic_rerun_is_served_by_the_cache_and_spends_no_tokens(
        harness: Harness) -> None:
    cache = ResultCache(ttl_s=60, max_entries=64)
    harness.model.script("", SIX_SAME, "FINAL(done)")
    first = await cached_run(harness, cache, temperature=0).run()
    assert harness.model.sub_prompts == ["same question"]
    assert first.tokens.total_tokens > 0
    # Five of the six sub-calls shared the first one's answer.
    assert first.cached_tokens.total_tokens == 5 * first.sub_call_tokens.total_tokens
    calls = len(harness.model.root_requests)
    harness.events.clear()
    second = await cached_run(harness, cache, temperature=0).run()
    assert second.answer == "done"
    assert len(harness.model.root_requests) == calls
    assert second.tokens.total_tokens == 0
    assert second.cached_tokens.total_tokens == (first.tokens.total_tokens
                                                  + first.cached_tokens.total_tokens)
    replies = [event for event in harness.events if isinstance(event, ModelReplied)]
    assert all(event.cached and event.tokens.total_tokens == 0 for event in replies)
    subs = [event for event in harness.events if isinstance(event, SubCallAnswered)]
    assert len(subs) == 6
    assert all(event.cached_tokens.total_tokens > 0 for event in subs)


async def test_reasoning_is_recorded_but_never_read_as_code_or_final(
    aiohttp_server: Any, sandbox: Sandbox, tmp_path: Path,
) -> None:
    thinking = "FINAL(13)\n```python\nopen('thought.txt', 'w')\n```"
    model = ScriptedModel("I checked it.\nFINAL(42)")
    app = make_exo_app(flavour="v1", models=(MODEL,), reply=model)
    app[STANDIN].reasoning = thinking
    server = await aiohttp_server(app)
    client = ExoClient(str(server.make_url("")))
    rig = Harness(model, ClientBackend(client), tmp_path / "runs")
    rig.manager = SessionManager(sandbox, max_sessions=1, idle_timeout_s=60,
                                 llm_handler=rig.relay)
    try:
        result = await rig.new_run("q", "ctx").run()
    finally:
        await rig.manager.close()
        await client.close()
    assert (result.stop_reason, result.answer, result.iterations) == ("final", "42", 1)
    replied = [e for e in rig.events if isinstance(e, ModelReplied)]
    assert [(e.text, e.reasoning) for e in replied] == [("I checked it.\nFINAL(42)", thinking)]
    # Not run as code, and not sent back to the model as its own words.
    assert not [e for e in rig.events if isinstance(e, CodeExecuted | CodeSkipped)]
    assert all(thinking not in m["content"] for m in model.root_requests[-1])
    assert read_trajectory(result.run_id, rig.runs_dir).events == rig.events
