"""The run view's call tree: iterations, cells, sub-calls and child runs, live and after the end."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import msgspec
import pytest
from controller_env import controller_config, healthy_ids, running_controller
from procs import AgentProcess

from kowalski.common.config import RlmConfig
from kowalski.controller.rlm.call_tree import build_tree, render_call_tree
from kowalski.controller.rlm.events import (
    AnyRlmEvent,
    CodeExecuted,
    IterationStarted,
    RunResumed,
    RunStarted,
)
from kowalski.controller.rlm.trajectory import Trajectory, read_trajectory
from kowalski.controller.rlm.trajectory_writer import TrajectoryWriter

pytestmark = pytest.mark.timeout(120)

ROOT_QUERY = "map the call tree"
CHILD_QUERY = "child: ask the leaves"
# More than the tree shows unfolded (FOLD_SUB_CALLS in calltree.js).
LEAVES = 24


class TreeModel:
    """The root's one cell starts a child run; the child's cell asks LEAVES leaf sub-calls.

    The child's second reply waits for `gate`, so the run can be looked at while it goes.
    """

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()

    async def __call__(self, body: dict[str, Any]) -> str:
        messages = body["messages"]
        if messages[0]["role"] != "system":
            return f"leaf answer to {messages[-1]['content']}"
        replied = sum(1 for message in messages if message["role"] == "assistant")
        if CHILD_QUERY in messages[1]["content"]:
            if replied == 0:
                return ("Asking the leaves.\n```repl\n"
                        f"parts = llm_query_batched([f'leaf {{i}}' for i in range({LEAVES})])\n"
                        "print(len(parts))\n```")
            self.waiting.set()
            await self.gate.wait()
            return "FINAL(child done)"
        if replied == 0:
            return f"One child run.\n```repl\nprint(llm_query({CHILD_QUERY!r}))\n```"
        return "FINAL(root done)"


@pytest.fixture
def tree_model() -> TreeModel:
    return TreeModel()


@pytest.fixture
def exo_reply(tree_model: TreeModel) -> TreeModel:
    return tree_model


async def check_tree(page: Any, run_id: str, *, agents: list[str], endpoint: str,
                     live: bool, unfold: bool) -> None:
    """The tree under #trajectory: the root's cell, its child run, the child's sub-calls."""
    from playwright.async_api import expect

    agent = re.compile("^(" + "|".join(map(re.escape, agents)) + ")$")
    tree = page.locator("#trajectory .call-tree")
    root = tree.locator(f'li.kind-run[data-run="{run_id}"]')
    await expect(root).to_have_attribute("data-status", "running" if live else "finished")
    first = root.locator(f'li.kind-iteration[data-key="{run_id}/i1"]')
    await expect(first).to_have_attribute("data-where", endpoint)
    await expect(first.locator("> details > summary")).to_contain_text("model ")
    cell = first.locator(f'li.kind-cell[data-key="{run_id}/i1/b1"]')
    await expect(cell).to_have_attribute("data-status", "running" if live else "ok")
    if not live:
        await expect(cell).to_have_attribute("data-where", agent)
    child = cell.locator(f'li.kind-run[data-run="{run_id}-s1"]')
    await expect(child).to_have_attribute("data-status", "running" if live else "finished")
    # The child's own iterations: the one that asked the leaves, and the one that answered.
    await expect(child.locator("li.kind-iteration")).to_have_count(2)
    second = child.locator(f'li.kind-iteration[data-key="{run_id}-s1/i2"]')
    await expect(second).to_have_attribute("data-status", "running" if live else "ok")
    child_cell = child.locator(f'li.kind-cell[data-key="{run_id}-s1/i1/b1"]')
    await expect(child_cell).to_have_attribute("data-where", agent)
    await expect(child_cell).to_have_attribute("data-status", "ok")
    folded = child_cell.locator("li.kind-sub_calls")
    await expect(folded).to_contain_text(f"{LEAVES} sub-calls · 1 endpoint · 0 errors")
    calls = child_cell.locator("li.kind-sub_call")
    if unfold:
        # Folded, and drawn only once opened.
        await expect(calls).to_have_count(0)
        await folded.locator("summary").click()
    await expect(calls).to_have_count(LEAVES)
    for index in (0, LEAVES - 1):
        await expect(calls.nth(index)).to_have_attribute("data-where", endpoint)
        await expect(calls.nth(index)).to_have_attribute("data-status", "ok")
    if not live:
        await expect(root.locator(f'li.kind-iteration[data-key="{run_id}/i2"]')).to_have_attribute(
            "data-status", "ok")


