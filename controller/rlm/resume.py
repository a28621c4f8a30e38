"""Resuming a run from its trajectory: what to replay, and the sub-call answers to replay with.

`plan_resume` reads a run's events and says what a resume needs: the turns already done
(each one's reply, cells and feedback), the sub-call answers those cells got, the totals
so far, and the iteration to go on at. Events after a `resumed` seam replace the ones
before it from that iteration on, so a run resumed twice is read the same way.
`replay` runs the recorded cells again in a fresh session, `llm_query` answered from the
record by `RecordedAnswers`, and says where the session stopped matching the record.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from kowalski.common.config import RlmConfig
from kowalski.common.errors import ParseError, RunNotResumableError
from kowalski.controller.models.chat_types import ChatMessage
from kowalski.controller.rlm import prompts
from kowalski.controller.rlm.events import (
    SUB_CALL_CHARS,
    CodeExecuted,
    CodeSession,
    ContextFolded,
    IterationFinished,
    IterationStarted,
    ModelReplied,
    RunResumed,
    StepTiming,
    SubCallAnswered,
    TokenCount,
)
from kowalski.controller.rlm.ledger import RunLedger
from kowalski.controller.rlm.trajectory import Trajectory

__all__ = ["RecordedAnswers", "ReplayTurn", "ResumePlan", "ResumeReason", "plan_resume",
           "replay"]

ResumeReason = Literal["controller restart", "by hand"]


class ResumeRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """POST /v1/runs/{run_id}/resume: go on with a stopped run."""

    # A new iteration limit: above the iterations done, and above the old limit for a run
    # stopped there; at most this controller's rlm.max_iterations.
    max_iterations: Annotated[int, Meta(gt=0)] | None = None
    stream: bool = False


class ReplayTurn(msgspec.Struct, frozen=True, kw_only=True):
    """One finished turn as recorded: the reply, the cells it ran, the message sent back."""

    iteration: int
    reply: str
    cells: list[CodeExecuted]
    feedback: str
    model_ms: float
    code_ms: float


class ResumePlan(msgspec.Struct, frozen=True, kw_only=True):
    """What a resume rebuilds, read from a run's trajectory."""

    run_id: str
    query: str
    model: str
    config: RlmConfig
    trajectory_path: str
    context_file: str
    system_prompt: str
    task: str
    reason: ResumeReason
    turns: list[ReplayTurn]
    sub_calls: list[SubCallAnswered]
    tokens: TokenCount
    sub_call_tokens: TokenCount
    cached_tokens: TokenCount
    agents: list[str]
    endpoints: list[str]
    folds: int
    # Seconds of the run's time limit already used, downtime not counted.
    elapsed_s: float
    # The highest child run number used (`<run_id>-sN`), so new children get fresh files.
    children: int

    @property
    def next_iteration(self) -> int:
        return len(self.turns) + 1

    @property
    def last_reply(self) -> str:
        return self.turns[-1].reply if self.turns else ""

    def messages(self) -> list[ChatMessage]:
        """The conversation as it stood after the last finished turn (unfolded)."""
        messages = [ChatMessage(role="system", content=self.system_prompt),
                    ChatMessage(role="user", content=self.task)]
        for turn in self.turns:
            messages += [ChatMessage(role="assistant", content=turn.reply),
                         ChatMessage(role="user", content=turn.feedback)]
        return messages

    def restore(self, ledger: RunLedger) -> None:
        """Put the totals so far back into a fresh run's ledger."""
        ledger.tokens, ledger.sub_call_tokens = self.tokens, self.sub_call_tokens
        ledger.cached_tokens, ledger.sub_calls = self.cached_tokens, len(self.sub_calls)
        for name in self.agents:
            ledger.note_agent(name)
        for name in self.endpoints:
            ledger.note_endpoint(name)

    def steps(self) -> list[StepTiming]:
        return [StepTiming(iteration=turn.iteration, model_ms=turn.model_ms,
                           code_ms=turn.code_ms) for turn in self.turns]

    def python_cells(self) -> list[str]:
        """The code of the Python cells done, in order: what made the session's state."""
        return [cell.code for turn in self.turns for cell in turn.cells
                if cell.ran_as == "python"]

    def seam(self) -> RunResumed:
        """The event that marks where the run resumed."""
        return RunResumed(
            run_id=self.run_id, depth=0, iteration=self.next_iteration, reason=self.reason,
            replayed_cells=len(self.python_cells()),
            replayed_sub_calls=len(self.sub_calls), resumed_at=time.time(),
            max_iterations=self.config.max_iterations)


