"""One connection to a model server: HTTP plumbing, API detection, health and the model view."""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Self, TypeVar
from urllib.parse import urlsplit

import aiohttp
import msgspec

from kowalski.common.config import ExoConfig
from kowalski.common.errors import ExoApiError, KowalskiError, NetworkError, ParseError
from kowalski.controller.models.exo_errors import (
    EndpointAuthError,
    ExoTimeoutError,
    FirstByteTimeoutError,
    IncompleteAnswerError,
    MalformedAnswerError,
    UnsupportedFlavourError,
    http_error,
)
from kowalski.controller.models.exo_types import (
    ClusterState,
    Flavour,
    Health,
    ModelId,
    ModelInfo,
    NodeId,
    NodeInfo,
    parse_model_list,
    parse_state,
    parse_v0_topology,
)
from kowalski.controller.models.served_models import ServedModels

T = TypeVar("T")

CHAT_PATH = "/v1/chat/completions"
_JSON_HEADERS = {"Content-Type": "application/json"}
# Bodies past this go as a stream: aiohttp warns that sending a large bytes body at once
# blocks the event loop.
_STREAM_FROM_BYTES = 512 * 1024
# A cheap GET per flavour that answers whenever the server is up; an OpenAI-compatible
# server may have no /health (it is not part of the OpenAI API): /v1/models then.
# The sub-trees of exo v1's /state a poll reads: the rest (most of it `downloads`) is
# left on the server.
READY_PARTS = ("instances", "runners")
NODE_PARTS = ("topology", "lastSeen", "nodeIdentities", "nodeMemory")
_HEALTH_PATHS: dict[Flavour, str] = {"v1": "/node_id", "v0": "/healthcheck", "openai": "/health"}


@dataclass
class ClientStats:
    """Running totals over one client's calls; detection and health probes are left out."""

    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_latency_ms: float = 0.0


