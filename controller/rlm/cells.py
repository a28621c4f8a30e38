"""A reply's code blocks run in the run's session, in order, each reported as an event."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from kowalski.common.code_blocks import CodeBlock
from kowalski.common.config import RlmConfig
from kowalski.controller.rlm import final, prompts
from kowalski.controller.rlm.events import CodeExecuted, CodeSession, CodeSkipped, RlmEvent, Stop
from kowalski.controller.rlm.ledger import RunLedger
from kowalski.controller.rlm.subcalls import SubCalls

__all__ = ["CellRunner"]


class CellRunner:
    """Runs the Python blocks of a run's replies; keeps the code run and a ready answer."""

    def __init__(self, *, run_id: str, depth: int, config: RlmConfig, subs: SubCalls,
                 ledger: RunLedger, emit: Callable[[RlmEvent], Awaitable[None]],
                 timeout_ms: int | None) -> None:
        self._run_id, self._depth, self._config = run_id, depth, config
        self._subs, self._ledger, self._emit = subs, ledger, emit
        self.timeout_ms = timeout_ms
        # Every cell's code so far (folding keeps the names they set).
        self.cells: list[str] = []
        # Set by a cell that made answer["ready"] true.
        self.answered: Stop | None = None

    async def run(self, session: CodeSession, blocks: list[CodeBlock]) -> list[str]:
        """Run the Python blocks in order; the feedback for each block, run or not."""
        iteration = self._ledger.iteration
        feedback: list[str] = []
        for number, block in enumerate(blocks, start=1):
            if not (block.fenced and block.language == "python"):
                feedback.append(prompts.skipped_block_note(number, block))
                await self._emit(CodeSkipped(
                    run_id=self._run_id, depth=self._depth, iteration=iteration, block=number,
                    language=block.raw_language, code=block.code))
                continue
            started = time.monotonic()
            with self._subs.cell(iteration, number):
                result = await session.execute(block.code, timeout_ms=self.timeout_ms)
            wall_ms = (time.monotonic() - started) * 1000
            self.answered = self.answered or final.answer_stop(result)
            self.cells.append(block.code)
            device = result.agent_id or session.device_id
            self._ledger.note_agent(session.device_id)
            output = prompts.format_output(result, self._config.max_output_chars)
            title = "REPL output" if len(blocks) == 1 else f"REPL output of block {number}"
            feedback.append(f"{title}:\n{output}")
            await self._emit(CodeExecuted(
                run_id=self._run_id, depth=self._depth, iteration=iteration, block=number,
                code=block.code, status=result.status, output=output, wall_time_ms=wall_ms,
                device_id=device, language=block.raw_language))
        return feedback