def _refuse(trajectory: Trajectory, max_iterations: int | None) -> None:
    """Raise why this run cannot be resumed (with this limit), if it cannot."""
    start = trajectory.started
    if start.depth != 0:
        raise RunNotResumableError(
            f"run {start.run_id} is a sub-call's run; resume its parent {start.parent_run_id}")
    if not (start.system_prompt and start.task and start.context_file):
        raise RunNotResumableError(
            f"run {start.run_id} was recorded without what a resume needs (its prompts and a "
            "copy of its context)")
    finished = trajectory.finished
    if finished is None:
        return
    result, limit = finished.result, start.config.max_iterations
    if result.stop_reason != "max_iterations":
        raise RunNotResumableError(f"run {start.run_id} has finished ({result.stop_reason}); "
                                   "only a run stopped at its iteration limit, or one that "
                                   "never finished, can go on")
    if max_iterations is None:
        raise ParseError(f"run {start.run_id} stopped at its iteration limit of {limit}; give "
                         f"a higher one with --max-iterations (more than {limit})")


def plan_resume(trajectory: Trajectory, *, reason: ResumeReason,
                max_iterations: int | None = None) -> ResumePlan:
    """What resuming this run replays and where it goes on; raises if it cannot go on."""
    _refuse(trajectory, max_iterations)
    start = trajectory.started
    replies: dict[int, ModelReplied] = {}
    cells: dict[int, list[CodeExecuted]] = {}
    ends: dict[int, IterationFinished] = {}
    calls: list[SubCallAnswered] = []
    tokens = sub_tokens = cached = TokenCount()
    agents: dict[str, None] = {}
    endpoints: dict[str, None] = {}
    folds: dict[int, int] = {}
    children = 0
    elapsed, segment, last = 0.0, start.started_at, start.started_at
    limit = start.config.max_iterations
    for event in trajectory.events:
        if isinstance(event, RunResumed):
            # What came after the last finished turn was redone after the seam.
            for table in (replies, cells, ends, folds):
                for key in [key for key in table if key >= event.iteration]:
                    del table[key]
            calls = [call for call in calls if call.iteration < event.iteration]
            elapsed += last - segment
            segment = last = event.resumed_at
            limit = event.max_iterations
        elif isinstance(event, IterationStarted):
            last = max(last, event.started_at)
        elif isinstance(event, ModelReplied):
            tokens, cached = tokens + event.tokens, cached + event.cached_tokens
            endpoints.setdefault(event.endpoint, None)
            if event.phase == "turn":
                replies[event.iteration] = event
        elif isinstance(event, CodeExecuted):
            cells.setdefault(event.iteration, []).append(event)
            agents.setdefault(event.device_id, None)
        elif isinstance(event, IterationFinished) and event.phase == "turn":
            ends[event.iteration] = event
        elif isinstance(event, SubCallAnswered):
            calls.append(event)
            sub_tokens, cached = sub_tokens + event.tokens, cached + event.cached_tokens
            endpoints.setdefault(event.endpoint, None)
            if event.child_run_id:
                children = max(children, int(event.child_run_id.rpartition("-s")[2] or 0))
        elif isinstance(event, ContextFolded) and event.method != "none":
            folds[event.iteration] = folds.get(event.iteration, 0) + 1
    turns: list[ReplayTurn] = []
    protocol = start.config.final_protocol
    new_limit = max_iterations or limit
    for iteration in range(1, len(ends) + 2):
        reply, end = replies.get(iteration), ends.get(iteration)
        # A turn without its feedback ended the run, or was cut off: it is asked again.
        if reply is None or end is None or not end.feedback:
            break
        feedback = end.feedback
        ending = prompts.final_request(limit, protocol)
        if iteration == limit < new_limit and feedback.endswith(ending):
            # The turn at the old limit asked for a last answer; the new limit lets it go on.
            feedback = feedback[: -len(ending)] + prompts.continue_prompt(start.query, protocol)
        turns.append(ReplayTurn(iteration=iteration, reply=reply.text,
                                cells=cells.get(iteration, []), feedback=feedback,
                                model_ms=reply.model_ms, code_ms=end.code_ms))
    done = len(turns)
    if max_iterations is not None and max_iterations <= done:
        raise ParseError(f"--max-iterations {max_iterations} is too low: run {start.run_id} "
                         f"has done {done} iterations; give more than {done}")
    config = start.config if new_limit == start.config.max_iterations else (
        msgspec.structs.replace(start.config, max_iterations=new_limit))
    return ResumePlan(
        run_id=start.run_id, query=start.query, model=start.model, config=config,
        trajectory_path=trajectory.path, context_file=start.context_file,
        system_prompt=start.system_prompt, task=start.task, reason=reason, turns=turns,
        sub_calls=[call for call in calls if call.iteration <= done],
        tokens=tokens, sub_call_tokens=sub_tokens, cached_tokens=cached,
        agents=[name for name in agents if name], endpoints=[name for name in endpoints if name],
        folds=sum(count for iteration, count in folds.items() if iteration <= done),
        elapsed_s=elapsed + last - segment, children=children)


