"""Client for exo's HTTP API (v1 and v0) and for plain OpenAI-compatible servers (llama-server)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal, TypeVar
from urllib.parse import quote, urlsplit

import aiohttp
import msgspec

from kowalski.common.config import ExoConfig
from kowalski.common.errors import ExoApiError, KowalskiError, NetworkError, ParseError
from kowalski.controller.models.chat_types import (
    ChatDelta,
    ChatRequest,
    ChatResult,
    SseDecoder,
    Usage,
    WireCompletion,
    encode_request,
)
from kowalski.controller.models.exo_errors import (
    ExoTimeoutError,
    IncompleteStreamError,
    InstanceNotReadyError,
    MalformedAnswerError,
    StreamError,
    UnsupportedFlavourError,
    http_error,
    in_band_error,
)
from kowalski.controller.models.exo_types import (
    ClusterState,
    Flavour,
    Health,
    ModelId,
    ModelInfo,
    NodeId,
    NodeInfo,
    PlacementResult,
    decode,
    parse_model_list,
    parse_state,
    parse_v0_topology,
)

T = TypeVar("T")
Sharding = Literal["Pipeline", "Tensor"]
InstanceMeta = Literal["MlxRing", "MlxJaccl"]

CHAT_PATH = "/v1/chat/completions"
_JSON_HEADERS = {"Content-Type": "application/json"}
# A cheap GET per flavour that answers whenever the server is up.
_HEALTH_PATHS: dict[Flavour, str] = {"v1": "/node_id", "v0": "/healthcheck", "openai": "/health"}


class _CommandAnswer(msgspec.Struct, frozen=True, kw_only=True):
    command_id: str
    message: str = ""


@dataclass
class ClientStats:
    """Running totals over one client's calls; detection and health probes are left out."""

    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_latency_ms: float = 0.0


async def _payloads(response: aiohttp.ClientResponse) -> AsyncGenerator[str, None]:
    decoder = SseDecoder()
    # iter_any, not line iteration: aiohttp caps line length, and a data line has no cap.
    async for chunk in response.content.iter_any():
        for payload in decoder.feed(chunk):
            yield payload
    for payload in decoder.close():
        yield payload


