"""Runs that end without an answer: the OpenAI front's reply, Ctrl-C and SIGTERM in the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import tomli_w
from controller_env import controller_config, running_controller
from exo_standin import DEFAULT_MODEL, make_exo_app
from procs import AgentProcess

from kowalski.controller.service import Controller

pytestmark = pytest.mark.timeout(120)
CODE_ONLY = "Let me look.\n```repl\nprint(len(context))\n```"


async def never_answers(body: dict[str, Any]) -> str:
    """A model that takes its time and only ever writes code, never FINAL."""
    await asyncio.sleep(0.5)
    return CODE_ONLY


@pytest.fixture
def exo_reply() -> Callable[[dict[str, Any]], Any]:
    return never_answers


@pytest.fixture
def agent_count() -> int:
    return 1


async def test_openai_front_says_a_run_stopped_at_its_limit_has_no_answer(
    agents: list[AgentProcess], exo: Any, tmp_path: Path,
) -> None:
    config = controller_config(agents, [str(exo.make_url("")).rstrip("/")], tmp_path,
                               rlm={"max_iterations": 1})
    async with running_controller(config) as running:
        client = openai.AsyncOpenAI(base_url=running.base_url + "/v1", api_key="unused")
        try:
            answer = await client.chat.completions.create(
                model=f"rlm:{DEFAULT_MODEL}",
                messages=[{"role": "user", "content": "abc"},
                          {"role": "user", "content": "count letters"}])
        finally:
            await client.close()
    choice = answer.choices[0]
    assert choice.finish_reason == "length"
    content = choice.message.content or ""
    assert "stopped without an answer (max_iterations" in content
    assert "```" not in content


async def _start_ctl(*argv: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kowalski.controller", *argv, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=dict(os.environ))


async def _interrupt_after_first_reply(process: asyncio.subprocess.Process, signum: int
                                       ) -> tuple[int, str, str]:
    """Wait for the first printed iteration, send signum, and collect what follows."""
    assert process.stdout is not None
    assert process.stderr is not None
    seen = []
    async with asyncio.timeout(60):
        while True:
            line = (await process.stdout.readline()).decode()
            assert line, f"the run ended early: {''.join(seen)}{await process.stderr.read()!r}"
            seen.append(line)
            if line.startswith("── iteration 1"):
                break
    process.send_signal(signum)
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, "".join(seen) + out.decode(), err.decode()


def _trajectory_path(out: str) -> Path:
    line = next(line for line in out.splitlines() if line.startswith("--- trajectory:"))
    return Path(line.removeprefix("--- trajectory:").strip())


async def _runs_show(runs_dir: Path, run_id: str) -> str:
    process = await _start_ctl("runs", "--dir", str(runs_dir), "show", run_id)
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode()


async def test_ctrl_c_during_a_local_run_prints_the_partial_result_and_exits_130(
    exo: Any, tmp_path: Path,
) -> None:
    config = tmp_path / "kowalski.toml"
    config.write_text(tomli_w.dumps({
        "exo": {"endpoints": [str(exo.make_url("")).rstrip("/")]},
        "rlm": {"trajectory_dir": str(tmp_path / "runs")},
        "sandbox": {"memory_limit_mb": 256},
    }))
    process = await _start_ctl("--config", str(config), "run", "count letters", "--local")
    code, out, err = await _interrupt_after_first_reply(process, signal.SIGINT)
    assert code == 130, err
    assert "=== no answer (cancelled" in out
    assert "no answer; the model's last reply was:" in out
    assert "Traceback" not in err
    path = _trajectory_path(out)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records[-1]["kind"] == "run_finished"
    assert records[-1]["result"]["stop_reason"] == "cancelled"
    shown = await _runs_show(path.parent, path.stem)
    assert "── Finished: cancelled ──" in shown
    assert "No answer; the model's last reply was:" in shown


async def test_sigterm_during_a_remote_run_stops_it_and_the_controller_records_it(
    controller: Controller, tmp_path: Path,
) -> None:
    process = await _start_ctl("run", "count letters", "--url", controller.base_url)
    code, out, err = await _interrupt_after_first_reply(process, signal.SIGTERM)
    assert code == 130, err
    assert "=== no answer (cancelled" in out
    assert "Traceback" not in err
    path = _trajectory_path(out)
    assert path.parent == tmp_path / "runs"
    # The controller sees the client gone and cancels the run.
    for _ in range(200):
        if path.exists() and '"run_finished"' in path.read_text():
            break
        await asyncio.sleep(0.1)
    last = json.loads(path.read_text().splitlines()[-1])
    assert last["result"]["stop_reason"] == "cancelled"
    assert "── Finished: cancelled ──" in await _runs_show(path.parent, path.stem)


async def test_a_streamed_run_whose_caller_hangs_up_stops_during_a_hung_model_call(
    agents: list[AgentProcess], aiohttp_server: Any, tmp_path: Path,
) -> None:
    calls = 0
    hung = asyncio.Event()

    async def hangs_after_the_first_reply(body: dict[str, Any]) -> str:
        nonlocal calls
        calls += 1
        if calls > 1:
            hung.set()
            await asyncio.sleep(60)
        return CODE_ONLY

    server = await aiohttp_server(make_exo_app(reply=hangs_after_the_first_reply))
    config = controller_config(agents, [str(server.make_url("")).rstrip("/")], tmp_path)
    async with running_controller(config) as running, aiohttp.ClientSession() as http:
        response = await http.post(running.base_url + "/v1/runs", json={
            "query": "count letters", "context": "abc", "stream": True})
        run_id = ""
        async for line in response.content:
            event = json.loads(line)
            run_id = run_id or event.get("run_id", "")
            if event.get("kind") == "code_executed":
                break
        # Hang up once every event before the hung call has gone out: from here on the run
        # has nothing to write, so only watching the connection can notice the caller left.
        await hung.wait()
        await asyncio.sleep(0.5)
        response.close()
        hung_up = asyncio.get_running_loop().time()
        path = tmp_path / "runs" / f"{run_id}.jsonl"
        while '"run_finished"' not in path.read_text():
            assert asyncio.get_running_loop().time() - hung_up < 10, "the run went on"
            await asyncio.sleep(0.1)
    last = json.loads(path.read_text().splitlines()[-1])
    assert last["result"]["stop_reason"] == "cancelled"
