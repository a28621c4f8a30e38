"""A run's sub-calls: llm_query / llm_query_batched answered by the model or by child runs.

Each run owns one `SubCalls`. Below `max_depth` a sub-call is an RLM run of its own over
the prompt, looping with the root model; at the last level it is one plain model call to
the sub model (`rlm.sub_model`, else the root model). A model named in the call itself
(`llm_query(prompt, model=...)`) wins over both. A refused or failed sub-call
answers "Error: ..." instead of raising, so the model's code can carry on.

Sub-calls belong to the cell that made them: they are taken only while a cell runs, and
when the cell ends (done, timed out, or its run ended) the ones still pending are
cancelled, so abandoned work never reaches the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import msgspec

from kowalski.common.config import RlmConfig
from kowalski.common.errors import BudgetExceededError, CancelledJobError, KowalskiError
from kowalski.controller.models.cache import chat_outcome
from kowalski.controller.models.chat_types import ChatBackend, ChatMessage, ChatRequest
from kowalski.controller.rlm.events import (
    SUB_CALL_CHARS,
    RlmEvent,
    RlmResult,
    SubCallAnswered,
    TokenCount,
    chat_tokens,
)
from kowalski.controller.rlm.folding import CHARS_PER_TOKEN
from kowalski.controller.rlm.ledger import RunLedger

__all__ = ["Cell", "ChildRunner", "SubCalls", "max_prompt_chars"]

# A code cell: (iteration, block number); sub-calls and child runs name the one that asked.
Cell = tuple[int, int]
# Longer sub-call prompts reach a child run as its context, with a short query.
_QUERY_CHARS = 2000


class ChildRunner(Protocol):
    """Runs a child RLM run (one level deeper) to its end."""

    async def __call__(self, query: str, context: str, *, config: RlmConfig, model: str,
                       run_id: str, cell: Cell) -> RlmResult: ...


def max_prompt_chars(config: RlmConfig) -> int:
    """How long a sub-call prompt may be: most of the window, leaving room for the answer."""
    return config.context_window_tokens * CHARS_PER_TOKEN * 3 // 4


@dataclass(frozen=True)
class _Outcome:
    """One sub-call's answer and what its record holds."""

    answer: str
    tokens: TokenCount
    endpoint: str = ""
    error: str = ""
    child_run_id: str = ""
    cached_tokens: TokenCount | None = None


