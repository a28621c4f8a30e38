"""A run as a call tree in text: iterations ▸ cells ▸ sub-calls and child runs ▸ theirs.

Built from a trajectory read with its descendants (`read_trajectory(..., descendants=True)`);
the dashboard draws the same tree in the browser (controller/api/static/calltree.js).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kowalski.controller.rlm.events import (
    CodeExecuted,
    CodeSkipped,
    IterationFinished,
    IterationStarted,
    ModelReplied,
    RunResumed,
    SubCallAnswered,
)
from kowalski.controller.rlm.trajectory import Trajectory

__all__ = ["FOLD_SUB_CALLS", "TreeNode", "build_tree", "render_call_tree"]

# A node with more sub-calls than this prints them as one line (counts and total time).
FOLD_SUB_CALLS = 20
# A sub-call's prompt is shown up to this many characters, on one line.
_PROMPT_CHARS = 48
# A node whose end is not in the file: still going, or its run died (a file cannot tell).
_UNFINISHED = "unfinished"


@dataclass
class TreeNode:
    """One node: a run, an iteration, a code cell, a sub-call, or where a run resumed."""

    kind: str
    title: str
    status: str
    # The endpoint (model calls), the agent (cells) or the counts (runs).
    where: str = ""
    duration: str = ""
    error: str = ""
    latency_ms: float = 0.0
    children: list[TreeNode] = field(default_factory=list)


def _ms(value: float) -> str:
    if value < 10:
        return f"{value:.1f} ms"
    if value < 1000:
        return f"{value:.0f} ms"
    return f"{value / 1000:.1f} s"


def _one_line(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit - 1] + "…"


@dataclass
class _Era:
    """The iterations and cells one go of a run names: a resume starts the next go."""

    iterations: dict[int, TreeNode] = field(default_factory=dict)
    cells: dict[tuple[int, int], TreeNode] = field(default_factory=dict)


class _RunBuilder:
    """The nodes of one run's iterations and cells, created as events name them."""

    def __init__(self) -> None:
        self.eras = [_Era()]
        # When each resume happened: a child run belongs to the go it started in.
        self.resumes: list[float] = []
        # The run's own children in order: its iterations, and the seams where it resumed.
        self.top: list[TreeNode] = []

    def era_at(self, when: float) -> int:
        return sum(resumed <= when for resumed in self.resumes)

    def iteration(self, number: int, era: int = -1) -> TreeNode:
        iterations = self.eras[era].iterations
        if number not in iterations:
            iterations[number] = TreeNode(kind="iteration", title=f"Iteration {number}",
                                          status=_UNFINISHED)
            self.top.append(iterations[number])
        return iterations[number]

    def resumed_at(self, number: int, when: float) -> None:
        """Iterations from number on start afresh: those recorded before are cut-off tries."""
        last = self.eras[-1]
        self.eras.append(_Era({n: node for n, node in last.iterations.items() if n < number},
                              {key: node for key, node in last.cells.items() if key[0] < number}))
        self.resumes.append(when)

    def cell(self, number: int, block: int, era: int = -1) -> TreeNode:
        cells = self.eras[era].cells
        if (number, block) not in cells:
            node = TreeNode(kind="cell", title=f"Cell {block}", status=_UNFINISHED)
            cells[number, block] = node
            self.iteration(number, era).children.append(node)
        return cells[number, block]

    def parent(self, iteration: int, block: int, era: int = -1) -> TreeNode:
        """Where a sub-call or child run hangs: its cell, else its iteration (older files)."""
        if not iteration:
            return self.iteration(max(self.eras[era].iterations, default=1), era)
        return self.cell(iteration, block, era) if block else self.iteration(iteration, era)


