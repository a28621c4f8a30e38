"""The answer-dict protocol: a cell that sets answer["ready"] ends the run with answer["content"].

Through a controller and a real agent process, so the flag travels from the session's
driver in the cell result.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from controller_env import controller_config, healthy_ids, running_controller
from exo_standin import DEFAULT_MODEL, make_exo_app
from procs import AgentProcess

from kowalski.agent.sandbox import Sandbox
from kowalski.agent.sessions import SessionManager
from kowalski.common.config import SandboxConfig
from kowalski.common.messages import CellRequest, LlmCallback, SessionCreate
from kowalski.controller.service import Controller

pytestmark = pytest.mark.timeout(120)


class Script:
    """Replies in order to the loop's calls; keeps every request body."""

    def __init__(self, *replies: str) -> None:
        self.replies = list(replies)
        self.bodies: list[dict[str, Any]] = []

    def __call__(self, body: dict[str, Any]) -> str:
        self.bodies.append(body)
        return self.replies.pop(0) if self.replies else "no more replies"


@pytest.fixture
def agent_count() -> int:
    return 1


@asynccontextmanager
async def cluster(agents: list[AgentProcess], aiohttp_server: Any, tmp_path: Path,
                  script: Script, **rlm: Any) -> AsyncIterator[Controller]:
    exo = await aiohttp_server(make_exo_app(flavour="v1", models=(DEFAULT_MODEL,),
                                            reply=script))
    config = controller_config(agents, [str(exo.make_url("")).rstrip("/")], tmp_path,
                               rlm={"trajectory_dir": str(tmp_path / "runs"), **rlm})
    async with running_controller(config) as running:
        assert await running.cluster.wait_for(
            lambda table: len(healthy_ids(table)) == len(agents), timeout_s=15)
        yield running


async def run(controller: Controller, **extra: Any) -> dict[str, Any]:
    body = {"query": "how many words?", "context": "one two three", **extra}
    async with aiohttp.ClientSession() as session, session.post(
            controller.base_url + "/v1/runs", json=body) as response:
        assert response.status == 200, await response.text()
        result: dict[str, Any] = await response.json()
        return result


SET_READY = ("```repl\nanswer['content'] = len(context.split())\n"
             "answer['ready'] = True\n```")


async def test_answer_dict_protocol_is_taught_and_a_ready_answer_ends_the_run(
        agents: list[AgentProcess], aiohttp_server: Any, tmp_path: Path) -> None:
    script = Script(SET_READY, "FINAL(never asked)")
    async with cluster(agents, aiohttp_server, tmp_path, script,
                       final_protocol="answer_dict") as running:
        result = await run(running)
    assert (result["stop_reason"], result["answer"]) == ("answer_dict", "3"), result
    assert result["iterations"] == 1
    assert len(script.bodies) == 1
    system = script.bodies[0]["messages"][0]["content"]
    assert 'answer["ready"] = True' in system
    assert "FINAL_VAR(variable_name)" not in system


async def test_the_final_protocol_is_the_default_and_the_answer_dict_still_ends_a_run(
        agents: list[AgentProcess], aiohttp_server: Any, tmp_path: Path) -> None:
    # A draft without "ready" does not end the run; the next cell setting it does.
    script = Script("```repl\nanswer['content'] = 'draft: ' + context\n```",
                    "```repl\nanswer['ready'] = 1\n```", "FINAL(never asked)")
    async with cluster(agents, aiohttp_server, tmp_path, script) as running:
        result = await run(running)
    assert (result["stop_reason"], result["answer"]) == ("answer_dict", "draft: one two three")
    assert result["iterations"] == 2
    system = script.bodies[0]["messages"][0]["content"]
    assert "FINAL_VAR(variable_name)" in system
    assert 'answer["ready"]' not in system
    # The feedback after the draft still teaches FINAL.
    assert "FINAL(...)" in script.bodies[1]["messages"][-1]["content"]


async def test_a_final_marker_in_the_same_reply_wins_over_the_answer_dict(
        agents: list[AgentProcess], aiohttp_server: Any, tmp_path: Path) -> None:
    script = Script(SET_READY + "\nFINAL(from the marker)")
    async with cluster(agents, aiohttp_server, tmp_path, script) as running:
        result = await run(running)
    assert (result["stop_reason"], result["answer"]) == ("final", "from the marker")


async def test_at_the_limit_the_answer_dict_protocol_runs_the_last_replys_code(
        agents: list[AgentProcess], aiohttp_server: Any, tmp_path: Path) -> None:
    script = Script("```repl\nprint(len(context))\n```", SET_READY)
    async with cluster(agents, aiohttp_server, tmp_path, script,
                       final_protocol="answer_dict") as running:
        result = await run(running, max_iterations=1)
    assert (result["stop_reason"], result["answer"]) == ("max_iterations", "3"), result
    assert "ANSWER_DICT" in result["detail"]
    last_request = script.bodies[1]["messages"][-1]["content"]
    assert 'answer["ready"] = True' in last_request


async def test_a_reassigned_answer_name_is_not_an_answer(
        agents: list[AgentProcess], aiohttp_server: Any, tmp_path: Path) -> None:
    script = Script("```repl\nanswer = 'ready'\n```", "FINAL(done)")
    async with cluster(agents, aiohttp_server, tmp_path, script) as running:
        result = await run(running)
    assert (result["stop_reason"], result["answer"]) == ("final", "done")


# --- the session's driver, in process -------------------------------------------------------


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[SessionManager]:
    asked: list[tuple[list[str], str]] = []

    async def handler(callback: LlmCallback, prompts: list[str], model: str = ""
                      ) -> list[str]:
        asked.append((prompts, model))
        return [f"{model or 'default'}: {prompt}" for prompt in prompts]

    mode = "bwrap" if os.geteuid() == 0 else "rlimit"
    box = Sandbox(SandboxConfig(mode=mode, memory_limit_mb=256, pids_limit=64, pool_size=0,
                                max_output_bytes=4096), work_root=tmp_path / "work")
    await box.start()
    made = SessionManager(box, max_sessions=2, idle_timeout_s=60, llm_handler=handler)
    await made.create(SessionCreate(session_id="s", llm_callback=LlmCallback(
        url="http://127.0.0.1:1/v1/llm", token="t", depth=1)))
    yield made
    await made.close()
    await box.close()


async def cell(manager: SessionManager, code: str, number: int) -> Any:
    return await manager.execute("s", CellRequest(cell_id=f"c{number}", code=code))


async def test_a_ready_answer_too_long_for_the_line_is_cut_and_the_session_lives(
        manager: SessionManager) -> None:
    first = await cell(manager, "print('x' * 10_000)\nanswer['content'] = 'y' * 500_000\n"
                                "answer['ready'] = True", 1)
    assert first.status == "ok"
    assert first.stdout_truncated
    assert first.answer is not None
    assert first.answer_truncated
    assert 1000 < len(first.answer) < 500_000
    assert set(first.answer) == {"y"}
    second = await cell(manager, "answer['ready'] = False\nprint('alive')", 2)
    assert (second.stdout, second.answer) == ("alive\n", None)


async def test_llm_query_names_a_model_and_the_agent_handler_gets_it(
        manager: SessionManager) -> None:
    result = await cell(manager, "print(llm_query('a', model='small/m'))\n"
                                 "print(llm_query_batched(['b'])[0])\n"
                                 "llm_query('c', model=3)", 1)
    assert result.stdout == "small/m: a\ndefault: b\n"
    assert "TypeError: model= takes the name of a served model" in result.stderr
