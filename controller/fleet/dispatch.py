"""Sends work to the best agent and re-sends it elsewhere when that agent fails."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec

from kowalski.common.errors import ExecutionError, NetworkError, RemoteError
from kowalski.common.messages import DeviceId, JobRequest, JobResult
from kowalski.controller.fleet.agent_client import AgentClient
from kowalski.controller.fleet.cluster import Cluster
from kowalski.controller.fleet.device_table import DeviceRow, DeviceTable, JobAssigned, JobReleased
from kowalski.controller.fleet.selection import select
from kowalski.controller.retry import RetryPolicy, retry_helps, with_failover
from kowalski.controller.scoring import Operation

T = TypeVar("T")
# Time a call may take beyond the job's own limit (queueing, compile, transfer).
CALL_MARGIN_S = 30.0
# Compiled languages compile before their limit starts (the agent's compile_timeout_ms_*).
COMPILE_MARGIN_S = {"rust": 60.0, "java": 60.0}
DEFAULT_JOB_TIMEOUT_S = 300.0
_BUSY_CODES = frozenset({"busy", "rate_limited"})


class JobCounters(msgspec.Struct, kw_only=True):
    """What the dispatcher has done since start, for status and metrics."""

    submitted: int = 0
    succeeded: int = 0
    failed: int = 0
    rerouted: int = 0
    # Refusals by a full agent (503 busy, 429): each one sent the job elsewhere.
    busy: int = 0



class DeviceFailedError(NetworkError):
    """The device stopped answering heartbeats while it held the call."""

    code = "device_failed"


def _device_down(device_id: DeviceId) -> Callable[[DeviceTable], bool]:
    def down(table: DeviceTable) -> bool:
        row = table.devices.get(device_id)
        return row is None or row.lost or row.health == "unhealthy"
    return down


def _outcome(error: Exception) -> str:
    """What a failed call says about its device, for the circuit breaker."""
    if isinstance(error, RemoteError) and error.remote_code in _BUSY_CODES:
        # A full agent is working, not failing: try elsewhere, but do not open its circuit.
        return "cancelled"
    # Faults of the device (as opposed to the caller's input, or code that fails wherever
    # it runs) open its circuit.
    return "failure" if retry_helps(error) else "success"


class Dispatcher:
    """Picks devices by score and runs calls on them with retries and failover."""

    def __init__(self, *, cluster: Cluster, agents: AgentClient, policy: RetryPolicy,
                 rng: random.Random | None = None) -> None:
        self.cluster = cluster
        self.agents = agents
        self._policy = policy
        self._rng = rng or random.Random()
        self.counters = JobCounters()

    def select(self, operation: Operation, *, language: str | None = None,
               exclude: frozenset[DeviceId] = frozenset()) -> DeviceRow:
        return select(self.cluster.table, operation, language=language, exclude=exclude,
                      now=self.cluster.clock())

    async def guarded(self, device_id: DeviceId, call: Awaitable[T]) -> T:
        """Await call, but give up as soon as the device is judged down."""
        task = asyncio.ensure_future(call)
        watcher = asyncio.ensure_future(
            self.cluster.wait_for(_device_down(device_id), timeout_s=math.inf))
        try:
            done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            watcher.cancel()
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise DeviceFailedError(f"device {device_id} stopped answering heartbeats")

    async def on_device(self, device_id: DeviceId, job_id: str,
                        call: Callable[[DeviceRow], Awaitable[T]]) -> T:
        """Run call on one device, recording the assignment and its outcome."""
        row = self.cluster.table.devices[device_id]
        self.cluster.apply(JobAssigned(device_id=device_id, job_id=job_id,
                                       at=self.cluster.clock()))
        outcome: Any = "cancelled"
        try:
            result = await self.guarded(device_id, call(row))
            outcome = "success"
            return result
        except Exception as exc:
            outcome = _outcome(exc)
            raise
        finally:
            self.cluster.apply(JobReleased(device_id=device_id, job_id=job_id, outcome=outcome,
                                           at=self.cluster.clock()))

    async def with_failover(self, operation: Operation, job_id: str,
                            call: Callable[[DeviceRow], Awaitable[T]], *,
                            language: str | None = None) -> T:
        """Try the best device; on a device fault, the next best, with backoff."""

        def rerouted(attempt: int, error: Exception, delay_ms: float) -> None:
            self.counters.rerouted += 1
            if isinstance(error, RemoteError) and error.remote_code in _BUSY_CODES:
                self.counters.busy += 1

        return await with_failover(
            lambda row: self.on_device(row.device_id, job_id, call), self._policy,
            choose=lambda exclude: self.select(operation, language=language, exclude=exclude),
            key=lambda row: row.device_id, on_retry=rerouted, rng=self._rng)

    async def run_job(self, request: JobRequest) -> JobResult:
        """Run a code job somewhere; the same job id goes with every attempt."""
        timeout_s = (request.timeout_ms / 1000 if request.timeout_ms else DEFAULT_JOB_TIMEOUT_S)
        timeout_s += COMPILE_MARGIN_S.get(request.language, 0.0)

        async def call(row: DeviceRow) -> JobResult:
            result = await self.agents.run_job(row.url, request,
                                               timeout_s=timeout_s + CALL_MARGIN_S)
            if result.status == "failed" and result.error is not None and result.error.retryable:
                raise ExecutionError(f"{row.device_id} could not run the job: "
                                     f"{result.error.message}")
            return result

        self.counters.submitted += 1
        try:
            result = await self.with_failover("code_execution", request.job_id, call,
                                              language=request.language)
        except Exception:
            self.counters.failed += 1
            raise
        self.counters.succeeded += 1
        return result
