"""Many chat requests with bounded concurrency: results in input order, errors per item.

Input and output are JSONL (docs/BATCH.md). Each finished item goes to a journal beside
the output file as soon as it lands, so a batch that was killed resumes without asking
again; the output file itself is written whole, in input order, at the end.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import msgspec

from kowalski.common import config as config_module
from kowalski.common.errors import KowalskiError
from kowalski.controller.batch.files import (
    BatchItem,
    InOrderWriter,
    ItemError,
    ItemFailure,
    ItemId,
    ItemResult,
    ItemSuccess,
    Journal,
    decode_result,
    encode_result,
    journal_path,
    load_finished,
    parse_batch_line,
    read_batch,
    read_input,
    write_atomically,
)
from kowalski.controller.batch.model_wait import ModelWait
from kowalski.controller.batch.progress import Progress, ProgressBar, format_duration
from kowalski.controller.models.cache import CacheOutcome, chat_outcome
from kowalski.controller.models.chat_types import ChatBackend, ChatRequest, ChatResult
from kowalski.controller.models.exo_client import ExoClient
from kowalski.controller.retry import RetryPolicy, retry, retry_helps

__all__ = [
    "BatchItem",
    "BatchRun",
    "BatchSummary",
    "ExoClientBackend",
    "ItemError",
    "ItemFailure",
    "ItemId",
    "ItemResult",
    "ItemSuccess",
    "decode_result",
    "encode_result",
    "journal_path",
    "load_finished",
    "parse_batch_line",
    "read_batch",
    "run_batch",
    "run_batch_file",
]

log = logging.getLogger(__name__)

DEFAULT_OPERATION = "llm_inference"


# --- running ---------------------------------------------------------------------------------


class BatchSummary(msgspec.Struct, frozen=True, kw_only=True):
    total: int
    ok: int
    failed: int
    cached: int
    resumed: int
    retries: int
    # Tokens spent by this run: cached and resumed answers cost nothing now.
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    wall_s: float
    items_per_s: float
    completion_tokens_per_s: float
    # Stopped before every item was asked (a signal); the journal holds what finished.
    stopped: bool = False

    def describe(self) -> str:
        """A line for people: counts, tokens, time and throughput."""
        parts = [f"{self.total} items: {self.ok} ok, {self.failed} failed, {self.cached} cached"]
        if self.stopped:
            parts.append(f"{self.total - self.ok - self.failed} not done (stopped)")
        if self.resumed:
            parts.append(f"{self.resumed} resumed")
        if self.retries:
            parts.append(f"{self.retries} retries")
        parts.append(f"{self.prompt_tokens} prompt + {self.completion_tokens} completion tokens")
        parts.append(f"in {format_duration(self.wall_s)} ({self.wall_s:.2f} s)")
        parts.append(f"{self.items_per_s:.2f} items/s, {self.completion_tokens_per_s:.1f} tok/s")
        return ", ".join(parts)


class BatchRun(msgspec.Struct, frozen=True, kw_only=True):
    # One per item, in input order.
    results: list[ItemResult]
    summary: BatchSummary


@dataclass
class _Tally:
    total: int
    done: int = 0
    ok: int = 0
    failed: int = 0
    cached: int = 0
    resumed: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, result: ItemResult, *, resumed: bool = False) -> None:
        self.done += 1
        self.resumed += resumed
        if isinstance(result, ItemFailure):
            self.failed += 1
            return
        self.ok += 1
        self.cached += result.cached
        if result.usage is not None and not (result.cached or resumed):
            self.prompt_tokens += result.usage.prompt_tokens
            self.completion_tokens += result.usage.completion_tokens

    def progress(self, elapsed_s: float) -> Progress:
        return Progress(
            total=self.total, done=self.done, ok=self.ok, failed=self.failed, cached=self.cached,
            resumed=self.resumed, retries=self.retries,
            completion_tokens=self.completion_tokens, elapsed_s=elapsed_s,
        )

    def summary(self, wall_s: float, *, stopped: bool = False) -> BatchSummary:
        per_s = 1 / wall_s if wall_s > 0 else 0.0
        return BatchSummary(stopped=stopped,
            total=self.total, ok=self.ok, failed=self.failed, cached=self.cached,
            resumed=self.resumed, retries=self.retries, prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens, wall_s=wall_s,
            items_per_s=(self.done - self.resumed) * per_s,
            completion_tokens_per_s=self.completion_tokens * per_s,
        )


async def _run_item(
    item: BatchItem, backend: ChatBackend, policy: RetryPolicy, operation: str, tally: _Tally,
) -> ItemResult:
    attempts = 0
    started = time.monotonic()

    async def ask() -> CacheOutcome:
        nonlocal attempts
        attempts += 1
        return await chat_outcome(backend, item.request, operation=operation)

    def waiting(wait_s: float, probe_pending: bool) -> None:
        if not probe_pending:
            tally.retries += 1
            log.debug("item %r waits %.2f s for a circuit to half-open", item.id, wait_s)

    wait = ModelWait(policy, waiting)

    async def attempt() -> CacheOutcome:
        return await wait.call(ask)

    def gives_hope(error: Exception) -> bool:
        return retry_helps(error) and not wait.gave_up

    def retried(attempt_number: int, error: Exception, delay_ms: float) -> None:
        tally.retries += 1
        log.info("item %r attempt %d failed (%s); retrying in %.0f ms",
                 item.id, attempt_number, error, delay_ms)

    try:
        result, cached = await retry(attempt, policy, is_retryable=gives_hope,
                                     on_retry=retried)
    except Exception as error:
        if not isinstance(error, KowalskiError):
            log.error("item %r failed unexpectedly", item.id, exc_info=error)
        return ItemFailure(
            id=item.id, index=item.index, line=item.line, error=ItemError.of(error),
            attempts=attempts,
        )
    return ItemSuccess(
        id=item.id, index=item.index, line=item.line, text=result.text,
        finish_reason=result.finish_reason, usage=result.usage,
        latency_ms=(time.monotonic() - started) * 1000 if cached else result.latency_ms,
        endpoint=result.endpoint, cached=cached, attempts=attempts,
    )


async def run_batch(
    items: Sequence[BatchItem | ItemFailure],
    backend: ChatBackend,
    *,
    concurrency: int,
    policy: RetryPolicy | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    on_result: Callable[[ItemResult], None] | None = None,
    finished: Sequence[ItemResult] = (),
    operation: str = DEFAULT_OPERATION,
    stop: asyncio.Event | None = None,
) -> BatchRun:
    """Ask for every item, at most ``concurrency`` at a time; failed items do not stop the rest.

    ``finished`` holds results of an earlier run, kept as they are. ``on_result`` sees each
    new result as it lands (failed lines first), ``on_progress`` the counts after each one.
    Recoverable errors are retried per ``policy`` (the controller's retry settings if None).
    Once ``stop`` is set, calls in flight are cancelled and the results so far are returned
    (``results`` then lacks the items not done, and the summary says ``stopped``).
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    policy = policy or RetryPolicy.from_config(config_module.ControllerConfig())
    started = time.monotonic()
    tally = _Tally(total=len(items) + len(finished))
    results: dict[int, ItemResult] = {}
    for result in finished:
        results[result.index] = result
        tally.add(result, resumed=True)

    def land(result: ItemResult) -> None:
        results[result.index] = result
        tally.add(result)
        if on_result is not None:
            on_result(result)
        if on_progress is not None:
            on_progress(tally.progress(time.monotonic() - started))

    if on_progress is not None:
        on_progress(tally.progress(0.0))
    pending: deque[BatchItem] = deque()
    for item in items:
        if isinstance(item, ItemFailure):
            land(item)
        else:
            pending.append(item)

    async def worker() -> None:
        while pending:
            land(await _run_item(pending.popleft(), backend, policy, operation, tally))

    async with asyncio.TaskGroup() as group:
        workers = [group.create_task(worker()) for _ in range(min(concurrency, len(pending)))]
        if stop is not None:
            group.create_task(_cancel_when_set(stop, workers))
    ordered = [results[index] for index in sorted(results)]
    stopped = stop is not None and stop.is_set() and tally.done < tally.total
    return BatchRun(results=ordered, summary=tally.summary(time.monotonic() - started,
                                                           stopped=stopped))


async def _cancel_when_set(stop: asyncio.Event, workers: list[asyncio.Task[None]]) -> None:
    """Cancel the workers once stop is set; return when they are all done either way."""
    stopping = asyncio.ensure_future(stop.wait())
    running = set(workers)
    try:
        while running and not stopping.done():
            done, _ = await asyncio.wait({stopping, *running},
                                         return_when=asyncio.FIRST_COMPLETED)
            running -= done
    finally:
        stopping.cancel()
    for task in running:
        task.cancel()


async def run_batch_file(
    input_path: str | Path,
    output_path: str | Path,
    backend: ChatBackend,
    *,
    concurrency: int,
    default_model: str,
    resume: bool = False,
    show_progress: bool = False,
    policy: RetryPolicy | None = None,
    progress_stream: TextIO | None = None,
    operation: str = DEFAULT_OPERATION,
    input_data: bytes | None = None,
    stop: asyncio.Event | None = None,
) -> BatchSummary:
    """Run a JSONL file into a JSONL file; "-" is stdin or stdout (in order, no resume).

    With ``resume``, items the output file or its journal already hold are not asked
    again. Without it, any earlier journal is discarded. Unreadable input or an
    unwritable output raises OSError. ``input_data``, when given, is the input already read.
    A batch stopped by ``stop`` keeps its journal and leaves the output file as it was, for
    ``resume``.
    """
    if resume and str(output_path) == "-":
        raise ValueError("resuming needs an output file")
    if input_data is None:
        input_data = await asyncio.to_thread(read_input, str(input_path))
    items = read_batch(input_data, default_model=default_model)
    bar = ProgressBar(progress_stream or sys.stderr) if show_progress else None

    async def run(
        todo: Sequence[BatchItem | ItemFailure], on_result: Callable[[ItemResult], None],
        finished: Sequence[ItemResult] = (),
    ) -> BatchRun:
        return await run_batch(
            todo, backend, concurrency=concurrency, policy=policy, operation=operation,
            on_progress=bar.update if bar else None, on_result=on_result, finished=finished,
            stop=stop,
        )

    try:
        if str(output_path) == "-":
            return (await run(items, InOrderWriter(sys.stdout.buffer).write)).summary
        output = Path(output_path)
        finished = await asyncio.to_thread(load_finished, output, items) if resume else []
        done = {result.index for result in finished}
        journal = await asyncio.to_thread(Journal, journal_path(output), finished)
        try:
            outcome = await run(
                [item for item in items if item.index not in done], journal.write, finished,
            )
        finally:
            journal.close()
        if outcome.summary.stopped:
            return outcome.summary
        await asyncio.to_thread(write_atomically, output, outcome.results)
        journal.path.unlink(missing_ok=True)
        return outcome.summary
    finally:
        if bar is not None:
            bar.close()


# --- one exo endpoint as a backend, no routing ----------------------------------------------


class ExoClientBackend:
    """One ExoClient as a chat backend, without routing or failover."""

    def __init__(self, client: ExoClient) -> None:
        self.client = client

    async def chat(
        self, request: ChatRequest, *, operation: str = DEFAULT_OPERATION,
    ) -> ChatResult:
        """One completion from the client's endpoint."""
        return await self.client.chat(request)

