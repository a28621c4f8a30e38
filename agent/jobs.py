"""Runs code jobs with bounded concurrency; a job id is an idempotency key."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from kowalski.agent.job_output import OutputListener
from kowalski.common.errors import BusyError, CancelledJobError, ConflictError
from kowalski.common.messages import CancelResult, JobId, JobRequest, JobResult

log = logging.getLogger(__name__)
# Cancelled attempt ids remembered, so a cancel that overtakes its job still holds.
_CANCELLED_KEPT = 65_536


class JobSandbox(Protocol):
    async def run_job(self, request: JobRequest, *, on_output: OutputListener | None = None,
                      extra_files: Mapping[str, bytes] | None = None) -> JobResult: ...


def _fingerprint(request: JobRequest) -> str:
    return hashlib.sha256(
        f"{request.language}\0{request.session_id or ''}\0{request.code}".encode()).hexdigest()


def _never_gone() -> bool:
    return False


@dataclass(frozen=True)
class Waiter:
    """One caller waiting for a job: its attempt id and whether it has hung up."""

    attempt_id: str | None
    deadline: float | None
    gone: Callable[[], bool] = _never_gone


@dataclass
class LiveJob:
    fingerprint: str
    task: asyncio.Task[JobResult]
    waiters: list[Waiter] = field(default_factory=list)
    # Callers streaming the output; one that joins late hears it from then on.
    listeners: list[OutputListener] = field(default_factory=list)

    def tell(self, stream: str, data: bytes) -> None:
        for listener in self.listeners:
            listener(stream, data)


class JobRunner:
    """Admits, queues and runs jobs; repeated ids share the first run and its result.

    A job sent by a controller carries an attempt id and a deadline. It is not started once
    every attempt waiting for it is cancelled or has hung up (the controller gave it to
    another agent), nor once the latest deadline has passed.
    """

    def __init__(self, *, sandbox: JobSandbox, agent_id: str, max_concurrent: int,
                 max_queued: int, cache_size: int,
                 clock: Callable[[], float] = time.time) -> None:
        self._sandbox = sandbox
        self._agent_id = agent_id
        self._slots = asyncio.Semaphore(max_concurrent)
        self._max_concurrent = max_concurrent
        self._max_queued = max_queued
        self._cache_size = cache_size
        self._clock = clock
        self._done: OrderedDict[str, tuple[str, JobResult]] = OrderedDict()
        self._live: dict[str, LiveJob] = {}
        self._running: set[JobId] = set()
        self._cancelled: OrderedDict[str, None] = OrderedDict()

    @property
    def running_ids(self) -> list[JobId]:
        return sorted(self._running)

    @property
    def queued(self) -> int:
        return len(self._live) - len(self._running)

    async def submit(self, request: JobRequest, *, gone: Callable[[], bool] = _never_gone,
                     on_output: OutputListener | None = None,
                     files: Mapping[str, bytes] | None = None) -> JobResult:
        """Run a job, or join the run already under way for its id (on_output hears it).

        files go into the job's working directory beside its program.
        """
        fingerprint = _fingerprint(request)
        if request.job_id in self._done:
            known, result = self._done[request.job_id]
            self._check_same(request.job_id, known, fingerprint)
            return result
        if request.attempt_id is not None and request.attempt_id in self._cancelled:
            raise CancelledJobError(f"attempt {request.attempt_id} of job {request.job_id!r} "
                                    "was cancelled by the controller")
        waiter = Waiter(attempt_id=request.attempt_id, deadline=request.deadline, gone=gone)
        live = self._live.get(request.job_id)
        if live is not None:
            self._check_same(request.job_id, live.fingerprint, fingerprint)
        else:
            if len(self._live) >= self._max_concurrent + self._max_queued:
                raise BusyError(
                    f"agent is running {len(self._running)} jobs with {self.queued} queued",
                    retry_after_s=1.0,
                )
            task = asyncio.create_task(self._run(request, files or {}),
                                       name=f"job-{request.job_id}")
            live = self._live[request.job_id] = LiveJob(fingerprint=fingerprint, task=task)
        live.waiters.append(waiter)
        if on_output is not None:
            live.listeners.append(on_output)
        try:
            # The job outlives a client that hangs up once it has started: a retry under
            # the same id finds it.
            return await asyncio.shield(live.task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if live.task.cancelled() and (current is None or not current.cancelling()):
                raise CancelledJobError(f"job {request.job_id!r} was cancelled by the "
                                        "controller") from None
            raise
        finally:
            if on_output is not None and on_output in live.listeners:
                live.listeners.remove(on_output)

    @staticmethod
    def _check_same(job_id: str, known: str, fingerprint: str) -> None:
        if known != fingerprint:
            raise ConflictError(f"job id {job_id!r} was already used for different code")

    def _dropped(self, waiter: Waiter) -> bool:
        # Without an attempt id nobody can cancel the caller's claim: it holds until done.
        if waiter.attempt_id is None:
            return False
        return waiter.attempt_id in self._cancelled or waiter.gone()

    def _why_stale(self, job_id: str) -> str | None:
        """Why a queued job must not start now, or None when it may."""
        live = self._live.get(job_id)
        if live is None or not live.waiters:
            return None
        if all(self._dropped(waiter) for waiter in live.waiters):
            return "every attempt waiting for it was cancelled or hung up"
        deadlines = [w.deadline for w in live.waiters if not self._dropped(w)]
        if None not in deadlines and max(d for d in deadlines if d is not None) <= self._clock():
            return "its deadline has passed"
        return None

    async def _run(self, request: JobRequest, files: Mapping[str, bytes]) -> JobResult:
        try:
            async with self._slots:
                # The last look before starting: a controller may have moved the job while
                # it waited here (or while this process was paused).
                await asyncio.sleep(0)
                stale = self._why_stale(request.job_id)
                if stale is not None:
                    log.info("not starting job %s: %s", request.job_id, stale)
                    raise CancelledJobError(f"job {request.job_id!r} was not started: {stale}")
                log.debug("starting job %s (attempt %s)", request.job_id, request.attempt_id)
                self._running.add(request.job_id)
                try:
                    listening = self._live[request.job_id]
                    result = await self._sandbox.run_job(request, on_output=listening.tell,
                                                         extra_files=files)
                finally:
                    self._running.discard(request.job_id)
            result = msgspec.structs.replace(result, agent_id=self._agent_id)
            live = self._live.get(request.job_id)
            if live is not None:
                self._done[request.job_id] = (live.fingerprint, result)
            while len(self._done) > self._cache_size:
                self._done.popitem(last=False)
            return result
        finally:
            self._live.pop(request.job_id, None)

    def refuses(self, attempt_id: str | None) -> bool:
        """Whether this attempt was cancelled here."""
        return attempt_id is not None and attempt_id in self._cancelled

    def cancel(self, attempt_ids: list[str]) -> CancelResult:
        """Refuse these attempts from now on; stop jobs that no other attempt waits for."""
        for attempt_id in attempt_ids:
            self._cancelled[attempt_id] = None
            self._cancelled.move_to_end(attempt_id)
        while len(self._cancelled) > _CANCELLED_KEPT:
            self._cancelled.popitem(last=False)
        asked = set(attempt_ids)
        stopped: list[str] = []
        for job_id, live in list(self._live.items()):
            mine = [w.attempt_id for w in live.waiters if w.attempt_id in asked]
            if mine and all(self._dropped(w) for w in live.waiters):
                live.task.cancel()
                stopped += [a for a in mine if a is not None]
                log.info("cancelled job %s: the controller gave it to another agent", job_id)
        return CancelResult(stopped=sorted(stopped), refused=len(asked))

    async def close(self) -> None:
        """Cancel every job still queued or running (the sandbox kills its processes)."""
        tasks = [live.task for live in self._live.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
