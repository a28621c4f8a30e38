"""A model endpoint: from its config entry to a client, and what the router knows of it."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import aiohttp
import msgspec

from kowalski.common.config import EndpointConfig, ExoConfig
from kowalski.common.errors import ConfigError
from kowalski.controller import circuit as breaker
from kowalski.controller.models.exo_client import ExoClient
from kowalski.controller.scoring import Operation


def read_api_key(endpoint: EndpointConfig) -> str:
    """The endpoint's API key from its file or environment variable; empty when it has none."""
    if endpoint.api_key_env:
        key = os.environ.get(endpoint.api_key_env, "").strip()
        if not key:
            raise ConfigError(
                f"the environment variable {endpoint.api_key_env} holding the API key of "
                f"{endpoint.url} is not set", key="exo.endpoints.api_key_env")
        return key
    if not endpoint.api_key_file:
        return ""
    path = Path(endpoint.api_key_file).expanduser()
    try:
        key = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not text"
        raise ConfigError(f"cannot read the API key of {endpoint.url}: {reason}",
                          path=str(path)) from None
    if not key:
        raise ConfigError(f"the API key file of {endpoint.url} is empty", path=str(path))
    return key


def client_for(
    entry: str | EndpointConfig, config: ExoConfig, *, session: aiohttp.ClientSession | None,
) -> ExoClient:
    """A client for one `exo.endpoints` entry, with its key and models."""
    endpoint = entry if isinstance(entry, EndpointConfig) else EndpointConfig(url=entry)
    return ExoClient.from_config(endpoint.url, config, session=session,
                                 api_key=read_api_key(endpoint), models=tuple(endpoint.models))


# Latency moving-average weight of the newest sample.
_ALPHA = 0.3
# probing: not yet answered its first probe; up: answered the last one; down: did not.
EndpointState = Literal["probing", "up", "down"]


@dataclass
class Endpoint:
    """What the router knows of one exo endpoint."""

    client: ExoClient
    state: EndpointState = "probing"
    healthy: bool = False
    # The last probe was slow: warned once, not at every poll.
    slow: bool = False
    flavour: str = ""
    latency_ms: float | None = None
    ready_models: tuple[str, ...] = ()
    nodes: int = 0
    last_error: str = ""
    in_flight: int = 0
    # The circuit the run's own model calls depend on (what the status shows).
    circuit: breaker.Circuit = field(default_factory=lambda: breaker.CLOSED)
    # The machines behind it: endpoints reporting the same ones are one cluster.
    node_ids: frozenset[str] = frozenset()
    # Calls in flight at once here, from the endpoint's config; None: no limit of its own.
    limit: asyncio.Semaphore | None = None
    # The same number, for choosing by work against capacity; 0: no limit of its own.
    capacity: int = 0
    # Folding summaries keep their own failure count: a failing summariser must not shut
    # the endpoint for the calls a run cannot do without.
    summary_circuit: breaker.Circuit = field(default_factory=lambda: breaker.CLOSED)

    @property
    def url(self) -> str:
        return self.client.base_url

    @property
    def cluster(self) -> str:
        """One name per cluster: its first node id, or the URL before the nodes are known."""
        return min(self.node_ids) if self.node_ids else self.url

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
    state: EndpointState
    healthy: bool
    flavour: str
    latency_ms: float | None
    ready_models: list[str]
    nodes: int
    # Endpoints of one cluster (the same nodes) share this name.
    cluster: str = ""
    in_flight: int
    circuit: str
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    last_error: str


def concurrency_limit(entry: str | EndpointConfig) -> asyncio.Semaphore | None:
    if isinstance(entry, EndpointConfig) and entry.max_concurrency:
        return asyncio.Semaphore(entry.max_concurrency)
    return None
