"""The Recursive Language Model loop: a model writes code against `context` until FINAL.

A run keeps the context as the variable `context` in a persistent Python session on an
agent. Each iteration the model replies; its ```repl blocks run in order (blocks in the other
enabled languages run as jobs beside the session, `controller/rlm/blocks.py`) and what they
print goes back as the next user message. Code may call llm_query / llm_query_batched,
which the session relays to `RlmRun.answer_sub_calls`. The run ends at FINAL(answer) or
FINAL_VAR(name) starting a line outside code (read after that reply's code ran), at the
iteration limit (after one last request for an answer), or at the time or token budget;
a run stopped without FINAL has an empty answer and the model's last reply beside it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import secrets
import time
from typing import Any, Literal

import msgspec

from kowalski.common.code_blocks import extract_code_blocks
from kowalski.common.config import RlmConfig
from kowalski.common.errors import ContextSizeExceededError, KowalskiError
from kowalski.common.messages import WireError
from kowalski.controller.models.chat_types import (
    ChatBackend,
    ChatMessage,
    ChatRequest,
    ChatResult,
)
from kowalski.controller.rlm import final, prompts
from kowalski.controller.rlm.blocks import BlockRunner
from kowalski.controller.rlm.events import (
    ContextFolded,
    IterationFinished,
    IterationStarted,
    ModelReplied,
    Observer,
    RlmEvent,
    RlmResult,
    RunFinished,
    RunStarted,
    SessionFactory,
    StepTiming,
    Stop,
    TokenCount,
    budget_stop,
    chat_tokens,
    limit_stop,
)
from kowalski.controller.rlm.folding import estimate_tokens, fold, names_in, needs_fold
from kowalski.controller.rlm.ledger import RunLedger
from kowalski.controller.rlm.opening import SessionOpening
from kowalski.controller.rlm.resume import RecordedAnswers, ResumePlan, replay
from kowalski.controller.rlm.streaming import ask_streamed, reply_sink
from kowalski.controller.rlm.subcalls import Cell, SubCalls, max_prompt_chars
from kowalski.controller.rlm.trajectory_writer import TrajectoryWriter

__all__ = ["RlmRun", "new_run_id"]

log = logging.getLogger(__name__)


def new_run_id() -> str:
    """A fresh, sortable run id that is safe in URLs and file names."""
    return f"rlm-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(4)}"


class RlmRun:
    """One RLM run; `await run.run()` once, and route the session's sub-calls to it."""

    def __init__(
        self,
        query: str,
        context: Any,
        *,
        backend: ChatBackend,
        session_factory: SessionFactory,
        config: RlmConfig | None = None,
        model: str = "",
        observer: Observer | None = None,
        run_id: str | None = None,
        depth: int = 0,
        parent_run_id: str = "",
        parent_cell: Cell = (0, 0),
        temperature: float | None = None,
        cell_timeout_ms: int | None = None,
        context_file: str = "",
        grammar: str | None = None,
    ) -> None:
        self.query, self.context = query, context
        self.config, self.model = config or RlmConfig(), model
        self.run_id = run_id or new_run_id()
        self.depth, self.parent_run_id, self.parent_cell = depth, parent_run_id, parent_cell
        self._backend, self._factory = backend, session_factory
        self._observer = observer
        self._temperature, self._cell_timeout_ms = temperature, cell_timeout_ms
        # grammar: the shape of the root model's replies (llama.cpp); sub-calls answer freely.
        self._context_file, self._grammar = context_file, grammar
        # Set while a resumed run replays its recorded cells: llm_query is answered from it.
        self._recorded: RecordedAnswers | None = None
        self._plan: ResumePlan | None = None
        # Set when the controller stops: a cancelled run then keeps no end, to be resumed.
        self.suspended = False
        self._writer = TrajectoryWriter(self.config.trajectory_dir, self.run_id)
        self.trajectory_path = str(self._writer.path)
        self._messages: list[ChatMessage] = []
        # (tokens the server counted for messages[:count], count), from the last reply.
        self._known: tuple[int, int] | None = None
        self._steps: list[StepTiming] = []
        self._folds, self._last_reply = 0, ""
        # The last iteration whose model call came back: a run that never reached the
        # model reports 0 iterations.
        self._replied = 0
        self._started = False
        self._ledger = RunLedger()
        self._opening = SessionOpening(factory=session_factory, context=context, run=self,
                                       ledger=self._ledger, emit=self._emit)
        self._subs = SubCalls(
            run_id=self.run_id, depth=depth, config=self.config, backend=backend,
            ledger=self._ledger, emit=self._emit, run_child=self._run_child,
            temperature=temperature)
        self._blocks = BlockRunner(
            run_id=self.run_id, depth=depth, config=self.config, emit=self._emit,
            subs=self._subs, ledger=self._ledger, cell_timeout_ms=cell_timeout_ms)

    # --- bookkeeping ------------------------------------------------------------------------

    @property
    def tokens_used(self) -> int:
        """Tokens spent so far, sub-calls included."""
        return self._ledger.tokens_used

    async def _emit(self, event: RlmEvent) -> None:
        """Store the event in the trajectory, then tell the observer."""
        await self._writer.record(event)
        if self._observer is None:
            return
        try:
            outcome = self._observer(event)
            if inspect.isawaitable(outcome):
                await outcome
        except Exception:
            log.exception("run %s: the observer failed on %s", self.run_id, type(event).__name__)

    def _window_tokens(self) -> int:
        if self._known is not None and self._known[1] <= len(self._messages):
            tokens, count = self._known
            return tokens + estimate_tokens(self._messages[count:])
        return estimate_tokens(self._messages)

    # --- the loop ---------------------------------------------------------------------------

    async def run(self) -> RlmResult:
        """Run to the end; KowalskiErrors become stop_reason "error", a too-large context raises."""
        if self._started:
            raise RuntimeError(f"run {self.run_id} was already started")
        self._started = True
        info = prompts.describe_context(self.context)
        if info.total_chars > self.config.max_context_length:
            raise ContextSizeExceededError(info.total_chars, self.config.max_context_length)
        started_at, started = time.time(), time.monotonic()
        self._ledger.deadline = asyncio.get_running_loop().time() + self.config.run_timeout_s
        recursive = self.depth + 1 < self.config.max_depth
        system = prompts.system_prompt(
            info, output_chars=self.config.max_output_chars,
            sub_chars=max_prompt_chars(self.config), recursive_sub_calls=recursive,
            protocol=self.config.final_protocol, languages=self.config.languages)
        task = prompts.task_prompt(self.query)
        self._messages = [ChatMessage(role="system", content=system),
                          ChatMessage(role="user", content=task)]
        await self._emit(RunStarted(
            run_id=self.run_id, depth=self.depth, query=self.query, model=self.model,
            context_type=info.type, context_chars=info.total_chars,
            context_chunks=len(info.chunk_chars), started_at=started_at, config=self.config,
            trajectory_path=self.trajectory_path, parent_run_id=self.parent_run_id,
            parent_iteration=self.parent_cell[0], parent_block=self.parent_cell[1],
            system_prompt=system, task=task, context_file=self._context_file))
        return await self._drive(started)

    async def resume(self, plan: ResumePlan) -> RlmResult:
        """Go on with a stopped run: rebuild its session and conversation, then loop on."""
        if self._started:
            raise RuntimeError(f"run {self.run_id} was already started")
        self._started, self._plan = True, plan
        self._messages, self._steps, self._folds = plan.messages(), plan.steps(), plan.folds
        plan.restore(self._ledger)
        self._subs.children = plan.children
        self._blocks.cells = plan.python_cells()
        self._last_reply, self._replied = plan.last_reply, len(plan.turns)
        started = time.monotonic()
        self._ledger.deadline = (asyncio.get_running_loop().time()
                                 + max(self.config.run_timeout_s - plan.elapsed_s, 0.0))
        await self._emit(plan.seam())
        return await self._drive(started)

    async def _drive(self, started: float) -> RlmResult:
        try:
            stop = await self._guarded()
        except BaseException as exc:
            # Cancelled, or a fault in Kowalski itself: still close the session and the file.
            cancelled = isinstance(exc, asyncio.CancelledError)
            await self._finish(Stop(
                reason="cancelled" if cancelled else "error",
                detail="the run was cancelled" if cancelled else f"internal error: {exc!r}",
            ), started)
            raise
        return await self._finish(stop, started)

    async def _guarded(self) -> Stop:
        """The loop under the run's deadline; budget and errors become a stop."""
        timeout = asyncio.timeout_at(self._ledger.deadline)
        try:
            async with timeout:
                if self.depth >= self.config.max_depth:
                    return await self._direct()
                if self._plan is None:
                    # The session opens beside the first model call (see _turn).
                    return await self._loop(1)
                self._recorded = RecordedAnswers(self._plan.sub_calls)
                diverged = await replay(await self._opening.get(), self._plan, self._recorded,
                                        self._ledger, timeout_ms=self._cell_timeout_ms)
                self._recorded = None
                if diverged:
                    return Stop(reason="error", detail=f"the resume failed: {diverged}")
                return await self._loop(self._plan.next_iteration)
        except (TimeoutError, KowalskiError) as exc:
            if timeout.expired():
                return Stop(reason="timeout",
                            detail=f"the run passed its time limit of "
                                   f"{self.config.run_timeout_s:g} s before an answer")
            if not isinstance(exc, KowalskiError):
                raise
            log.warning("run %s failed: %s", self.run_id, exc)
            return Stop(reason="error", detail=exc.user_message(),
                        error=WireError(code=exc.code, message=exc.message,
                                        retryable=exc.is_recoverable))

    async def _loop(self, first: int) -> Stop:
        limit = self.config.max_iterations
        for iteration in range(first, limit + 1):
            stop = budget_stop(self.tokens_used, self.config.token_budget)
            if stop is not None:
                return stop
            stop = await self._turn(iteration, "turn")
            if stop is not None:
                return stop
        stop = (budget_stop(self.tokens_used, self.config.token_budget)
                or await self._turn(limit + 1, "final_request"))
        assert stop is not None  # the final request always stops
        return stop

    async def _ask(self, phase: str) -> tuple[ChatResult, float]:
        """Send the conversation, append the reply, count its tokens."""
        sent, prompt_chars = len(self._messages), sum(len(m.content) for m in self._messages)
        request = ChatRequest(model=self.model, messages=list(self._messages),
                              max_tokens=self.config.max_reply_tokens,
                              temperature=self._temperature, grammar=self._grammar)
        started = time.monotonic()
        sink = reply_sink(self._emit, self.run_id, self.depth, self._ledger.iteration)
        result, cached = await ask_streamed(self._backend, request, sink)
        model_ms = (time.monotonic() - started) * 1000
        counted = chat_tokens(result, self._messages)
        # A cached answer cost nothing now: it is reported apart from the tokens spent.
        tokens, cached_tokens = (TokenCount(), counted) if cached else (counted, TokenCount())
        self._ledger.tokens += tokens
        self._ledger.cached_tokens += cached_tokens
        self._ledger.note_endpoint(result.endpoint)
        self._messages.append(ChatMessage(role="assistant", content=result.text))
        self._known = (counted.total_tokens, len(self._messages))
        self._last_reply, self._replied = result.text, self._ledger.iteration
        await self._emit(ModelReplied(
            run_id=self.run_id, depth=self.depth, iteration=self._ledger.iteration, phase=phase,
            text=result.text, model_ms=model_ms, tokens=tokens, endpoint=result.endpoint,
            finish_reason=result.finish_reason, messages_sent=sent, prompt_chars=prompt_chars,
            cached=cached, cached_tokens=cached_tokens, reasoning=result.reasoning))
        return result, model_ms

    async def _maybe_fold(self) -> None:
        tokens = self._window_tokens()
        window, threshold = self.config.context_window_tokens, self.config.fold_threshold
        if not needs_fold(tokens, window_tokens=window, threshold=threshold):
            return None
        folded = await fold(
            self._messages, backend=self._backend, model=self.model,
            keep_last_turns=self.config.keep_last_turns,
            variable_names=names_in(self._blocks.cells), window_tokens=window,
            threshold=threshold, tokens=tokens)
        if folded.method == "none":
            return
        self._messages, self._known = folded.messages, None
        self._folds += 1
        if folded.chat is not None:
            self._ledger.tokens += chat_tokens(folded.chat, [])
            self._ledger.note_endpoint(folded.chat.endpoint)
        await self._emit(ContextFolded(
            run_id=self.run_id, depth=self.depth, iteration=self._ledger.iteration,
            method=folded.method, folded_turns=folded.folded_turns, tokens_before=tokens,
            tokens_after=folded.tokens_after, summary=folded.summary, error=folded.error))

    async def _turn(self, iteration: int, phase: Literal["turn", "final_request"]
                    ) -> Stop | None:
        """One model call and, in a normal turn, its code; the stop it makes, if any."""
        self._ledger.iteration = iteration
        await self._emit(IterationStarted(run_id=self.run_id, depth=self.depth,
                                          iteration=iteration, phase=phase,
                                          started_at=time.time()))
        self._opening.start()
        await self._maybe_fold()
        result, model_ms = await self._ask(phase)
        blocks = extract_code_blocks(result.text)
        # Code time includes waiting for a session still opening (the first turn's).
        code_started = time.monotonic()
        session = await self._opening.get()
        # The extra request at the limit asks for an answer only: its code is not run.
        feedback = (await self._blocks.run(session, blocks) if phase == "turn"
                    or self.config.final_protocol == "answer_dict" else [])
        marker = final.find_final(result.text, blocks)
        stop, note = None, ""
        if marker is not None:
            stop, note = await final.resolve(marker, session)
        stop = stop or self._blocks.answered
        code_ms = (time.monotonic() - code_started) * 1000
        message = ""
        limit = self.config.max_iterations
        if phase == "final_request":
            stop = limit_stop(stop, limit)
        elif stop is None:
            feedback += prompts.reply_notes(
                note, cut_at=self.config.max_reply_tokens if result.finish_reason == "length"
                else 0, nothing_ran=not blocks and marker is None)
            protocol = self.config.final_protocol
            ending = (prompts.final_request(limit, protocol) if iteration == limit
                      else prompts.continue_prompt(self.query, protocol))
            message = "\n\n".join([*feedback, ending])
            self._messages.append(ChatMessage(role="user", content=message))
        self._steps.append(StepTiming(iteration=iteration, model_ms=model_ms, code_ms=code_ms))
        await self._emit(IterationFinished(
            run_id=self.run_id, depth=self.depth, iteration=iteration, phase=phase,
            code_ms=code_ms, final_kind=marker.kind if marker else "",
            final_value=marker.value if marker else "", final_note=note, feedback=message))
        return stop

    async def _direct(self) -> Stop:
        """max_depth 0: the run is one plain model call over the query and the context."""
        text = self.context if isinstance(self.context, str) else msgspec.json.encode(
            self.context).decode()
        self._messages = [ChatMessage(role="user", content=f"{text}\n\n{self.query}")]
        result, model_ms = await self._ask("direct")
        self._steps.append(StepTiming(iteration=0, model_ms=model_ms, code_ms=0.0))
        return Stop(reason="direct", answer=result.text.strip(),
                    detail="max_depth is 0: one plain model call, no REPL")

    async def _finish(self, stop: Stop, started: float) -> RlmResult:
        ledger = self._ledger
        ledger.finished = True
        await asyncio.shield(self._opening.close(cancel=stop.reason in ("cancelled", "timeout")))
        result = RlmResult(
            run_id=self.run_id, answer=stop.answer, stop_reason=stop.reason, detail=stop.detail,
            iterations=min(self._replied, self.config.max_iterations),
            sub_calls=ledger.sub_calls, tokens=ledger.tokens + ledger.sub_call_tokens,
            sub_call_tokens=ledger.sub_call_tokens, steps=self._steps,
            latency_ms=(time.monotonic() - started) * 1000,
            devices=[*ledger.agents, *ledger.endpoints], agents=list(ledger.agents),
            endpoints=list(ledger.endpoints), trajectory_path=self.trajectory_path,
            folds=self._folds, error=stop.error, last_reply=self._last_reply,
            cached_tokens=ledger.cached_tokens)
        if not (self.suspended and stop.reason == "cancelled"):
            await self._emit(RunFinished(run_id=self.run_id, depth=self.depth, result=result,
                                         finished_at=time.time()))
        # A suspended run writes no end, but what it queued goes to its file.
        await asyncio.shield(self._writer.flush())
        return result

    # --- sub-calls ------------------------------------------------------------------------

    async def answer_sub_calls(self, prompts: list[str], *, model: str = "") -> list[str]:
        """Answers to llm_query / llm_query_batched, in order; a failed one reads "Error: ..."."""
        if self._recorded is not None:
            return self._recorded.answer(self._ledger.iteration, prompts)
        return await self._subs.answer(prompts, model=model, root_model=self.model)

    async def _run_child(self, query: str, context: str, *, config: RlmConfig, model: str,
                         run_id: str, cell: Cell) -> RlmResult:
        """A sub-call's own run, one level deeper, of the same class as this one."""
        child = type(self)(
            query, context, backend=self._backend, session_factory=self._factory,
            config=config, model=model, observer=self._observer, run_id=run_id,
            depth=self.depth + 1, parent_run_id=self.run_id, parent_cell=cell,
            temperature=self._temperature, cell_timeout_ms=self._cell_timeout_ms,
            grammar=self._grammar)
        return await child.run()
