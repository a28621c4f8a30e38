"""RLM runs whose replies mix languages, through a real controller and agent."""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from controller_env import controller_config, healthy_ids, running_controller
from exo_standin import STANDIN
from procs import AgentProcess

from kowalski.controller.service import Controller

pytestmark = pytest.mark.timeout(240)

CONTEXT = "alpha beta\ngamma delta epsilon\nzeta\n"
WORDS, LINES, CHARS = 6, 3, len(CONTEXT)

PYTHON = "```repl\nprint(f'py={len(context.splitlines())}')\n```"
# A first Rust try that does not compile: the model is told why and fixes it.
RUST_BROKEN = "```rust\nlet n: u32 = \"six\";\nprintln!(\"rust={}\", n);\n```"
RUST = ("```rust\nlet text = std::fs::read_to_string(\"context.txt\").unwrap();\n"
        "println!(\"rust={}\", text.split_whitespace().count());\n```")
JAVA = ("```java\nString text = java.nio.file.Files.readString(java.nio.file.Path.of("
        "\"context.txt\"));\nSystem.out.println(\"java=\" + text.length());\n```")
BASH = "```bash\necho \"bash=$(wc -l < context.txt)\"\n```"
JAVASCRIPT = ("```javascript\nconst text = require('fs').readFileSync('context.txt', 'utf8');\n"
              "console.log('js=' + text.split('\\n')[0].length);\n```")


def _found(messages: list[dict[str, Any]]) -> dict[str, str]:
    """The name=value lines the blocks printed, from every feedback message so far."""
    text = "\n".join(m["content"] for m in messages if m["role"] == "user")
    return dict(re.findall(r"^(py|rust|java|bash|js)=(\d+)$", text, flags=re.MULTILINE))


def script(plan: list[str]) -> Callable[[dict[str, Any]], str]:
    """A model that sends plan's replies in turn, then FINAL with what its blocks printed."""

    def reply(body: dict[str, Any]) -> str:
        messages = body["messages"]
        turn = sum(1 for m in messages if m["role"] == "assistant")
        if turn < len(plan):
            return plan[turn]
        found = _found(messages)
        return "FINAL(" + " ".join(f"{k}={v}" for k, v in sorted(found.items())) + ")"

    return reply


PLAN: list[str] = []


@pytest.fixture
def exo_reply() -> Callable[[dict[str, Any]], str]:
    return script(PLAN)


@pytest.fixture
def agent_count() -> int:
    return 1


def _offered(controller: Controller) -> set[str]:
    [row] = controller.cluster.table.devices.values()
    return set(row.languages)


async def _streamed_run(controller: Controller, body: dict[str, Any]) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.post(
        controller.base_url + "/v1/runs", json={**body, "stream": True},
    ) as response:
        assert response.status == 200, await response.text()
        return [json.loads(line) async for line in response.content]


async def test_python_rust_and_java_blocks_answer_together(
    controller: Controller, agents: list[AgentProcess],
) -> None:
    missing = {"rust", "java"} - _offered(controller)
    if missing:
        pytest.skip(f"the agent offers no {' or '.join(sorted(missing))}: the toolchain is not "
                    "installed here")
    PLAN[:] = [f"Count first.\n{PYTHON}\n{RUST_BROKEN}", f"Fixed.\n{RUST}\n{JAVA}"]
    lines = await _streamed_run(controller, {"query": "count", "context": CONTEXT})
    result = lines[-1]["result"]
    assert result["answer"] == f"java={CHARS} py={LINES} rust={WORDS}", result
    assert result["stop_reason"] == "final"
    executed = [line for line in lines if line["kind"] == "code_executed"]
    assert [(e["ran_as"], e["status"]) for e in executed] == [
        ("python", "ok"), ("rust", "error"), ("rust", "ok"), ("java", "ok")]
    assert {e["device_id"] for e in executed} == {agents[0].agent_id}
    # The compile error went back to the model as an error it could fix.
    second = next(line for line in lines if line["kind"] == "iteration_finished")["feedback"]
    assert "[rust] output of block 2:" in second
    assert "rust compilation failed" in second
    # Each block's output streamed before its result, labelled with its language.
    for event in executed:
        if event["status"] == "ok":
            index = lines.index(event)
            pieces = [line for line in lines[:index] if line["kind"] == "cell_output"
                      and (line["iteration"], line["block"]) == (event["iteration"],
                                                                 event["block"])]
            assert pieces, event
            assert {p["language"] for p in pieces} == {event["ran_as"]}
    async with aiohttp.ClientSession() as session, session.get(
            f"{controller.base_url}/v1/runs/{result['run_id']}") as response:
        trajectory = await response.json()
    kinds = [event["kind"] for event in trajectory["events"]]
    assert "cell_output" not in kinds
    assert [e["ran_as"] for e in trajectory["events"] if e["kind"] == "code_executed"] == [
        "python", "rust", "rust", "java"]


async def test_bash_and_javascript_blocks_read_the_context_file(
    controller: Controller,
) -> None:
    plan = [f"{PYTHON}\n{BASH}"]
    expected = f"bash={LINES} py={LINES}"
    if "javascript" in _offered(controller):
        plan[0] += f"\n{JAVASCRIPT}"
        expected = f"bash={LINES} js={len('alpha beta')} py={LINES}"
    PLAN[:] = plan
    lines = await _streamed_run(controller, {"query": "count", "context": CONTEXT})
    assert lines[-1]["result"]["answer"] == expected
    system = lines[0]["system_prompt"]
    assert "`context.txt`" in system


