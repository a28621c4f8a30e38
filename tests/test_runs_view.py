"""Runs as users see them: root runs listed with their child runs, runs without an answer,
one stored-run shape, and the call tree in the terminal."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from controller_env import controller_config, healthy_ids, running_controller
from procs import AgentProcess

from kowalski.common.config import RlmConfig
from kowalski.controller.rlm.call_tree import FOLD_SUB_CALLS, render_call_tree
from kowalski.controller.rlm.events import (
    AnyRlmEvent,
    CodeExecuted,
    IterationFinished,
    IterationStarted,
    ModelReplied,
    RlmResult,
    RunFinished,
    RunStarted,
    StopReason,
    SubCallAnswered,
    TokenCount,
)
from kowalski.controller.rlm.trajectory import (
    StoredRunSummary,
    list_runs,
    read_trajectory,
)
from kowalski.controller.service import Controller

pytestmark = pytest.mark.timeout(120)

CHILD_QUERY = "child: ask the leaves"
# More than the tree prints one by one.
LEAVES = 24
FIRST_FORMAT = Path(__file__).parent / "data" / "trajectory"
FIRST_FORMAT_RUN = "rlm-20260101-120000-0a1b2c3d"


def tree_reply(body: dict[str, Any]) -> str:
    """The root's one cell starts a child run; the child's cell asks LEAVES leaf sub-calls."""
    messages = body["messages"]
    if messages[0]["role"] != "system":
        return f"leaf answer to {messages[-1]['content']}"
    replied = sum(1 for message in messages if message["role"] == "assistant")
    if CHILD_QUERY in messages[1]["content"]:
        if replied == 0:
            return ("```repl\n"
                    f"parts = llm_query_batched([f'leaf {{i}}' for i in range({LEAVES})])\n"
                    "print(len(parts))\n```")
        return "FINAL(child done)"
    if replied == 0:
        return f"One child run.\n```repl\nprint(llm_query({CHILD_QUERY!r}))\n```"
    return "FINAL(root done)"


@pytest.fixture
def exo_reply() -> Any:
    return tree_reply


@pytest.fixture
def agent_count() -> int:
    return 1


@pytest.fixture
async def deep_controller(agents: list[AgentProcess], exo: Any, tmp_path: Path
                          ) -> AsyncIterator[Controller]:
    """A controller whose sub-calls at depth 1 are child runs."""
    config = controller_config(agents, [str(exo.make_url("")).rstrip("/")], tmp_path,
                               rlm={"max_depth": 2})
    async with running_controller(config) as running:
        assert await running.cluster.wait_for(
            lambda t: len(healthy_ids(t)) == len(agents), timeout_s=15)
        await running.router.first_probes()
        yield running


async def ctl(*argv: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kowalski.controller", *argv, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def masked(text: str, **names: str) -> list[str]:
    """The tree's lines with durations as T and the given names (agents, URLs) as their key."""
    for key, value in names.items():
        text = text.replace(value, key)
    return re.sub(r"\b\d+(?:\.\d+)? (?:ms|s)\b", "T", text).splitlines()


