"""RLM runs on the cluster: sessions on agents, sub-calls back through the controller."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from kowalski.common.config import RlmConfig
from kowalski.common.errors import ContextSizeExceededError, ParseError
from kowalski.common.messages import LlmCallback, WireError
from kowalski.controller.fleet.dispatch import Dispatcher
from kowalski.controller.fleet.sessions import RemoteSession
from kowalski.controller.models.chat_types import ChatBackend
from kowalski.controller.rlm.events import (
    AnyRlmEvent,
    CodeExecuted,
    ModelReplied,
    ReplyDelta,
    RlmEvent,
    RlmResult,
    RunFinished,
    RunHandle,
    SubCallAnswered,
)
from kowalski.controller.rlm.loop import RlmRun, new_run_id

log = logging.getLogger(__name__)
EventListener = Callable[[RlmEvent], None]
# Summaries of finished runs kept for the status page.
_KEEP_FINISHED = 50


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


# A live summary keeps at most this much of the reply being generated.
REPLY_SO_FAR_CHARS = 4000


class RunRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """POST /v1/runs: one RLM job."""

    query: str
    context: Any = None
    model: str = ""
    # The model answering llm_query sub-calls (empty: rlm.sub_model, else model).
    sub_model: str = ""
    # Overrides may only tighten the controller's own limits (checked against the config).
    max_iterations: Annotated[int, Meta(gt=0)] | None = None
    max_depth: Annotated[int, Meta(ge=0)] | None = None
    token_budget: Annotated[int, Meta(gt=0)] | None = None
    run_timeout_s: Annotated[float, Meta(gt=0)] | None = None
    # Stream events as NDJSON while the run goes, then the result.
    stream: bool = False


class RunStreamResult(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind",
                      tag="result"):
    """The last line of a streamed run that ended with a result."""

    result: RlmResult


class RunStreamError(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind",
                     tag="error"):
    """The last line of a streamed run that could not run (or failed in Kowalski)."""

    error: WireError


# One line of POST /v1/runs with "stream": true: events, then a result or an error.
RunStreamLine = AnyRlmEvent | RunStreamResult | RunStreamError


class _Live:
    """A run's live numbers, for the status page."""

    def __init__(self, run_id: str, query: str) -> None:
        self.summary = LiveRunSummary(run_id=run_id, query=query[:200], status="running",
                                  iterations=0, sub_calls=0, tokens=0,
                                  started_at=time.time(), devices=[])

    def update(self, event: RlmEvent) -> None:
        summary = self.summary
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


class RunRegistry:
    """Starts runs, answers their sessions' llm_query calls, and lists them."""

    def __init__(self, *, config: RlmConfig, dispatcher: Dispatcher, backend: ChatBackend,
                 callback_url: str, cell_timeout_s: float = 300.0,
                 reply_grammar: str | None = None) -> None:
        self.config = config
        # For the embedded model only: a GBNF grammar its RLM replies must follow.
        self._reply_grammar = reply_grammar
        self._dispatcher = dispatcher
        self._backend = backend
        self._callback_url = callback_url
        self._cell_timeout_s = cell_timeout_s
        # Token -> run, for sub-calls; tokens die with their run.
        self._tokens: dict[str, RunHandle] = {}
        self._live: OrderedDict[str, _Live] = OrderedDict()
        self._listeners: list[EventListener] = []

    def subscribe(self, listener: EventListener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def summaries(self) -> list[LiveRunSummary]:
        return [live.summary for live in reversed(self._live.values())]

    async def answer(self, token: str, prompts: list[str], model: str = "") -> list[str] | None:
        """Sub-call answers for the run holding token, or None for an unknown token."""
        run = self._tokens.get(token)
        if run is None:
            return None
        return await run.answer_sub_calls(prompts, model=model)

    async def _session(self, context: Any, run: RunHandle) -> RemoteSession:
        token = secrets.token_urlsafe(24)
        self._tokens[token] = run
        session = RemoteSession(
            dispatcher=self._dispatcher, session_id=f"{run.run_id}-{secrets.token_hex(3)}",
            context=context,
            llm_callback=LlmCallback(url=self._callback_url, token=token, depth=run.depth + 1),
            timeout_s=self._cell_timeout_s, on_close=lambda: self._forget(token))
        try:
            await session.open()
        except BaseException:
            self._tokens.pop(token, None)
            raise
        return session

    def _forget(self, token: str) -> None:
        self._tokens.pop(token, None)

    def _overrides(self, request: RunRequest) -> RlmConfig:
        for key in ("max_iterations", "max_depth", "token_budget", "run_timeout_s"):
            value, limit = getattr(request, key), getattr(self.config, key)
            if value is not None and value > limit:
                raise ParseError(f"{key} = {value} is over this controller's limit of {limit} "
                                 f"(rlm.{key})")
        changes: dict[str, Any] = {key: value for key, value in (
            ("max_iterations", request.max_iterations), ("max_depth", request.max_depth),
            ("token_budget", request.token_budget), ("run_timeout_s", request.run_timeout_s),
        ) if value is not None}
        if request.sub_model:
            changes["sub_model"] = request.sub_model
        return msgspec.structs.replace(self.config, **changes) if changes else self.config

    def _check_context(self, context: Any) -> None:
        size = len(context) if isinstance(context, str) else len(msgspec.json.encode(context))
        if size > self.config.max_context_length:
            raise ContextSizeExceededError(size, self.config.max_context_length)

    async def run(self, request: RunRequest, *, observer: EventListener | None = None
                  ) -> RlmResult:
        """Run one RLM job to its end; events go to observer and to subscribers."""
        self._check_context(request.context)
        run_id = new_run_id()
        live = self._live[run_id] = _Live(run_id, request.query)
        while len(self._live) > _KEEP_FINISHED:
            oldest = next(iter(self._live))
            if self._live[oldest].summary.status == "running":
                break
            del self._live[oldest]

        def observe(event: RlmEvent) -> None:
            live.update(event)
            for listener in [*self._listeners, *([observer] if observer else [])]:
                try:
                    listener(event)
                except Exception:
                    log.exception("run event listener failed")

        run = RlmRun(request.query, request.context, backend=self._backend,
                     session_factory=self._session, config=self._overrides(request),
                     model=request.model, observer=observe, run_id=run_id,
                     grammar=self._reply_grammar)
        try:
            return await run.run()
        except asyncio.CancelledError:
            live.summary = msgspec.structs.replace(live.summary, status="cancelled",
                                                   reply_so_far="", reply_iteration=0)
            raise
