"""The Recursive Language Model loop: a model writes code against `context` until FINAL.

A run keeps the context as the variable `context` in a persistent Python session on an
agent. Each iteration the model replies; its ```repl blocks run in order and what they
print goes back as the next user message. Code may call llm_query / llm_query_batched,
which the session relays to `RlmRun.answer_sub_calls`. The run ends at FINAL(answer) or
FINAL_VAR(name) starting a line outside code (read after that reply's code ran), at the
iteration limit (after one last request for an answer), or at the time or token budget.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import secrets
import time
from typing import Any, Literal

import msgspec

from kowalski.common.code_blocks import CodeBlock, extract_code_blocks
from kowalski.common.config import RlmConfig
from kowalski.common.errors import ContextSizeExceededError, KowalskiError
from kowalski.common.messages import WireError
from kowalski.controller.models.chat_types import ChatMessage, ChatRequest, ChatResult
from kowalski.controller.rlm import prompts as prompts
from kowalski.controller.rlm.events import (
    AnyRlmEvent,
    ChatBackend,
    CodeExecuted,
    CodeSession,
    ContextFolded,
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
    StopReason,
    SubCallAnswered,
    TokenCount,
    budget_stop,
    chat_tokens,
    limit_stop,
)
from kowalski.controller.rlm.folding import estimate_tokens, fold, names_in, needs_fold
from kowalski.controller.rlm.subcalls import SubCalls
from kowalski.controller.rlm.trajectory import (
    CodeRecord,
    FinalRecord,
    FoldRecord,
    IterationRecord,
    RunMeta,
    TrajectoryWriter,
)

# The interfaces, events and result are defined in rlm_events and re-exported for callers.
__all__ = [
    "AnyRlmEvent", "ChatBackend", "CodeExecuted", "CodeSession", "ContextFolded",
    "IterationStarted", "ModelReplied", "Observer", "RlmEvent", "RlmResult", "RlmRun",
    "RunFinished", "RunStarted", "SessionFactory", "StepTiming", "StopReason",
    "SubCallAnswered", "TokenCount", "new_run_id",
]

log = logging.getLogger(__name__)

# FINAL_VAR answers are read up to this many characters.
FINAL_VAR_MAX_CHARS = 1_000_000


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
        temperature: float | None = None,
        reply_max_tokens: int | None = None,
        cell_timeout_ms: int | None = None,
    ) -> None:
        self.query = query
        self.context = context
        self.config = config or RlmConfig()
        self.model = model
        self.run_id = run_id or new_run_id()
        self.depth = depth
        self.parent_run_id = parent_run_id
        self._backend = backend
        self._factory = session_factory
        self._observer = observer
        self._temperature = temperature
        window = self.config.context_window_tokens
        # The reply gets the part of the window that folding keeps free.
        self._reply_max_tokens = reply_max_tokens or max(
            256, int(window * (1 - self.config.fold_threshold)))
        self._cell_timeout_ms = cell_timeout_ms
        self._writer = TrajectoryWriter(self.config.trajectory_dir, self.run_id)
        self.trajectory_path = str(self._writer.path)
        self._messages: list[ChatMessage] = []
        # (tokens the server counted for messages[:count], count), from the last reply.
        self._known: tuple[int, int] | None = None
        self._tokens = TokenCount()
        self._cells: list[str] = []
        self._steps: list[StepTiming] = []
        self._agents: dict[str, None] = {}
        self._endpoints: dict[str, None] = {}
        self._iteration = 0
        self._folds = 0
        self._last_reply = ""
        self._session: CodeSession | None = None
        self._deadline = 0.0
        self._started = False
        self._finished = False
        self._subs = SubCalls(self)

    # --- bookkeeping ------------------------------------------------------------------------

    @property
    def tokens_used(self) -> int:
        """Tokens spent so far, sub-calls included."""
        return self._tokens.total_tokens + self._subs.tokens.total_tokens

    def _note(self, table: dict[str, None], name: str) -> None:
        if name:
            table.setdefault(name, None)

    async def _emit(self, event: RlmEvent) -> None:
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
        self._deadline = asyncio.get_running_loop().time() + self.config.run_timeout_s
        recursive = self.depth + 1 < self.config.max_depth
        system = prompts.system_prompt(
            info, output_chars=self.config.max_output_chars,
            sub_chars=self._subs.max_prompt_chars(), recursive_sub_calls=recursive)
        task = prompts.task_prompt(self.query)
        self._messages = [ChatMessage(role="system", content=system),
                          ChatMessage(role="user", content=task)]
        await self._writer.write(RunMeta(
            run_id=self.run_id, query=self.query, model=self.model, context_type=info.type,
            context_chars=info.total_chars, context_chunks=len(info.chunk_chars),
            config=self.config, started_at=started_at, depth=self.depth,
            parent_run_id=self.parent_run_id, system_prompt=system, task=task))
        await self._emit(RunStarted(
            run_id=self.run_id, depth=self.depth, query=self.query, model=self.model,
            context_type=info.type, context_chars=info.total_chars,
            trajectory_path=self.trajectory_path, parent_run_id=self.parent_run_id))
        try:
            stop = await self._guarded()
        except BaseException as exc:
            # Cancelled, or a fault in Kowalski itself: still close the session and the file.
            cancelled = isinstance(exc, asyncio.CancelledError)
            await self._finish(Stop(
                reason="cancelled" if cancelled else "error", answer=self._last_reply,
                detail="the run was cancelled" if cancelled else f"internal error: {exc!r}",
            ), started)
            raise
        return await self._finish(stop, started)

    async def _guarded(self) -> Stop:
        """The loop under the run's deadline; budget and errors become a stop."""
        timeout = asyncio.timeout_at(self._deadline)
        try:
            async with timeout:
                if self.depth >= self.config.max_depth:
                    return await self._direct()
                self._session = await self._factory(self.context, self)
                self._note(self._agents, self._session.device_id)
                return await self._loop()
        except (TimeoutError, KowalskiError) as exc:
            if timeout.expired():
                return Stop(reason="timeout", answer=self._last_reply,
                            detail=f"the run passed its time limit of "
                                   f"{self.config.run_timeout_s:g} s; the answer is the "
                                   "model's last reply")
            if not isinstance(exc, KowalskiError):
                raise
            log.warning("run %s failed: %s", self.run_id, exc)
            return Stop(reason="error", answer=self._last_reply, detail=exc.user_message(),
                        error=WireError(code=exc.code, message=exc.message,
                                        retryable=exc.is_recoverable))

    async def _loop(self) -> Stop:
        limit = self.config.max_iterations
        for iteration in range(1, limit + 1):
            stop = budget_stop(self.tokens_used, self.config.token_budget, self._last_reply)
            if stop is not None:
                return stop
            stop = await self._turn(iteration, "turn")
            if stop is not None:
                return stop
        stop = (budget_stop(self.tokens_used, self.config.token_budget, self._last_reply)
                or await self._turn(limit + 1, "final_request"))
        assert stop is not None  # the final request always stops
        return stop

    async def _ask(self, phase: str) -> tuple[ChatResult, float, TokenCount]:
        """Send the conversation, append the reply, count its tokens."""
        request = ChatRequest(model=self.model, messages=list(self._messages),
                              max_tokens=self._reply_max_tokens, temperature=self._temperature)
        started = time.monotonic()
        result = await self._backend.chat(request, operation="llm_inference")
        model_ms = (time.monotonic() - started) * 1000
        tokens = chat_tokens(result, self._messages)
        self._tokens += tokens
        self._note(self._endpoints, result.endpoint)
        self._messages.append(ChatMessage(role="assistant", content=result.text))
        self._known = (tokens.total_tokens, len(self._messages))
        self._last_reply = result.text
        await self._emit(ModelReplied(
            run_id=self.run_id, depth=self.depth, iteration=self._iteration, phase=phase,
            text=result.text, model_ms=model_ms, tokens=tokens, endpoint=result.endpoint))
        return result, model_ms, tokens

    async def _maybe_fold(self) -> FoldRecord | None:
        tokens = self._window_tokens()
        window, threshold = self.config.context_window_tokens, self.config.fold_threshold
        if not needs_fold(tokens, window_tokens=window, threshold=threshold):
            return None
        folded = await fold(
            self._messages, backend=self._backend, model=self.model,
            keep_last_turns=self.config.keep_last_turns, variable_names=names_in(self._cells),
            window_tokens=window, threshold=threshold, tokens=tokens)
        if folded.method == "none":
            return None
        self._messages, self._known = folded.messages, None
        self._folds += 1
        if folded.chat is not None:
            self._tokens += chat_tokens(folded.chat, [])
            self._note(self._endpoints, folded.chat.endpoint)
        record = FoldRecord(method=folded.method, folded_turns=folded.folded_turns,
                            tokens_before=tokens, tokens_after=folded.tokens_after,
                            summary=folded.summary, error=folded.error)
        await self._emit(ContextFolded(
            run_id=self.run_id, depth=self.depth, iteration=self._iteration,
            method=folded.method, folded_turns=folded.folded_turns, tokens_before=tokens,
            tokens_after=folded.tokens_after))
        return record

    async def _run_blocks(self, blocks: list[CodeBlock]) -> tuple[list[CodeRecord], list[str]]:
        """Run the Python blocks in order; the feedback for each block, run or not."""
        assert self._session is not None
        records: list[CodeRecord] = []
        feedback: list[str] = []
        for number, block in enumerate(blocks, start=1):
            if not (block.fenced and block.language == "python"):
                records.append(CodeRecord(index=number, language=block.raw_language,
                                          code=block.code, executed=False))
                feedback.append(prompts.skipped_block_note(number, block))
                continue
            started = time.monotonic()
            result = await self._session.execute(block.code, timeout_ms=self._cell_timeout_ms)
            wall_ms = (time.monotonic() - started) * 1000
            self._cells.append(block.code)
            device = result.agent_id or self._session.device_id
            self._note(self._agents, self._session.device_id)
            output = prompts.format_output(result, self.config.max_output_chars)
            records.append(CodeRecord(
                index=number, language=block.raw_language, code=block.code, executed=True,
                status=result.status, output=output, wall_time_ms=wall_ms, device_id=device))
            title = "REPL output" if len(blocks) == 1 else f"REPL output of block {number}"
            feedback.append(f"{title}:\n{output}")
            await self._emit(CodeExecuted(
                run_id=self.run_id, depth=self.depth, iteration=self._iteration, block=number,
                code=block.code, status=result.status, output=output, wall_time_ms=wall_ms,
                device_id=device))
        return records, feedback

    async def _resolve(self, marker: prompts.FinalMarker) -> tuple[Stop | None, str]:
        """The stop a FINAL marker makes, or why it does not end the run."""
        if marker.kind == "final" and not marker.value:
            return None, ("FINAL() is empty, so the run goes on: write the answer inside the "
                          "parentheses, e.g. FINAL(42), or use FINAL_VAR(variable_name).")
        if marker.kind == "final":
            return Stop(reason="final", answer=marker.value), ""
        name = marker.value
        if not prompts.is_identifier(name):
            return None, (f"FINAL_VAR({name}) is not final: FINAL_VAR takes the name of one "
                          "variable; assign the value to a variable first.")
        assert self._session is not None
        value = await self._session.get_variable(name, max_chars=FINAL_VAR_MAX_CHARS)
        if not value.found:
            return None, (f"FINAL_VAR({name}) is not final: there is no variable named "
                          f"{name!r} in the REPL. Assign it in a ```repl block first.")
        detail = (f"the value of {name} was cut at {FINAL_VAR_MAX_CHARS} characters"
                  if value.truncated else "")
        return Stop(reason="final_var", answer=value.value, detail=detail), ""

    async def _turn(self, iteration: int, phase: Literal["turn", "final_request"]
                    ) -> Stop | None:
        """One model call and, in a normal turn, its code; the stop it makes, if any."""
        self._iteration = iteration
        self._subs.records = []
        started_at = time.time()
        await self._emit(IterationStarted(run_id=self.run_id, depth=self.depth,
                                          iteration=iteration, phase=phase))
        fold_record = await self._maybe_fold()
        sent, prompt_chars = len(self._messages), sum(len(m.content) for m in self._messages)
        result, model_ms, tokens = await self._ask(phase)
        blocks = extract_code_blocks(result.text)
        code_started = time.monotonic()
        # The extra request at the limit asks for an answer only: its code is not run.
        records, feedback = await self._run_blocks(blocks) if phase == "turn" else ([], [])
        marker = prompts.find_final(result.text, blocks)
        stop, note = await self._resolve(marker) if marker is not None else (None, "")
        code_ms = (time.monotonic() - code_started) * 1000
        message = ""
        limit = self.config.max_iterations
        if phase == "final_request":
            stop = limit_stop(stop, result.text, limit)
        elif stop is None:
            if note:
                feedback.append(note)
            if not blocks and marker is None:
                feedback.append("Your reply had no ```repl block and no FINAL(...) line, so "
                                "nothing ran.")
            ending = (prompts.final_request(limit) if iteration == limit
                      else prompts.continue_prompt(self.query))
            message = "\n\n".join([*feedback, ending])
            self._messages.append(ChatMessage(role="user", content=message))
        self._steps.append(StepTiming(iteration=iteration, model_ms=model_ms, code_ms=code_ms))
        await self._writer.write(IterationRecord(
            run_id=self.run_id, iteration=iteration, phase=phase, started_at=started_at,
            messages_sent=sent, prompt_chars=prompt_chars, response=result.text,
            finish_reason=result.finish_reason, endpoint=result.endpoint, tokens=tokens,
            model_ms=model_ms, code_ms=code_ms, code=records, sub_calls=self._subs.records,
            fold=fold_record, final_kind=marker.kind if marker else "",
            final_value=marker.value if marker else "", final_note=note, feedback=message))
        return stop

    async def _direct(self) -> Stop:
        """max_depth 0: the run is one plain model call over the query and the context."""
        text = self.context if isinstance(self.context, str) else msgspec.json.encode(
            self.context).decode()
        self._messages = [ChatMessage(role="user", content=f"{text}\n\n{self.query}")]
        result, model_ms, _ = await self._ask("direct")
        self._steps.append(StepTiming(iteration=0, model_ms=model_ms, code_ms=0.0))
        return Stop(reason="direct", answer=result.text.strip(),
                    detail="max_depth is 0: one plain model call, no REPL")

    async def _finish(self, stop: Stop, started: float) -> RlmResult:
        self._finished = True
        session, self._session = self._session, None
        if session is not None:
            try:
                await asyncio.shield(session.close())
            except KowalskiError as exc:
                log.info("run %s: closing its session: %s", self.run_id, exc)
        latency_ms = (time.monotonic() - started) * 1000
        devices = [*self._agents, *self._endpoints]
        iterations = min(self._iteration, self.config.max_iterations)
        result = RlmResult(
            run_id=self.run_id, answer=stop.answer, stop_reason=stop.reason, detail=stop.detail,
            iterations=iterations, sub_calls=self._subs.count,
            tokens=self._tokens + self._subs.tokens, sub_call_tokens=self._subs.tokens,
            steps=self._steps, latency_ms=latency_ms, devices=devices,
            agents=list(self._agents), endpoints=list(self._endpoints),
            trajectory_path=self.trajectory_path, folds=self._folds, error=stop.error)
        await asyncio.shield(self._writer.write(FinalRecord(
            run_id=self.run_id, answer=stop.answer, stop_reason=stop.reason, detail=stop.detail,
            iterations=iterations, sub_calls=self._subs.count, tokens=result.tokens,
            sub_call_tokens=self._subs.tokens, latency_ms=latency_ms, finished_at=time.time(),
            devices=devices, error=stop.error)))
        await self._emit(RunFinished(run_id=self.run_id, depth=self.depth, result=result))
        return result

    # --- sub-calls ------------------------------------------------------------------------

    async def answer_sub_calls(self, prompts: list[str], *, model: str = "") -> list[str]:
        """Answers to llm_query / llm_query_batched, in order; a failed one reads "Error: ..."."""
        return await self._subs.answer(prompts, model=model)