async def test_a_run_with_a_child_run_is_listed_once_and_shown_as_a_tree(
    deep_controller: Controller, agents: list[AgentProcess], exo: Any, tmp_path: Path,
) -> None:
    base = deep_controller.base_url
    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/v1/runs",
                                json={"query": "map the call tree", "context": "x"}) as response:
            assert response.status == 200, await response.text()
            result = await response.json()
        run_id, child_id = result["run_id"], result["run_id"] + "-s1"
        assert result["answer"] == "root done"
        async with session.get(base + "/v1/runs") as response:
            stored = (await response.json())["stored"]
        async with session.get(f"{base}/v1/runs/{child_id}") as response:
            assert response.status == 200, await response.text()
            child = await response.json()
    # The child run is no row of its own: its root counts it, and it is still readable.
    assert [(run["run_id"], run["child_runs"]) for run in stored] == [(run_id, 1)]
    assert set(stored[0]) == set(StoredRunSummary.__struct_fields__)
    assert child["events"][0]["parent_run_id"] == run_id
    assert child["events"][-1]["result"]["answer"] == "child done"
    runs = str(tmp_path / "runs")

    code, out, err = await ctl("runs", "--dir", runs, "list")
    assert code == 0, err
    assert out.splitlines() == [f"{run_id}  final            2 it  'map the call tree'  "
                                "(1 child run)"]
    code, out, err = await ctl("runs", "--dir", runs, "show", child_id)
    assert code == 0, err
    assert f"Run {child_id} (model " in out
    assert f"depth 1, sub-call of {run_id})" in out
    code, out, err = await ctl("runs", "--dir", runs, "show", run_id)
    assert code == 0, err
    assert f"[sub-call 1 from block 1: {len(CHILD_QUERY)} chars in" in out
    assert f"child run {child_id}" in out

    code, out, err = await ctl("runs", "--dir", runs, "show", run_id, "--tree")
    assert code == 0, err
    endpoint = str(exo.make_url("")).rstrip("/")
    assert masked(out, AGENT=agents[0].agent_id, EXO=endpoint, RUN=run_id) == [
        f"Run RUN · final · 2 iterations, {1 + LEAVES} sub-calls · T",
        "├─ Iteration 1 · ok · EXO · model T, code T",
        "│  └─ Cell 1 (repl) · ok · AGENT · T",
        f"│     └─ Child run RUN-s1 · final · 2 iterations, {LEAVES} sub-calls · T",
        "│        ├─ Iteration 1 · ok · EXO · model T, code T",
        "│        │  └─ Cell 1 (repl) · ok · AGENT · T",
        f"│        │     └─ {LEAVES} sub-calls · 1 endpoint · 0 errors · T in all, "
        "T each on average",
        "│        └─ Iteration 2 · ok · EXO · model T, code T",
        "└─ Iteration 2 · ok · EXO · model T, code T",
    ]
    # The folded line's total is the sum of the leaves' latencies.
    [child_trajectory] = read_trajectory(run_id, runs, descendants=True).descendants
    total_ms = sum(event.latency_ms for event in child_trajectory.events
                   if isinstance(event, SubCallAnswered))
    total = f"{total_ms:.1f} ms" if total_ms < 10 else (
        f"{total_ms:.0f} ms" if total_ms < 1000 else f"{total_ms / 1000:.1f} s")
    assert f"· {total} in all" in out


def test_a_first_format_trajectory_prints_as_a_tree_with_its_sub_call_under_the_iteration(
) -> None:
    text = render_call_tree(read_trajectory(FIRST_FORMAT_RUN, FIRST_FORMAT,
                                            descendants=True))
    # Sub-calls in that format do not name their cell: they hang under their iteration.
    assert masked(text, EXO="http://127.0.0.1:46093") == [
        f"Run {FIRST_FORMAT_RUN} · final_var · 4 iterations, 1 sub-calls · T",
        "├─ Iteration 1 · ok · EXO · model T, code T",
        "│  ├─ Block 1 (bash) · not run",
        "│  ├─ Cell 2 (repl) · ok · local-agent · T",
        "│  └─ llm_query 'what is in the box?' · ok · EXO · T",
        "├─ Iteration 2 · ok · EXO · model T, code T",
        "├─ Iteration 3 · ok · EXO · model T, code T",
        "│  └─ Cell 1 (repl) · ok · local-agent · T",
        "└─ Iteration 4 · ok · EXO · model T, code T",
    ]


def _result(run_id: str, stop: StopReason, *, answer: str = "", last_reply: str = "",
            detail: str = "", sub_calls: int = 0) -> RlmResult:
    return RlmResult(run_id=run_id, answer=answer, stop_reason=stop, iterations=1,
                     sub_calls=sub_calls, tokens=TokenCount(), sub_call_tokens=TokenCount(),
                     steps=[], latency_ms=12.0, devices=[], agents=[], endpoints=[],
                     trajectory_path="", detail=detail, last_reply=last_reply)