async def test_a_run_may_narrow_its_languages_but_not_widen_them(
    controller: Controller,
) -> None:
    PLAN[:] = [f"{PYTHON}\n{BASH}"]
    lines = await _streamed_run(controller, {"query": "count", "context": CONTEXT,
                                             "languages": ["python"]})
    assert lines[-1]["result"]["answer"] == f"py={LINES}"
    skipped = [line for line in lines if line["kind"] == "code_skipped"]
    assert [s["language"] for s in skipped] == ["bash"]
    feedback = next(line for line in lines if line["kind"] == "iteration_finished")["feedback"]
    assert "the languages that run here are ```python" in feedback
    async with aiohttp.ClientSession() as session, session.post(
        controller.base_url + "/v1/runs",
        json={"query": "q", "context": "c", "languages": ["cobol"]},
    ) as response:
        assert response.status == 400
        assert "cobol" in (await response.json())["error"]["message"]


async def test_a_run_cannot_enable_a_language_the_controller_leaves_off(
    agents: list[AgentProcess], exo: Any, tmp_path: Path,
) -> None:
    config = controller_config(agents, [str(exo.make_url("")).rstrip("/")], tmp_path,
                               rlm={"languages": ["python"]})
    async with running_controller(config) as running, aiohttp.ClientSession() as session, \
            session.post(running.base_url + "/v1/runs",
                         json={"query": "q", "context": "c",
                               "languages": ["python", "bash"]}) as response:
        assert response.status == 400
        message = (await response.json())["error"]["message"]
    assert "languages bash are not enabled on this controller" in message
    assert "rlm.languages" in message
    assert exo.app[STANDIN].counts["/v1/chat/completions"] == 0
    # Refused before the run took its lock or began its context's copy.
    runs = tmp_path / "runs"
    assert not runs.exists() or [path.name for path in runs.rglob("*")] == []


async def test_ctl_run_prints_a_cells_output_while_it_runs(controller: Controller) -> None:
    PLAN[:] = ["```repl\nimport time\nprint('tick-one', flush=True)\ntime.sleep(2)\n"
               "print('tick-two')\nprint('py=1')\n```"]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kowalski.controller", "run", "tick", "--url",
        controller.base_url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert process.stdout is not None
    seen: list[tuple[float, str]] = []
    async with asyncio.timeout(60):
        while line := await process.stdout.readline():
            seen.append((time.monotonic(), line.decode()))
    assert await process.wait() == 0, await process.stderr.read() if process.stderr else ""
    text = "".join(line for _, line in seen)
    first = next(at for at, line in seen if "│ tick-one" in line)
    second = next(at for at, line in seen if "│ tick-two" in line)
    # Line-based output too: the first line was printed while the cell slept.
    assert second - first > 1.5, text
    # Printed once as it came, not again with the block's result.
    assert text.count("│ tick-one") == 1, text
    assert "▶ block 1 (python) running:" in text
    assert "=== answer (final) ===\npy=1\n" in text


async def test_the_controller_refuses_jobs_that_name_a_session(controller: Controller) -> None:
    async with aiohttp.ClientSession() as session, session.post(
        controller.base_url + "/v1/jobs",
        json={"job_id": "peek", "language": "bash", "code": "cat context.txt",
              "session_id": "someone-elses"},
    ) as response:
        assert response.status == 400
        message = (await response.json())["error"]["message"]
    assert "session_id is for jobs of the controller's own RLM runs" in message


async def test_a_language_the_agent_lacks_is_not_offered_and_its_block_is_a_note(
    exo: Any, tmp_path: Path,
) -> None:
    # A java that fails its probe: the agent starts and does not offer Java.
    broken = tmp_path / "broken-java"
    broken.write_text("#!/bin/sh\nexit 1\n")
    broken.chmod(0o755)
    agent = await AgentProcess(tmp_path, name="nojava",
                               sandbox={"java_path": str(broken)}).start()
    try:
        config = controller_config([agent], [str(exo.make_url("")).rstrip("/")], tmp_path)
        async with running_controller(config) as running:
            assert await running.cluster.wait_for(
                lambda t: len(healthy_ids(t)) == 1, timeout_s=15), running.cluster.table
            await running.router.first_probes()
            assert "java" not in _offered(running)
            PLAN[:] = [f"{JAVA}\n{PYTHON}"]
            lines = await _streamed_run(running, {"query": "count", "context": CONTEXT})
    finally:
        await agent.stop()
    assert lines[-1]["result"]["answer"] == f"py={LINES}"
    # The model was never told of Java, and a Java block anyway is skipped with a note.
    assert "java" not in lines[0]["config"]["languages"]
    assert not re.search(r"```java\b|Java", lines[0]["system_prompt"])
    assert "```bash" in lines[0]["system_prompt"]
    [skipped] = [line for line in lines if line["kind"] == "code_skipped"]
    assert skipped["language"] == "java"
    feedback = next(line for line in lines if line["kind"] == "iteration_finished")["feedback"]
    assert "the languages that run here are" in feedback
    assert not re.search(r"```java\b", feedback.split("the languages that run here are")[1])