async def check_old_and_large_trees(page: Any) -> None:
    """Files from before cells were named, and a cell with 500 sub-calls, in the page's code."""
    drawn = await page.evaluate("""async () => {
        const {CallTree, buildTree} = await import("/static/calltree.js");
        const base = {run_id: "old", depth: 0};
        const call = (n, extra) => ({...base, kind: "sub_call", iteration: 1, latency_ms: n,
            endpoint: "http://e", error: "", ...extra});
        const events = [
            {...base, kind: "run_started", parent_run_id: ""},
            {...base, kind: "iteration_started", iteration: 1, phase: "turn"},
            {...base, kind: "model_replied", iteration: 1, phase: "turn", endpoint: "http://e",
             model_ms: 5},
            ...Array.from({length: 500}, (_, n) => call(n, {block: 1})),
            call(1, {}),
            call(2, {child_run_id: "old-s1"}),
            {...base, kind: "code_executed", iteration: 1, block: 1, device_id: "a1",
             wall_time_ms: 9, status: "ok", language: "repl"},
        ];
        const child = [{run_id: "old-s1", depth: 1, kind: "run_started",
                        parent_run_id: "old"}];
        const started = performance.now();
        const tree = new CallTree().render(buildTree({events, descendants: [{events: child}]}));
        const ms = performance.now() - started;
        const at = (key) => tree.querySelector(`[data-key="${key}"]`);
        return {
            ms,
            rows: tree.querySelectorAll("li").length,
            summary: at("old/i1/b1/sub-calls").textContent,
            underIteration: [...at("old/i1").querySelectorAll(
                ":scope > details > ul > li")].map((li) => li.dataset.kind),
        };
    }""")
    # Folded, the 500 sub-calls are one row and are not drawn at all.
    assert drawn["summary"].startswith("500 sub-calls · 1 endpoint · 0 errors")
    assert drawn["rows"] < 10, drawn
    assert drawn["ms"] < 500, drawn
    # Without a block, a sub-call and a child run hang under their iteration.
    assert drawn["underIteration"] == ["cell", "run", "sub_call"], drawn
    # A resumed run: the iteration cut off by the stop stays, the seam follows, and the
    # iteration done again after it is a row of its own.
    rows = await page.evaluate("""async () => {
        const {CallTree, buildTree} = await import("/static/calltree.js");
        const base = {run_id: "back", depth: 0};
        const turn = (n) => [
            {...base, kind: "iteration_started", iteration: n, phase: "turn"},
            {...base, kind: "code_executed", iteration: n, block: 1, device_id: "a1",
             wall_time_ms: 3, status: "ok", language: "repl"}];
        const events = [
            {...base, kind: "run_started", parent_run_id: ""}, ...turn(1),
            {...base, kind: "iteration_finished", iteration: 1, code_ms: 3}, ...turn(2),
            {...base, kind: "resumed", iteration: 2, reason: "controller restart",
             replayed_cells: 1, replayed_sub_calls: 0, resumed_at: 10}, ...turn(2)];
        // Each go's cell 2.1 started a child run: before the stop, and after the resume.
        const child = (id, at) => ({events: [{run_id: id, depth: 1, kind: "run_started",
            parent_run_id: "back", parent_iteration: 2, parent_block: 1, started_at: at}]});
        const tree = new CallTree().render(buildTree(
            {events, descendants: [child("back-s1", 5), child("back-s2", 11)]}));
        const rows = [...tree.querySelector('[data-key="back"]').querySelectorAll(
            ":scope > details > ul > li")].map((li) => [li.dataset.kind, li.dataset.key,
                                                        li.dataset.status]);
        const under = (run) => tree.querySelector(`[data-run="${run}"]`)
            .parentElement.closest("li").dataset.key;
        return {rows, children: [under("back-s1"), under("back-s2")]};
    }""")
    assert rows["rows"] == [["iteration", "back/i1", "ok"], ["iteration", "back/i2", "running"],
                            ["resumed", "back/r1", "controller restart"],
                            ["iteration", "back/r1/i2", "running"]], rows
    assert rows["children"] == ["back/i2/b1", "back/r1/i2/b1"], rows


