"""Runs code jobs with bounded concurrency; a job id is an idempotency key."""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from typing import Protocol

import msgspec

from kowalski.common.errors import BusyError, ConflictError
from kowalski.common.messages import JobId, JobRequest, JobResult


class JobSandbox(Protocol):
    async def run_job(self, request: JobRequest) -> JobResult: ...


def _fingerprint(request: JobRequest) -> str:
    return hashlib.sha256(f"{request.language}\0{request.code}".encode()).hexdigest()


class JobRunner:
    """Admits, queues and runs jobs; repeated ids share the first run and its result."""

    def __init__(self, *, sandbox: JobSandbox, agent_id: str, max_concurrent: int,
                 max_queued: int, cache_size: int) -> None:
        self._sandbox = sandbox
        self._agent_id = agent_id
        self._slots = asyncio.Semaphore(max_concurrent)
        self._max_concurrent = max_concurrent
        self._max_queued = max_queued
        self._cache_size = cache_size
        self._done: OrderedDict[str, tuple[str, JobResult]] = OrderedDict()
        self._live: dict[str, tuple[str, asyncio.Task[JobResult]]] = {}
        self._running: set[JobId] = set()

    @property
    def running_ids(self) -> list[JobId]:
        return sorted(self._running)

    @property
    def queued(self) -> int:
        return len(self._live) - len(self._running)

    async def submit(self, request: JobRequest) -> JobResult:
        """Run a job, or join the run already under way for its id."""
        fingerprint = _fingerprint(request)
        if request.job_id in self._done:
            known, result = self._done[request.job_id]
            self._check_same(request.job_id, known, fingerprint)
            return result
        if request.job_id in self._live:
            known, task = self._live[request.job_id]
            self._check_same(request.job_id, known, fingerprint)
        else:
            if len(self._live) >= self._max_concurrent + self._max_queued:
                raise BusyError(
                    f"agent is running {len(self._running)} jobs with {self.queued} queued",
                    retry_after_s=1.0,
                )
            task = asyncio.create_task(self._run(request, fingerprint),
                                       name=f"job-{request.job_id}")
            self._live[request.job_id] = (fingerprint, task)
        # The job outlives a client that hangs up: a retry under the same id finds it.
        return await asyncio.shield(task)

    @staticmethod
    def _check_same(job_id: str, known: str, fingerprint: str) -> None:
        if known != fingerprint:
            raise ConflictError(f"job id {job_id!r} was already used for different code")

    async def _run(self, request: JobRequest, fingerprint: str) -> JobResult:
        try:
            async with self._slots:
                self._running.add(request.job_id)
                try:
                    result = await self._sandbox.run_job(request)
                finally:
                    self._running.discard(request.job_id)
            result = msgspec.structs.replace(result, agent_id=self._agent_id)
            self._done[request.job_id] = (fingerprint, result)
            while len(self._done) > self._cache_size:
                self._done.popitem(last=False)
            return result
        finally:
            self._live.pop(request.job_id, None)

    async def close(self) -> None:
        """Cancel every job still queued or running (the sandbox kills its processes)."""
        tasks = [task for _, task in self._live.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
