"""RLM jobs through the controller: HTTP runs, the CLI, the OpenAI front, sub-calls."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import tomli_w
from controller_env import controller_config, running_controller
from exo_standin import DEFAULT_MODEL, STANDIN
from procs import AgentProcess

from kowalski.controller.rlm.runs import RunRequest
from kowalski.controller.service import Controller

pytestmark = pytest.mark.timeout(120)


def scripted(body: dict[str, Any]) -> str:
    """A model that computes in the REPL, asks a sub-question, then answers."""
    messages = body["messages"]
    last = messages[-1]["content"]
    if messages[0]["role"] != "system":
        # A sub-call from llm_query(): a plain prompt.
        return f"sub-answer to {last[:20]}"
    if "sub-answer to" in last:
        return "The REPL found it.\nFINAL_VAR(result)"
    return ("Let me look.\n```repl\nresult = sum(len(line) for line in context.splitlines())\n"
            "note = llm_query('what is ' + str(result))\nprint(result, note)\n```")


@pytest.fixture
def exo_reply() -> Callable[[dict[str, Any]], str]:
    return scripted


@pytest.fixture
def agent_count() -> int:
    return 1


CONTEXT = "alpha\nbeta\ngamma\n"
EXPECTED = str(sum(len(line) for line in CONTEXT.splitlines()))


async def test_run_over_http_answers_from_the_repl_with_a_sub_call(
    controller: Controller, exo: Any, agents: list[AgentProcess],
) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(controller.base_url + "/v1/runs",
                                json={"query": "count letters", "context": CONTEXT}) as response:
            assert response.status == 200, await response.text()
            result = await response.json()
        assert result["answer"] == EXPECTED
        assert result["stop_reason"] == "final_var"
        assert result["sub_calls"] == 1
        assert result["iterations"] == 2
        assert agents[0].agent_id in result["devices"]
        async with session.get(f"{controller.base_url}/v1/runs/{result['run_id']}") as response:
            trajectory = await response.json()
        assert trajectory["events"][0]["kind"] == "run_started"
        assert trajectory["events"][-1]["result"]["answer"] == EXPECTED
        async with session.get(f"{controller.base_url}/v1/runs/rlm-nope") as response:
            assert response.status == 404
        async with session.get(controller.base_url + "/v1/status") as response:
            status = await response.json()
    assert status["runs"][0]["status"] == "finished"
    assert status["runs"][0]["sub_calls"] == 1
    # The sub-call reached the model as a plain prompt through the session's callback.
    prompts = [body["messages"][-1]["content"] for body in exo.app[STANDIN].chat_requests]
    assert f"what is {EXPECTED}" in prompts


async def test_the_reply_grammar_switched_on_never_reaches_an_exo_endpoint(
    exo: Any, agents: list[AgentProcess], tmp_path: Path,
) -> None:
    config = controller_config(agents, [str(exo.make_url("")).rstrip("/")], tmp_path,
                               exo={"embedded_grammar": "repl"})
    async with running_controller(config) as running:
        assert await running.cluster.wait_for(
            lambda table: any(row.health == "healthy" for row in table.devices.values()),
            timeout_s=15)
        await running.router.first_probes()
        result = await running.state.runs.run(RunRequest(query="count letters",
                                                         context=CONTEXT))
    assert result.answer == EXPECTED
    bodies = exo.app[STANDIN].chat_requests
    assert len(bodies) == 3  # two root replies and one sub-call
    # The grammar is the embedded model's alone: an exo endpoint gets plain requests.
    assert not any("grammar" in body for body in bodies)


async def test_streamed_run_sends_events_then_the_result(controller: Controller) -> None:
    kinds = []
    async with aiohttp.ClientSession() as session, session.post(
        controller.base_url + "/v1/runs",
        json={"query": "count", "context": CONTEXT, "stream": True},
    ) as response:
        async for line in response.content:
            kinds.append(json.loads(line)["kind"])
    assert kinds[0] == "run_started"
    assert "code_executed" in kinds
    assert kinds[-1] == "result"


async def test_bad_run_bodies_are_refused_with_the_reason(controller: Controller) -> None:
    async with aiohttp.ClientSession() as session:
        for body, says in (({"context": "x"}, "missing required field `query`"),
                           ({"query": 1}, "Expected `str`"),
                           ({"query": "q", "colour": 1}, "unknown field `colour`")):
            async with session.post(controller.base_url + "/v1/runs", json=body) as response:
                assert response.status == 400
                assert says in (await response.json())["error"]["message"]


async def test_context_over_the_limit_is_refused_before_anything_runs(
    agents: list[AgentProcess], exo: Any, tmp_path: Path,
) -> None:
    config = controller_config(agents, [str(exo.make_url("")).rstrip("/")], tmp_path,
                               rlm={"max_context_length": 10})
    async with running_controller(config) as running, aiohttp.ClientSession() as session:
        # A str by its characters; anything else by its JSON (here ["abcdef","ghi"]).
        for context, size in (("x" * 11, 11), (["abcdef", "ghi"], 16)):
            async with session.post(running.base_url + "/v1/runs",
                                    json={"query": "q", "context": context}) as response:
                assert response.status == 413
                assert f"{size} characters, over the limit of 10" in await response.text()
    assert exo.app[STANDIN].counts["/v1/chat/completions"] == 0
    runs = tmp_path / "runs"
    assert not runs.exists() or [path.name for path in runs.rglob("*")] == []


async def test_openai_client_runs_rlm_and_plain_models(controller: Controller) -> None:
    client = openai.AsyncOpenAI(base_url=controller.base_url + "/v1", api_key="unused")
    try:
        models = [m.id async for m in client.models.list()]
        assert {DEFAULT_MODEL, f"rlm:{DEFAULT_MODEL}"} <= set(models)
        answer = await client.chat.completions.create(
            model=f"rlm:{DEFAULT_MODEL}",
            messages=[{"role": "user", "content": CONTEXT},
                      {"role": "user", "content": "count letters"}])
        assert answer.choices[0].message.content == EXPECTED
        assert answer.usage is not None
        assert answer.usage.total_tokens > 0
        plain = await client.chat.completions.create(
            model=DEFAULT_MODEL, messages=[{"role": "user", "content": "hello"}])
        assert plain.choices[0].message.content == "sub-answer to hello"
        pieces = []
        stream = await client.chat.completions.create(
            model=DEFAULT_MODEL, messages=[{"role": "user", "content": "hello"}], stream=True)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
        assert "".join(pieces) == plain.choices[0].message.content
    finally:
        await client.close()


async def test_openai_front_passes_a_reasoning_models_thinking_on_apart(
    controller: Controller, exo: Any,
) -> None:
    thinking = "First I weigh the greeting. Then I answer it."
    exo.app[STANDIN].reasoning = thinking
    client = openai.AsyncOpenAI(base_url=controller.base_url + "/v1", api_key="unused")
    try:
        plain = await client.chat.completions.create(
            model=DEFAULT_MODEL, messages=[{"role": "user", "content": "hello"}])
        message = plain.choices[0].message
        assert message.content == "sub-answer to hello"
        assert (message.model_extra or {}).get("reasoning_content") == thinking
        thoughts, pieces = [], []
        stream = await client.chat.completions.create(
            model=DEFAULT_MODEL, messages=[{"role": "user", "content": "hello"}], stream=True)
        async for chunk in stream:
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            thoughts.append((delta.model_extra or {}).get("reasoning_content") or "")
            pieces.append(delta.content or "")
        assert "".join(thoughts) == thinking
        assert "".join(pieces) == message.content
    finally:
        await client.close()


async def _ctl(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kowalski.controller", *argv, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, **(env or {})})
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_cli_run_streams_iterations_and_runs_show_prints_the_trajectory(
    controller: Controller, tmp_path: Path,
) -> None:
    context = tmp_path / "context.txt"
    context.write_text(CONTEXT)
    code, out, err = await _ctl("run", "count letters", "--context-file", str(context),
                                "--url", controller.base_url)
    assert code == 0, err
    assert "── iteration 1" in out
    assert re.search(r"^  session on agent0-\S+ \(\d+ ms\)$", out, flags=re.MULTILINE), out
    assert "▶ block 1 on agent0-" in out
    assert f"=== answer (final_var) ===\n{EXPECTED}\n" in out
    run_id = next(line.split("/")[-1].removesuffix(".jsonl") for line in out.splitlines()
                  if line.startswith("--- trajectory:"))
    code, out, err = await _ctl("runs", "--dir", str(tmp_path / "runs"), "show", run_id)
    assert code == 0, err
    assert "count letters" in out
    assert re.search(r"^\[session opened on agent0-\S+ in \d+ ms\]$", out, flags=re.MULTILINE)
    assert EXPECTED in out
    code, out, _ = await _ctl("runs", "--dir", str(tmp_path / "runs"), "list")
    assert run_id in out


FIRST_FORMAT = Path(__file__).parent / "data" / "trajectory"
FIRST_FORMAT_RUN = "rlm-20260101-120000-0a1b2c3d"


async def test_a_trajectory_of_the_first_format_is_served_as_events(
    controller: Controller, tmp_path: Path,
) -> None:
    source = FIRST_FORMAT / f"{FIRST_FORMAT_RUN}.jsonl"
    (tmp_path / "runs").mkdir(exist_ok=True)
    (tmp_path / "runs" / source.name).write_bytes(source.read_bytes())
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{controller.base_url}/v1/runs/{FIRST_FORMAT_RUN}") as response:
            assert response.status == 200, await response.text()
            trajectory = await response.json()
        async with session.get(f"{controller.base_url}/v1/runs") as response:
            listed = await response.json()
    kinds = [event["kind"] for event in trajectory["events"]]
    assert (kinds[0], kinds[-1]) == ("run_started", "run_finished")
    assert kinds.count("iteration_started") == 4
    assert "code_skipped" in kinds
    assert "sub_call" in kinds
    assert trajectory["events"][0]["query"] == "what is kept?"
    assert trajectory["events"][-1]["result"]["answer"] == "kept across the fold"
    [stored] = [run for run in listed["stored"] if run["run_id"] == FIRST_FORMAT_RUN]
    assert (stored["stop_reason"], stored["iterations"]) == ("final_var", 4)


async def test_runs_show_prints_a_trajectory_of_the_first_format() -> None:
    code, out, err = await _ctl("runs", "--dir", str(FIRST_FORMAT), "show", FIRST_FORMAT_RUN)
    assert code == 0, err
    for piece in (f"Run {FIRST_FORMAT_RUN} (model scripted/model, depth 0)", "what is kept?",
                  "── Iteration 1 ──", "[block 1: ```bash not run]",
                  "  > first_var = 'kept across the fold'", "[sub-call 1: 19 chars in",
                  "[context folded by truncation", "FINAL_VAR(missing) is not final",
                  "── Finished: final_var ── after 4 iterations, 1 sub-calls",
                  "Answer:\n  kept across the fold"):
        assert piece in out, piece
    code, out, _ = await _ctl("runs", "--dir", str(FIRST_FORMAT), "list")
    assert code == 0
    assert f"{FIRST_FORMAT_RUN}  final_var" in out


async def test_cli_run_without_a_controller_says_how_to_start_one() -> None:
    code, _, err = await _ctl("run", "q", "--url", "http://127.0.0.1:9")
    assert code == 4
    assert "kowalski-ctl serve" in err
    assert "--local" in err


async def test_cli_run_local_starts_its_own_agent_and_answers(exo: Any, tmp_path: Path) -> None:
    config = tmp_path / "kowalski.toml"
    config.write_text(tomli_w.dumps({
        "exo": {"endpoints": [str(exo.make_url("")).rstrip("/")]},
        "rlm": {"trajectory_dir": str(tmp_path / "runs")},
        "sandbox": {"memory_limit_mb": 256},
    }))
    code, out, err = await _ctl("--config", str(config), "run", "count letters", "--local",
                                "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["stop_reason"] == "final_var"
    assert result["agents"][0].startswith("local-")


async def test_cli_batch_writes_results_in_order_and_reports_cache_hits(
    exo: Any, tmp_path: Path,
) -> None:
    config = tmp_path / "kowalski.toml"
    config.write_text(tomli_w.dumps({"exo": {"endpoints": [str(exo.make_url("")).rstrip("/")]}}))
    source = tmp_path / "prompts.jsonl"
    # Temperature 0: only deterministic requests may be answered from the cache.
    source.write_text("".join(json.dumps({"id": f"p{n % 3}", "prompt": f"say {n % 3}",
                                          "temperature": 0}) + "\n"
                              for n in range(6)) + "not json\n")
    code, _, err = await _ctl("--config", str(config), "batch", str(source))
    assert code == 5, err
    lines = [json.loads(line) for line in (tmp_path / "prompts.out.jsonl").read_text()
             .splitlines()]
    assert [line["index"] for line in lines] == list(range(7))
    assert [line["ok"] for line in lines] == [True] * 6 + [False]
    assert sum(line.get("cached", False) for line in lines) == 3
    assert "7 items: 6 ok, 1 failed, 3 cached" in err


@pytest.mark.model
@pytest.mark.timeout(300)
async def test_embedded_smollm2_run_replies_counts_tokens_and_terminates(tmp_path: Path) -> None:
    from kowalski.common.config import loads
    from kowalski.controller.cli.local import local_cluster

    # A small window keeps each reply short: on 2 busy cores a long one takes minutes.
    config = loads(tomli_w.dumps({
        "rlm": {"trajectory_dir": str(tmp_path / "runs"), "max_iterations": 1,
                "context_window_tokens": 2048, "run_timeout_s": 240},
        "sandbox": {"memory_limit_mb": 256},
    }))
    async with local_cluster(config) as running:
        result = await running.state.runs.run(
            RunRequest(query="What is 2 + 2? Use the REPL, then answer with FINAL(...).",
                       context="numbers: 2, 2"))
    # A 135M model may or may not follow the protocol; what must hold is the loop's contract.
    assert result.stop_reason in ("final", "final_var", "max_iterations")
    assert result.iterations >= 1
    assert result.tokens.total_tokens > 0
    # Stopped at the limit, the answer is empty and the reply is kept apart.
    assert (result.answer if result.stop_reason != "max_iterations" else result.last_reply).strip()
    assert Path(result.trajectory_path).is_file()
