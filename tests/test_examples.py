"""The scripts in examples/, run as a user runs them: subprocesses against a real controller."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import tomli_w
from aiohttp import web
from controller_env import controller_config, healthy_ids, running_controller
from exo_standin import DEFAULT_MODEL, STANDIN, ExoStandin, make_exo_app
from procs import AgentProcess

from kowalski.controller.service import Controller

pytestmark = pytest.mark.timeout(60)
# The controller, agent and stand-in are started once, for every test here.
module_loop = pytest.mark.asyncio(loop_scope="module")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# Every script in examples/ and the test that runs it: a new example needs a test.
TESTED = {"needle_in_haystack.py", "openai_client.py", "submit_job.py", "run_batch.py"}

MAGIC_CODE = """```repl
hits = [line for line in context.splitlines() if "magic number" in line]
answer = hits[0].rstrip(".").split()[-1]
print(len(hits), answer)
```"""
CRATES_CODE = """```repl
rows = [line.split(", ") for line in context.splitlines() if line.startswith("W")]
answer = max(rows, key=lambda row: int(row[2]))[1]
print(answer)
```"""


def capable_model(body: dict[str, Any]) -> str:
    """What a capable model would reply to the examples' prompts, without the model."""
    messages = body["messages"]
    last = messages[-1]["content"]
    if "llm_query" not in messages[0]["content"]:
        # Not the RLM system prompt: a plain chat call.
        return f"echo: {last[:60]}"
    if "REPL output" in last:
        return "The code found it.\nFINAL_VAR(answer)"
    task = messages[1]["content"]
    return MAGIC_CODE if "magic number" in task else CRATES_CODE


def most_crates_city() -> str:
    rows = [line.split(", ") for line in (EXAMPLES / "warehouses.txt").read_text().splitlines()
            if line.startswith("W")]
    return max(rows, key=lambda row: int(row[2]))[1]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def exo() -> AsyncIterator[tuple[str, ExoStandin]]:
    app = make_exo_app(flavour="v1", models=(DEFAULT_MODEL,), reply=capable_model)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", app[STANDIN]
    finally:
        await runner.cleanup()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def controller(exo: tuple[str, ExoStandin], tmp_path_factory: pytest.TempPathFactory
                     ) -> AsyncIterator[Controller]:
    tmp = tmp_path_factory.mktemp("examples")
    # No warm sessions and no sandbox pool: the session or sandbox refilled after a test's
    # work would outlive that test, and the leak check would count it against the test.
    agent = await AgentProcess(tmp, name="agent0", agent={"warm_sessions": 0},
                               sandbox={"pool_size": 0}).start()
    try:
        async with running_controller(controller_config([agent], [exo[0]], tmp)) as running:
            assert await running.cluster.wait_for(lambda t: len(healthy_ids(t)) == 1,
                                                  timeout_s=15)
            yield running
    finally:
        await agent.stop()


async def run_script(*argv: str) -> tuple[int, str, str]:
    """Run a command as a user would; the event loop keeps serving meanwhile."""
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out, err = await asyncio.wait_for(process.communicate(), 45)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def example(name: str, *args: str) -> tuple[int, str, str]:
    return await run_script(sys.executable, str(EXAMPLES / name), *args)


def test_every_example_script_has_a_test() -> None:
    assert {path.name for path in EXAMPLES.glob("*.py")} == TESTED


@module_loop
async def test_needle_in_haystack_streams_the_run_and_finds_the_number(
    controller: Controller,
) -> None:
    code, out, err = await example("needle_in_haystack.py", "--url", controller.base_url,
                                   "--lines", "20000")
    assert code == 0, out + err
    assert "characters of str" in out
    assert "iteration 1: the model replied" in out
    assert "block 1 on agent0-" in out
    assert "answer (final_var):" in out
    assert "found the magic number" in out


@module_loop
async def test_openai_client_lists_models_chats_streams_and_runs_rlm(
    controller: Controller, exo: tuple[str, ExoStandin],
) -> None:
    code, out, err = await example("openai_client.py", "--url", controller.base_url)
    assert code == 0, out + err
    assert f"models: {DEFAULT_MODEL}, rlm:{DEFAULT_MODEL}" in out
    assert f"plain chat ({DEFAULT_MODEL}): echo: Say hello in five words." in out
    assert "streamed: echo: Count from one to five." in out
    rlm_line = next(line for line in out.splitlines() if line.startswith("rlm:"))
    assert rlm_line.startswith(f"rlm:{DEFAULT_MODEL} (stop, ")
    assert rlm_line.endswith(f": {most_crates_city()}")
    # The document reached the session as the context, not the model's prompt.
    prompts = [body["messages"][1]["content"] for body in exo[1].chat_requests
               if body["messages"][0]["role"] == "system"]
    assert prompts
    assert all("W0001, Graz" not in prompt for prompt in prompts)


@module_loop
async def test_submit_job_runs_code_in_a_sandbox_and_reports_failures(
    controller: Controller,
) -> None:
    code, out, err = await example("submit_job.py", "--url", controller.base_url)
    assert code == 0, out + err
    assert "on agent0-" in out
    assert ": ok (exit 0," in out
    assert "25 primes below 100, the last 97" in out
    code, out, err = await example("submit_job.py", "--url", controller.base_url,
                                   "--language", "bash", "--code", "echo $((6 * 7)); exit 3")
    assert code == 1, out + err
    assert ": error (exit 3," in out
    assert "--- stdout\n42\n" in out
    assert "--- error repl_error:" in out


@module_loop
async def test_run_batch_answers_every_line_in_input_order(
    controller: Controller, tmp_path: Path,
) -> None:
    output = tmp_path / "answers.jsonl"
    code, out, err = await example("run_batch.py", "--url", controller.base_url,
                                   "--output", str(output), "--concurrency", "3")
    assert code == 0, out + err
    assert "6 items: 6 ok, 0 failed" in err
    results = [json.loads(line) for line in output.read_text().splitlines()]
    inputs = [json.loads(line) for line in (EXAMPLES / "batch_prompts.jsonl").read_text()
              .splitlines()]
    assert [r["id"] for r in results] == [i["id"] for i in inputs]
    assert results[0]["text"] == "echo: What is the capital of France? Answer in one word."
    assert results[4]["text"] == "echo: What is 17 + 25?"


@module_loop
async def test_batch_prompts_file_runs_with_kowalski_ctl_batch(
    exo: tuple[str, ExoStandin], tmp_path: Path,
) -> None:
    config = tmp_path / "kowalski.toml"
    config.write_text(tomli_w.dumps({"exo": {"endpoints": [exo[0]]}}))
    output = tmp_path / "answers.jsonl"
    code, _, err = await run_script(
        sys.executable, "-m", "kowalski.controller", "--config", str(config), "batch",
        str(EXAMPLES / "batch_prompts.jsonl"), "-o", str(output))
    assert code == 0, err
    results = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["ok"] for r in results] == [True] * 6
    assert results[1]["text"] == "echo: What is the capital of Finland? Answer in one word."


@pytest.mark.parametrize(("name", "exit_code"), [
    ("needle_in_haystack.py", 2), ("submit_job.py", 2), ("run_batch.py", 2),
    ("openai_client.py", 1),
])
@module_loop
async def test_examples_say_when_no_controller_answers(name: str, exit_code: int) -> None:
    code, out, err = await example(name, "--url", "http://127.0.0.1:9")
    assert code == exit_code, out + err
    assert "Traceback" not in err
    assert "127.0.0.1:9" in err