async def test_run_view_draws_the_call_tree_live_and_from_the_stored_events(
    browser_page: Any, agents: list[AgentProcess], exo: Any, tree_model: TreeModel,
    tmp_path: Path,
) -> None:
    page = browser_page
    requested: list[str] = []
    page.on("request", lambda request: requested.append(urlsplit(request.url).path))
    endpoint = str(exo.make_url("")).rstrip("/")
    agent_ids = [agent.agent_id for agent in agents]
    config = controller_config(agents, [endpoint], tmp_path, rlm={"max_depth": 2})
    async with running_controller(config) as controller, aiohttp.ClientSession() as session:
        assert await controller.cluster.wait_for(
            lambda t: len(healthy_ids(t)) == len(agents), timeout_s=15)
        await controller.router.first_probes()
        await page.goto(controller.base_url + "/")

        async def start() -> dict[str, Any]:
            async with session.post(controller.base_url + "/v1/runs",
                                    json={"query": ROOT_QUERY, "context": "x"}) as response:
                assert response.status == 200, await response.text()
                answer: dict[str, Any] = await response.json()
                return answer

        run = asyncio.create_task(start())
        try:
            await asyncio.wait_for(tree_model.waiting.wait(), 60)
            async with session.get(controller.base_url + "/v1/runs") as response:
                run_id = (await response.json())["live"][0]["run_id"]
            await page.locator(f'#runs tr[data-run="{run_id}"] button').click()
            await check_tree(page, run_id, agents=agent_ids, endpoint=endpoint, live=True,
                             unfold=True)
            tree_model.gate.set()
            result = await asyncio.wait_for(run, 60)
        finally:
            run.cancel()
        assert (result["run_id"], result["answer"]) == (run_id, "root done")
        # The same page follows the end, and keeps the sub-call list it was told to open.
        await check_tree(page, run_id, agents=agent_ids, endpoint=endpoint, live=False,
                         unfold=False)

        # A fresh page draws the finished run from its stored events alone.
        await page.reload()
        await page.locator(f'#runs tr[data-run="{run_id}"] button').click()
        await check_tree(page, run_id, agents=agent_ids, endpoint=endpoint, live=False,
                         unfold=True)
        await check_old_and_large_trees(page)
    # One read of the run's trajectory per change, never one per node of the tree.
    asked = {path for path in requested if not path.startswith("/static/")}
    assert asked == {"/", "/v1/events", f"/v1/runs/{run_id}"}


def test_descendants_are_read_parents_first_and_only_below_the_run(tmp_path: Path) -> None:
    def write(run_id: str, parent: str = "") -> None:
        started = RunStarted(run_id=run_id, depth=run_id.count("-s"), query="q", model="",
                             context_type="str", context_chars=1, trajectory_path="",
                             context_chunks=1, started_at=0.0, config=RlmConfig(),
                             parent_run_id=parent)
        path = TrajectoryWriter(tmp_path, run_id).path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(msgspec.json.encode(started) + b"\n")

    for run_id in ("run-a", "run-a-s10", "run-a-s2", "run-a-s2-s1", "run-ab-s1", "run-b-s1"):
        write(run_id, run_id.rsplit("-s", 1)[0] if "-s" in run_id else "")
    # A child that has not written its first line yet is left out, not an error.
    (tmp_path / "run-a-s3.jsonl").write_bytes(b"")
    tree = read_trajectory("run-a", tmp_path, descendants=True)
    assert [below.started.run_id for below in tree.descendants] == [
        "run-a-s2", "run-a-s2-s1", "run-a-s10"]
    assert read_trajectory("run-a", tmp_path).descendants == []


def _started(run_id: str, at: float, *, parent: str = "", cell: tuple[int, int] = (0, 0)
             ) -> RunStarted:
    return RunStarted(run_id=run_id, depth=1 if parent else 0, query="q", model="m",
                      context_type="str", context_chars=1, trajectory_path="",
                      context_chunks=1, started_at=at, config=RlmConfig(),
                      parent_run_id=parent, parent_iteration=cell[0], parent_block=cell[1])


def _turn(run_id: str, iteration: int) -> list[AnyRlmEvent]:
    return [IterationStarted(run_id=run_id, depth=0, iteration=iteration, phase="turn",
                             started_at=0.0),
            CodeExecuted(run_id=run_id, depth=0, iteration=iteration, block=1, code="",
                         status="ok", output="", wall_time_ms=1.0, device_id="a1",
                         language="repl")]


def test_a_child_run_hangs_under_the_go_of_its_run_that_started_it() -> None:
    # Iteration 2's cell started a child, the controller stopped, and the resumed run did
    # iteration 2 again, whose cell started another child.
    events = [_started("r", 1.0), *_turn("r", 1), *_turn("r", 2)[:1],
              RunResumed(run_id="r", depth=0, iteration=2, reason="controller restart",
                         replayed_cells=1, replayed_sub_calls=0, resumed_at=10.0,
                         max_iterations=20),
              *_turn("r", 2)]
    before = Trajectory(path="r-s1", events=[_started("r-s1", 5.0, parent="r", cell=(2, 1))])
    after = Trajectory(path="r-s2", events=[_started("r-s2", 11.0, parent="r", cell=(2, 1))])
    tree = build_tree(Trajectory(path="r", events=events, descendants=[before, after]))
    rows = [(node.title, [child.title for child in node.children]) for node in tree.children]
    assert rows == [("Iteration 1", ["Cell 1 (repl)"]), ("Iteration 2", ["Cell 1"]),
                    ("Resumed at iteration 2", []), ("Iteration 2", ["Cell 1 (repl)"])]
    cut_off, redone = tree.children[1].children[0], tree.children[3].children[0]
    assert [child.title for child in cut_off.children] == ["Child run r-s1"]
    assert [child.title for child in redone.children] == ["Child run r-s2"]
    # The same in text, the cut-off try's child above the seam.
    text = render_call_tree(Trajectory(path="r", events=events, descendants=[before, after]))
    assert text.index("Child run r-s1") < text.index("Resumed at iteration 2") \
        < text.index("Child run r-s2")