class SubCalls:
    """The sub-calls of one run: their answers, counted in the run's ledger."""

    def __init__(self, *, run_id: str, depth: int, config: RlmConfig, backend: ChatBackend,
                 ledger: RunLedger, emit: Callable[[RlmEvent], Awaitable[None]],
                 run_child: ChildRunner, temperature: float | None = None) -> None:
        self._run_id = run_id
        self._depth = depth
        self._config = config
        self._backend = backend
        self._ledger = ledger
        self._emit = emit
        self._run_child = run_child
        self._temperature = temperature
        # Child runs started; a resumed run goes on from its record's count.
        self.children = 0
        self._semaphore = asyncio.Semaphore(config.sub_call_concurrency)
        self._cells_running = 0
        self._cell: Cell = (0, 0)
        self._work: set[asyncio.Task[list[str]]] = set()

    @contextlib.contextmanager
    def cell(self, iteration: int, block: int) -> Iterator[None]:
        """While a cell runs: sub-calls are taken, and cancelled once it ends however it ends."""
        self._cells_running += 1
        self._cell = (iteration, block)
        try:
            yield
        finally:
            self._cells_running -= 1
            for work in list(self._work):
                work.cancel()

    async def answer(self, prompts: list[str], *, model: str = "", root_model: str = ""
                     ) -> list[str]:
        """Answers to llm_query / llm_query_batched, in order; a failed one reads "Error: ...".

        model is the one the call named (empty: none); root_model is the run's own.
        """
        ledger, config = self._ledger, self._config
        if ledger.finished:
            raise CancelledJobError(f"run {self._run_id} has finished; no more sub-calls")
        if ledger.tokens_used >= config.token_budget:
            raise BudgetExceededError(f"run {self._run_id} has spent its token budget of "
                                      f"{config.token_budget}")
        if not self._cells_running:
            raise CancelledJobError(f"run {self._run_id} has no cell running; the cell that "
                                    "asked has ended and its sub-calls were dropped")
        work = asyncio.ensure_future(self._answer_all(prompts, model, root_model, self._cell))
        self._work.add(work)
        work.add_done_callback(self._work.discard)
        try:
            return await work
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if work.cancelled() and (current is None or not current.cancelling()):
                # Cancelled by the cell's end, not by our caller: an answer, not a crash.
                raise CancelledJobError(f"run {self._run_id}: the cell that asked has ended; "
                                        "its pending sub-calls were cancelled") from None
            raise

    async def _answer_all(self, prompts: list[str], model: str, root_model: str, cell: Cell
                          ) -> list[str]:
        ledger, config = self._ledger, self._config
        recursive = self._depth + 1 < config.max_depth
        # A child run loops with the root model; a leaf is one call to the sub model.
        chosen = model or (root_model if recursive else config.sub_model or root_model)

        answers = [""] * len(prompts)
        pending = iter(enumerate(prompts))

        async def work() -> None:
            # The workers share one iterator: each takes the next prompt when it is free.
            for index, prompt in pending:
                answers[index] = await self._sub_call(prompt, chosen, cell)

        # A worker per slot, and as many more to take a slot while the first record answers:
        # a batch of hundreds costs a few dozen tasks, not one task and one wait each.
        workers = min(len(prompts), 2 * config.sub_call_concurrency)
        try:
            async with asyncio.timeout_at(ledger.deadline), asyncio.TaskGroup() as group:
                for _ in range(workers):
                    group.create_task(work())
        except TimeoutError:
            raise BudgetExceededError(f"run {self._run_id} passed its time limit of "
                                      f"{config.run_timeout_s:g} s") from None
        return answers

    async def _sub_call(self, prompt: str, model: str, cell: Cell) -> str:
        limit = max_prompt_chars(self._config)
        if len(prompt) > limit:
            refusal = (f"Error: the prompt is {len(prompt)} characters; a sub-call takes at "
                       f"most about {limit}. Split it into smaller pieces.")
            await self._record(prompt, refusal, TokenCount(), 0.0, cell, error=refusal)
            return refusal
        # Only the model call (or child run) holds a slot: recording its answer must not keep
        # the next prompt waiting. The budget is looked at once the slot is ours.
        async with self._semaphore:
            spent = self._ledger.tokens_used >= self._config.token_budget
            started = time.monotonic()
            if not spent and self._depth + 1 < self._config.max_depth:
                outcome = await self._child_call(prompt, model, cell)
            elif not spent:
                outcome = await self._model_call(prompt, model)
        if spent:
            refusal = "Error: the run's token budget is spent; no more sub-calls."
            await self._record(prompt, refusal, TokenCount(), 0.0, cell, error=refusal)
            return refusal
        await self._record(prompt, outcome.answer, outcome.tokens,
                           (time.monotonic() - started) * 1000, cell, endpoint=outcome.endpoint,
                           error=outcome.error, child_run_id=outcome.child_run_id,
                           cached_tokens=outcome.cached_tokens)
        return outcome.answer

    async def _model_call(self, prompt: str, model: str) -> _Outcome:
        """A leaf: one call to the model; its answer and what the record of it holds."""
        messages = [ChatMessage(role="user", content=prompt)]
        request = ChatRequest(model=model, messages=messages, temperature=self._temperature)
        try:
            result, cached = await chat_outcome(self._backend, request,
                                                operation="llm_inference")
        except KowalskiError as exc:
            return _Outcome(f"Error: {exc.message}", TokenCount(), error=exc.message)
        self._ledger.note_endpoint(result.endpoint)
        tokens = chat_tokens(result, messages)
        return _Outcome(result.text, TokenCount() if cached else tokens,
                        endpoint=result.endpoint, cached_tokens=tokens if cached else None)

    async def _child_call(self, prompt: str, model: str, cell: Cell) -> _Outcome:
        """A sub-call below max_depth: an RLM run of its own over the prompt."""
        ledger, config = self._ledger, self._config
        self.children += 1
        remaining_s = max(ledger.deadline - asyncio.get_running_loop().time(), 0.001)
        child_config = msgspec.structs.replace(
            config, run_timeout_s=remaining_s,
            token_budget=max(1, config.token_budget - ledger.tokens_used))
        query = prompt if len(prompt) <= _QUERY_CHARS else (
            f"Answer the request written in `context` (a prompt of {len(prompt)} characters).")
        child_run_id = f"{self._run_id}-s{self.children}"
        result = await self._run_child(query, prompt, config=child_config, model=model,
                                       run_id=child_run_id, cell=cell)
        for name in result.agents:
            ledger.note_agent(name)
        for name in result.endpoints:
            ledger.note_endpoint(name)
        ledger.sub_calls += result.sub_calls
        error = result.detail if result.stop_reason == "error" else ""
        answer = result.answer or (f"Error: the sub-call's run stopped without an answer "
                                   f"({result.stop_reason}: {result.detail})")
        return _Outcome(answer, result.tokens, error=error, child_run_id=child_run_id,
                        cached_tokens=result.cached_tokens)

    async def _record(self, prompt: str, answer: str, tokens: TokenCount, latency_ms: float,
                      cell: Cell, *, endpoint: str = "", error: str = "", child_run_id: str = "",
                      cached_tokens: TokenCount | None = None) -> None:
        ledger = self._ledger
        ledger.sub_calls += 1
        ledger.sub_call_tokens += tokens
        ledger.cached_tokens += cached_tokens or TokenCount()
        await self._emit(SubCallAnswered(
            run_id=self._run_id, depth=self._depth, iteration=cell[0], block=cell[1],
            prompt_chars=len(prompt), answer_chars=len(answer), latency_ms=latency_ms,
            tokens=tokens, error=error, prompt=prompt[:SUB_CALL_CHARS],
            answer=answer, endpoint=endpoint, child_run_id=child_run_id,
            cached_tokens=cached_tokens or TokenCount()))