class RecordedAnswers:
    """llm_query answers served from the record while cells are replayed: no model calls."""

    def __init__(self, calls: list[SubCallAnswered]) -> None:
        self._calls = list(calls)
        self._used = [False] * len(calls)
        # Why the replay left the record, once it has.
        self.diverged = ""

    def answer(self, iteration: int, asked: list[str]) -> list[str]:
        """The recorded answers to these prompts of this iteration, each used once."""
        answers = []
        for prompt in asked:
            for index, call in enumerate(self._calls):
                if (not self._used[index] and call.iteration == iteration
                        and call.prompt == prompt[:SUB_CALL_CHARS]):
                    self._used[index] = True
                    answers.append(call.answer)
                    break
            else:
                self.diverged = self.diverged or (
                    f"replaying iteration {iteration}, a cell asked llm_query for a prompt "
                    f"the record does not hold: {prompt[:200]!r}")
                answers.append("Error: this sub-call is not in the run's record")
        return answers

    def unused(self) -> str:
        """Why the replay is short of the record (answers never asked for), or ""."""
        left = self._used.count(False)
        return f"replaying the cells asked for {left} recorded sub-call(s) fewer" if left else ""


async def replay(session: CodeSession, plan: ResumePlan, answers: RecordedAnswers,
                 ledger: RunLedger, *, timeout_ms: int | None = None) -> str:
    """Run the recorded cells again in order; why the session left the record, or ""."""
    for turn in plan.turns:
        ledger.iteration = turn.iteration
        # Only Python cells made the session's state; other languages ran as jobs beside it.
        for cell in (cell for cell in turn.cells if cell.ran_as == "python"):
            result = await session.execute(cell.code, timeout_ms=timeout_ms)
            if result.status != cell.status:
                return (f"replaying iteration {turn.iteration} block {cell.block}: the cell "
                        f"ended {result.status!r}, recorded {cell.status!r}")
            if answers.diverged:
                return answers.diverged
    return answers.unused()
