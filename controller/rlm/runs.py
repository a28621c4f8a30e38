"""RLM runs on the cluster: sessions on agents, sub-calls back through the controller.

The registry also makes runs durable: each root run keeps a copy of its context and holds
its run lock while it goes (durable.py); `resume` goes on with a stopped one from its
trajectory (resume.py), and `resume_unfinished` does so, at start, for every run whose
controller is gone.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from kowalski.common.config import RlmConfig
from kowalski.common.errors import (
    ConflictError,
    ContextSizeExceededError,
    KowalskiError,
    NotFoundError,
    ParseError,
    RunNotResumableError,
)
from kowalski.common.messages import Language, LlmCallback, WireError
from kowalski.controller.fleet.context_body import ContextBody
from kowalski.controller.fleet.dispatch import Dispatcher
from kowalski.controller.fleet.sessions import RemoteSession
from kowalski.controller.models.chat_types import ChatBackend
from kowalski.controller.rlm.durable import (
    ContextCopy,
    RunLock,
    close_run,
    expire_contexts,
    highest_child,
    is_held,
    load_context,
    unfinished_run_ids,
)
from kowalski.controller.rlm.events import (
    AnyRlmEvent,
    IterationFinished,
    RlmEvent,
    RlmResult,
    RunHandle,
)
from kowalski.controller.rlm.live import LiveRun, LiveRunSummary
from kowalski.controller.rlm.loop import RlmRun, new_run_id
from kowalski.controller.rlm.resume import ResumePlan, ResumeReason, plan_resume
from kowalski.controller.rlm.trajectory import SUFFIX, read_trajectory, run_dir

log = logging.getLogger(__name__)
EventListener = Callable[[RlmEvent], None]
# Summaries of finished runs kept for the status page.
_KEEP_FINISHED = 50
# How often stored contexts are looked at for expiry.
_EXPIRE_EVERY_S = 3600.0


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
    # Languages whose blocks run (empty: rlm.languages); only ones the controller enables.
    languages: list[Language] = msgspec.field(default_factory=list)
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
        # Root runs' stored contexts, with the bytes their sessions are opened with.
        self._copies: dict[str, ContextCopy] = {}
        self._live: OrderedDict[str, LiveRun] = OrderedDict()
        self._listeners: list[EventListener] = []
        # Runs going on, and the task awaiting each.
        self._running: dict[str, tuple[RlmRun, asyncio.Task[Any] | None]] = {}

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
        copy = self._copies.get(run.run_id)
        session = RemoteSession(
            dispatcher=self._dispatcher, session_id=f"{run.run_id}-{secrets.token_hex(3)}",
            context=context,
            llm_callback=LlmCallback(url=self._callback_url, token=token, depth=run.depth + 1),
            timeout_s=self._cell_timeout_s, on_close=lambda: self._forget(token),
            body=None if copy is None else copy.body)
        try:
            await session.open()
        except BaseException:
            self._tokens.pop(token, None)
            raise
        return session

    def _forget(self, token: str) -> None:
        self._tokens.pop(token, None)

    def _overrides(self, request: RunRequest) -> RlmConfig:
        changes: dict[str, Any] = {}
        for key in ("max_iterations", "max_depth", "token_budget", "run_timeout_s"):
            value, limit = getattr(request, key), getattr(self.config, key)
            if value is not None and value > limit:
                raise ParseError(f"{key} = {value} is over this controller's limit of {limit} "
                                 f"(rlm.{key})")
            if value is not None:
                changes[key] = value
        if request.sub_model:
            changes["sub_model"] = request.sub_model
        if request.languages:
            refused = [name for name in request.languages if name not in self.config.languages]
            if refused:
                raise ParseError(f"languages {', '.join(refused)} are not enabled on this "
                                 f"controller (rlm.languages = {self.config.languages})")
            changes["languages"] = list(dict.fromkeys(request.languages))
        return msgspec.structs.replace(self.config, **changes) if changes else self.config

    def _offered(self, config: RlmConfig) -> RlmConfig:
        """The run's languages less those a healthy agent lacks: its session may land on any.

        Blocks in another language run on the session's agent, so the model is offered
        only what every agent that can hold a session has; with none known yet, all.
        """
        rows = [row for row in self._dispatcher.cluster.table.devices.values()
                if row.health == "healthy" and "python" in row.languages]
        offered = [name for name in config.languages
                   if all(name in row.languages for row in rows)]
        if offered == list(config.languages):
            return config
        log.debug("the run's languages %s are not offered by every healthy agent; it is "
                  "offered %s", ", ".join(sorted(set(config.languages) - set(offered))),
                  ", ".join(offered))
        return msgspec.structs.replace(config, languages=offered)

    def _check_size(self, size: int) -> None:
        if size > self.config.max_context_length:
            raise ContextSizeExceededError(size, self.config.max_context_length)

    async def run(self, request: RunRequest, *, observer: EventListener | None = None
                  ) -> RlmResult:
        """Run one RLM job to its end; events go to observer and to subscribers."""
        # Refused before anything is taken or stored for the run.
        if isinstance(request.context, str):
            self._check_size(len(request.context))
        config = self._offered(self._overrides(request))
        # Made while the run starts (in a thread for a large context), for its session and
        # its stored copy alike. Anything but a str is measured as this JSON, made once.
        body = asyncio.ensure_future(ContextBody.of(request.context))
        if not isinstance(request.context, str):
            self._check_size(len((await body).data))
        run_id, directory = new_run_id(), self.config.trajectory_dir
        lock = await asyncio.to_thread(RunLock.take, directory, run_id)
        assert lock is not None  # a fresh id
        copy = self._copies[run_id] = ContextCopy(directory, run_id, context=request.context,
                                                  body=body)
        run = RlmRun(request.query, request.context, backend=self._backend,
                     session_factory=self._session, config=config,
                     model=request.model, run_id=run_id, context_file=copy.name,
                     observer=self._observer(run_id, request.query, observer),
                     grammar=self._reply_grammar)
        result: RlmResult | None = None
        try:
            result = await self._going(run, run.run())
            return result
        finally:
            self._copies.pop(run_id, None)
            try:
                await copy.settle(result, suspended=run.suspended)
            finally:
                lock.release()

    async def resume(self, run_id: str, *, max_iterations: int | None = None,
                     reason: ResumeReason = "by hand", observer: EventListener | None = None
                     ) -> RlmResult:
        """Go on with a stopped run from its trajectory; raises why it cannot."""
        await self.check_resume(run_id, max_iterations=max_iterations)
        directory = run_dir(self.config.trajectory_dir)
        lock = await asyncio.to_thread(RunLock.take, directory, run_id)
        if lock is None:
            raise ConflictError(f"run {run_id} is running on a controller now; it cannot be "
                                "resumed while it goes")
        try:
            plan = await self.check_resume(run_id, max_iterations=max_iterations, reason=reason)
            # Sub-call runs cut off by the stop have files too: new ones get fresh numbers.
            children = await asyncio.to_thread(highest_child, directory, run_id)
            plan = msgspec.structs.replace(plan, children=max(plan.children, children))
            context = await asyncio.to_thread(load_context, plan.trajectory_path,
                                              plan.context_file)
            run = self._resumed_run(plan, context, observer)
            copy, result = ContextCopy(directory, plan.run_id, stored=plan.context_file), None
            try:
                result = await self._going(run, run.resume(plan))
                return result
            finally:
                await copy.settle(result, suspended=run.suspended)
        finally:
            lock.release()

    async def check_resume(self, run_id: str, *, max_iterations: int | None = None,
                           reason: ResumeReason = "by hand") -> ResumePlan:
        """What resuming the run would do; raises why it cannot (unknown, finished, limit)."""
        if not run_id.replace("-", "").isalnum():
            raise ParseError(f"not a run id: {run_id!r}")
        limit = self.config.max_iterations
        if max_iterations is not None and max_iterations > limit:
            raise ParseError(f"max_iterations = {max_iterations} is over this controller's "
                             f"limit of {limit} (rlm.max_iterations)")
        directory = run_dir(self.config.trajectory_dir)
        if not (directory / f"{run_id}{SUFFIX}").is_file():
            raise NotFoundError(f"no run {run_id} in {directory}",
                                next_step="List the runs with `kowalski-ctl runs list`")
        trajectory = await asyncio.to_thread(read_trajectory, run_id, directory)
        return plan_resume(trajectory, reason=reason, max_iterations=max_iterations)

    def _resumed_run(self, plan: ResumePlan, context: Any, observer: EventListener | None
                     ) -> RlmRun:
        # The record's own limits and model; its file stays where it is.
        config = msgspec.structs.replace(
            plan.config, trajectory_dir=str(run_dir(plan.trajectory_path).parent))
        return RlmRun(plan.query, context, backend=self._backend, session_factory=self._session,
                      config=config, model=plan.model, run_id=plan.run_id,
                      context_file=plan.context_file, grammar=self._reply_grammar,
                      observer=self._observer(plan.run_id, plan.query, observer))

    async def expire_contexts(self) -> None:
        """Now and every hour, drop the stored contexts that waited out keep_contexts_days."""
        directory, days = self.config.trajectory_dir, self.config.keep_contexts_days
        while days:
            try:
                removed = await asyncio.to_thread(expire_contexts, directory, days * 86400)
            except OSError as exc:
                log.warning("cannot look for stored contexts to expire in %s: %s",
                            directory, exc)
            else:
                if removed:
                    log.info("removed %d stored context(s) of runs idle for %g days "
                             "(rlm.keep_contexts_days): %s", len(removed), days,
                             ", ".join(removed))
            await asyncio.sleep(_EXPIRE_EVERY_S)

    async def resume_unfinished(self) -> None:
        """Resume, side by side, every run whose controller is gone; log what happens."""
        directory = self.config.trajectory_dir
        run_ids = await asyncio.to_thread(unfinished_run_ids, directory)
        if run_ids:
            log.info("resuming %d run(s) left unfinished: %s", len(run_ids), ", ".join(run_ids))
        async with asyncio.TaskGroup() as group:
            for run_id in run_ids:
                group.create_task(self._resume_one(run_id), name=f"resume-{run_id}")

    async def _resume_one(self, run_id: str) -> None:
        try:
            trajectory = await asyncio.to_thread(read_trajectory, run_id,
                                                 self.config.trajectory_dir)
            if trajectory.started.depth > 0:
                # A sub-call's run: its parent, resumed, asks again if it must. Root run
                # ids have no "-s": theirs ends at the first one.
                root = run_id.partition("-s")[0]
                if await asyncio.to_thread(is_held, self.config.trajectory_dir, root):
                    return
                await self._close(run_id, RunNotResumableError(
                    "the controller stopped while this sub-call's run went on; its parent "
                    "run does the sub-call again when it is resumed"))
                return
            result = await self.resume(run_id, reason="controller restart")
            log.info("resumed run %s ended: %s", run_id, result.stop_reason)
        except KowalskiError as exc:
            if isinstance(exc, ConflictError) and not isinstance(exc, RunNotResumableError):
                log.info("run %s: %s", run_id, exc.message)  # another controller took it
                return
            log.warning("run %s cannot be resumed: %s", run_id, exc.user_message())
            try:
                await self._close(run_id, exc)
            except KowalskiError as again:
                log.warning("run %s: cannot close its file either: %s", run_id, again)
        except Exception:
            # A fault in Kowalski itself: logged, and the controller goes on.
            log.exception("run %s: resuming it failed", run_id)

    async def _close(self, run_id: str, why: KowalskiError) -> None:
        """End an unfinished run's file with a failed end naming why, unless someone holds it."""
        directory = self.config.trajectory_dir
        lock = await asyncio.to_thread(RunLock.take, directory, run_id)
        if lock is None:
            return
        try:
            trajectory = await asyncio.to_thread(read_trajectory, run_id, directory)
            if trajectory.finished is None:
                await close_run(trajectory, why)
        finally:
            lock.release()

    def _observer(self, run_id: str, query: str, observer: EventListener | None
                  ) -> EventListener:
        """Counts the run's events for the status page and hands them to every listener."""
        live = self._live[run_id] = LiveRun(run_id, query)
        while len(self._live) > _KEEP_FINISHED:
            oldest = next(iter(self._live))
            if self._live[oldest].summary.status == "running":
                break
            del self._live[oldest]

        def observe(event: RlmEvent) -> None:
            live.update(event)
            if isinstance(event, IterationFinished) and event.run_id == run_id:
                # Once there is something to resume from: see ContextCopy.
                copy = self._copies.get(run_id)
                if copy is not None:
                    copy.write_now()
            for listener in [*self._listeners, *([observer] if observer else [])]:
                try:
                    listener(event)
                except Exception:
                    log.exception("run event listener failed")

        return observe

    async def _going(self, run: RlmRun, going: Awaitable[RlmResult]) -> RlmResult:
        """Await a run; a cancelled one is marked so on the status page."""
        self._running[run.run_id] = (run, asyncio.current_task())
        try:
            return await going
        except asyncio.CancelledError:
            live = self._live.get(run.run_id)
            if live is not None:
                live.summary = msgspec.structs.replace(live.summary, status="cancelled",
                                                       reply_so_far="", reply_iteration=0)
            raise
        finally:
            self._running.pop(run.run_id, None)

    def suspend(self) -> None:
        """The controller is stopping: its runs stop now and keep no end, to be resumed."""
        for run, task in self._running.values():
            run.suspended = True
            if task is not None:
                task.cancel()

