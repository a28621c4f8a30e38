"""What the status page knows of a run going on, counted from its events as they come."""

from __future__ import annotations

import time

import msgspec

from kowalski.controller.rlm.events import (
    LIVE_ONLY,
    CodeExecuted,
    ModelReplied,
    ReplyDelta,
    RlmEvent,
    RunFinished,
    SubCallAnswered,
)

__all__ = ["REPLY_SO_FAR_CHARS", "LiveRun", "LiveRunSummary"]


class LiveRunSummary(msgspec.Struct, frozen=True, kw_only=True):
    """A run of this controller, counted from its events as they come: running or done is known."""

    run_id: str
    query: str
    status: str
    iterations: int
    sub_calls: int
    tokens: int
    started_at: float
    devices: list[str]
    stop_reason: str = ""
    # The root model's reply while it streams (its last REPLY_SO_FAR_CHARS), and its iteration.
    reply_so_far: str = ""
    reply_iteration: int = 0
    # Events stored so far by the run and the child runs below it: a page showing its
    # trajectory reads it again when this moves.
    events: int = 0


# A live summary keeps at most this much of the reply being generated.
REPLY_SO_FAR_CHARS = 4000


class LiveRun:
    """A run's live numbers, for the status page."""

    def __init__(self, run_id: str, query: str) -> None:
        self.summary = LiveRunSummary(run_id=run_id, query=query[:200], status="running",
                                  iterations=0, sub_calls=0, tokens=0,
                                  started_at=time.time(), devices=[])

    def update(self, event: RlmEvent) -> None:
        summary = self.summary
        if not isinstance(event, LIVE_ONLY):
            summary = msgspec.structs.replace(summary, events=summary.events + 1)
        if isinstance(event, ReplyDelta) and event.depth == 0:
            text = (summary.reply_so_far if summary.reply_iteration == event.iteration else "")
            summary = msgspec.structs.replace(
                summary, reply_so_far=(text + event.text)[-REPLY_SO_FAR_CHARS:],
                reply_iteration=event.iteration)
        elif isinstance(event, ModelReplied) and event.depth == 0:
            summary = msgspec.structs.replace(
                summary, iterations=max(summary.iterations, event.iteration),
                tokens=summary.tokens + event.tokens.total_tokens, reply_so_far="",
                reply_iteration=0)
        elif isinstance(event, SubCallAnswered):
            summary = msgspec.structs.replace(summary, sub_calls=summary.sub_calls + 1,
                                              tokens=summary.tokens + event.tokens.total_tokens)
        elif isinstance(event, CodeExecuted) and event.device_id not in summary.devices:
            summary = msgspec.structs.replace(summary,
                                              devices=[*summary.devices, event.device_id])
        elif isinstance(event, RunFinished) and event.depth == 0:
            result = event.result
            summary = msgspec.structs.replace(
                summary, status="finished" if result.error is None else "failed",
                iterations=result.iterations, sub_calls=result.sub_calls,
                tokens=result.tokens.total_tokens, devices=result.devices,
                stop_reason=result.stop_reason, reply_so_far="", reply_iteration=0)
        self.summary = summary