def stored_run(directory: Path, run_id: str, *, query: str = "q", parent: str = "",
               started_at: float = 1.0, result: RlmResult | None = None,
               calls: int = 0) -> list[AnyRlmEvent]:
    """A one-iteration run's events, written to its file; calls sub-calls in block 1."""
    depth = run_id.count("-s")
    events: list[AnyRlmEvent] = [
        RunStarted(run_id=run_id, depth=depth, query=query, model="m", context_type="str",
                   context_chars=1, trajectory_path="", context_chunks=1,
                   started_at=started_at, config=RlmConfig(), parent_run_id=parent,
                   parent_iteration=1 if parent else 0, parent_block=1 if parent else 0),
        IterationStarted(run_id=run_id, depth=depth, iteration=1, phase="turn",
                         started_at=started_at),
        ModelReplied(run_id=run_id, depth=depth, iteration=1, phase="turn",
                     text=result.last_reply if result else "", model_ms=5.0,
                     tokens=TokenCount(), endpoint="http://e", messages_sent=2,
                     prompt_chars=10),
        *(SubCallAnswered(run_id=run_id, depth=depth, iteration=1, prompt_chars=1,
                          answer_chars=1, latency_ms=2.0, tokens=TokenCount(),
                          prompt=f"leaf {n}", endpoint="http://e", block=1)
          for n in range(calls)),
        CodeExecuted(run_id=run_id, depth=depth, iteration=1, block=1, code="x", status="ok",
                     output="", wall_time_ms=3.0, device_id="a1", language="repl"),
    ]
    if result is not None:
        events += [IterationFinished(run_id=run_id, depth=depth, iteration=1, phase="turn",
                                     code_ms=3.0),
                   RunFinished(run_id=run_id, depth=depth, result=result, finished_at=2.0)]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{run_id}.jsonl").write_bytes(
        b"".join(msgspec.json.encode(event) + b"\n" for event in events))
    return events


def test_more_than_twenty_sub_calls_of_a_cell_fold_into_one_line(tmp_path: Path) -> None:
    for run_id, calls in (("run-few", FOLD_SUB_CALLS), ("run-many", FOLD_SUB_CALLS + 1)):
        stored_run(tmp_path, run_id, calls=calls,
                   result=_result(run_id, "final", answer="a", sub_calls=calls))
    few = render_call_tree(read_trajectory("run-few", tmp_path))
    assert few.count("llm_query 'leaf") == FOLD_SUB_CALLS
    many = render_call_tree(read_trajectory("run-many", tmp_path))
    assert "llm_query" not in many
    assert (f"   └─ {FOLD_SUB_CALLS + 1} sub-calls · 1 endpoint · 0 errors · 42 ms in all, "
            "2.0 ms each on average") in many


def test_listing_hundreds_of_runs_counts_child_runs_by_name_without_opening_them(
    tmp_path: Path,
) -> None:
    roots = 200
    for n in range(roots):
        stored_run(tmp_path, f"run-{n}", started_at=float(n),
                   result=_result(f"run-{n}", "final", answer=str(n), sub_calls=1))
        # A reader that opened a child's file would wait here for ever (a FIFO): the
        # listing must tell child runs by their names alone.
        os.mkfifo(tmp_path / f"run-{n}-s1.jsonl")
        os.mkfifo(tmp_path / f"run-{n}-s1-s2.jsonl")
    # A child whose root is gone is listed under its own id; so is a root whose id merely
    # looks like a child's.
    stored_run(tmp_path, "gone-s1", parent="gone", started_at=float(roots))
    stored_run(tmp_path, "plain-s3", started_at=float(roots + 1))
    runs = list_runs(tmp_path)
    assert [run.run_id for run in runs[:3]] == ["plain-s3", "gone-s1", f"run-{roots - 1}"]
    assert len(runs) == roots + 2
    assert {run.child_runs for run in runs[2:]} == {2}
    assert (runs[2].answer, runs[2].sub_calls, runs[2].stop_reason) == (
        str(roots - 1), 1, "final")
    assert (runs[0].child_runs, runs[0].stop_reason, runs[0].sub_calls) == (0, None, None)


