"""Trajectory files of the first format (`meta`, `iteration`, `final` lines), read as events.

Runs used to store one line per iteration that repeated what its events said. Files in
that format are still read: each line becomes the events a run emits today. Nothing writes
this format any more.
"""

from __future__ import annotations

import msgspec

from kowalski.common.config import RlmConfig
from kowalski.common.messages import WireError
from kowalski.controller.rlm.events import (
    AnyRlmEvent,
    CodeExecuted,
    CodeSkipped,
    ContextFolded,
    IterationFinished,
    IterationStarted,
    ModelReplied,
    RlmResult,
    RunFinished,
    RunStarted,
    StepTiming,
    StopReason,
    SubCallAnswered,
    TokenCount,
)

__all__ = ["V1Final", "V1Iteration", "V1Meta", "V1Record", "final_event", "meta_event",
           "to_events"]


class _V1Line(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    run_id: str


class V1Meta(_V1Line, frozen=True, tag="meta"):
    query: str
    model: str
    context_type: str
    context_chars: int
    context_chunks: int
    config: RlmConfig
    started_at: float
    depth: int = 0
    parent_run_id: str = ""
    system_prompt: str = ""
    task: str = ""


class _V1SubCall(msgspec.Struct, frozen=True, kw_only=True):
    prompt: str
    answer: str
    prompt_chars: int
    answer_chars: int
    tokens: TokenCount
    latency_ms: float
    endpoint: str = ""
    error: str = ""
    child_run_id: str = ""


class _V1Code(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    language: str
    code: str
    executed: bool
    status: str = ""
    output: str = ""
    wall_time_ms: float = 0.0
    device_id: str = ""


class _V1Fold(msgspec.Struct, frozen=True, kw_only=True):
    method: str
    folded_turns: int
    tokens_before: int
    tokens_after: int
    summary: str
    error: str = ""


class V1Iteration(_V1Line, frozen=True, tag="iteration"):
    iteration: int
    started_at: float
    messages_sent: int
    prompt_chars: int
    response: str
    tokens: TokenCount
    model_ms: float
    phase: str = "turn"
    finish_reason: str | None = None
    endpoint: str = ""
    code_ms: float = 0.0
    code: list[_V1Code] = msgspec.field(default_factory=list)
    sub_calls: list[_V1SubCall] = msgspec.field(default_factory=list)
    fold: _V1Fold | None = None
    final_kind: str = ""
    final_value: str = ""
    final_note: str = ""
    feedback: str = ""


class V1Final(_V1Line, frozen=True, tag="final"):
    answer: str
    stop_reason: StopReason
    iterations: int
    sub_calls: int
    tokens: TokenCount
    sub_call_tokens: TokenCount
    latency_ms: float
    finished_at: float
    detail: str = ""
    devices: list[str] = msgspec.field(default_factory=list)
    error: WireError | None = None


V1Record = V1Meta | V1Iteration | V1Final


def meta_event(meta: V1Meta, path: str) -> RunStarted:
    """The run's first line as its RunStarted."""
    return RunStarted(
        run_id=meta.run_id, depth=meta.depth, query=meta.query, model=meta.model,
        context_type=meta.context_type, context_chars=meta.context_chars,
        context_chunks=meta.context_chunks, started_at=meta.started_at, config=meta.config,
        trajectory_path=path, parent_run_id=meta.parent_run_id,
        system_prompt=meta.system_prompt, task=meta.task)


def _iteration_events(line: V1Iteration, depth: int) -> list[AnyRlmEvent]:
    """One iteration line as its events; sub-calls follow the code that made them."""
    run_id, number = line.run_id, line.iteration
    events: list[AnyRlmEvent] = [IterationStarted(
        run_id=run_id, depth=depth, iteration=number, phase=line.phase,
        started_at=line.started_at)]
    if line.fold is not None:
        fold = line.fold
        events.append(ContextFolded(
            run_id=run_id, depth=depth, iteration=number, method=fold.method,
            folded_turns=fold.folded_turns, tokens_before=fold.tokens_before,
            tokens_after=fold.tokens_after, summary=fold.summary, error=fold.error))
    events.append(ModelReplied(
        run_id=run_id, depth=depth, iteration=number, phase=line.phase, text=line.response,
        model_ms=line.model_ms, tokens=line.tokens, endpoint=line.endpoint,
        finish_reason=line.finish_reason, messages_sent=line.messages_sent,
        prompt_chars=line.prompt_chars))
    for block in line.code:
        if block.executed:
            events.append(CodeExecuted(
                run_id=run_id, depth=depth, iteration=number, block=block.index,
                code=block.code, status=block.status, output=block.output,
                wall_time_ms=block.wall_time_ms, device_id=block.device_id,
                language=block.language))
        else:
            events.append(CodeSkipped(
                run_id=run_id, depth=depth, iteration=number, block=block.index,
                language=block.language, code=block.code))
    events += [SubCallAnswered(
        run_id=run_id, depth=depth, iteration=number, prompt_chars=call.prompt_chars,
        answer_chars=call.answer_chars, latency_ms=call.latency_ms, tokens=call.tokens,
        error=call.error, prompt=call.prompt, answer=call.answer, endpoint=call.endpoint,
        child_run_id=call.child_run_id) for call in line.sub_calls]
    events.append(IterationFinished(
        run_id=run_id, depth=depth, iteration=number, phase=line.phase, code_ms=line.code_ms,
        final_kind=line.final_kind, final_value=line.final_value, final_note=line.final_note,
        feedback=line.feedback))
    return events


def final_event(final: V1Final, iterations: list[V1Iteration], *, depth: int,
                path: str) -> RunFinished:
    """The final line as RunFinished; agents and endpoints are rebuilt from the iterations."""
    agents = {block.device_id: None for line in iterations for block in line.code
              if block.device_id}
    endpoints = {name: None for line in iterations
                 for name in (line.endpoint, *(call.endpoint for call in line.sub_calls))
                 if name}
    result = RlmResult(
        run_id=final.run_id, answer=final.answer, stop_reason=final.stop_reason,
        iterations=final.iterations, sub_calls=final.sub_calls, tokens=final.tokens,
        sub_call_tokens=final.sub_call_tokens,
        steps=[StepTiming(iteration=line.iteration, model_ms=line.model_ms,
                          code_ms=line.code_ms) for line in iterations],
        latency_ms=final.latency_ms, devices=final.devices, agents=list(agents),
        endpoints=list(endpoints), trajectory_path=path, detail=final.detail,
        folds=sum(line.fold is not None for line in iterations), error=final.error,
        # The first format had no last_reply: the last model call's reply is it.
        last_reply=iterations[-1].response if iterations else "")
    return RunFinished(run_id=final.run_id, depth=depth, result=result,
                       finished_at=final.finished_at)


def to_events(meta: V1Meta, lines: list[V1Record], path: str) -> list[AnyRlmEvent]:
    """A whole first-format file (its meta line, then the rest) as events."""
    iterations = [line for line in lines if isinstance(line, V1Iteration)]
    events: list[AnyRlmEvent] = [meta_event(meta, path)]
    for line in iterations:
        events += _iteration_events(line, meta.depth)
    events += [final_event(line, iterations, depth=meta.depth, path=path)
               for line in lines if isinstance(line, V1Final)]
    return events
