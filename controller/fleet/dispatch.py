"""Sends work to the best agent and re-sends it elsewhere when that agent fails."""

from __future__ import annotations

import asyncio
import logging
import math
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec

from kowalski.common.errors import ExecutionError, KowalskiError, NetworkError, RemoteError
from kowalski.common.job_stream import TextListener
from kowalski.common.messages import DeviceId, JobRequest, JobResult
from kowalski.controller.fleet.agent_client import AgentClient
from kowalski.controller.fleet.cluster import Cluster
from kowalski.controller.fleet.device_table import DeviceRow, DeviceTable, JobAssigned, JobReleased
from kowalski.controller.fleet.selection import select
from kowalski.controller.retry import RetryPolicy, retry_helps, with_failover
from kowalski.controller.scoring import Operation

log = logging.getLogger(__name__)
T = TypeVar("T")
# Attempts remembered per device for the cancel sent when it comes back.
_MOVED_KEPT = 10_000
# Time a cancel call may take; the device gets no work until one succeeds.
_CANCEL_TIMEOUT_S = 5.0
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
    # Attempts cancelled on an agent that came back after its work had moved elsewhere.
    cancelled_on_return: int = 0



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
        # Attempts given up on each device (it stopped answering): cancelled there when it
        # answers again, before it gets new work.
        self._moved: dict[DeviceId, list[str]] = {}
        # Devices whose last cancel failed: warned about once, not at every retry.
        self._cancel_failed: set[DeviceId] = set()

    def select(self, operation: Operation, *, language: str | None = None,
               exclude: frozenset[DeviceId] = frozenset()) -> DeviceRow:
        return select(self.cluster.table, operation, language=language,
                      exclude=exclude | self._moved.keys(), now=self.cluster.clock())

    @property
    def awaiting_cancel(self) -> frozenset[DeviceId]:
        """Devices kept from new work until their moved attempts are cancelled there."""
        return frozenset(self._moved)

    def new_attempt(self) -> str:
        """A fresh attempt id for one try of a job or cell on one device."""
        return secrets.token_hex(8)

    def moved(self, device_id: DeviceId, attempt_id: str) -> None:
        """Note an attempt given up on a device that did not answer, to cancel it there."""
        attempts = self._moved.setdefault(device_id, [])
        attempts.append(attempt_id)
        del attempts[:-_MOVED_KEPT]

    async def run(self) -> None:
        """Cancel moved attempts on each device as soon as it is healthy again."""
        while True:
            table = self.cluster.table
            back = [d for d in self._moved
                    if (row := table.devices.get(d)) is not None and row.health == "healthy"]
            gone = [d for d in self._moved if d not in table.devices]
            for device_id in gone:
                del self._moved[device_id]
                self._cancel_failed.discard(device_id)
            await asyncio.gather(*(self._cancel_moved(d) for d in back))
            await self.cluster.changed()

    async def _cancel_moved(self, device_id: DeviceId) -> None:
        attempts = list(self._moved.get(device_id, ()))
        try:
            result = await self.agents.cancel(self.cluster.url_of(device_id), attempts,
                                              timeout_s=_CANCEL_TIMEOUT_S)
        except KowalskiError as exc:
            # It stays out of selection; the next table change (a heartbeat) tries again.
            # Said once per device: an agent that just died fails every try until the
            # failure detector takes its row out.
            level = logging.DEBUG if device_id in self._cancel_failed else logging.WARNING
            self._cancel_failed.add(device_id)
            log.log(level, "could not cancel %d moved attempts on %s: %s", len(attempts),
                    device_id, exc.message)
            return
        self._cancel_failed.discard(device_id)
        remaining = self._moved.get(device_id, [])[len(attempts):]
        if remaining:
            self._moved[device_id] = remaining
        else:
            self._moved.pop(device_id, None)
        self.counters.cancelled_on_return += len(result.stopped)
        log.info("%s is back: cancelled %d attempts moved elsewhere (%d were still there)",
                 device_id, len(attempts), len(result.stopped))

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
                            language: str | None = None,
                            is_retryable: Callable[[Exception], bool] = retry_helps) -> T:
        """Try the best device; on a device fault, the next best, with backoff."""

        def rerouted(attempt: int, error: Exception, delay_ms: float) -> None:
            self.counters.rerouted += 1
            if isinstance(error, RemoteError) and error.remote_code in _BUSY_CODES:
                self.counters.busy += 1

        return await with_failover(
            lambda row: self.on_device(row.device_id, job_id, call), self._policy,
            choose=lambda exclude: self.select(operation, language=language, exclude=exclude),
            key=lambda row: row.device_id, is_retryable=is_retryable, on_retry=rerouted,
            rng=self._rng)

    async def run_job(self, request: JobRequest, *,
                      on_output: TextListener | None = None) -> JobResult:
        """Run a code job somewhere; the same job id goes with every attempt.

        With on_output the job's output streams to it; once some has, a failure is final:
        the caller has seen part of one run, so the job is not sent elsewhere.
        """
        flowed = False

        def tell(stream: str, data: str) -> None:
            nonlocal flowed
            flowed = True
            if on_output is not None:
                on_output(stream, data)

        timeout_s = (request.timeout_ms / 1000 if request.timeout_ms else DEFAULT_JOB_TIMEOUT_S)
        timeout_s += COMPILE_MARGIN_S.get(request.language, 0.0)

        async def call(row: DeviceRow) -> JobResult:
            call_timeout_s = timeout_s + CALL_MARGIN_S
            attempt = msgspec.structs.replace(request, attempt_id=self.new_attempt(),
                                              deadline=time.time() + call_timeout_s,
                                              stream=on_output is not None)
            try:
                result = await (
                    self.agents.run_job(row.url, attempt, timeout_s=call_timeout_s)
                    if on_output is None else self.agents.run_job_streamed(
                        row.url, attempt, on_output=tell, timeout_s=call_timeout_s))
            except (asyncio.CancelledError, NetworkError):
                # Given up without an answer (the device was judged down, or the network
                # failed): the job may still sit in its queue.
                self.moved(row.device_id, str(attempt.attempt_id))
                raise
            if result.status == "failed" and result.error is not None and result.error.retryable:
                raise ExecutionError(f"{row.device_id} could not run the job: "
                                     f"{result.error.message}")
            return result

        self.counters.submitted += 1
        try:
            result = await self.with_failover(
                "code_execution", request.job_id, call, language=request.language,
                is_retryable=lambda error: not flowed and retry_helps(error))
        except Exception:
            self.counters.failed += 1
            raise
        self.counters.succeeded += 1
        return result