async def test_dashboard_lists_root_runs_and_shows_why_a_run_has_no_answer(
    browser_page: Any, tmp_path: Path,
) -> None:
    from playwright.async_api import expect

    runs = tmp_path / "runs"
    long_answer = "the answer " * 100
    stored_run(runs, "run-root", query="root with a child", started_at=4.0,
               result=_result("run-root", "final", answer=long_answer, sub_calls=1))
    stored_run(runs, "run-root-s1", parent="run-root", started_at=4.5,
               result=_result("run-root-s1", "final", answer="child answer"))
    stored_run(runs, "run-limited", query="stopped at the limit", started_at=3.0,
               result=_result("run-limited", "max_iterations",
                              last_reply="```repl\nprint('still looking')\n```",
                              detail="the iteration limit of 1 was reached and the last "
                                     "request got no usable FINAL"))
    stored_run(runs, "run-cancelled", query="cancelled", started_at=2.0,
               result=_result("run-cancelled", "cancelled", detail="the run was cancelled"))
    stored_run(runs, "run-dead", query="died mid-run", started_at=1.0)
    config = controller_config([], [], tmp_path)
    async with running_controller(config) as controller, aiohttp.ClientSession() as session:
        # The page's snapshot carries stored runs as StoredRunSummary, without answers. The
        # directory is read in the background: the first snapshots may come before it.
        async with session.get(controller.base_url + "/v1/events") as response:
            async for line in response.content:
                if line.startswith(b"data: "):
                    snapshot = json.loads(line.removeprefix(b"data: "))
                    if snapshot["stored_runs"]:
                        break
        stored = {run["run_id"]: run for run in snapshot["stored_runs"]}
        assert set(stored) == {"run-root", "run-limited", "run-cancelled", "run-dead"}
        assert set(stored["run-root"]) == set(StoredRunSummary.__struct_fields__)
        # Left out is empty; an unfinished run's answer stays None.
        assert [stored[run]["answer"] for run in ("run-root", "run-limited", "run-dead")] == [
            "", "", None]
        assert stored["run-root"]["child_runs"] == 1

        page = browser_page
        await page.goto(controller.base_url + "/")
        rows = page.locator("#runs tbody tr")
        await expect(rows).to_have_count(4)
        root = page.locator('#runs tr[data-run="run-root"]')
        await expect(root.locator(".child-runs")).to_have_text("1 child run")
        await expect(page.locator('#runs tr[data-run="run-limited"] .child-runs')).to_have_count(0)

        final = page.locator("#trajectory article.final")
        await page.locator('#runs tr[data-run="run-limited"] button').click()
        await expect(final).to_have_attribute("data-answered", "no")
        await expect(final.locator("h3")).to_have_text("No answer")
        await expect(final.locator(".stop-detail")).to_contain_text("iteration limit of 1")
        await expect(final.locator(".no-answer")).to_have_text(
            "No answer (max_iterations); the model's last reply was:")
        await expect(final.locator("pre.last-reply")).to_have_text(
            "```repl\nprint('still looking')\n```")
        await expect(final.locator("pre.final-answer")).to_have_count(0)

        await page.locator('#runs tr[data-run="run-cancelled"] button').click()
        await expect(page.locator("#trajectory .run-id")).to_have_text("run-cancelled")
        await expect(final.locator(".no-answer")).to_contain_text("No answer (cancelled)")
        await expect(final.locator("pre.last-reply")).to_have_text("(the model never replied)")

        await page.locator('#runs tr[data-run="run-root"] button').click()
        await expect(final).to_have_attribute("data-answered", "yes")
        await expect(final.locator("pre.final-answer")).to_contain_text("the answer the answer")
        # The child run is in its root's call tree, not in the table.
        await expect(page.locator(
            '#trajectory .call-tree li.kind-run[data-run="run-root-s1"]')).to_have_count(1)
