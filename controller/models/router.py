"""Routes model calls to the best healthy exo endpoint that has the model ready."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import msgspec

from kowalski.common.config import EndpointConfig, ExoConfig
from kowalski.common.errors import (
    KowalskiError,
    ModelNotYetAvailableError,
    NoModelAvailableError,
)
from kowalski.controller import circuit as breaker
from kowalski.controller.models.chat_types import ChatDelta, ChatRequest, ChatResult
from kowalski.controller.models.endpoints import (
    Endpoint,
    EndpointState,
    EndpointView,
    client_for,
    concurrency_limit,
)
from kowalski.controller.models.exo_errors import ModelMismatchError, ModelNotServedError
from kowalski.controller.retry import RetryPolicy, with_failover
from kowalski.controller.scoring import Operation, formula

__all__ = ["Endpoint", "EndpointState", "EndpointView", "LlmRouter"]

log = logging.getLogger(__name__)
# Time past probe_timeout_s a first model call waits for the first probes to end.
_PROBE_MARGIN_S = 0.5


class LlmRouter:
    """Keeps endpoint health and ready models fresh, and sends each call to the best one."""

    def __init__(self, *, config: ExoConfig, urls: list[str | EndpointConfig],
                 session: aiohttp.ClientSession,
                 policy: RetryPolicy, circuit_policy: breaker.CircuitPolicy, load_penalty: float,
                 clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self._config = config
        # Score taken off an endpoint per call in flight, so concurrent calls spread.
        self._load_penalty = load_penalty
        self._policy = policy
        self._circuit_policy = circuit_policy
        self._clock = clock
        self._rng = rng or random.Random()
        self.endpoints = [Endpoint(client=client_for(entry, config, session=session),
                                   limit=concurrency_limit(entry),
                                   capacity=getattr(entry, "max_concurrency", 0))
                          for entry in urls]
        self._placing: dict[str, asyncio.Task[None]] = {}
        # Set and replaced whenever a probe ends: waiters for the first probes hold the old one.
        self._probed = asyncio.Event()

    async def run(self) -> None:
        """Probe each endpoint every poll interval, independently, until cancelled."""
        async with asyncio.TaskGroup() as group:
            for endpoint in self.endpoints:
                group.create_task(self._poll(endpoint), name=f"probe {endpoint.url}")

    async def _poll(self, endpoint: Endpoint) -> None:
        while True:
            await self.probe(endpoint)
            await asyncio.sleep(self._config.poll_interval_s)

    async def refresh(self) -> None:
        await asyncio.gather(*(self.probe(endpoint) for endpoint in self.endpoints))

    async def probe(self, endpoint: Endpoint) -> None:
        """One bounded probe: a hung endpoint is down after probe_timeout_s, not later."""
        started = self._clock()
        limit_s = self._config.probe_timeout_s
        try:
            async with asyncio.timeout(limit_s):
                await self._refresh(endpoint)
        except TimeoutError:
            if endpoint.state != "down" or not endpoint.last_error.startswith("no answer"):
                log.warning("exo endpoint %s: no answer to its probe within %g s; down until "
                            "it answers", endpoint.url, limit_s)
            endpoint.healthy = False
            endpoint.last_error = f"no answer to the health probe within {limit_s:g} s"
        else:
            elapsed_s = self._clock() - started
            if elapsed_s > self._config.probe_slow_s and not endpoint.slow:
                log.warning("exo endpoint %s: probe took %.1f s", endpoint.url, elapsed_s)
            endpoint.slow = elapsed_s > self._config.probe_slow_s
        was = endpoint.state
        endpoint.state = "up" if endpoint.healthy else "down"
        if was != endpoint.state and endpoint.state == "up":
            log.info("exo endpoint %s is up", endpoint.url)
        probed, self._probed = self._probed, asyncio.Event()
        probed.set()

    async def first_probes(self) -> None:
        """Wait until an endpoint is up or none is on its first probe (at most one probe)."""
        if self._probes_done():
            # Every call after the first probes: no timer to arm.
            return
        # Bounded: a router whose probes never run answers with its error, not a hang.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._config.probe_timeout_s + _PROBE_MARGIN_S):
                while not self._probes_done():
                    await self._probed.wait()

    def _probes_done(self) -> bool:
        # `state` changes when a probe is over; `healthy` is set half-way through it,
        # before the endpoint's models are known.
        return any(e.state == "up" for e in self.endpoints) or not any(
            e.state == "probing" for e in self.endpoints)

    async def _refresh(self, endpoint: Endpoint) -> None:
        health = await endpoint.client.health()
        endpoint.healthy = health.ok
        endpoint.flavour = health.flavour or ""
        if not health.ok:
            endpoint.last_error = health.error
            return
        endpoint.observe_latency(health.latency_ms)
        try:
            ready = await endpoint.client.ready_models()
            endpoint.ready_models = tuple(sorted(m.model_id for m in ready))
            nodes = await endpoint.client.nodes()
            endpoint.nodes = len(nodes)
            endpoint.node_ids = frozenset(n.node_id for n in nodes)
        except KowalskiError as exc:
            endpoint.last_error = exc.message

    def views(self) -> list[EndpointView]:
        now = self._clock()
        return [EndpointView(
            url=e.url, state=e.state, healthy=e.healthy, flavour=e.flavour,
            latency_ms=e.latency_ms, ready_models=list(e.ready_models), nodes=e.nodes,
            cluster=e.cluster, in_flight=e.in_flight,
            circuit=breaker.phase(e.circuit, now, self._circuit_policy),
            requests=e.client.stats.requests, errors=e.client.stats.errors,
            prompt_tokens=e.client.stats.prompt_tokens,
            completion_tokens=e.client.stats.completion_tokens, last_error=e.last_error,
        ) for e in self.endpoints]

    def ready_models(self) -> list[str]:
        return sorted({m for e in self.endpoints if e.healthy for m in e.ready_models})

    def resolve_model(self, model: str) -> str:
        """The model to use: as asked, else the configured default, else any ready one."""
        if model:
            return model
        if self._config.default_model:
            return self._config.default_model
        ready = self.ready_models()
        if not ready:
            down = [f"{e.url}: {e.last_error}" for e in self.endpoints if not e.healthy]
            if down and len(down) == len(self.endpoints):
                raise NoModelAvailableError(f"every model endpoint is down ({'; '.join(down)})")
            raise NoModelAvailableError(
                "no endpoint has a model known to be ready: set exo.default_model, or list "
                "the models of each endpoint (exo v0 calls every model ready)")
        return ready[0]

    def choose(self, model: str, operation: Operation,
               exclude: frozenset[str] = frozenset()) -> Endpoint:
        """The best endpoint for the call, or an error naming why there is none."""
        now = self._clock()
        if not self.endpoints:
            raise NoModelAvailableError("no exo endpoint configured")
        healthy = [e for e in self.endpoints if e.healthy]
        if not healthy and any(e.state == "probing" for e in self.endpoints):
            raise NoModelAvailableError("the exo endpoints are still being probed")
        if not healthy:
            # The next health check may find one back.
            raise ModelNotYetAvailableError(f"all {len(self.endpoints)} exo endpoints are down",
                                            wait_s=self._config.poll_interval_s)
        serving = [e for e in healthy if model in e.ready_models
                   and e.client.served.allows(model)]
        if not serving:
            # exo v0 calls every card ready: only asking shows whether it serves the model.
            serving = [e for e in healthy if e.flavour == "v0" and e.client.served.allows(model)]
        if not serving:
            refused = [f"{e.url}: {e.last_error}" for e in healthy
                       if e.client.served.is_refused(model)]
            raise NoModelAvailableError(
                f"no healthy exo endpoint has {model!r} ready "
                f"(ready: {', '.join(self.ready_models()) or 'none'})"
                + (f"; refused by {'; '.join(refused)}" if refused else ""))
        policy = self._circuit_policy
        open_ok = [e for e in serving if e.url not in exclude
                   and breaker.allows(e.circuit_for(operation), now, policy)]
        if not open_ok:
            reason = f"every endpoint serving {model!r} has failed or has its circuit open"
            shut = [e.circuit_for(operation) for e in serving if e.url not in exclude]
            if not shut or any(c.state == "closed" for c in shut):
                raise NoModelAvailableError(reason)
            # Only open circuits stand in the way: say when the first one lets a probe by
            # (already, when one is half-open with its probe out).
            wait_s = min(max(c.opened_at + policy.reset_s - now, 0.0) for c in shut)
            raise ModelNotYetAvailableError(reason, wait_s=wait_s, probe_pending=wait_s <= 0)
        if len(open_ok) == 1:
            # Nothing to weigh: every call of a one-endpoint setup comes this way.
            return open_ok[0]
        # Endpoints of one cluster share its machines, so they share its load and capacity.
        # One without a limit of its own counts as able to take exo.max_concurrency calls.
        load = {e.cluster: 0 for e in self.endpoints}
        capacity = dict.fromkeys(load, 0)
        for e in self.endpoints:
            load[e.cluster] += e.in_flight
            capacity[e.cluster] += e.capacity or self._config.max_concurrency

        def rank(e: Endpoint) -> tuple[float, float]:
            # Least work in flight against capacity, weighed by the time one call takes
            # there: the expected wait of one more call. Endpoints then get work in
            # proportion to capacity and speed, and a full one queues only when all are.
            # Between equals, the faster one, less its load.
            share = (load[e.cluster] + 1) / capacity[e.cluster]
            return (-share * max(e.latency_ms or 0.0, 1.0), formula(
                operation, latency_ms=e.latency_ms or 0.0, memory_free_fraction=0.0,
            ) - self._load_penalty * load[e.cluster])

        return max(open_ok, key=rank)

    async def _ensure_model(self, model: str) -> None:
        """Place an instance of a model nobody serves, when the config allows it."""
        if not self._config.place_instances or any(
                model in e.ready_models for e in self.endpoints if e.healthy):
            return
        task = self._placing.get(model)
        if task is None:
            task = self._placing[model] = asyncio.create_task(self._place(model))
            task.add_done_callback(lambda _: self._placing.pop(model, None))
        await asyncio.shield(task)

    async def _place(self, model: str) -> None:
        for endpoint in self.endpoints:
            if endpoint.healthy and endpoint.flavour == "v1":
                log.info("placing an instance of %s on %s", model, endpoint.url)
                placed = await endpoint.client.place_instance(model)
                await endpoint.client.wait_ready(model, self._config.request_timeout_s,
                                                 instance_id=placed.instance_id)
                await self._refresh(endpoint)
                return
        raise NoModelAvailableError(f"no exo v1 endpoint can place {model!r}")

    async def chat(self, request: ChatRequest, *, operation: str = "llm_inference"
                   ) -> ChatResult:
        """One completion, retried on another endpoint when one fails."""
        await self.first_probes()
        model = self.resolve_model(request.model)
        if model != request.model:
            request = msgspec.structs.replace(request, model=model)
        await self._ensure_model(model)
        op: Operation = "context_compression" if operation == "context_compression" \
            else "llm_inference"
        return await with_failover(
            lambda endpoint: self._call(endpoint, request, op), self._policy,
            choose=lambda exclude: self.choose(model, op, exclude),
            key=lambda endpoint: endpoint.url, rng=self._rng)

    async def _call(self, endpoint: Endpoint, request: ChatRequest,
                    operation: Operation = "llm_inference") -> ChatResult:
        job_id = self._begin(endpoint, operation, request)
        try:
            async with endpoint.limit or contextlib.nullcontext():
                result = await endpoint.client.chat(request)
        except BaseException as exc:
            self._settle(endpoint, operation, job_id, request.model, exc)
            raise
        finally:
            endpoint.in_flight -= 1
        self._settle(endpoint, operation, job_id, request.model, None)
        endpoint.observe_latency(result.latency_ms)
        return result

    def _begin(self, endpoint: Endpoint, operation: Operation, request: ChatRequest) -> str:
        """Count a call against the endpoint's circuit and work in flight; its attempt id."""
        job_id = f"chat-{id(request)}"
        endpoint.set_circuit(operation, breaker.on_attempt(
            endpoint.circuit_for(operation), self._clock(), self._circuit_policy,
            job_id=job_id))
        endpoint.in_flight += 1
        return job_id

    def _settle(self, endpoint: Endpoint, operation: Operation, job_id: str, model: str,
                error: BaseException | None) -> None:
        """What one call's outcome says about the endpoint's circuit and models."""
        policy, now = self._circuit_policy, self._clock()
        circuit = endpoint.circuit_for(operation)
        if error is not None and not isinstance(error, KowalskiError):
            # A cancelled (or crashed) call settles nothing; without this the circuit
            # would wait forever for the probe's outcome.
            endpoint.set_circuit(operation, breaker.on_abandon(circuit, job_id=job_id))
            return
        if isinstance(error, ModelNotServedError | ModelMismatchError):
            # The endpoint is fine; it just does not serve this model.
            endpoint.ready_models = tuple(m for m in endpoint.ready_models if m != model)
            endpoint.last_error = error.message
        elif error is not None and error.is_recoverable:
            endpoint.set_circuit(operation, breaker.on_failure(circuit, now, policy))
            endpoint.last_error = error.message
            return
        endpoint.set_circuit(operation, breaker.on_success(circuit, now, policy))
        if error is None and model not in endpoint.ready_models:
            endpoint.ready_models = tuple(sorted({*endpoint.ready_models, model}))

    async def chat_stream(self, request: ChatRequest) -> AsyncIterator[ChatDelta]:
        """A streamed completion from the best endpoint (no failover once text flowed).

        The stream counts for the endpoint's circuit and latency as a plain call does, so a
        caller that falls back to `chat` after a failed stream is sent elsewhere.
        """
        await self.first_probes()
        model = self.resolve_model(request.model)
        request = msgspec.structs.replace(request, model=model)
        await self._ensure_model(model)
        endpoint = self.choose(model, "llm_inference")
        job_id = self._begin(endpoint, "llm_inference", request)
        started = time.monotonic()
        try:
            async with endpoint.limit or contextlib.nullcontext():
                async for delta in endpoint.client.chat_stream(request):
                    yield delta
        except BaseException as exc:
            self._settle(endpoint, "llm_inference", job_id, model, exc)
            raise
        finally:
            endpoint.in_flight -= 1
        self._settle(endpoint, "llm_inference", job_id, model, None)
        endpoint.observe_latency((time.monotonic() - started) * 1000)

    async def close(self) -> None:
        for task in self._placing.values():
            task.cancel()
        for endpoint in self.endpoints:
            await endpoint.client.close()
