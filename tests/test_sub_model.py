"""The sub-call model: which served model each call of a run reaches.

A stand-in exo serves two models; the run's root loop, its child runs' loops and its leaf
sub-calls are told apart by what they send, and each records the model it named.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from controller_env import controller_config, healthy_ids, running_controller
from exo_standin import DEFAULT_MODEL, make_exo_app
from procs import AgentProcess

from kowalski.controller.service import Controller

ROOT = DEFAULT_MODEL
SUB = "small/sub-model"
# The root query; a sub-call whose prompt starts with "child" becomes a child run's query.
QUERY = "main question"

pytestmark = pytest.mark.timeout(120)


class TwoModels:
    """Scripted loops by query, leaves answered with the model that was asked; all recorded."""

    def __init__(self, scripts: dict[str, list[str]]) -> None:
        self.scripts = scripts
        # (kind, model): kind is the query of a loop call, or "leaf".
        self.calls: list[tuple[str, str]] = []

    def __call__(self, body: dict[str, Any]) -> str:
        messages, model = body["messages"], body["model"]
        if messages[0]["role"] != "system":
            prompt = messages[-1]["content"]
            self.calls.append(("leaf", model))
            return f"{model} answered {prompt}"
        query = next(name for name in self.scripts if f"Query: {name}" in messages[1]["content"])
        self.calls.append((query, model))
        turn = sum(message["role"] == "assistant" for message in messages)
        script = self.scripts[query]
        return script[turn] if turn < len(script) else "FINAL(out of script)"


@pytest.fixture
def agent_count() -> int:
    return 1


@asynccontextmanager
async def cluster(agents: list[AgentProcess], aiohttp_server: Any, tmp_path: Path,
                  reply: Callable[[dict[str, Any]], str], **rlm: Any
                  ) -> AsyncIterator[Controller]:
    exo = await aiohttp_server(make_exo_app(flavour="v1", models=(ROOT, SUB), reply=reply))
    config = controller_config(agents, [str(exo.make_url("")).rstrip("/")], tmp_path,
                               rlm={"trajectory_dir": str(tmp_path / "runs"), **rlm})
    async with running_controller(config) as running:
        assert await running.cluster.wait_for(
            lambda table: len(healthy_ids(table)) == len(agents), timeout_s=15)
        await running.router.first_probes()
        yield running


async def post(controller: Controller, path: str, body: dict[str, Any]) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.post(
            controller.base_url + path, json=body) as response:
        assert response.status == 200, await response.text()
        answer: dict[str, Any] = await response.json()
        return answer


LEAVES = [f"```repl\na = llm_query('leaf one')\nb = llm_query('leaf two', model={ROOT!r})\n"
          "both = a + ' | ' + b\n```", "FINAL_VAR(both)"]


async def test_run_request_sub_model_answers_leaves_and_a_named_model_wins(
        agents: list[AgentProcess], aiohttp_server: Any, tmp_path: Path) -> None:
    model = TwoModels({QUERY: LEAVES})
    async with cluster(agents, aiohttp_server, tmp_path, model) as running:
        result = await post(running, "/v1/runs", {"query": QUERY, "context": "text",
                                                  "model": ROOT, "sub_model": SUB})
    assert result["stop_reason"] == "final_var", result
    assert result["answer"] == f"{SUB} answered leaf one | {ROOT} answered leaf two"
    assert model.calls == [(QUERY, ROOT), ("leaf", SUB), ("leaf", ROOT), (QUERY, ROOT)]


async def test_without_a_sub_model_leaves_use_the_root_model(
        agents: list[AgentProcess], aiohttp_server: Any, tmp_path: Path) -> None:
    model = TwoModels({QUERY: LEAVES})
    async with cluster(agents, aiohttp_server, tmp_path, model) as running:
        result = await post(running, "/v1/runs", {"query": QUERY, "context": "text",
                                                  "model": ROOT})
    assert result["answer"] == f"{ROOT} answered leaf one | {ROOT} answered leaf two"
    assert {used for _, used in model.calls} == {ROOT}


async def test_child_runs_loop_with_the_root_model_and_their_leaves_use_rlm_sub_model(
        agents: list[AgentProcess], aiohttp_server: Any, tmp_path: Path) -> None:
    model = TwoModels({
        QUERY: ["```repl\na = llm_query('child task')\n```", "FINAL_VAR(a)"],
        "child task": ["```repl\nx = llm_query('grandchild leaf')\n```", "FINAL_VAR(x)"],
    })
    async with cluster(agents, aiohttp_server, tmp_path, model, max_depth=2,
                       sub_model=SUB) as running:
        result = await post(running, "/v1/runs", {"query": QUERY, "context": "text",
                                                  "model": ROOT})
    assert result["answer"] == f"{SUB} answered grandchild leaf", result
    assert model.calls == [(QUERY, ROOT), ("child task", ROOT), ("leaf", SUB),
                           ("child task", ROOT), (QUERY, ROOT)]


async def test_openai_front_names_the_sub_model_after_a_plus_or_in_extra_body(
        agents: list[AgentProcess], aiohttp_server: Any, tmp_path: Path) -> None:
    model = TwoModels({QUERY: LEAVES})
    async with cluster(agents, aiohttp_server, tmp_path, model) as running:
        plus = await post(running, "/v1/chat/completions", {
            "model": f"rlm:{ROOT}+{SUB}", "messages": [{"role": "user", "content": QUERY}]})
        extra = await post(running, "/v1/chat/completions", {
            "model": f"rlm:{ROOT}", "sub_model": SUB,
            "messages": [{"role": "user", "content": QUERY}]})
    expected = f"{SUB} answered leaf one | {ROOT} answered leaf two"
    assert plus["choices"][0]["message"]["content"] == expected
    assert extra["choices"][0]["message"]["content"] == expected
    assert [used for kind, used in model.calls if kind != "leaf"] == [ROOT] * 4


async def test_a_served_model_with_a_plus_in_its_name_is_not_split(
        agents: list[AgentProcess], aiohttp_server: Any, tmp_path: Path) -> None:
    model = TwoModels({QUERY: LEAVES})
    odd = f"{ROOT}+{SUB}"
    exo = await aiohttp_server(make_exo_app(flavour="v1", models=(ROOT, SUB, odd),
                                            reply=model))
    config = controller_config(agents, [str(exo.make_url("")).rstrip("/")], tmp_path,
                               rlm={"trajectory_dir": str(tmp_path / "runs")})
    async with running_controller(config) as running:
        assert await running.cluster.wait_for(lambda table: len(healthy_ids(table)) == 1,
                                              timeout_s=15)
        await running.router.first_probes()
        answer = await post(running, "/v1/chat/completions", {
            "model": f"rlm:{odd}", "messages": [{"role": "user", "content": QUERY}]})
    assert answer["choices"][0]["message"]["content"] == (
        f"{odd} answered leaf one | {ROOT} answered leaf two")
    assert [used for kind, used in model.calls if kind != "leaf"] == [odd, odd]


async def test_a_sub_call_naming_an_unserved_model_answers_an_error_and_the_run_goes_on(
        agents: list[AgentProcess], aiohttp_server: Any, tmp_path: Path) -> None:
    model = TwoModels({QUERY: ["```repl\na = llm_query('leaf', model='no/such-model')\n"
                               "print(a)\n```", "FINAL_VAR(a)"]})
    async with cluster(agents, aiohttp_server, tmp_path, model) as running:
        result = await post(running, "/v1/runs", {"query": QUERY, "context": "text",
                                                  "model": ROOT})
    assert result["stop_reason"] == "final_var"
    assert result["answer"].startswith("Error: ")
    assert "no/such-model" in result["answer"]
    assert ("leaf", "no/such-model") not in model.calls


async def test_cli_run_sub_model_flag_sends_leaves_to_the_sub_model(
        aiohttp_server: Any, tmp_path: Path) -> None:
    model = TwoModels({QUERY: LEAVES})
    exo = await aiohttp_server(make_exo_app(flavour="v1", models=(ROOT, SUB), reply=model,
                                            bare=True))
    # A fresh HOME: no config file, and the run's trajectory goes under it.
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kowalski.controller", "run", QUERY, "--endpoint",
        str(exo.make_url("")).rstrip("/"), "--model", ROOT, "--sub-model", SUB, "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "HOME": str(tmp_path)})
    out, err = await asyncio.wait_for(process.communicate(), 90)
    assert process.returncode == 0, err.decode()
    result = json.loads(out)
    assert result["answer"] == f"{SUB} answered leaf one | {ROOT} answered leaf two"
    assert model.calls == [(QUERY, ROOT), ("leaf", SUB), ("leaf", ROOT), (QUERY, ROOT)]
