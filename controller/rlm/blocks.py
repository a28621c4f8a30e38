"""A reply's code blocks, run in order: Python in the session, other languages as jobs.

Python blocks are cells of the run's persistent session. A block in another enabled language
(`rlm.languages`) is a one-shot sandboxed job on the agent holding the session, which finds
the context in its working directory. Output streams out as `CellOutput` events while a
block runs; the feedback to the model carries the whole (capped) output, labelled with the
language for jobs.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from kowalski.common.code_blocks import CodeBlock
from kowalski.common.config import RlmConfig
from kowalski.common.errors import (
    KowalskiError,
    ParseError,
    RemoteError,
    UnsupportedLanguageError,
)
from kowalski.common.job_stream import TextListener
from kowalski.common.messages import CellResult, JobId, JobResult, Language, WireError
from kowalski.controller.rlm import final, prompts
from kowalski.controller.rlm.events import (
    CellOutput,
    CodeExecuted,
    CodeSession,
    CodeSkipped,
    RlmEvent,
    Stop,
)
from kowalski.controller.rlm.ledger import RunLedger
from kowalski.controller.rlm.subcalls import Cell, SubCalls

__all__ = ["BlockRunner"]

R = TypeVar("R")
# Refusals of one block by the agent: told to the model, not the end of the run.
_REFUSED_JOB_CODES = frozenset({UnsupportedLanguageError.code, ParseError.code})


class BlockRunner:
    """Runs the blocks of each reply for one run; remembers the Python it ran."""

    def __init__(self, *, run_id: str, depth: int, config: RlmConfig,
                 emit: Callable[[RlmEvent], Awaitable[None]], subs: SubCalls,
                 ledger: RunLedger, cell_timeout_ms: int | None) -> None:
        self._run_id, self._depth = run_id, depth
        self._config = config
        self._emit = emit
        self._subs = subs
        self._ledger = ledger
        self._timeout_ms = cell_timeout_ms
        # The Python cells run so far, for the variable names folding keeps.
        self.cells: list[str] = []
        # Set by the first cell that made answer["ready"] true.
        self.answered: Stop | None = None

    async def run(self, session: CodeSession, blocks: list[CodeBlock]) -> list[str]:
        """Run the blocks in order; the feedback for each block, run or not."""
        iteration = self._ledger.iteration
        enabled = self._config.languages
        feedback: list[str] = []
        for number, block in enumerate(blocks, start=1):
            language = block.language if block.fenced else None
            if language is None or language not in enabled:
                feedback.append(prompts.skipped_block_note(number, block, enabled))
                await self._emit(CodeSkipped(
                    run_id=self._run_id, depth=self._depth, iteration=iteration, block=number,
                    language=block.raw_language, code=block.code))
                continue
            ran: Language = language
            started = time.monotonic()
            result = await self._streamed(
                functools.partial(self._one, session, ran, block.code, (iteration, number)),
                iteration, number, ran)
            wall_ms = (time.monotonic() - started) * 1000
            device = result.agent_id or session.device_id
            self._ledger.note_agent(session.device_id)
            if isinstance(result, CellResult):
                self.answered = self.answered or final.answer_stop(result)
                self.cells.append(block.code)
                output = prompts.format_output(result, self._config.max_output_chars)
                title = "REPL output" if len(blocks) == 1 else f"REPL output of block {number}"
            else:
                output = prompts.format_output(result, self._config.max_output_chars,
                                               label=ran)
                title = (f"[{ran}] output" if len(blocks) == 1
                         else f"[{ran}] output of block {number}")
            feedback.append(f"{title}:\n{output}")
            await self._emit(CodeExecuted(
                run_id=self._run_id, depth=self._depth, iteration=iteration, block=number,
                code=block.code, status=result.status, output=output, wall_time_ms=wall_ms,
                device_id=device, language=block.raw_language, ran_as=ran))
        return feedback

    async def _one(self, session: CodeSession, language: Language, code: str, cell: Cell,
                   listener: TextListener) -> CellResult | JobResult:
        if language == "python":
            with self._subs.cell(*cell):
                return await session.execute(code, timeout_ms=self._timeout_ms,
                                             on_output=listener)
        try:
            return await session.run_job(language, code, timeout_ms=self._timeout_ms,
                                         on_output=listener)
        except KowalskiError as exc:
            code_name = exc.remote_code if isinstance(exc, RemoteError) else exc.code
            if code_name not in _REFUSED_JOB_CODES:
                raise
            # The agent will not take this block (a language it lacks, code too large):
            # the model hears why and the run goes on, as after code that failed.
            return JobResult(job_id=JobId(""), status="failed", exit_code=None, stdout="",
                             stderr="", error=WireError(code=code_name, message=exc.message))

    async def _streamed(self, call: Callable[[TextListener], Awaitable[R]], iteration: int,
                        block: int, language: str) -> R:
        """call, its output passed on as CellOutput events in order while it runs."""
        pieces: asyncio.Queue[tuple[str, str] | None] = asyncio.Queue()

        async def pump() -> None:
            while True:
                # Pieces that queued up while the last event went out go as one per stream
                # run: a cell printing many short lines makes few events.
                batch = [await pieces.get()]
                while not pieces.empty():
                    batch.append(pieces.get_nowait())
                ended = None in batch
                for stream, text in _merged([p for p in batch if p is not None]):
                    await self._emit(CellOutput(
                        run_id=self._run_id, depth=self._depth, iteration=iteration,
                        block=block, language=language, stream=stream, text=text))
                if ended:
                    return

        pumping = asyncio.create_task(pump())
        try:
            result = await call(lambda stream, text: pieces.put_nowait((stream, text)))
        except BaseException:
            pumping.cancel()
            await asyncio.gather(pumping, return_exceptions=True)
            raise
        # The pieces already heard go out before the block's result.
        pieces.put_nowait(None)
        await pumping
        return result


def _merged(pieces: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Consecutive pieces of the same stream joined, in order."""
    merged: list[tuple[str, str]] = []
    for stream, text in pieces:
        if merged and merged[-1][0] == stream:
            merged[-1] = (stream, merged[-1][1] + text)
        else:
            merged.append((stream, text))
    return merged