class EndpointConnection:
    """One endpoint: the HTTP calls, flavour detection, health, nodes and models."""

    def __init__(
        self,
        base_url: str,
        *,
        session: aiohttp.ClientSession | None = None,
        flavour: Flavour | None = None,
        connect_timeout_s: float = 5.0,
        request_timeout_s: float = 300.0,
        poll_interval_s: float = 2.0,
        first_byte_timeout_s: float | None = None,
        api_key: str = "",
        models: tuple[str, ...] = (),
        unservable_model_s: float = 300.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.stats = ClientStats()
        self.served = ServedModels(allowed=models, unservable_s=unservable_model_s)
        self.poll_interval_s = poll_interval_s
        # exo v1's node id, learnt during detection.
        self.node_id: str | None = None
        self._session = session
        self._owns_session = session is None
        self._closed = False
        self._flavour: Flavour | None = flavour
        self._detect_lock = asyncio.Lock()
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s, connect=connect_timeout_s)
        self._first_byte_s = first_byte_timeout_s
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # Set when exo v1 has no GET /state/{path}: polls then read the whole state.
        self._whole_state_only = False
        # Whether an OpenAI-compatible server has GET /health; None until asked.
        self._has_health: bool | None = None

    @classmethod
    def from_config(
        cls, base_url: str, config: ExoConfig, *, session: aiohttp.ClientSession | None = None,
        api_key: str = "", models: tuple[str, ...] = (),
    ) -> Self:
        """A client with the timeouts and poll interval of the [exo] config section."""
        return cls(
            base_url, session=session, connect_timeout_s=config.connect_timeout_s,
            request_timeout_s=config.request_timeout_s, poll_interval_s=config.poll_interval_s,
            first_byte_timeout_s=config.first_byte_timeout_s, api_key=api_key, models=models,
            unservable_model_s=config.unservable_model_s,
        )

    @property
    def flavour(self) -> Flavour | None:
        """The detected flavour, or None before detection."""
        return self._flavour

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session if this client made it; safe to call more than once."""
        self._closed = True
        if self._owns_session and self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _http(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError(f"the client for {self.base_url} is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    def _failed(self, error: KowalskiError, record: bool = True) -> KowalskiError:
        if record:
            self.stats.errors += 1
        return error

    async def _open(
        self, stack: contextlib.AsyncExitStack, method: str, url: str, body: bytes | None,
        *, first_byte: bool = False,
    ) -> aiohttp.ClientResponse:
        """Send a request and wait for the answer's head, within the first-byte timeout."""
        headers = {**_JSON_HEADERS, **self._auth} if body is not None else self._auth
        data = io.BytesIO(body) if body is not None and len(body) > _STREAM_FROM_BYTES else body
        limit = self._first_byte_s if first_byte else None
        deadline = asyncio.timeout(limit)
        try:
            async with deadline:
                return await stack.enter_async_context(self._http().request(
                    method, url, data=data, headers=headers or None, timeout=self._timeout,
                ))
        except TimeoutError:
            if limit is not None and deadline.expired():
                raise FirstByteTimeoutError(
                    f"{method} {url}: no answer began within {limit:g} s") from None
            raise

    async def _call(
        self, method: str, path: str, *, body: bytes | None = None, record: bool = True,
        first_byte: bool = False,
    ) -> tuple[bytes, float]:
        """One request and its latency in ms; answers of 400 and above raise typed errors."""
        url = self.base_url + path
        if record:
            self.stats.requests += 1
        started = time.monotonic()
        arrived = bytearray()
        try:
            async with contextlib.AsyncExitStack() as stack:
                response = await self._open(stack, method, url, body, first_byte=first_byte)
                status = response.status
                # Chunk by chunk, so that an answer cut short can say what did arrive.
                async for chunk in response.content.iter_any():
                    arrived += chunk
                data = bytes(arrived)
        except aiohttp.ClientPayloadError as exc:
            # exo raises a runner's error after the 200 headers: the body just stops.
            text = arrived.decode("utf-8", "replace")
            broken = IncompleteAnswerError(
                f"{method} {url}", f"the body broke off after {len(arrived)} bytes ({exc})", text)
            raise self._failed(broken, record) from exc
        except FirstByteTimeoutError as exc:
            raise self._failed(exc, record) from None
        except TimeoutError as exc:
            error = ExoTimeoutError(f"{method} {url}: no answer within {self._timeout.total:g} s")
            raise self._failed(error, record) from exc
        except aiohttp.ClientError as exc:
            raise self._failed(NetworkError(f"{method} {url} failed: {exc}"), record) from exc
        latency_ms = (time.monotonic() - started) * 1000
        if record:
            self.stats.total_latency_ms += latency_ms
        if status >= 400:
            raise self._failed(http_error(status, data, url), record)
        return data, latency_ms

    def _parse(self, parser: Callable[[bytes, str], T], data: bytes, path: str) -> T:
        try:
            return parser(data, self.base_url + path)
        except ParseError as exc:
            # Not the caller's input that is wrong but the server's answer: another may do.
            malformed = MalformedAnswerError(exc.message, url=self.base_url + path)
            raise self._failed(malformed) from None

    # --- detection and the uniform view ----------------------------------------------------

    async def detect(self) -> Flavour:
        """Which API the endpoint speaks, probed once and cached."""
        if self._flavour is None:
            async with self._detect_lock:
                if self._flavour is None:
                    self._flavour = await self._probe()
        return self._flavour

    async def _probe(self) -> Flavour:
        notes = []
        for path in ("/node_id", "/healthcheck", "/v1/models"):
            try:
                data, _ = await self._call("GET", path, record=False)
                value = msgspec.json.decode(data)
            except EndpointAuthError:
                raise
            except ExoApiError as exc:
                notes.append(f"{path}: HTTP {exc.status}")
                continue
            except msgspec.DecodeError:
                notes.append(f"{path}: not JSON")
                continue
            if path == "/node_id" and isinstance(value, str):
                self.node_id = value
                return "v1"
            if path == "/healthcheck" and isinstance(value, dict) and value.get("status") == "ok":
                return "v0"
            listed = value.get("data") if isinstance(value, dict) else None
            if path == "/v1/models" and isinstance(listed, list):
                # An exo v0 too old for /healthcheck still marks its models `ready`.
                marked = any(isinstance(m, dict) and "ready" in m for m in listed)
                return "v0" if marked else "openai"
            notes.append(f"{path}: unexpected answer")
        body = f"not an exo or OpenAI-compatible API ({'; '.join(notes)})"
        raise ExoApiError(404, body, url=self.base_url)

    async def health(self) -> Health:
        """Probe the endpoint; never raises, and says how long the answer took."""
        started = time.monotonic()
        try:
            flavour = await self.detect()
            path = _HEALTH_PATHS[flavour]
            if flavour == "openai" and self._has_health is False:
                path = "/v1/models"
            try:
                _, latency_ms = await self._call("GET", path, record=False)
            except ExoApiError as exc:
                if path != "/health" or exc.status != 404 or self._has_health:
                    raise
                # Not part of the OpenAI API: many servers have none. Never asked again.
                self._has_health = False
                _, latency_ms = await self._call("GET", "/v1/models", record=False)
            else:
                if path == "/health":
                    self._has_health = True
        except KowalskiError as exc:
            latency_ms = (time.monotonic() - started) * 1000
            return Health(ok=False, latency_ms=latency_ms, flavour=self._flavour, error=exc.message)
        return Health(ok=True, latency_ms=latency_ms, flavour=flavour)

    async def _require_v1(self, what: str) -> None:
        flavour = await self.detect()
        if flavour != "v1":
            raise UnsupportedFlavourError(f"{what} needs exo v1; {self.base_url} speaks {flavour}")

    async def state(self, parts: tuple[str, ...] | None = None) -> ClusterState:
        """exo v1's cluster state; with `parts`, only those sub-trees (GET /state/{part})."""
        await self._require_v1("GET /state")
        if parts is None or self._whole_state_only:
            data, _ = await self._call("GET", "/state")
            return self._parse(parse_state, data, "/state")
        try:
            answers = await asyncio.gather(*(self._call("GET", f"/state/{p}") for p in parts))
        except ExoApiError as exc:
            if exc.status != 404:
                raise
            # An exo older than /state/{path}: the whole state, from now on.
            self._whole_state_only = True
            return await self.state()
        joined = b",".join(b'"%s":%s' % (p.encode(), data) for p, (data, _) in zip(
            parts, answers, strict=True))
        return self._parse(parse_state, b"{" + joined + b"}", f"/state/{{{','.join(parts)}}}")

    async def nodes(self) -> list[NodeInfo]:
        """The machines behind the endpoint; a plain OpenAI server counts as one."""
        flavour = await self.detect()
        if flavour == "v1":
            return list((await self.state(NODE_PARTS)).nodes)
        if flavour == "v0":
            data, _ = await self._call("GET", "/v1/topology")
            return self._parse(parse_v0_topology, data, "/v1/topology")
        return [NodeInfo(node_id=NodeId(self.base_url), name=urlsplit(self.base_url).netloc)]

    async def models(self) -> list[ModelInfo]:
        """Every model the endpoint lists, each marked ready or not."""
        flavour = await self.detect()
        if flavour != "v1":
            data, _ = await self._call("GET", "/v1/models")
            listed = self._parse(parse_model_list, data, "/v1/models")
            # exo v0 marks every card ready: only an answer shows a model is served.
            known = set(self.served.known([] if flavour == "v0" else
                                          [m.model_id for m in listed]))
            return [msgspec.structs.replace(m, ready=m.model_id in known) for m in listed]
        ready = (await self.state(READY_PARTS)).ready_models()
        ready_ids = frozenset(m.model_id for m in ready)
        data, _ = await self._call("GET", "/models")
        listed = self._parse(
            lambda d, s: parse_model_list(d, s, ready=ready_ids), data, "/models",
        )
        known = {m.model_id for m in listed}
        return listed + [m for m in ready if m.model_id not in known]

    async def ready_models(self) -> list[ModelInfo]:
        """Models that can answer now: as configured, exo v1's Ready ones, or (v0) answered."""
        if self.served.allowed:
            return [ModelInfo(model_id=ModelId(m), ready=True, name=m.rsplit("/", 1)[-1])
                    for m in self.served.allowed]
        if await self.detect() == "v1":
            return (await self.state(READY_PARTS)).ready_models()
        return [m for m in await self.models() if m.ready]
