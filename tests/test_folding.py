"""Context folding: when it starts, what survives it, and the fallback when no model answers."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from exo_standin import CHAT_PATH, STANDIN, ExoStandin, FailMode, make_exo_app
from local_session import LocalSession

from kowalski.agent.sandbox import Sandbox
from kowalski.agent.sessions import SessionManager
from kowalski.common.config import ControllerConfig, ExoConfig, RlmConfig, SandboxConfig
from kowalski.common.messages import SessionCreate
from kowalski.controller.circuit import CircuitPolicy
from kowalski.controller.models.chat_types import ChatMessage, ChatRequest, ChatResult
from kowalski.controller.models.exo_client import ExoClient
from kowalski.controller.models.router import LlmRouter
from kowalski.controller.retry import RetryPolicy
from kowalski.controller.rlm.events import ContextFolded, RlmEvent
from kowalski.controller.rlm.folding import (
    assigned_names,
    estimate_tokens,
    fold,
    fold_limit,
    names_in,
    needs_fold,
    shrink,
)

MODEL = "scripted/model"
SUMMARY = "SUMMARY: counted 1204 matching lines; kept them in hits."


class ClientBackend:
    """The ChatBackend protocol over one ExoClient, keeping each request and operation."""

    def __init__(self, client: ExoClient) -> None:
        self.client = client
        self.calls: list[tuple[str, ChatRequest]] = []

    async def chat(self, request: ChatRequest, *, operation: str = "llm_inference"
                   ) -> ChatResult:
        self.calls.append((operation, request))
        return await self.client.chat(request)


@pytest.fixture
async def exo(aiohttp_server: Any) -> AsyncIterator[tuple[ExoStandin, ClientBackend]]:
    app = make_exo_app(flavour="v1", models=(MODEL,), reply=lambda body: SUMMARY)
    server = await aiohttp_server(app)
    client = ExoClient(str(server.make_url("")))
    yield app[STANDIN], ClientBackend(client)
    await client.close()


def user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)


def assistant(text: str) -> ChatMessage:
    return ChatMessage(role="assistant", content=text)


def conversation(turns: int, output_chars: int = 400) -> list[ChatMessage]:
    messages = [ChatMessage(role="system", content="You are in a REPL."),
                user("Query: how many lines match?")]
    for turn in range(1, turns + 1):
        messages += [assistant(f"step {turn}\n```repl\nvar_{turn} = {turn}\n```"),
                     user(f"output {turn}: " + str(turn) * output_chars)]
    return messages


def test_folding_starts_just_past_the_threshold() -> None:
    assert fold_limit(1000, 0.8) == 800
    assert not needs_fold(800, window_tokens=1000, threshold=0.8)
    assert needs_fold(801, window_tokens=1000, threshold=0.8)
    # Four characters a token, plus a little for each message.
    assert estimate_tokens([user("x" * 400)]) == 104
    assert estimate_tokens([user("x" * 400), assistant("")]) == 108


@pytest.mark.parametrize(("code", "names"), [
    ("a = 1\nb, (c, d) = 2, (3, 4)\ne: int = 5\nf += 1", ["a", "b", "c", "d", "e", "f"]),
    ("for i, line in enumerate(x):\n    hits = line", ["i", "line", "hits"]),
    ("import os, re as regex\nfrom a.b import c as dee\nimport xml.etree", ["os", "regex",
                                                                             "dee", "xml"]),
    ("def helper(arg):\n    local = arg\n    return local\nclass Box: attr = 1",
     ["helper", "Box"]),
    ("def setter():\n    global shared\n    shared = 1", ["setter", "shared"]),
    ("squares = [n * n for n in range(3)]\n[(total := k) for k in range(2)]",
     ["squares", "total"]),
    ("with open('f') as fh:\n    data = fh.read()\ntry:\n    pass\nexcept OSError as err:\n"
     "    pass", ["fh", "data", "err"]),
    ("if (match := 3):\n    found = match\ndel found", ["match", "found"]),
    ("this is not python (", []),
])
def test_assigned_names_are_the_cells_top_level_bindings(code: str, names: list[str]) -> None:
    assert assigned_names(code) == names


def test_names_across_cells_keep_first_order_and_skip_private_ones() -> None:
    assert names_in(["a = 1\n_tmp = 2", "b = a\na = 3", "broken ("]) == ["a", "b"]


async def test_old_turns_become_a_model_summary_and_the_rest_survives(
        exo: tuple[ExoStandin, ClientBackend]) -> None:
    _, backend = exo
    messages = conversation(turns=4)
    result = await fold(messages, backend=backend, model=MODEL, keep_last_turns=2,
                        variable_names=["var_1", "var_2", "hits"], window_tokens=4000,
                        threshold=0.8)
    assert (result.method, result.folded_turns, result.error) == ("model", 2, "")
    folded = result.messages
    assert folded[0] == messages[0]
    # The last two turns, word for word.
    assert folded[2:] == messages[-4:]
    task = folded[1].content
    assert task.startswith(messages[1].content)
    assert SUMMARY in task
    assert task.endswith("FINAL_VAR can return them): var_1, var_2, hits.")
    assert result.tokens_after < result.tokens_before
    assert result.chat is not None
    assert result.chat.usage is not None
    [(operation, request)] = backend.calls
    assert operation == "context_compression"
    assert request.model == MODEL
    assert request.max_tokens == 800
    instruction = request.messages[-1].content
    assert "step 1" in instruction
    assert "output 2: 22" in instruction
    assert "step 3" not in instruction
    assert request.messages[:2] == messages[:2]


async def test_a_second_fold_summarises_again_from_the_first_summary(
        exo: tuple[ExoStandin, ClientBackend]) -> None:
    _, backend = exo
    once = await fold(conversation(turns=3), backend=backend, model=MODEL, keep_last_turns=1,
                      variable_names=["var_1"], window_tokens=4000, threshold=0.8)
    later = [*once.messages, assistant("step 4"), user("output 4")]
    twice = await fold(later, backend=backend, model=MODEL, keep_last_turns=1,
                       variable_names=["var_1", "var_4"], window_tokens=4000, threshold=0.8)
    task = twice.messages[1].content
    # One summary section, replaced rather than stacked.
    assert task.count("Progress so far") == 1
    assert task.endswith("var_1, var_4.")
    # The summariser saw the earlier summary, inside the task message.
    assert SUMMARY in backend.calls[1][1].messages[1].content


@pytest.mark.parametrize("mode", ["http_500", "malformed_json", "no_instance"])
async def test_without_a_model_old_turns_are_digested_locally(
        exo: tuple[ExoStandin, ClientBackend], mode: FailMode) -> None:
    standin, backend = exo
    standin.fail(mode)
    messages = conversation(turns=4)
    result = await fold(messages, backend=backend, model=MODEL, keep_last_turns=1,
                        variable_names=["var_1", "var_2", "var_3"], window_tokens=4000,
                        threshold=0.8)
    assert (result.method, result.folded_turns, result.chat) == ("truncation", 3, None)
    assert result.error
    assert result.messages[2:] == messages[-2:]
    task = result.messages[1].content
    assert "summary unavailable" in task
    assert "- you: step 1" in task
    assert "- repl: output 3: 333" in task
    assert task.endswith("var_1, var_2, var_3.")
    # The digest keeps only the start of each message.
    assert "3" * 300 not in task


async def test_local_fallback_keeps_an_earlier_model_summary(
        exo: tuple[ExoStandin, ClientBackend]) -> None:
    standin, backend = exo
    once = await fold(conversation(turns=3), backend=backend, model=MODEL, keep_last_turns=1,
                      variable_names=[], window_tokens=4000, threshold=0.8)
    standin.fail("http_500")
    later = [*once.messages, assistant("step 4"), user("output 4")]
    twice = await fold(later, backend=backend, model=MODEL, keep_last_turns=1,
                       variable_names=["var_4"], window_tokens=4000, threshold=0.8)
    assert twice.method == "truncation"
    task = twice.messages[1].content
    assert SUMMARY in task
    assert "- you: step 3" in task
    assert task.endswith("Variables assigned in the REPL so far (they still exist; FINAL_VAR "
                         "can return them): var_4.")


async def test_kept_turns_too_long_for_the_window_are_cut_to_fit(
        exo: tuple[ExoStandin, ClientBackend]) -> None:
    _, backend = exo
    messages = conversation(turns=3, output_chars=3000)
    result = await fold(messages, backend=backend, model=MODEL, keep_last_turns=2,
                        variable_names=["var_1"], window_tokens=1000, threshold=0.8)
    assert result.method == "model"
    assert result.tokens_after <= fold_limit(1000, 0.8)
    assert estimate_tokens(result.messages) == result.tokens_after
    assert result.messages[0] == messages[0]
    assert "characters folded away" in result.messages[3].content
    # Each cut message keeps its start and its end.
    newest = result.messages[-1].content
    assert newest.startswith("output 3: 333")
    assert newest.endswith("333")


async def test_with_nothing_old_enough_only_the_long_output_is_cut(
        exo: tuple[ExoStandin, ClientBackend]) -> None:
    _, backend = exo
    messages = conversation(turns=1, output_chars=8000)
    result = await fold(messages, backend=backend, model=MODEL, keep_last_turns=2,
                        variable_names=["var_1"], window_tokens=1000, threshold=0.8)
    assert (result.method, result.folded_turns, result.summary) == ("truncation", 0, "")
    assert backend.calls == []
    assert result.messages[:3] == messages[:3]
    assert result.tokens_after <= 800


def test_shrink_leaves_a_conversation_that_fits_alone() -> None:
    messages = conversation(turns=2)
    assert shrink(messages, estimate_tokens(messages)) == messages


async def test_a_server_count_above_the_estimate_folds_deeper(
        exo: tuple[ExoStandin, ClientBackend]) -> None:
    _, backend = exo
    messages = conversation(turns=1, output_chars=3000)
    server_count = 2 * estimate_tokens(messages)
    result = await fold(messages, backend=backend, model=MODEL, keep_last_turns=1,
                        variable_names=[], window_tokens=1000, threshold=0.8,
                        tokens=server_count)
    assert result.tokens_before == server_count
    assert result.tokens_after <= 800
    assert estimate_tokens(result.messages) <= 400


def shown_and_folded(text: str) -> int:
    """Characters a cut text stands for: what is shown plus what its markers count."""
    markers = list(re.finditer(r"\n\[\.\.\. (\d+) characters folded away \.\.\.\]\n", text))
    return (len(text) - sum(len(m.group(0)) for m in markers)
            + sum(int(m.group(1)) for m in markers))


def test_the_folded_away_marker_counts_every_character_after_repeated_cuts() -> None:
    original = "".join(str(i % 10) for i in range(10_000))
    messages = [ChatMessage(role="system", content="s"), user("task"), user(original)]
    counts = []
    for target in (2000, 1200, 700, 300):
        messages = shrink(messages, target)
        text = messages[2].content
        counts.append(int(re.findall(r"(\d+) characters folded away", text)[0]))
        assert text.count("characters folded away") == 1
        assert shown_and_folded(text) == len(original)
    assert counts == sorted(counts)
    assert counts[-1] > 8000


async def test_kept_turns_stay_whole_and_fewer_are_kept_when_they_do_not_fit(
        exo: tuple[ExoStandin, ClientBackend]) -> None:
    _, backend = exo
    # Four turns of about 320 tokens each; the window keeps room for one beside the summary.
    messages = conversation(turns=4, output_chars=1200)
    result = await fold(messages, backend=backend, model=MODEL, keep_last_turns=3,
                        variable_names=[], window_tokens=1200, threshold=0.8)
    assert result.method == "model"
    kept = result.messages[2:]
    assert kept == messages[len(messages) - len(kept):]
    assert 2 <= len(kept) < 6
    assert not any("folded away" in m.content for m in kept)
    assert result.tokens_after <= fold_limit(1200, 0.8)
    # The summariser saw every folded output whole, its middle included.
    [(_, request)] = backend.calls
    transcript = request.messages[-1].content
    for turn in range(1, 5 - len(kept) // 2):
        assert f"output {turn}: {str(turn) * 1200}" in transcript


async def test_the_fallback_digest_keeps_a_fixed_budget_over_many_folds(
        exo: tuple[ExoStandin, ClientBackend]) -> None:
    standin, backend = exo
    standin.fail("http_500")
    messages = conversation(turns=2)
    sizes = []
    for turn in range(3, 43):
        messages = [*messages, assistant(f"fact {turn}: value_{turn} = {turn * 7}"),
                    user(f"output {turn}: " + "z" * 300)]
        result = await fold(messages, backend=backend, model=MODEL, keep_last_turns=1,
                            variable_names=["hits"], window_tokens=2000, threshold=0.8)
        assert result.method == "truncation"
        messages = result.messages
        sizes.append(len(messages[1].content))
    # The summary is capped at the summariser's own budget: 20 % of the window.
    assert max(sizes) <= len("Query: how many lines match?") + 400 * 4 + 200
    assert sizes[-1] <= sizes[20] + 50
    task = messages[1].content
    assert "fact 41" in task
    assert "fact 3:" in task
    assert shown_and_folded(task) > len(task)


# --- a failing summariser inside a run -------------------------------------------------------


SUMMARY_START = "Below are earlier steps of your work"


def fail_summaries(app: web.Application) -> list[int]:
    """Make the stand-in answer every summary request with HTTP 500; count them."""
    seen = [0]

    @web.middleware
    async def middleware(request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
        if request.path == CHAT_PATH:
            body = await request.json()
            if body["messages"][-1]["content"].startswith(SUMMARY_START):
                seen[0] += 1
                return web.json_response({"error": {"message": "summariser broke"}},
                                         status=500)
        return await handler(request)

    app.middlewares.insert(0, middleware)
    return seen


async def test_a_failing_summariser_never_fails_the_run(
        aiohttp_server: Any, tmp_path: Path) -> None:
    from kowalski.controller.rlm.loop import RlmRun

    root_calls = [0]

    def reply(body: dict[str, Any]) -> str:
        root_calls[0] += 1
        if root_calls[0] < 9:
            # The stand-in counts words as tokens: about 450 a turn.
            return f"```repl\nprint('w{root_calls[0]} ' * 450)\n```"
        return "FINAL(survived)"

    app = make_exo_app(flavour="v1", models=(MODEL,), reply=reply)
    summaries = fail_summaries(app)
    server = await aiohttp_server(app)
    endpoint = str(server.make_url("")).rstrip("/")
    settings = ControllerConfig(retry_max_attempts=2, retry_base_delay_ms=1,
                                retry_max_delay_ms=2, circuit_failure_threshold=2,
                                circuit_reset_s=60)
    mode = "bwrap" if os.geteuid() == 0 else "rlimit"
    box = Sandbox(SandboxConfig(mode=mode, memory_limit_mb=512, pids_limit=64, pool_size=0),
                  work_root=tmp_path / "jobs")
    await box.start()
    async def no_sub_calls(callback: Any, prompts: list[str]) -> list[str]:
        raise AssertionError("this run makes no sub-calls")

    manager = SessionManager(box, max_sessions=2, idle_timeout_s=60, llm_handler=no_sub_calls)
    events: list[RlmEvent] = []

    async def factory(context: Any, run: Any) -> LocalSession:
        await manager.create(SessionCreate(session_id=run.run_id, context=context))
        return LocalSession(manager, run.run_id)

    async with aiohttp.ClientSession() as http:
        router = LlmRouter(config=ExoConfig(endpoints=[endpoint], poll_interval_s=0.1),
                           urls=[endpoint], session=http,
                           policy=RetryPolicy.from_config(settings),
                           circuit_policy=CircuitPolicy.from_config(settings),
                           load_penalty=settings.load_penalty)
        try:
            await router.refresh()
            config = RlmConfig(trajectory_dir=str(tmp_path / "runs"), context_window_tokens=2048,
                               keep_last_turns=1, max_iterations=12)
            run = RlmRun("q", "c", backend=router, session_factory=factory, config=config,
                         model=MODEL, observer=events.append)
            result = await run.run()
            [view] = router.views()
        finally:
            await router.close()
            await manager.close()
            await box.close()
    assert (result.stop_reason, result.answer) == ("final", "survived")
    folds = [e for e in events if isinstance(e, ContextFolded)]
    # Every fold is in the trajectory, the fallback ones with the summariser's error.
    assert len(folds) == result.folds >= 3
    assert all(f.method == "truncation" and f.error for f in folds)
    assert "HTTP 500" in folds[0].error
    # Two failures opened the summaries' circuit, which spared the server the rest; the
    # run's own calls kept theirs closed.
    assert summaries[0] == 2
    assert "circuit open" in folds[-1].error
    assert view.circuit == "closed"