def _run_node(run_id: str, runs: dict[str, Trajectory], call: SubCallAnswered | None
              ) -> TreeNode:
    trajectory = runs[run_id]
    finished = trajectory.finished
    tree = _RunBuilder()
    # Child runs' answers, and the go of the run that got each.
    answered: dict[str, tuple[SubCallAnswered, int]] = {}
    model_ms: dict[int, float] = {}
    for event in trajectory.events:
        if isinstance(event, IterationStarted):
            tree.iteration(event.iteration).title = (
                "Final request" if event.phase == "final_request"
                else f"Iteration {event.iteration}")
        elif isinstance(event, ModelReplied):
            node = tree.iteration(event.iteration)
            if event.phase == "direct":
                node.title = "Direct call"
            node.where = event.endpoint or ("cache" if event.cached else "")
            model_ms[event.iteration] = event.model_ms
            node.duration = f"model {_ms(event.model_ms)}"
        elif isinstance(event, CodeExecuted):
            node = tree.cell(event.iteration, event.block)
            node.title = f"Cell {event.block} ({event.language or 'python'})"
            node.where, node.status = event.device_id, event.status or "unknown"
            node.duration = _ms(event.wall_time_ms)
        elif isinstance(event, CodeSkipped):
            node = tree.cell(event.iteration, event.block)
            node.title = f"Block {event.block} ({event.language or 'untagged'})"
            node.status = "not run"
        elif isinstance(event, IterationFinished):
            node = tree.iteration(event.iteration)
            node.status = "ok"
            model = model_ms.get(event.iteration)
            node.duration = ", ".join(
                part for part in (f"model {_ms(model)}" if model is not None else "",
                                  f"code {_ms(event.code_ms)}") if part)
        elif isinstance(event, RunResumed):
            tree.resumed_at(event.iteration, event.resumed_at)
            tree.top.append(TreeNode(
                kind="resumed", title=f"Resumed at iteration {event.iteration}",
                status=event.reason, where=f"replayed {event.replayed_cells} cell(s) and "
                f"{event.replayed_sub_calls} sub-call answer(s)"))
        elif isinstance(event, SubCallAnswered) and event.child_run_id:
            answered[event.child_run_id] = (event, len(tree.eras) - 1)
        elif isinstance(event, SubCallAnswered):
            tree.parent(event.iteration, event.block).children.append(TreeNode(
                kind="sub_call", title=f"llm_query {_one_line(event.prompt, _PROMPT_CHARS)!r}",
                status="error" if event.error else "ok", where=event.endpoint,
                duration=_ms(event.latency_ms), error=event.error,
                latency_ms=event.latency_ms))
    for child_id, child in runs.items():
        start = child.started
        if start.parent_run_id != run_id:
            continue
        asked, era = answered.get(child_id, (None, -1))
        # A child run names its cell from its first line; older files only by the answer.
        if start.parent_iteration:
            parent = tree.parent(start.parent_iteration, start.parent_block,
                                 tree.era_at(start.started_at))
        else:
            parent = tree.parent(asked.iteration if asked else 0, asked.block if asked else 0,
                                 era)
        parent.children.append(_run_node(child_id, runs, asked))
    for child_id, (asked, era) in answered.items():
        if child_id not in runs:
            tree.parent(asked.iteration, asked.block, era).children.append(TreeNode(
                kind="run", title=f"Child run {child_id} (no file)",
                status="error" if asked.error else "unknown", duration=_ms(asked.latency_ms),
                error=asked.error))
    start = trajectory.started
    title = f"Child run {run_id}" if start.depth else f"Run {run_id}"
    if finished is None:
        return TreeNode(kind="run", title=title, status=_UNFINISHED,
                        duration=_ms(call.latency_ms) if call else "",
                        children=tree.top)
    result = finished.result
    return TreeNode(kind="run", title=title, status=result.stop_reason,
                    where=f"{result.iterations} iterations, {result.sub_calls} sub-calls",
                    duration=_ms(result.latency_ms),
                    error=result.error.message if result.error else "",
                    children=tree.top)


def build_tree(trajectory: Trajectory) -> TreeNode:
    """The tree of a trajectory read with its descendants."""
    runs = {run.started.run_id: run for run in (trajectory, *trajectory.descendants)}
    return _run_node(trajectory.started.run_id, runs, None)


def _line(node: TreeNode) -> str:
    facts = [node.title, node.status, node.where, node.duration]
    text = " · ".join(fact for fact in facts if fact)
    return text + (f" · error: {_one_line(node.error, 120)}" if node.error else "")


def _folded(calls: list[TreeNode]) -> str:
    endpoints = {call.where for call in calls if call.where}
    errors = sum(call.status == "error" for call in calls)
    total_ms = sum(call.latency_ms for call in calls)
    return (f"{len(calls)} sub-calls · {len(endpoints)} endpoint"
            f"{'' if len(endpoints) == 1 else 's'} · {errors} error{'' if errors == 1 else 's'}"
            f" · {_ms(total_ms)} in all, {_ms(total_ms / len(calls))} each on average")


def _lines(node: TreeNode, prefix: str, out: list[str]) -> None:
    calls = [child for child in node.children if child.kind == "sub_call"]
    others = [child for child in node.children if child.kind != "sub_call"]
    # Child runs and cells first; a long sub-call list is one line, not hundreds.
    rows: list[TreeNode | str] = [*others]
    rows += [_folded(calls)] if len(calls) > FOLD_SUB_CALLS else calls
    for index, row in enumerate(rows):
        last = index == len(rows) - 1
        branch, below = ("└─ ", "   ") if last else ("├─ ", "│  ")
        if isinstance(row, str):
            out.append(prefix + branch + row)
            continue
        out.append(prefix + branch + _line(row))
        _lines(row, prefix + below, out)


def render_call_tree(trajectory: Trajectory) -> str:
    """The run and its child runs as an indented tree, one node a line."""
    root = build_tree(trajectory)
    out = [_line(root)]
    _lines(root, "", out)
    return "\n".join(out) + "\n"
