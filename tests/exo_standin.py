"""A stand-in exo (v1 or v0) or llama-server for tests, speaking their real wire formats.

Answers are built from the captured samples in tests/data/exo/<flavour>/, with ids, model
names, text and token counts filled in. Serve the app on 127.0.0.1 port 0 and steer it
while it runs through the handle stored at `app[STANDIN]`:

    app = make_exo_app(flavour="v1", models=("m",), reply=lambda body: "hi there")
    server = await aiohttp_server(app)           # pytest-aiohttp
    standin = app[STANDIN]
    standin.fail("http_500", times=1)            # the next chat request fails, then it heals
    standin.set_model("m", "Loading")            # exo v1: runners not Ready
    assert standin.counts["/v1/chat/completions"] == 1

Behaviour as in the real servers: exo v1 answers 404 `No instance found for model X` when a
model has no instance, and holds a chat request while the instance's runners are not Ready;
llama-server answers any model name. exo v0 behaves as the live cluster captured in
tests/data/exo/v0_real/ did: every one of its 73 model cards is listed `ready`, a model it
does not know is replaced by its default model (`default_model`), a model its engine cannot
run gets 400 `Unsupported model`, `max_tokens`, `stop` and `seed` are ignored, malformed
bodies get 500 text/plain, unknown paths 404 with an empty body, and streams end without
`[DONE]`. The models set with set_model(..., "Ready") are the ones its engine can run.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import inspect
import json
import re
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, Literal, get_args

from aiohttp import web

DATA_DIR = Path(__file__).parent / "data" / "exo"
DEFAULT_MODEL = "mlx-community/Llama-3.2-1B-Instruct-4bit"
CHAT_PATH = "/v1/chat/completions"
# exo v0's own default model, put in place of any model id it does not know.
V0_DEFAULT_MODEL = "llama-3.2-1b"
V0_ENGINE = "DummyInferenceEngine"
V0_TROUBLE = "500 Internal Server Error\n\nServer got itself in trouble"

Flavour = Literal["v1", "v0", "openai"]
# http_500: HTTP 500 in the flavour's error envelope. no_instance: exo v1's 404 (v0: 400
# unsupported model; llama-server: 404). malformed_json: a 200 body (or stream chunk) that is
# not JSON. validation_422: FastAPI's 422 {"detail": [...]} (v0, llama-server: their 400).
# mid_stream_error: one piece, then {"error": ...} under HTTP 200 (non-streaming: the error
# body under 200); exo v0 has no in-band error, so its stream just stops and a plain request
# gets HTTP 500. truncated_stream: one piece, then the stream ends without [DONE] or
# finish_reason (non-streaming: an empty 200 body). hang: no answer until the server stops.
FailMode = Literal[
    "http_500", "no_instance", "malformed_json", "validation_422", "mid_stream_error",
    "truncated_stream", "hang",
]
FAIL_MODES: tuple[FailMode, ...] = get_args(FailMode)
Reply = Callable[[dict[str, Any]], "str | Awaitable[str]"]


@functools.cache
def _sample_text(relative: str) -> str:
    return (DATA_DIR / relative).read_text(encoding="utf-8")


def sample(relative: str) -> Any:
    """A fresh copy of a captured JSON sample, e.g. sample("v1/state_idle.json")."""
    return copy.deepcopy(json.loads(_sample_text(relative)))


def sse_sample(relative: str) -> list[tuple[str, str]]:
    """A captured event stream as (kind, text) pairs, kind "comment" or "data"."""
    events = []
    for block in _sample_text(relative).split("\n\n"):
        line = block.strip("\n")
        if line.startswith(":"):
            events.append(("comment", line[1:].strip()))
        elif line.startswith("data:"):
            events.append(("data", line[5:].strip()))
    return events


@functools.cache
def captured_http(name: str) -> tuple[int, dict[str, str], bytes]:
    """A raw answer from tests/data/exo/v0_real/: status, headers, body."""
    raw = (DATA_DIR / "v0_real" / name).read_bytes()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    if headers.get("Transfer-Encoding") == "chunked" and not body.strip():
        body = b""
    return int(status_line.split()[1]), headers, body


def v0_cards() -> list[str]:
    """The ids of the 73 model cards real exo v0 lists."""
    return [entry["id"] for entry in json.loads(captured_http("models.http")[2])["data"]]


def split_tokens(text: str) -> list[str]:
    """The pieces a reply streams in: words with their trailing spaces (joined, the text)."""
    return re.findall(r"\S+\s*|\s+", text)


def default_reply(body: dict[str, Any]) -> str:
    """Echoes the last message."""
    messages = body.get("messages") or [{}]
    return f"You said: {messages[-1].get('content', '')}"


@dataclass
class _Model:
    # Runner status without exo's "Runner" prefix; None: listed, but no instance.
    status: str | None
    error_message: str | None = None
    instance_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    runner_id: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass(eq=False)
class ExoStandin:
    """The stand-in's behaviour and what it has seen; change the fields while it serves."""

    flavour: Flavour = "v1"
    reply: Reply = default_reply
    # Chat only: before answering, and between streamed pieces.
    latency_s: float = 0.0
    token_delay_s: float = 0.0
    # exo v1 placement: Loading until this much time has passed, then Ready.
    load_delay_s: float = 0.0
    # exo v1 placement: the 400 message of /instance/placement (e.g. not enough memory), and
    # the error a placed instance's runner fails with after load_delay_s instead of Ready.
    placement_error: str | None = None
    load_error: str | None = None
    # exo v1 reasoning models: thinking sent as `reasoning_content` before the reply.
    reasoning: str = ""
    node_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    node_name: str = "standin"
    memory_total_bytes: int = 25_276_510_208
    memory_available_bytes: int = 24_515_055_616
    fail_mode: FailMode | None = None
    # Requests left to fail; None fails every one until heal().
    fail_times: int | None = None
    # "chat": only chat requests fail; "all": other GETs too (http_500, malformed_json, hang).
    fail_scope: Literal["chat", "all"] = "chat"
    # exo v0: the model put in place of unknown ones, and the cluster's other node ids
    # (endpoints of one cluster all report the whole topology).
    default_model: str = V0_DEFAULT_MODEL
    peer_node_ids: list[str] = field(default_factory=list)
    # openai: serve only /v1/models and /v1/chat/completions, as many gateways do.
    bare: bool = False
    # When set, every request must carry `Authorization: Bearer <api_key>` (else 401).
    api_key: str = ""
    # Requests received, by path; chat request bodies in arrival order.
    counts: Counter[str] = field(default_factory=Counter)
    chat_requests: list[dict[str, Any]] = field(default_factory=list)
    _models: dict[str, _Model] = field(default_factory=dict)
    # Generations in progress (streamed or, on v1 with token_delay_s, not): set to end early.
    _streams: dict[str, asyncio.Event] = field(default_factory=dict)
    _stream_models: dict[str, str] = field(default_factory=dict)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _event_index: int = 0

    # --- steering --------------------------------------------------------------------------

    def set_model(
        self, model_id: str, status: str | None = "Ready", *, error_message: str | None = None,
    ) -> None:
        """List a model; status is its runners' (Ready, Loading, Failed...), None: no instance."""
        current = self._models.get(model_id)
        if current is None or current.status is None:
            current = self._models[model_id] = _Model(status=None)
        current.status, current.error_message = status, error_message
        self._event_index += 1

    def remove_model(self, model_id: str) -> None:
        """Stop listing a model at all."""
        self._models.pop(model_id, None)
        self._event_index += 1

    def model_status(self, model_id: str) -> str | None:
        model = self._models.get(model_id)
        return model.status if model is not None else None

    def instance_id(self, model_id: str) -> str:
        """exo v1: the id of the model's instance."""
        return self._models[model_id].instance_id

    def fail(
        self, mode: FailMode, *, times: int | None = None, scope: Literal["chat", "all"] = "chat",
    ) -> None:
        """Fail the next `times` requests (None: all of them) in the given way."""
        if mode not in FAIL_MODES:
            raise ValueError(f"unknown fail mode {mode!r}")
        self.fail_mode, self.fail_times, self.fail_scope = mode, times, scope

    def heal(self) -> None:
        self.fail_mode, self.fail_times = None, None

    def make_app(self) -> web.Application:
        middlewares = [self._middleware, *([_v0_not_found] if self.flavour == "v0" else [])]
        app = web.Application(middlewares=middlewares)
        app[STANDIN] = self
        app.on_shutdown.append(self._on_shutdown)
        get, post = app.router.add_get, app.router.add_post
        post(CHAT_PATH, self._chat)
        if self.flavour == "v1":
            get("/node_id", self._answer(lambda: self.node_id))
            get("/state", self._answer(self._state))
            get("/state/{path:.*}", self._state_path)
            get("/instance/placement", self._placement)
            post("/instance", self._create_instance)
            get("/instance/{instance_id}", self._get_instance)
            get("/models", self._models_v1)
            get("/v1/models", self._models_v1)
            post("/place_instance", self._place)
            app.router.add_delete("/instance/{instance_id}", self._delete)
            post("/v1/cancel/{command_id}", self._cancel)
        elif self.flavour == "v0":
            get("/healthcheck", self._answer(lambda: {"status": "ok"}))
            get("/v1/models", self._models_v0)
            get("/models", self._models_v0)
            get("/v1/topology", self._answer(self._topology_v0))
        else:
            get("/v1/models", self._models_openai)
            if not self.bare:
                get("/health", self._answer(lambda: sample("openai/health.json")))
                get("/models", self._models_openai)
        return app

    # --- plumbing --------------------------------------------------------------------------

    def _answer(self, build: Callable[[], Any]) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(_request: web.Request) -> web.Response:
            return self._json(build())

        return handler

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.counts[request.path] += 1
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            # OpenAI's answer to a missing or wrong key.
            body = {"error": {"message": "Incorrect API key provided", "type":
                              "invalid_request_error", "param": None, "code": "invalid_api_key"}}
            return self._json(body, 401)
        if self.fail_scope == "all" and request.path != CHAT_PATH:
            mode = self._take_failure(("http_500", "malformed_json", "hang"))
            if mode == "hang":
                await self._hang()
            if mode == "http_500":
                return self._error(500, "Internal Server Error")
            if mode == "malformed_json":
                return web.Response(text='{"truncated": ', content_type="application/json")
        response: web.StreamResponse = await handler(request)
        return response

    async def _on_shutdown(self, _app: web.Application) -> None:
        self._stopping.set()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _hang(self) -> None:
        await self._stopping.wait()
        raise web.HTTPServiceUnavailable()

    def _take_failure(self, modes: tuple[FailMode, ...] = FAIL_MODES) -> FailMode | None:
        mode = self.fail_mode
        if mode is None or mode not in modes:
            return None
        if self.fail_times is not None:
            self.fail_times -= 1
            if self.fail_times <= 0:
                self.heal()
        return mode

    def _json(self, data: Any, status: int = 200) -> web.Response:
        # exo v1 (pydantic) and llama-server write compact JSON; exo v0 uses json.dumps.
        separators = (", ", ": ") if self.flavour == "v0" else (",", ":")
        text = json.dumps(data, separators=separators, ensure_ascii=False)
        return web.Response(text=text, status=status, content_type="application/json")

    def _error_body(self, status: int, message: str) -> dict[str, Any]:
        if self.flavour == "v1":
            phrase = HTTPStatus(status).phrase
            return {"error": {"message": message, "type": phrase, "param": None, "code": status}}
        if self.flavour == "v0":
            return {"detail": message}
        kind = "server_error" if status >= 500 else "invalid_request_error"
        return {"error": {"code": status, "message": message, "type": kind}}

    def _error(self, status: int, message: str) -> web.Response:
        if self.flavour == "v0" and status == 500:
            return _v0_trouble()
        return self._json(self._error_body(status, message), status)

    def _invalid(self, body: Any, missing: str) -> web.Response:
        if self.flavour == "v1":
            detail = {
                "type": "missing", "loc": ["body", missing], "msg": "Field required", "input": body,
            }
            return self._json({"detail": [detail]}, 422)
        if self.flavour == "openai":
            return self._json(sample("openai/error_400.json"), 400)
        return _v0_trouble()

    def _no_instance(self, model: str) -> web.Response:
        if self.flavour == "v1":
            return self._error(404, f"No instance found for model {model}")
        if self.flavour == "v0":
            served = [m for m in self._models if self.model_status(m) in ("Ready", "Running")]
            return self._error(400, f"Unsupported model: {model} with inference engine "
                                    f"{V0_ENGINE}. Supported models for this engine: {served}")
        return self._error(404, "model not found")

    # --- chat ------------------------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return self._error(500 if self.flavour == "v0" else 400, "the body is not JSON")
        self.chat_requests.append(body)
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        mode = self._take_failure()
        if mode == "hang":
            await self._hang()
        if mode == "http_500":
            return self._error(500, "Internal Server Error")
        messages = body.get("messages") if isinstance(body, dict) else None
        if mode == "validation_422" or not isinstance(messages, list) or (
                self.flavour == "v0" and not all("content" in m for m in messages)):
            return self._invalid(body, "messages")
        model = str(body.get("model", ""))
        if self.flavour == "v0" and model not in self._cards():
            model = self.default_model
        if mode == "no_instance" or not await self._wait_serving(model):
            return self._no_instance(model)
        pieces = split_tokens(await self._reply(body))
        # exo v0 ignores max_tokens (and stop, top_p, seed).
        limit = body.get("max_tokens") if self.flavour != "v0" else None
        finish = "length" if isinstance(limit, int) and len(pieces) > limit else "stop"
        pieces = pieces[:limit] if finish == "length" else pieces
        prompt = max(1, sum(len(str(m.get("content", "")).split()) for m in messages))
        usage = {
            "prompt_tokens": prompt, "completion_tokens": len(pieces),
            "total_tokens": prompt + len(pieces),
        }
        if body.get("stream"):
            return await self._stream(request, dict(body, model=model), pieces, finish, usage,
                                      mode)
        if mode == "malformed_json":
            return web.Response(text='{"id": "', content_type="application/json")
        if mode == "mid_stream_error" and self.flavour == "v1":
            # exo raises a runner's error after the 200 headers: the body stops, unsent.
            return await _cut_short(request, b"")
        if mode == "mid_stream_error":
            status = 500 if self.flavour == "v0" else 200
            return self._json(self._error_body(500, "runner failed mid-generation"), status)
        if mode == "truncated_stream":
            # Cancelled or deleted mid-generation: exo answers 200 with the text so far.
            return self._json(self._completion(model, "".join(pieces[:1]), None, usage))
        if self.flavour == "v1" and self.token_delay_s:
            return await self._generate(model, pieces, finish, usage)
        return self._json(self._completion(model, "".join(pieces), finish, usage))

    async def _generate(
        self, model: str, pieces: list[str], finish: str, usage: dict[str, int],
    ) -> web.Response:
        """exo v1 without streaming, paced: a cancel or a deleted instance ends it early."""
        command_id = self._new_id()
        cancelled = self._streams[command_id] = asyncio.Event()
        self._stream_models[command_id] = model
        done: list[str] = []
        try:
            for piece in pieces:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(cancelled.wait(), self.token_delay_s)
                if cancelled.is_set():
                    break
                done.append(piece)
        finally:
            del self._streams[command_id], self._stream_models[command_id]
        ended = None if cancelled.is_set() else finish
        answer = self._completion(model, "".join(done), ended, usage)
        answer["id"] = command_id
        return self._json(answer)

    async def _reply(self, body: dict[str, Any]) -> str:
        text = self.reply(body)
        return await text if inspect.isawaitable(text) else text

    async def _wait_serving(self, model: str) -> bool:
        """Whether the model is served; exo v1 holds the request until its runners are Ready."""
        if self.flavour == "openai":
            return True
        if self.flavour == "v0":
            return model in self._models and self.model_status(model) in ("Ready", "Running")
        while self.model_status(model) not in ("Ready", "Running"):
            if self.model_status(model) is None or self._stopping.is_set():
                return False
            await asyncio.sleep(0.01)
        return True

    def _completion(
        self, model: str, text: str, finish: str | None, usage: dict[str, int],
    ) -> Any:
        answer = sample(f"{self.flavour}/chat_nonstream.json")
        answer.update(id=self._new_id(), created=int(time.time()), model=model)
        answer["choices"][0]["message"]["content"] = text
        if self.reasoning and self.flavour == "v1":
            answer["choices"][0]["message"]["reasoning_content"] = self.reasoning
        # exo leaves out what is None (exclude_none): a cut-off answer has no finish_reason.
        answer["choices"][0]["finish_reason"] = finish
        if finish is None:
            del answer["choices"][0]["finish_reason"]
        answer["usage"].update(usage)
        return answer

    def _new_id(self) -> str:
        return str(uuid.uuid4()) if self.flavour == "v1" else f"chatcmpl-{uuid.uuid4()}"

    async def _stream(
        self, request: web.Request, body: dict[str, Any], pieces: list[str], finish: str,
        usage: dict[str, int], mode: FailMode | None,
    ) -> web.StreamResponse:
        command_id = self._new_id()
        frames = self._frames(command_id, str(body.get("model", "")), body, pieces, finish, usage)
        first = next((i for i, (_, token) in enumerate(frames) if token), len(frames) - 1)
        if mode == "truncated_stream" or (mode == "mid_stream_error" and self.flavour == "v0"):
            frames = frames[: first + 1]
        elif mode == "mid_stream_error":
            error = json.dumps(self._error_body(500, "runner failed mid-generation"))
            frames = [
                *frames[: first + 1], (f"data: {error}\n\n".encode(), False),
                (b"data: [DONE]\n\n", False),
            ]
        elif mode == "malformed_json":
            frames = [*frames[:first], (b'data: {"id": "\n\n', True)]
        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        if self.flavour != "v0":
            headers["X-Accel-Buffering"] = "no"
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        cancelled = self._streams[command_id] = asyncio.Event()
        self._stream_models[command_id] = str(body.get("model", ""))
        try:
            for frame, token in frames:
                if token and self.token_delay_s:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(cancelled.wait(), self.token_delay_s)
                if cancelled.is_set():
                    break
                await response.write(frame)
        finally:
            del self._streams[command_id], self._stream_models[command_id]
        await response.write_eof()
        return response

    def _frames(
        self, command_id: str, model: str, body: dict[str, Any], pieces: list[str], finish: str,
        usage: dict[str, int],
    ) -> list[tuple[bytes, bool]]:
        """The stream's frames; True marks those that carry text, paced by token_delay_s."""
        events = sse_sample(f"{self.flavour}/chat_stream.sse")
        chunks = [json.loads(text) for kind, text in events if kind == "data" and text != "[DONE]"]
        frames: list[tuple[bytes, bool]] = []

        def data(chunk: Any, token: bool = True) -> None:
            chunk.update(id=command_id, model=model, created=int(time.time()))
            separators = (", ", ": ") if self.flavour == "v0" else (",", ":")
            text = json.dumps(chunk, separators=separators, ensure_ascii=False)
            frames.append((f"data: {text}\n\n".encode(), token))

        def comment(text: str) -> None:
            frames.append((f": {text}\n\n".encode(), False))

        if self.flavour == "v1":
            comment("keep-alive")
            total = usage["prompt_tokens"]
            for done in (0, total):
                progress = {"model": model, "processed_tokens": done, "total_tokens": total}
                comment(f"prefill_progress {json.dumps({'PrefillProgressChunk': progress})}")
            for thought in split_tokens(self.reasoning):
                chunk = copy.deepcopy(chunks[0])
                delta = chunk["choices"][0]["delta"]
                del delta["content"]
                delta["reasoning_content"] = thought
                data(chunk)
            for piece in pieces[:-1]:
                chunk = copy.deepcopy(chunks[0])
                chunk["choices"][0]["delta"]["content"] = piece
                data(chunk)
            final = copy.deepcopy(chunks[-1])
            final["choices"][0]["delta"]["content"] = pieces[-1] if pieces else ""
            final["choices"][0]["finish_reason"] = finish
            final["usage"].update(usage)
            data(final)
            line = next(text for _, text in events if text.startswith("generation_stats"))
            stats = json.loads(line.split(" ", 1)[1])
            stats.update(prompt_tokens=usage["prompt_tokens"], generation_tokens=len(pieces))
            comment(f"generation_stats {json.dumps(stats)}")
        elif self.flavour == "v0":
            for index, piece in enumerate(pieces or [""]):
                chunk = copy.deepcopy(chunks[0])
                choice = chunk["choices"][0]
                choice["message"]["content"] = choice["delta"]["content"] = piece
                choice["finish_reason"] = finish if index == max(len(pieces) - 1, 0) else None
                data(chunk)
        else:
            data(copy.deepcopy(chunks[0]), token=False)
            for piece in pieces:
                chunk = copy.deepcopy(chunks[1])
                chunk["choices"][0]["delta"]["content"] = piece
                data(chunk)
            final = copy.deepcopy(chunks[-2])
            final["choices"][0]["finish_reason"] = finish
            data(final, token=False)
            if (body.get("stream_options") or {}).get("include_usage"):
                usage_chunk = copy.deepcopy(chunks[-1])
                usage_chunk["usage"].update(usage)
                data(usage_chunk, token=False)
        if self.flavour != "v0":
            frames.append((b"data: [DONE]\n\n", False))
        return frames

    # --- exo v1 cluster state and placement --------------------------------------------------

    def _state(self) -> Any:
        state = sample("v1/state_idle.json")
        for key in (
            "lastSeen", "nodeIdentities", "nodeMemory", "nodeDisk", "nodeNetwork", "nodeBackends",
        ):
            state[key] = {self.node_id: next(iter(state[key].values()))}
        state["downloads"] = {self.node_id: []}
        state["topology"]["nodes"] = [self.node_id]
        state["lastSeen"][self.node_id] = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
        state["nodeIdentities"][self.node_id]["friendlyName"] = self.node_name
        memory = state["nodeMemory"][self.node_id]
        memory["ramTotal"]["inBytes"] = self.memory_total_bytes
        memory["ramAvailable"]["inBytes"] = self.memory_available_bytes
        state["lastEventAppliedIdx"] = self._event_index
        for model_id, model in self._models.items():
            if model.status is None:
                continue
            state["instances"][model.instance_id] = self._instance(
                model_id, model.instance_id, model.runner_id)
            fields: dict[str, Any] = {}
            if model.status == "Ready":
                fields = {"prefillServerPort": None}
            elif model.status == "Loading":
                fields = {"layersLoaded": 1, "totalLayers": 2}
            elif model.status == "Failed":
                fields = {"errorMessage": model.error_message, "diagnostics": []}
            state["runners"][model.runner_id] = {f"Runner{model.status}": fields}
        return state

    def _instance(self, model_id: str, instance_id: str, runner_id: str) -> Any:
        """An instance of the model on this node, tagged as exo tags it."""
        template = sample("v1/state_with_instance.json")["instances"]
        inner = copy.deepcopy(next(iter(template.values()))["MlxRingInstance"])
        shard = next(iter(inner["shardAssignments"]["runnerToShard"].values()))
        shard["PipelineShardMetadata"]["modelCard"]["modelId"] = model_id
        inner["instanceId"] = instance_id
        inner["shardAssignments"] = {
            "modelId": model_id, "runnerToShard": {runner_id: shard},
            "nodeToRunner": {self.node_id: runner_id},
        }
        inner["hostsByNode"] = {self.node_id: next(iter(inner["hostsByNode"].values()))}
        return {"MlxRingInstance": inner}

    async def _state_path(self, request: web.Request) -> web.Response:
        """exo's GET /state/{path}: a sub-tree, dumped by pydantic (timestamps "+00:00")."""
        path = request.match_info["path"]
        tree = json.loads(json.dumps(self._state()))
        for stamp in tree["lastSeen"]:
            tree["lastSeen"][stamp] = tree["lastSeen"][stamp].replace("Z", "+00:00")
        try:
            for part in (p for p in path.split("/") if p):
                tree = tree[int(part)] if isinstance(tree, list) else tree[part]
        except (KeyError, IndexError, ValueError, TypeError):
            return self._error(404, f"unable to find path '{path.replace('/', '.')}' "
                                    "in state json")
        return self._json(tree)

    async def _placement(self, request: web.Request) -> web.Response:
        """exo's GET /instance/placement: the instance it would place, or a 400 saying why not."""
        model_id = request.query.get("model_id", "")
        if model_id not in self._models:
            # exo fails to load the model card and FastAPI answers a bare 500.
            return web.Response(status=500, text="Internal Server Error")
        if self.placement_error is not None:
            return self._error(400, self.placement_error)
        return self._json(self._instance(model_id, str(uuid.uuid4()), str(uuid.uuid4())))

    async def _create_instance(self, request: web.Request) -> web.Response:
        """exo's POST /instance: place exactly the instance given (from /instance/placement)."""
        body = await request.json()
        tagged = body.get("instance") if isinstance(body, dict) else None
        if not isinstance(tagged, dict) or len(tagged) != 1:
            return self._invalid(body, "instance")
        inner = next(iter(tagged.values()))
        model_id = inner["shardAssignments"]["modelId"]
        if model_id not in self._models:
            return web.Response(status=500, text="Internal Server Error")
        runner_id = next(iter(inner["shardAssignments"]["runnerToShard"]))
        self._models[model_id] = _Model(
            status="Loading", instance_id=inner["instanceId"], runner_id=runner_id)
        self._event_index += 1
        task = asyncio.create_task(self._load(model_id, inner["instanceId"]))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        answer = sample("v1/place_instance.json")
        answer["command_id"] = str(uuid.uuid4())
        answer["model_card"]["modelId"] = model_id
        return self._json(answer)

    async def _get_instance(self, request: web.Request) -> web.Response:
        instance_id = request.match_info["instance_id"]
        for model_id, model in self._models.items():
            if model.instance_id == instance_id and model.status is not None:
                return self._json(self._instance(model_id, instance_id, model.runner_id))
        return self._error(404, "Instance not found")

    def _listed(self, template: Any) -> list[Any]:
        entries = []
        for model_id in self._models:
            entry = copy.deepcopy(template)
            entry["id"] = model_id
            entries.append(entry)
        return entries

    async def _models_v1(self, _request: web.Request) -> web.Response:
        answer = sample("v1/models_downloaded.json")
        entries = self._listed(answer["data"][0])
        for entry in entries:
            entry.update(hugging_face_id=entry["id"], name=entry["id"].rsplit("/", 1)[-1])
        answer["data"] = entries
        return self._json(answer)

    def _cards(self) -> list[str]:
        return list(dict.fromkeys([*v0_cards(), *self._models]))

    async def _models_v0(self, _request: web.Request) -> web.Response:
        # Every card, each `ready`, whatever the engine can run.
        template = sample("v0/v1_models.json")["data"][0]
        return self._json({"object": "list", "data": [
            dict(template, id=card, ready=True) for card in self._cards()]})

    async def _models_openai(self, _request: web.Request) -> web.Response:
        if self.bare:
            # The OpenAI API's own shape, nothing more.
            return self._json({"object": "list", "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "standin"}
                for m in self._models]})
        answer = sample("openai/models.json")
        answer["data"] = self._listed(answer["data"][0])
        answer["models"] = [dict(answer["models"][0], name=m, model=m) for m in self._models]
        return self._json(answer)

    def _topology_v0(self) -> Any:
        # The shape of the captured two-node answer (memory in MiB, FLOPS 0 on CPU).
        captured = json.loads(captured_http("topology_nodeA.http")[2])
        template = next(iter(captured["nodes"].values()))
        ids = list(dict.fromkeys([self.node_id, *self.peer_node_ids]))
        nodes = {node_id: dict(template, memory=self.memory_total_bytes // 2**20)
                 for node_id in ids}
        nodes[self.node_id]["model"] = self.node_name
        graph = {} if len(ids) == 1 else {
            node: [{"from_id": node, "to_id": other, "description": "Other (veth)"}
                   for other in ids if other != node]
            for node in ids}
        return {"nodes": nodes, "peer_graph": graph, "active_node_id": None}

    async def _place(self, request: web.Request) -> web.Response:
        body = await request.json()
        model_id = body.get("model_id") if isinstance(body, dict) else None
        if not isinstance(model_id, str):
            return self._invalid(body, "model_id")
        if model_id not in self._models:
            # exo fails to load the model card and FastAPI answers a bare 500.
            return web.Response(status=500, text="Internal Server Error")
        model = self._models[model_id]
        if model.status is None:
            self.set_model(model_id, "Loading")
            task = asyncio.create_task(self._load(model_id, self._models[model_id].instance_id))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        answer = sample("v1/place_instance.json")
        answer["command_id"] = str(uuid.uuid4())
        answer["model_card"]["modelId"] = model_id
        return self._json(answer)

    async def _load(self, model_id: str, instance_id: str) -> None:
        await asyncio.sleep(self.load_delay_s)
        model = self._models.get(model_id)
        if model is not None and model.instance_id == instance_id and model.status == "Loading":
            if self.load_error is None:
                self.set_model(model_id, "Ready")
            else:
                self.set_model(model_id, "Failed", error_message=self.load_error)

    async def _delete(self, request: web.Request) -> web.Response:
        instance_id = request.match_info["instance_id"]
        for model_id, model in self._models.items():
            if model.instance_id == instance_id and model.status is not None:
                # Generations on the instance end early, as exo's do.
                for command_id, serving in self._stream_models.items():
                    if serving == model_id:
                        self._streams[command_id].set()
                self.set_model(model_id, None)
                answer = sample("v1/delete_instance.json")
                answer.update(command_id=str(uuid.uuid4()), instance_id=instance_id)
                return self._json(answer)
        return self._error(404, "Instance not found")

    async def _cancel(self, request: web.Request) -> web.Response:
        command_id = request.match_info["command_id"]
        stream = self._streams.get(command_id)
        if stream is None:
            return self._error(404, "Command not found or already completed")
        stream.set()
        answer = sample("v1/cancel.json")
        answer["command_id"] = command_id
        return self._json(answer)


STANDIN = web.AppKey("exo_standin", ExoStandin)


async def _cut_short(request: web.Request, sent: bytes) -> web.StreamResponse:
    """HTTP 200 headers and `sent`, then the connection closes before the body ends."""
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    if sent:
        await response.write(sent)
    if request.transport is not None:
        request.transport.close()
    return response


def _v0_trouble() -> web.Response:
    """exo v0's answer to any body it cannot handle."""
    return web.Response(status=500, text=V0_TROUBLE, content_type="text/plain")


@web.middleware
async def _v0_not_found(request: web.Request, handler: Any) -> web.StreamResponse:
    """exo v0 answers an unknown path, or a known one with the wrong method, 404 and no body."""
    try:
        response: web.StreamResponse = await handler(request)
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
        return web.Response(status=404, body=b"", content_type="application/octet-stream")
    return response


class FlakyServer:
    """A stand-in on a fixed port that really goes down (listener and connections closed)."""

    def __init__(self, standin: ExoStandin) -> None:
        self.standin = standin
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def up(self) -> None:
        self._runner = web.AppRunner(self.standin.make_app(), shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def down(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None



def make_exo_app(
    *,
    flavour: Flavour = "v1",
    models: tuple[str, ...] | list[str] = (DEFAULT_MODEL,),
    ready: bool = True,
    reply: Reply = default_reply,
    latency_s: float = 0.0,
    token_delay_s: float = 0.0,
    load_delay_s: float = 0.0,
    fail_mode: FailMode | None = None,
    fail_times: int | None = None,
    node_name: str = "standin",
    default_model: str = V0_DEFAULT_MODEL,
    peer_node_ids: tuple[str, ...] = (),
    node_id: str = "",
    bare: bool = False,
    api_key: str = "",
) -> web.Application:
    """A stand-in app serving `models`, Ready (or, with ready=False, Loading on exo v1)."""
    standin = ExoStandin(
        flavour=flavour, reply=reply, latency_s=latency_s, token_delay_s=token_delay_s,
        load_delay_s=load_delay_s, node_name=node_name, default_model=default_model,
        peer_node_ids=list(peer_node_ids), bare=bare, api_key=api_key,
        **({"node_id": node_id} if node_id else {}),
    )
    for model_id in models:
        standin.set_model(model_id, "Ready" if ready else "Loading")
    if fail_mode is not None:
        standin.fail(fail_mode, times=fail_times)
    return standin.make_app()
