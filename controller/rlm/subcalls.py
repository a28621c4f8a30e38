"""A run's sub-calls: llm_query / llm_query_batched answered by the model or by child runs.

Each run owns one `SubCalls`. Below `max_depth` a sub-call is an RLM run of its own over
the prompt; at the last level it is one plain model call. A refused or failed sub-call
answers "Error: ..." instead of raising, so the model's code can carry on.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import msgspec

from kowalski.common.errors import BudgetExceededError, CancelledJobError, KowalskiError
from kowalski.controller.models.chat_types import ChatMessage, ChatRequest
from kowalski.controller.rlm.events import SubCallAnswered, TokenCount, chat_tokens
from kowalski.controller.rlm.folding import CHARS_PER_TOKEN
from kowalski.controller.rlm.trajectory import SUB_CALL_CHARS, SubCallRecord

if TYPE_CHECKING:
    from kowalski.controller.rlm.loop import RlmRun

__all__ = ["SubCalls"]


class SubCalls:
    """The sub-calls of one run: their answers, their count and their tokens."""

    def __init__(self, run: RlmRun) -> None:
        # The run's own state (deadline, backend, device tables) is read through it.
        self._run = run
        # Sub-calls answered, those of child runs included.
        self.count = 0
        self.tokens = TokenCount()
        # The current iteration's sub-calls; the run resets it each iteration.
        self.records: list[SubCallRecord] = []
        self._children = 0
        self._semaphore = asyncio.Semaphore(run.config.sub_call_concurrency)

    def max_prompt_chars(self) -> int:
        """How long a sub-call prompt may be: most of the window, leaving room for the answer."""
        return self._run.config.context_window_tokens * CHARS_PER_TOKEN * 3 // 4

    async def answer(self, prompts: list[str], *, model: str = "") -> list[str]:
        """Answers to llm_query / llm_query_batched, in order; a failed one reads "Error: ..."."""
        run = self._run
        if run._finished:
            raise CancelledJobError(f"run {run.run_id} has finished; no more sub-calls")
        if run.tokens_used >= run.config.token_budget:
            raise BudgetExceededError(f"run {run.run_id} has spent its token budget of "
                                      f"{run.config.token_budget}")

        async def one(prompt: str) -> str:
            async with self._semaphore:
                return await self._sub_call(prompt, model or run.model)

        try:
            async with asyncio.timeout_at(run._deadline), asyncio.TaskGroup() as group:
                tasks = [group.create_task(one(prompt)) for prompt in prompts]
        except TimeoutError:
            raise BudgetExceededError(f"run {run.run_id} passed its time limit of "
                                      f"{run.config.run_timeout_s:g} s") from None
        return [task.result() for task in tasks]

    async def _sub_call(self, prompt: str, model: str) -> str:
        run = self._run
        limit = self.max_prompt_chars()
        refusal = ""
        if run.tokens_used >= run.config.token_budget:
            refusal = "Error: the run's token budget is spent; no more sub-calls."
        elif len(prompt) > limit:
            refusal = (f"Error: the prompt is {len(prompt)} characters; a sub-call takes at "
                       f"most about {limit}. Split it into smaller pieces.")
        if refusal:
            await self._record(prompt, refusal, TokenCount(), 0.0, error=refusal)
            return refusal
        started = time.monotonic()
        if run.depth + 1 < run.config.max_depth:
            return await self._child_call(prompt, model, started)
        messages = [ChatMessage(role="user", content=prompt)]
        request = ChatRequest(model=model, messages=messages, temperature=run._temperature)
        try:
            result = await run._backend.chat(request, operation="llm_inference")
        except KowalskiError as exc:
            answer = f"Error: {exc.message}"
            await self._record(prompt, answer, TokenCount(),
                               (time.monotonic() - started) * 1000, error=exc.message)
            return answer
        run._note(run._endpoints, result.endpoint)
        await self._record(prompt, result.text, chat_tokens(result, messages),
                           (time.monotonic() - started) * 1000, endpoint=result.endpoint)
        return result.text

    async def _child_call(self, prompt: str, model: str, started: float) -> str:
        """A sub-call below max_depth: an RLM run of its own over the prompt."""
        run = self._run
        self._children += 1
        remaining_s = max(run._deadline - asyncio.get_running_loop().time(), 0.001)
        config = msgspec.structs.replace(
            run.config, run_timeout_s=remaining_s,
            token_budget=max(1, run.config.token_budget - run.tokens_used))
        query = prompt if len(prompt) <= 2000 else (
            f"Answer the request written in `context` (a prompt of {len(prompt)} characters).")
        # The child is a run of the same class as its parent.
        child = type(run)(
            query, prompt, backend=run._backend, session_factory=run._factory, config=config,
            model=model, observer=run._observer, run_id=f"{run.run_id}-s{self._children}",
            depth=run.depth + 1, parent_run_id=run.run_id, temperature=run._temperature,
            cell_timeout_ms=run._cell_timeout_ms)
        result = await child.run()
        for name in result.agents:
            run._note(run._agents, name)
        for name in result.endpoints:
            run._note(run._endpoints, name)
        self.count += result.sub_calls
        error = result.detail if result.stop_reason == "error" else ""
        await self._record(prompt, result.answer, result.tokens,
                           (time.monotonic() - started) * 1000, error=error,
                           child_run_id=child.run_id)
        return result.answer

    async def _record(self, prompt: str, answer: str, tokens: TokenCount, latency_ms: float,
                      *, endpoint: str = "", error: str = "", child_run_id: str = "") -> None:
        run = self._run
        self.count += 1
        self.tokens += tokens
        self.records.append(SubCallRecord(
            prompt=prompt[:SUB_CALL_CHARS], answer=answer[:SUB_CALL_CHARS],
            prompt_chars=len(prompt), answer_chars=len(answer), tokens=tokens,
            latency_ms=latency_ms, endpoint=endpoint, error=error, child_run_id=child_run_id))
        await run._emit(SubCallAnswered(
            run_id=run.run_id, depth=run.depth, iteration=run._iteration,
            prompt_chars=len(prompt), answer_chars=len(answer), latency_ms=latency_ms,
            tokens=tokens, error=error))