class ExoClient:
    """One endpoint: flavour detection, cluster view, chat, and instance placement."""

    def __init__(
        self,
        base_url: str,
        *,
        session: aiohttp.ClientSession | None = None,
        flavour: Flavour | None = None,
        connect_timeout_s: float = 5.0,
        request_timeout_s: float = 300.0,
        poll_interval_s: float = 2.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.stats = ClientStats()
        self.poll_interval_s = poll_interval_s
        # exo v1's node id, learnt during detection.
        self.node_id: str | None = None
        self._session = session
        self._owns_session = session is None
        self._closed = False
        self._flavour: Flavour | None = flavour
        self._detect_lock = asyncio.Lock()
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s, connect=connect_timeout_s)

    @classmethod
    def from_config(
        cls, base_url: str, config: ExoConfig, *, session: aiohttp.ClientSession | None = None,
    ) -> ExoClient:
        """A client with the timeouts and poll interval of the [exo] config section."""
        return cls(
            base_url, session=session, connect_timeout_s=config.connect_timeout_s,
            request_timeout_s=config.request_timeout_s, poll_interval_s=config.poll_interval_s,
        )

    @property
    def flavour(self) -> Flavour | None:
        """The detected flavour, or None before detection."""
        return self._flavour

    async def __aenter__(self) -> ExoClient:
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

    async def _call(
        self, method: str, path: str, *, body: bytes | None = None, record: bool = True,
    ) -> tuple[bytes, float]:
        """One request and its latency in ms; answers of 400 and above raise typed errors."""
        url = self.base_url + path
        if record:
            self.stats.requests += 1
        started = time.monotonic()
        headers = _JSON_HEADERS if body is not None else None
        try:
            async with self._http().request(
                method, url, data=body, headers=headers, timeout=self._timeout,
            ) as response:
                data = await response.read()
                status = response.status
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
            _, latency_ms = await self._call("GET", _HEALTH_PATHS[flavour], record=False)
        except KowalskiError as exc:
            latency_ms = (time.monotonic() - started) * 1000
            return Health(ok=False, latency_ms=latency_ms, flavour=self._flavour, error=exc.message)
        return Health(ok=True, latency_ms=latency_ms, flavour=flavour)

    async def _require_v1(self, what: str) -> None:
        flavour = await self.detect()
        if flavour != "v1":
            raise UnsupportedFlavourError(f"{what} needs exo v1; {self.base_url} speaks {flavour}")

    async def state(self) -> ClusterState:
        """exo v1's cluster state: nodes, instances, runners, tasks."""
        await self._require_v1("GET /state")
        data, _ = await self._call("GET", "/state")
        return self._parse(parse_state, data, "/state")

    async def nodes(self) -> list[NodeInfo]:
        """The machines behind the endpoint; a plain OpenAI server counts as one."""
        flavour = await self.detect()
        if flavour == "v1":
            return list((await self.state()).nodes)
        if flavour == "v0":
            data, _ = await self._call("GET", "/v1/topology")
            return self._parse(parse_v0_topology, data, "/v1/topology")
        return [NodeInfo(node_id=NodeId(self.base_url), name=urlsplit(self.base_url).netloc)]

    async def models(self) -> list[ModelInfo]:
        """Every model the endpoint lists, each marked ready or not."""
        if await self.detect() != "v1":
            data, _ = await self._call("GET", "/v1/models")
            return self._parse(parse_model_list, data, "/v1/models")
        ready = (await self.state()).ready_models()
        ready_ids = frozenset(m.model_id for m in ready)
        data, _ = await self._call("GET", "/models")
        listed = self._parse(
            lambda d, s: parse_model_list(d, s, ready=ready_ids), data, "/models",
        )
        known = {m.model_id for m in listed}
        return listed + [m for m in ready if m.model_id not in known]

    async def ready_models(self) -> list[ModelInfo]:
        """Models that can answer now (exo v1: an instance whose runners are all Ready)."""
        if await self.detect() == "v1":
            return (await self.state()).ready_models()
        return [m for m in await self.models() if m.ready]

    # --- chat ------------------------------------------------------------------------------

    def _count_tokens(self, usage: Usage | None) -> None:
        if usage is not None:
            self.stats.prompt_tokens += usage.prompt_tokens
            self.stats.completion_tokens += usage.completion_tokens

    async def chat(self, request: ChatRequest) -> ChatResult:
        """One completion, waited for whole."""
        await self.detect()
        body = encode_request(request, stream=False)
        data, latency_ms = await self._call("POST", CHAT_PATH, body=body)
        answer = self._parse(lambda d, s: decode(d, WireCompletion, s), data, CHAT_PATH)
        url = self.base_url + CHAT_PATH
        if answer.error_text() is not None:
            raise self._failed(in_band_error(answer, data, url))
        if not answer.choices:
            raise self._failed(ParseError(f"{url}: the answer has no choices"))
        choice = answer.choices[0]
        self._count_tokens(answer.usage)
        return ChatResult(
            text=choice.content(), finish_reason=choice.finish_reason, usage=answer.usage,
            latency_ms=latency_ms, endpoint=self.base_url, id=answer.id, model=answer.model,
        )

    async def chat_stream(self, request: ChatRequest) -> AsyncIterator[ChatDelta]:
        """A streamed completion: text pieces as they come, then one done=True item with totals."""
        flavour = await self.detect()
        url = self.base_url + CHAT_PATH
        # llama-server reports usage in a stream only when asked to.
        extra = {"stream_options": {"include_usage": True}} if flavour == "openai" else None
        body = encode_request(request, stream=True, extra=extra)
        self.stats.requests += 1
        started = time.monotonic()
        finish: str | None = None
        usage: Usage | None = None
        completion_id = ""
        done = False
        try:
            async with self._http().post(
                url, data=body, headers=_JSON_HEADERS, timeout=self._timeout,
            ) as response:
                if response.status >= 400:
                    raise http_error(response.status, await response.read(), url)
                async with contextlib.aclosing(_payloads(response)) as payloads:
                    async for payload in payloads:
                        if payload == "[DONE]":
                            done = True
                            break
                        chunk = decode(payload, WireCompletion, url)
                        if chunk.error_text() is not None:
                            raise in_band_error(chunk, payload, url)
                        completion_id = chunk.id or completion_id
                        usage = chunk.usage or usage
                        for choice in chunk.choices[:1]:
                            if choice.finish_reason == "error":
                                raise StreamError(500, payload, url=url)
                            finish = choice.finish_reason or finish
                            if text := choice.content():
                                yield ChatDelta(text=text, id=completion_id)
        except KowalskiError as exc:
            raise self._failed(exc) from None
        except TimeoutError as exc:
            limit_s = self._timeout.total
            timeout = ExoTimeoutError(f"POST {url}: stream not done within {limit_s:g} s")
            raise self._failed(timeout) from exc
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as exc:
            broken = IncompleteStreamError(f"stream from {url} broke off: {exc}")
            raise self._failed(broken) from exc
        except aiohttp.ClientError as exc:
            raise self._failed(NetworkError(f"POST {url} failed: {exc}")) from exc
        # exo v0 ends a stream after the finish_reason chunk; the others then send [DONE].
        if finish is None or (flavour != "v0" and not done):
            missing = "a finish_reason" if finish is None else "[DONE]"
            raise self._failed(IncompleteStreamError(f"stream from {url} ended without {missing}"))
        latency_ms = (time.monotonic() - started) * 1000
        self.stats.total_latency_ms += latency_ms
        self._count_tokens(usage)
        yield ChatDelta(
            done=True, finish_reason=finish, usage=usage, latency_ms=latency_ms,
            endpoint=self.base_url, id=completion_id,
        )

    # --- placement (exo v1) ----------------------------------------------------------------

    async def place_instance(
        self,
        model_id: str,
        *,
        sharding: Sharding = "Pipeline",
        instance_meta: InstanceMeta = "MlxRing",
        min_nodes: int = 1,
    ) -> PlacementResult:
        """Ask exo to place an instance; it loads in the background (see wait_ready)."""
        await self._require_v1("place_instance")
        body = msgspec.json.encode({
            "model_id": model_id, "sharding": sharding, "instance_meta": instance_meta,
            "min_nodes": min_nodes,
        })
        data, _ = await self._call("POST", "/place_instance", body=body)
        answer = self._parse(lambda d, s: decode(d, _CommandAnswer, s), data, "/place_instance")
        return PlacementResult(
            command_id=answer.command_id, message=answer.message, model_id=ModelId(model_id),
        )

    async def delete_instance(self, instance_id: str) -> str:
        """Ask exo to shut an instance down; returns the command id."""
        await self._require_v1("delete_instance")
        path = f"/instance/{quote(instance_id, safe='')}"
        data, _ = await self._call("DELETE", path)
        return self._parse(lambda d, s: decode(d, _CommandAnswer, s), data, path).command_id

    async def cancel(self, command_id: str) -> bool:
        """Stop a generation by its chat id; False when it had already finished."""
        await self._require_v1("cancel")
        try:
            await self._call("POST", f"/v1/cancel/{quote(command_id, safe='')}")
        except ExoApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def wait_ready(
        self, model_id: str, timeout_s: float, *, poll_interval_s: float | None = None,
    ) -> ModelInfo:
        """Poll until the model can answer (exo v1: an instance with every runner Ready)."""
        interval = poll_interval_s if poll_interval_s is not None else self.poll_interval_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        detail = "no answer yet"
        while True:
            try:
                if await self.detect() == "v1":
                    # One snapshot gives both the answer and, failing that, the reason.
                    state = await self.state()
                    ready, detail = state.ready_models(), state.describe_model(model_id)
                else:
                    ready, detail = await self.ready_models(), "not listed as ready"
            except KowalskiError as exc:
                if not exc.is_recoverable:
                    raise
                ready, detail = [], exc.message
            for model in ready:
                if model.model_id == model_id:
                    return model
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise InstanceNotReadyError(model_id, timeout_s, detail)
            await asyncio.sleep(min(interval, remaining))
