"""Routes model calls to the best healthy exo endpoint that has the model ready."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp
import msgspec

from kowalski.common.config import ExoConfig
from kowalski.common.errors import (
    KowalskiError,
    ModelNotYetAvailableError,
    NoModelAvailableError,
)
from kowalski.controller import circuit as breaker
from kowalski.controller.models.chat_types import ChatDelta, ChatRequest, ChatResult
from kowalski.controller.models.exo_client import ExoClient
from kowalski.controller.retry import RetryPolicy, with_failover
from kowalski.controller.scoring import Operation, formula

log = logging.getLogger(__name__)
# Latency moving-average weight of the newest sample.
_ALPHA = 0.3


@dataclass
class Endpoint:
    """What the router knows of one exo endpoint."""

    client: ExoClient
    healthy: bool = False
    flavour: str = ""
    latency_ms: float | None = None
    ready_models: tuple[str, ...] = ()
    nodes: int = 0
    last_error: str = ""
    in_flight: int = 0
    # The circuit the run's own model calls depend on (what the status shows).
    circuit: breaker.Circuit = field(default_factory=lambda: breaker.CLOSED)
    # Folding summaries keep their own failure count: a failing summariser must not shut
    # the endpoint for the calls a run cannot do without.
    summary_circuit: breaker.Circuit = field(default_factory=lambda: breaker.CLOSED)

    @property
    def url(self) -> str:
        return self.client.base_url

    def circuit_for(self, operation: Operation) -> breaker.Circuit:
        """The circuit that counts this operation's failures."""
        return self.summary_circuit if operation == "context_compression" else self.circuit

    def set_circuit(self, operation: Operation, circuit: breaker.Circuit) -> None:
        if operation == "context_compression":
            self.summary_circuit = circuit
        else:
            self.circuit = circuit

    def observe_latency(self, latency_ms: float) -> None:
        if self.latency_ms is None:
            self.latency_ms = latency_ms
        else:
            self.latency_ms = (1 - _ALPHA) * self.latency_ms + _ALPHA * latency_ms


class EndpointView(msgspec.Struct, frozen=True, kw_only=True):
    """An endpoint as the status API shows it."""

    url: str
    healthy: bool
    flavour: str
    latency_ms: float | None
    ready_models: list[str]
    nodes: int
    in_flight: int
    circuit: str
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    last_error: str


class LlmRouter:
    """Keeps endpoint health and ready models fresh, and sends each call to the best one."""

    def __init__(self, *, config: ExoConfig, urls: list[str], session: aiohttp.ClientSession,
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
        self.endpoints = [Endpoint(client=ExoClient.from_config(url, config, session=session))
                          for url in urls]
        self._placing: dict[str, asyncio.Task[None]] = {}

    async def run(self) -> None:
        """Refresh every endpoint each poll interval until cancelled."""
        while True:
            await self.refresh()
            await asyncio.sleep(self._config.poll_interval_s)

    async def refresh(self) -> None:
        await asyncio.gather(*(self._refresh(endpoint) for endpoint in self.endpoints))

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
            endpoint.nodes = len(await endpoint.client.nodes())
        except KowalskiError as exc:
            endpoint.last_error = exc.message

    def views(self) -> list[EndpointView]:
        now = self._clock()
        return [EndpointView(
            url=e.url, healthy=e.healthy, flavour=e.flavour, latency_ms=e.latency_ms,
            ready_models=list(e.ready_models), nodes=e.nodes, in_flight=e.in_flight,
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
            raise NoModelAvailableError("no exo endpoint has a model ready")
        return ready[0]

    def choose(self, model: str, operation: Operation,
               exclude: frozenset[str] = frozenset()) -> Endpoint:
        """The best endpoint for the call, or an error naming why there is none."""
        now = self._clock()
        if not self.endpoints:
            raise NoModelAvailableError("no exo endpoint configured")
        healthy = [e for e in self.endpoints if e.healthy]
        if not healthy:
            # The next health check may find one back.
            raise ModelNotYetAvailableError(f"all {len(self.endpoints)} exo endpoints are down",
                                            wait_s=self._config.poll_interval_s)
        serving = [e for e in healthy if model in e.ready_models]
        if not serving:
            raise NoModelAvailableError(
                f"no healthy exo endpoint has {model!r} ready "
                f"(ready: {', '.join(self.ready_models()) or 'none'})")
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
        return max(open_ok, key=lambda e: formula(
            operation, latency_ms=e.latency_ms or 0.0, memory_free_fraction=0.0,
        ) - self._load_penalty * e.in_flight)

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
                await endpoint.client.place_instance(model)
                await endpoint.client.wait_ready(model, self._config.request_timeout_s)
                await self._refresh(endpoint)
                return
        raise NoModelAvailableError(f"no exo v1 endpoint can place {model!r}")

    async def chat(self, request: ChatRequest, *, operation: str = "llm_inference"
                   ) -> ChatResult:
        """One completion, retried on another endpoint when one fails."""
        model = self.resolve_model(request.model)
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
        policy, job_id = self._circuit_policy, f"chat-{id(request)}"
        endpoint.set_circuit(operation, breaker.on_attempt(
            endpoint.circuit_for(operation), self._clock(), policy, job_id=job_id))
        endpoint.in_flight += 1
        try:
            result = await endpoint.client.chat(request)
        except asyncio.CancelledError:
            # A cancelled probe settles nothing; without this the circuit would wait forever.
            endpoint.set_circuit(operation, breaker.on_abandon(
                endpoint.circuit_for(operation), job_id=job_id))
            raise
        except KowalskiError as exc:
            if exc.is_recoverable:
                endpoint.set_circuit(operation, breaker.on_failure(
                    endpoint.circuit_for(operation), self._clock(), policy))
                endpoint.last_error = exc.message
            else:
                endpoint.set_circuit(operation, breaker.on_success(
                    endpoint.circuit_for(operation), self._clock(), policy))
            raise
        finally:
            endpoint.in_flight -= 1
        endpoint.set_circuit(operation, breaker.on_success(
            endpoint.circuit_for(operation), self._clock(), policy))
        endpoint.observe_latency(result.latency_ms)
        return result

    async def chat_stream(self, request: ChatRequest) -> AsyncIterator[ChatDelta]:
        """A streamed completion from the best endpoint (no failover once text flowed)."""
        model = self.resolve_model(request.model)
        request = msgspec.structs.replace(request, model=model)
        await self._ensure_model(model)
        endpoint = self.choose(model, "llm_inference")
        endpoint.in_flight += 1
        try:
            async for delta in endpoint.client.chat_stream(request):
                yield delta
        finally:
            endpoint.in_flight -= 1

    async def close(self) -> None:
        for task in self._placing.values():
            task.cancel()
        for endpoint in self.endpoints:
            await endpoint.client.close()
