"""ExoClient against the exo stand-in (v1, v0, llama-server) and against replayed captures."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from exo_standin import DATA_DIR, ExoStandin, sample, split_tokens

from kowalski.common.config import ExoConfig
from kowalski.common.errors import ExoApiError, NetworkError, ParseError
from kowalski.controller.models.chat_types import (
    ChatDelta,
    ChatMessage,
    ChatRequest,
    ChatResult,
    SseDecoder,
    Usage,
    encode_request,
)
from kowalski.controller.models.exo_client import ExoClient
from kowalski.controller.models.exo_errors import (
    ExoTimeoutError,
    IncompleteAnswerError,
    IncompleteStreamError,
    InstanceFailedError,
    InstanceNotReadyError,
    ModelNotServedError,
    NoInstanceError,
    PlacementError,
    StreamError,
    UnsupportedFlavourError,
)
from kowalski.controller.models.exo_types import FLAVOURS, SERVING_STATUSES, Flavour, parse_state

MODEL = "mlx-community/Llama-3.2-1B-Instruct-4bit"
TINY = "local/tiny-llama"
REPLY = "The answer is forty two, and that is final."
Serve = Callable[..., Awaitable[tuple[ExoStandin, str]]]
MakeClient = Callable[..., ExoClient]


def ask(text: str = "what is six times seven", *, model: str = MODEL, **kwargs: Any) -> ChatRequest:
    return ChatRequest(model=model, messages=[ChatMessage(role="user", content=text)], **kwargs)


async def collect(stream: AsyncIterator[ChatDelta]) -> list[ChatDelta]:
    return [delta async for delta in stream]


async def drain(stream: AsyncIterator[ChatDelta], seen: list[str]) -> None:
    """Read a stream to its end, keeping the pieces that came before any failure."""
    async for delta in stream:
        seen.append(delta.text)


async def chat_once(exo: ExoClient, request: ChatRequest, stream: bool) -> ChatResult | None:
    if stream:
        await collect(exo.chat_stream(request))
        return None
    return await exo.chat(request)


@pytest.fixture
def serve(serve: Serve) -> Serve:
    """The shared stand-in exo, answering REPLY unless a test says otherwise."""
    async def start(**kwargs: Any) -> tuple[ExoStandin, str]:
        kwargs.setdefault("reply", lambda body: REPLY)
        return await serve(**kwargs)

    return start


@pytest.fixture
async def client() -> AsyncIterator[MakeClient]:
    made: list[ExoClient] = []

    def make(url: str, **kwargs: Any) -> ExoClient:
        made.append(ExoClient(url, **kwargs))
        return made[-1]

    yield make
    for each in made:
        await each.close()


async def dead_url(aiohttp_server: Any) -> str:
    server = await aiohttp_server(web.Application())
    url = str(server.make_url(""))
    await server.close()
    return url


# --- parsing the captured samples (no sockets) ------------------------------------------


@pytest.mark.parametrize(
    ("name", "counts", "ready"),
    [
        ("state_idle", (1, 0, 0, 0), []),
        ("state_with_instance", (1, 1, 1, 3), [TINY]),
        # exo restarted the crashed runner: a Shutdown task is pending, the new runner Ready.
        ("state_after_runner_crash", (1, 1, 1, 7), [TINY]),
        ("state_2node_trimmed", (2, 0, 0, 0), []),
    ],
)
def test_captured_states_parse_into_typed_objects(
    name: str, counts: tuple[int, int, int, int], ready: list[str],
) -> None:
    state = parse_state((DATA_DIR / "v1" / f"{name}.json").read_bytes())
    sizes = (len(state.nodes), len(state.instances), len(state.runners), len(state.tasks))
    assert sizes == counts
    assert [m.model_id for m in state.ready_models()] == ready
    for node in state.nodes:
        assert node.name == "vm"
        assert node.memory_total_bytes == 25_276_510_208
        assert 0 < (node.memory_available_bytes or 0) < node.memory_total_bytes
        assert (node.last_seen or "").startswith("2026-11-24T")
    for instance in state.instances.values():
        assert instance.kind == "MlxRingInstance"
        assert instance.context_length == 2048
        assert len(instance.runner_ids) == len(instance.node_ids) == 1


def test_runner_crash_sample_shows_the_restart_in_tasks() -> None:
    state = parse_state((DATA_DIR / "v1" / "state_after_runner_crash.json").read_bytes())
    assert [task.kind for task in state.tasks].count("CreateRunner") == 2
    assert [t.status for t in state.tasks if t.kind == "Shutdown"] == ["Pending"]


def _two_node_state(statuses: dict[int, str]) -> bytes:
    instances = sample("v1/instances_2node_trimmed.json")
    inner = next(iter(instances.values()))["MlxRingInstance"]
    runner_ids = list(inner["shardAssignments"]["runnerToShard"])
    runners: dict[str, Any] = {
        runner_ids[i]: {f"Runner{status}": {}} for i, status in statuses.items()
    }
    return json.dumps({"instances": instances, "runners": runners}).encode()


@pytest.mark.parametrize(
    ("statuses", "ready"),
    [
        ({0: "Ready", 1: "Ready"}, True),
        ({0: "Ready", 1: "Running"}, True),
        ({0: "Ready", 1: "Loading"}, False),
        ({0: "WarmingUp", 1: "Ready"}, False),
        ({0: "Ready"}, False),
    ],
)
def test_two_node_instance_is_ready_only_when_every_runner_is(
    statuses: dict[int, str], ready: bool,
) -> None:
    state = parse_state(_two_node_state(statuses))
    (instance,) = state.instances.values()
    assert len(instance.node_ids) == 2
    assert state.instance_ready(instance) is ready
    assert bool(state.ready_models()) is ready


@pytest.mark.parametrize(
    "status",
    ["Idle", "Connecting", "Connected", "Loading", "Loaded", "WarmingUp", "Ready", "Running",
     "ShuttingDown", "Shutdown", "Failed"],
)
def test_every_runner_status_parses_and_only_ready_or_running_serve(status: str) -> None:
    state = parse_state(_two_node_state({0: status, 1: status}))
    runner = next(iter(state.runners.values()))
    assert runner.status == status
    assert runner.serving is (status in SERVING_STATUSES)


def test_failed_runner_keeps_the_model_out_and_says_why() -> None:
    state = sample("v1/state_with_instance.json")
    runner_id = next(iter(state["runners"]))
    state["runners"][runner_id] = {
        "RunnerFailed": {"errorMessage": "Metal out of memory", "diagnostics": []},
    }
    parsed = parse_state(json.dumps(state))
    assert parsed.runners[runner_id].status == "Failed"
    assert parsed.runners[runner_id].error_message == "Metal out of memory"
    assert parsed.ready_models() == []
    assert "Failed (Metal out of memory)" in parsed.describe_model(TINY)


@pytest.mark.parametrize(
    "body",
    [b'{"instances": {"i": {"A": {}, "B": {}}}}', b'{"runners": []}', b"[1, 2", b""],
)
def test_unexpected_state_is_a_parse_error_naming_the_source(body: bytes) -> None:
    with pytest.raises(ParseError, match="http://exo:52415/state"):
        parse_state(body, "http://exo:52415/state")


def test_sse_decoder_gives_the_same_events_whatever_the_chunking() -> None:
    raw = (DATA_DIR / "v1" / "chat_stream.sse").read_bytes()
    whole = SseDecoder()
    expected = whole.feed(raw) + whole.close()
    assert len(expected) == 5
    assert expected[-1] == "[DONE]"
    assert whole.comments == 5
    for size in (1, 7, 64):
        decoder = SseDecoder()
        events = []
        for start in range(0, len(raw), size):
            events += decoder.feed(raw[start : start + size].replace(b"\n", b"\r\n"))
        assert events + decoder.close() == expected


def test_sse_decoder_flushes_an_event_without_a_final_blank_line() -> None:
    decoder = SseDecoder()
    assert decoder.feed(b"data: one\n\ndata:two") == ["one"]
    assert decoder.close() == ["two"]


def test_chat_request_leaves_out_unset_fields() -> None:
    request = ChatRequest(model="m", messages=[ChatMessage(role="user", content="hi")], seed=7)
    body = json.loads(encode_request(request, stream=False))
    messages = [{"role": "user", "content": "hi"}]
    assert body == {"model": "m", "messages": messages, "seed": 7, "stream": False}


# --- detection, readiness, nodes, health ---------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_flavour_is_detected_once_and_cached(
    flavour: Flavour, serve: Serve, client: MakeClient,
) -> None:
    standin, url = await serve(flavour=flavour)
    exo = client(url)
    assert exo.flavour is None
    assert await exo.detect() == flavour
    probes = sum(standin.counts.values())
    assert await exo.detect() == flavour
    assert sum(standin.counts.values()) == probes
    assert exo.stats.requests == 0
    if flavour == "v1":
        assert exo.node_id == standin.node_id


async def test_detection_rejects_a_server_that_is_no_llm_api(
    aiohttp_server: Any, client: MakeClient,
) -> None:
    server = await aiohttp_server(web.Application())
    with pytest.raises(ExoApiError, match="not an exo or OpenAI-compatible API"):
        await client(str(server.make_url(""))).detect()


async def test_ready_models_follow_runner_status_on_v1(serve: Serve, client: MakeClient) -> None:
    models = ("ready", "running", "loading", "failed", "none")
    standin, url = await serve(flavour="v1", models=models)
    standin.set_model("running", "Running")
    standin.set_model("loading", "Loading")
    standin.set_model("failed", "Failed", error_message="boom")
    standin.set_model("none", None)
    exo = client(url)
    ready = await exo.ready_models()
    assert sorted(m.model_id for m in ready) == ["ready", "running"]
    assert all(m.instance_ids == (standin.instance_id(m.model_id),) for m in ready)
    listed = {m.model_id: m.ready for m in await exo.models()}
    assert listed == {
        "ready": True, "running": True, "loading": False, "failed": False, "none": False,
    }


async def test_ready_models_on_openai_are_the_listed_ones(
    serve: Serve, client: MakeClient,
) -> None:
    _, url = await serve(flavour="openai", models=("a", "b"))
    assert [m.model_id for m in await client(url).ready_models()] == ["a", "b"]


async def test_ready_models_on_v0_are_those_that_answered(
    serve: Serve, client: MakeClient,
) -> None:
    standin, url = await serve(flavour="v0", models=("a", "b"))
    standin.set_model("b", "Loading")
    exo = client(url)
    # exo v0 lists all 73 cards as ready; none counts until it has answered.
    assert len([m for m in await exo.models()]) == 75
    assert await exo.ready_models() == []
    assert (await exo.chat(ask(model="a"))).model == "a"
    assert [m.model_id for m in await exo.ready_models()] == ["a"]
    with pytest.raises(ModelNotServedError, match="cannot serve the model 'b'"):
        await exo.chat(ask(model="b"))
    assert [m.model_id for m in await exo.ready_models()] == ["a"]


async def test_an_explicit_model_list_wins_over_what_the_server_says(
    serve: Serve, client: MakeClient,
) -> None:
    _, url = await serve(flavour="v0", models=("a",))
    exo = client(url, models=("a", "not-listed"))
    assert [m.model_id for m in await exo.ready_models()] == ["a", "not-listed"]


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_nodes_report_memory_where_the_flavour_knows_it(
    flavour: Flavour, serve: Serve, client: MakeClient,
) -> None:
    standin, url = await serve(flavour=flavour)
    (node,) = await client(url).nodes()
    if flavour == "v1":
        assert (node.node_id, node.name) == (standin.node_id, "standin")
        assert node.memory_total_bytes == standin.memory_total_bytes
        assert node.memory_available_bytes == standin.memory_available_bytes
    elif flavour == "v0":
        assert node.node_id == standin.node_id
        # v0 reports whole MiB, no free memory, and FLOPS 0 for a chip it does not know.
        assert node.memory_total_bytes == standin.memory_total_bytes // 2**20 * 2**20
        assert node.memory_available_bytes is None
        assert node.flops_fp16_tflops is None
    else:
        assert node.node_id == url
        assert node.memory_total_bytes is None


async def test_health_measures_latency_and_never_raises(
    serve: Serve, aiohttp_server: Any, client: MakeClient,
) -> None:
    _, url = await serve(flavour="v1")
    health = await client(url).health()
    assert health
    assert health.flavour == "v1"
    assert health.latency_ms > 0
    down = await client(await dead_url(aiohttp_server)).health()
    assert not down
    assert down.flavour is None
    assert "failed" in down.error


# --- chat ----------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_chat_returns_text_usage_and_latency(
    flavour: Flavour, serve: Serve, client: MakeClient,
) -> None:
    standin, url = await serve(flavour=flavour, latency_s=0.05)
    exo = client(url)
    result = await exo.chat(ask(temperature=0.0))
    assert (result.text, result.finish_reason) == (REPLY, "stop")
    assert result.usage == Usage(prompt_tokens=5, completion_tokens=9, total_tokens=14)
    assert result.latency_ms >= 50
    assert (result.endpoint, result.model) == (url, MODEL)
    assert result.id
    assert standin.chat_requests[-1] == {
        "model": MODEL, "messages": [{"role": "user", "content": "what is six times seven"}],
        "temperature": 0.0, "stream": False,
    }
    assert (exo.stats.requests, exo.stats.errors) == (1, 0)
    assert (exo.stats.prompt_tokens, exo.stats.completion_tokens) == (5, 9)
    assert exo.stats.total_latency_ms >= 50


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_stream_assembles_to_the_same_text_as_a_plain_chat(
    flavour: Flavour, serve: Serve, client: MakeClient,
) -> None:
    standin, url = await serve(flavour=flavour)
    exo = client(url)
    whole = await exo.chat(ask(max_tokens=6))
    *pieces, last = await collect(exo.chat_stream(ask(max_tokens=6)))
    assert [p.text for p in pieces] == split_tokens(REPLY)[:6]
    if flavour == "v0":
        # v0 ignores max_tokens: the whole answer is cut here by its share of the tokens.
        assert whole.usage is not None
        assert (whole.finish_reason, whole.usage.completion_tokens) == ("length", 6)
        assert whole.text == REPLY[: len(REPLY) * 6 // len(split_tokens(REPLY))]
    else:
        assert "".join(p.text for p in pieces) == whole.text
    assert not any(p.done for p in pieces)
    assert (last.done, last.text, last.finish_reason) == (True, "", "length")
    assert last.latency_ms is not None
    assert (last.endpoint, last.id) == (url, pieces[0].id)
    # exo v0 reports no usage when streaming; llama-server does when asked to.
    assert last.usage == (None if flavour == "v0" else whole.usage)
    options = standin.chat_requests[-1].get("stream_options")
    assert options == ({"include_usage": True} if flavour == "openai" else None)
    assert exo.stats.requests == 2


async def test_concurrent_chats_share_one_session(serve: Serve, client: MakeClient) -> None:
    standin, url = await serve(flavour="v1", latency_s=0.02)
    exo = client(url)
    results = await asyncio.gather(*(exo.chat(ask(f"question {i}")) for i in range(16)))
    assert [r.text for r in results] == [REPLY] * 16
    assert standin.counts["/v1/chat/completions"] == 16
    assert exo.stats.requests == 16


async def test_v1_holds_a_chat_until_the_runners_are_ready(
    serve: Serve, client: MakeClient,
) -> None:
    standin, url = await serve(flavour="v1", ready=False)
    chat = asyncio.create_task(client(url).chat(ask()))
    await asyncio.sleep(0.05)
    assert not chat.done()
    standin.set_model(MODEL, "Ready")
    assert (await asyncio.wait_for(chat, 5)).text == REPLY


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("stream", [False, True])
async def test_http_500_is_a_recoverable_api_error(
    flavour: Flavour, stream: bool, serve: Serve, client: MakeClient,
) -> None:
    _, url = await serve(flavour=flavour, fail_mode="http_500")
    exo = client(url)
    with pytest.raises(ExoApiError) as caught:
        await chat_once(exo, ask(), stream)
    assert caught.value.status == 500
    assert caught.value.is_recoverable
    assert caught.value.url == url + "/v1/chat/completions"
    assert (exo.stats.requests, exo.stats.errors) == (1, 1)


@pytest.mark.parametrize("stream", [False, True])
async def test_missing_instance_is_its_own_error(
    stream: bool, serve: Serve, client: MakeClient,
) -> None:
    _, url = await serve(flavour="v1")
    with pytest.raises(NoInstanceError) as caught:
        await chat_once(client(url), ask(model="mlx-community/not-placed"), stream)
    assert (caught.value.status, caught.value.model_id) == (404, "mlx-community/not-placed")
    assert caught.value.is_recoverable


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("stream", [False, True])
async def test_malformed_json_is_a_parse_error_naming_the_endpoint(
    flavour: Flavour, stream: bool, serve: Serve, client: MakeClient,
) -> None:
    _, url = await serve(flavour=flavour, fail_mode="malformed_json")
    exo = client(url)
    with pytest.raises(ParseError, match=f"{url}/v1/chat/completions"):
        await chat_once(exo, ask(), stream)
    assert exo.stats.errors == 1


async def test_malformed_state_is_a_parse_error_naming_the_endpoint(
    serve: Serve, client: MakeClient,
) -> None:
    standin, url = await serve(flavour="v1")
    exo = client(url)
    await exo.detect()
    standin.fail("malformed_json", scope="all")
    with pytest.raises(ParseError, match=f"{url}/state"):
        await exo.nodes()


async def test_validation_failure_carries_fastapi_detail(serve: Serve, client: MakeClient) -> None:
    _, url = await serve(flavour="v1", fail_mode="validation_422")
    with pytest.raises(ExoApiError) as caught:
        await client(url).chat(ask())
    assert caught.value.status == 422
    assert not caught.value.is_recoverable
    detail = json.loads(caught.value.body)["detail"]
    assert (detail[0]["loc"], detail[0]["msg"]) == (["body", "messages"], "Field required")


@pytest.mark.parametrize(
    ("flavour", "in_stream", "plain", "plain_says"),
    [
        # exo v1 raises a runner's error after the 200 headers of a plain answer: cut short.
        ("v1", StreamError, IncompleteAnswerError, "the body broke off after 0 bytes"),
        ("openai", StreamError, StreamError, "runner failed mid-generation"),
        # exo v0 has no in-band error: its stream stops short, a plain request gets HTTP 500.
        ("v0", IncompleteStreamError, ExoApiError, "runner failed mid-generation"),
    ],
)
async def test_error_mid_stream_raises_after_the_text_so_far(
    flavour: Flavour, in_stream: type[Exception], plain: type[Exception], plain_says: str,
    serve: Serve, client: MakeClient,
) -> None:
    _, url = await serve(flavour=flavour, fail_mode="mid_stream_error")
    exo = client(url)
    seen: list[str] = []
    with pytest.raises(in_stream) as caught:
        await drain(exo.chat_stream(ask()), seen)
    assert seen == split_tokens(REPLY)[:1]
    if isinstance(caught.value, StreamError):
        assert caught.value.status == 500
        assert "runner failed" in caught.value.body
    with pytest.raises(plain, match=plain_says) as plain_caught:
        await exo.chat(ask())
    if plain is IncompleteAnswerError:
        assert plain_caught.value.is_recoverable
    assert exo.stats.errors == 2


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_stream_ending_early_is_incomplete(
    flavour: Flavour, serve: Serve, client: MakeClient,
) -> None:
    _, url = await serve(flavour=flavour, fail_mode="truncated_stream", fail_times=2)
    exo = client(url)
    seen: list[str] = []
    with pytest.raises(IncompleteStreamError) as caught:
        await drain(exo.chat_stream(ask()), seen)
    assert seen == split_tokens(REPLY)[:1]
    assert caught.value.is_recoverable
    assert caught.value.arrived == seen[0]
    assert f"{url}/v1/chat/completions" in caught.value.message
    # Cancelled or deleted mid-generation, exo answers 200 with the text so far and no
    # finish_reason: that is not an answer either.
    with pytest.raises(IncompleteAnswerError, match="without a finish_reason") as plain:
        await exo.chat(ask())
    assert plain.value.arrived == seen[0]
    assert plain.value.is_recoverable
    assert f"POST {url}/v1/chat/completions" in plain.value.message
    assert (await exo.chat(ask())).text == REPLY


@pytest.mark.parametrize("stream", [False, True])
async def test_a_hung_server_times_out(stream: bool, serve: Serve, client: MakeClient) -> None:
    _, url = await serve(flavour="v1", fail_mode="hang")
    with pytest.raises(ExoTimeoutError) as caught:
        await chat_once(client(url, request_timeout_s=0.3), ask(), stream)
    assert isinstance(caught.value, NetworkError)
    assert isinstance(caught.value, TimeoutError)


async def test_refused_connection_is_a_network_error(
    aiohttp_server: Any, client: MakeClient,
) -> None:
    exo = client(await dead_url(aiohttp_server), flavour="v1")
    with pytest.raises(NetworkError):
        await exo.chat(ask())
    with pytest.raises(NetworkError):
        await collect(exo.chat_stream(ask()))
    assert (exo.stats.requests, exo.stats.errors) == (2, 2)


async def test_failures_can_be_limited_to_the_next_requests(
    serve: Serve, client: MakeClient,
) -> None:
    standin, url = await serve(flavour="v0", fail_mode="http_500", fail_times=2)
    exo = client(url)
    for _ in range(2):
        with pytest.raises(ExoApiError):
            await exo.chat(ask())
    assert (await exo.chat(ask())).text == REPLY
    assert standin.fail_mode is None
    assert standin.counts["/v1/chat/completions"] == 3


# --- replayed captures: the real bytes, not the stand-in's rendering --------------------------


# The models the captured answers came from.
CAPTURED_MODEL: dict[Flavour, str] = {
    "v1": TINY, "v0": "dummy", "openai": "SmolLM2-135M-Instruct",
}


def _replay_app(path: Path, content_type: str) -> web.Application:
    body = path.read_bytes()

    async def answer(_request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=content_type)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    return app


@pytest.mark.parametrize(
    ("flavour", "text", "finish", "usage"),
    [
        ("v1", "3 memory memory memory", "length", Usage(prompt_tokens=13, completion_tokens=4,
                                                         total_tokens=17)),
        ("v0", "dummy" * 10, "stop", None),
        ("openai", "I'm glad you", "length", Usage(prompt_tokens=32, completion_tokens=4,
                                                   total_tokens=36)),
    ],
)
async def test_captured_streams_replay(
    flavour: Flavour, text: str, finish: str, usage: Usage | None, aiohttp_server: Any,
    client: MakeClient,
) -> None:
    app = _replay_app(DATA_DIR / flavour / "chat_stream.sse", "text/event-stream")
    exo = client(str((await aiohttp_server(app)).make_url("")), flavour=flavour)
    *pieces, last = await collect(exo.chat_stream(ask(model=CAPTURED_MODEL[flavour])))
    assert "".join(p.text for p in pieces) == text
    assert (last.finish_reason, last.usage) == (finish, usage)


async def test_captured_cancelled_stream_is_incomplete(
    aiohttp_server: Any, client: MakeClient,
) -> None:
    app = _replay_app(DATA_DIR / "v1" / "chat_stream_cancelled.sse", "text/event-stream")
    exo = client(str((await aiohttp_server(app)).make_url("")), flavour="v1")
    seen: list[str] = []
    with pytest.raises(IncompleteStreamError, match="without a finish_reason"):
        await drain(exo.chat_stream(ask(model=TINY)), seen)
    assert "".join(seen).startswith("33oryru")


@pytest.mark.parametrize(
    ("flavour", "text", "finish", "usage"),
    [
        ("v1", "33ory\ufffdde\ufffd\ufffd\ufffd|||\ufffd", "length",
         Usage(prompt_tokens=5, completion_tokens=12, total_tokens=17)),
        ("v0", "dummy" * 10, "stop", Usage(prompt_tokens=1, completion_tokens=10, total_tokens=11)),
        ("openai", "I'm glad you're here", "length",
         Usage(prompt_tokens=32, completion_tokens=6, total_tokens=38)),
    ],
)
async def test_captured_answers_replay(
    flavour: Flavour, text: str, finish: str, usage: Usage, aiohttp_server: Any,
    client: MakeClient,
) -> None:
    app = _replay_app(DATA_DIR / flavour / "chat_nonstream.json", "application/json")
    exo = client(str((await aiohttp_server(app)).make_url("")), flavour=flavour)
    result = await exo.chat(ask(model=CAPTURED_MODEL[flavour]))
    assert (result.text, result.finish_reason, result.usage) == (text, finish, usage)


# --- placement (exo v1) ------------------------------------------------------------------------


async def test_place_wait_ready_chat_delete(serve: Serve, client: MakeClient) -> None:
    standin, url = await serve(flavour="v1", models=(TINY,), load_delay_s=0.2)
    standin.set_model(TINY, None)
    exo = client(url, poll_interval_s=0.02)
    with pytest.raises(NoInstanceError):
        await exo.chat(ask(model=TINY))
    placed = await exo.place_instance(TINY, sharding="Tensor", min_nodes=1)
    assert placed.command_id
    assert placed.model_id == TINY
    assert placed.instance_id == standin.instance_id(TINY)
    assert await exo.get_instance(placed.instance_id) == placed.instance_id
    assert standin.model_status(TINY) == "Loading"
    assert await exo.ready_models() == []
    model = await exo.wait_ready(TINY, timeout_s=5, instance_id=placed.instance_id)
    assert model.instance_ids == (standin.instance_id(TINY),)
    assert (await exo.chat(ask(model=TINY))).text == REPLY
    assert await exo.delete_instance(model.instance_ids[0])
    assert await exo.ready_models() == []
    with pytest.raises(ExoApiError) as caught:
        await exo.delete_instance(model.instance_ids[0])
    assert caught.value.status == 404


async def test_placing_an_unknown_model_fails_at_once(serve: Serve, client: MakeClient) -> None:
    standin, url = await serve(flavour="v1")
    # exo has no model card for the id and answers a bare 500.
    with pytest.raises(PlacementError, match="cannot place 'nobody/knows-this': HTTP 500"
                       ) as caught:
        await client(url).place_instance("nobody/knows-this")
    assert caught.value.status == 500
    assert not caught.value.is_recoverable
    assert standin.counts["/instance"] == 0


async def test_a_placement_exo_refuses_is_an_error_with_its_reason(
    serve: Serve, client: MakeClient,
) -> None:
    standin, url = await serve(flavour="v1", models=(TINY,))
    standin.set_model(TINY, None)
    standin.placement_error = "No cycles found with sufficient memory"
    with pytest.raises(PlacementError) as caught:
        await client(url).place_instance(TINY)
    assert caught.value.status == 400
    assert caught.value.message.endswith("HTTP 400: No cycles found with sufficient memory")
    assert standin.counts["/instance"] == 0
    assert standin.model_status(TINY) is None


async def test_a_placed_instance_whose_runner_fails_says_why_at_once(
    serve: Serve, client: MakeClient,
) -> None:
    standin, url = await serve(flavour="v1", models=(TINY,), load_delay_s=0.05)
    standin.set_model(TINY, None)
    standin.load_error = "Metal out of memory"
    exo = client(url, poll_interval_s=0.02)
    placed = await exo.place_instance(TINY)
    assert placed.instance_id is not None
    with pytest.raises(InstanceFailedError, match="runner Failed: Metal out of memory"):
        # Well before the timeout: the runner's error, not "not ready within 30 s".
        await asyncio.wait_for(exo.wait_ready(TINY, 30, instance_id=placed.instance_id), 5)
    with pytest.raises(ExoApiError, match="Instance not found") as missing:
        await exo.get_instance("no-such-instance")
    assert missing.value.status == 404


async def test_polls_read_state_sub_trees_not_the_whole_state(
    serve: Serve, client: MakeClient,
) -> None:
    standin, url = await serve(flavour="v1")
    exo = client(url)
    assert [m.model_id for m in await exo.ready_models()] == [MODEL]
    nodes = await exo.nodes()
    assert [n.name for n in nodes] == ["standin"]
    # Written "+00:00" by /state/{path}, as exo's pydantic dump does.
    assert nodes[0].last_seen is not None
    assert nodes[0].last_seen.endswith("+00:00")
    assert standin.counts["/state"] == 0
    assert standin.counts["/state/instances"] == standin.counts["/state/runners"] == 1
    async with aiohttp.ClientSession() as http, http.get(f"{url}/state/nope/deeper") as answer:
        assert answer.status == 404
        body = await answer.json()
    assert body["error"]["message"] == "unable to find path 'nope.deeper' in state json"


async def test_reasoning_is_kept_apart_from_the_reply(serve: Serve, client: MakeClient) -> None:
    thinking = "Maybe FINAL(13)? ```python\nprint(6 * 7)\n``` no: six sevens."
    standin, url = await serve(flavour="v1")
    standin.reasoning = thinking
    exo = client(url)
    result = await exo.chat(ask())
    assert (result.text, result.reasoning) == (REPLY, thinking)
    deltas = await collect(exo.chat_stream(ask()))
    assert "".join(d.reasoning for d in deltas) == thinking
    assert "".join(d.text for d in deltas) == REPLY
    # Thinking comes first, in pieces of its own: none mixes into the reply's text.
    assert all(not (d.text and d.reasoning) for d in deltas)
    assert deltas[0].reasoning
    assert deltas[0].text == ""


@pytest.mark.parametrize("how", ["cancel", "delete"])
async def test_a_plain_answer_cut_off_by_cancel_or_delete_is_incomplete(
    how: str, serve: Serve, client: MakeClient,
) -> None:
    asked = asyncio.Event()

    def reply(_body: dict[str, Any]) -> str:
        asked.set()
        return REPLY

    standin, url = await serve(flavour="v1", token_delay_s=0.05, reply=reply)
    exo = client(url)
    pending = asyncio.create_task(exo.chat(ask()))
    await asked.wait()
    # A few pieces generated, not all of them.
    await asyncio.sleep(0.12)
    if how == "cancel":
        assert await exo.cancel(next(iter(standin._streams)))
    else:
        assert await exo.delete_instance(standin.instance_id(MODEL))
    with pytest.raises(IncompleteAnswerError, match="200 without a finish_reason") as caught:
        await pending
    # exo's 200 carried the text so far: named in the error, never returned as the answer.
    assert caught.value.arrived
    assert REPLY.startswith(caught.value.arrived)
    assert caught.value.arrived != REPLY


async def test_wait_ready_times_out_with_the_runner_error(serve: Serve, client: MakeClient) -> None:
    standin, url = await serve(flavour="v1")
    standin.set_model(MODEL, "Failed", error_message="Metal out of memory")
    with pytest.raises(InstanceNotReadyError, match=r"Failed \(Metal out of memory\)") as caught:
        await client(url).wait_ready(MODEL, timeout_s=0.2, poll_interval_s=0.02)
    assert isinstance(caught.value, TimeoutError)
    assert caught.value.is_recoverable


@pytest.mark.parametrize("flavour", ["v0", "openai"])
async def test_wait_ready_and_placement_on_other_flavours(
    flavour: Flavour, serve: Serve, client: MakeClient,
) -> None:
    _, url = await serve(flavour=flavour)
    exo = client(url)
    if flavour == "v0":
        # Listed as ready, but exo v0 says that of every card: only an answer counts.
        with pytest.raises(InstanceNotReadyError):
            await exo.wait_ready(MODEL, timeout_s=0.1, poll_interval_s=0.02)
        await exo.chat(ask())
    assert (await exo.wait_ready(MODEL, timeout_s=1)).model_id == MODEL
    with pytest.raises(UnsupportedFlavourError):
        await exo.place_instance(MODEL)
    with pytest.raises(UnsupportedFlavourError):
        await exo.cancel("some-id")


async def test_cancel_ends_a_running_stream(serve: Serve, client: MakeClient) -> None:
    _, url = await serve(flavour="v1", token_delay_s=0.05)
    exo = client(url)
    seen: list[str] = []
    cancelled: list[bool] = []

    async def read_and_cancel() -> None:
        async for delta in exo.chat_stream(ask()):
            seen.append(delta.text)
            if not cancelled:
                cancelled.append(await exo.cancel(delta.id))

    with pytest.raises(IncompleteStreamError, match="without a finish_reason"):
        await read_and_cancel()
    assert cancelled == [True]
    assert 1 <= len(seen) < len(split_tokens(REPLY))


async def test_cancelling_a_finished_generation_says_so(serve: Serve, client: MakeClient) -> None:
    _, url = await serve(flavour="v1")
    exo = client(url)
    *_, last = await collect(exo.chat_stream(ask()))
    assert not await exo.cancel(last.id)


# --- lifecycle -----------------------------------------------------------------------------------


async def test_close_is_idempotent_and_leaves_a_borrowed_session_open(serve: Serve) -> None:
    _, url = await serve(flavour="openai")
    owned = ExoClient(url)
    assert (await owned.chat(ask())).text == REPLY
    await owned.close()
    await owned.close()
    with pytest.raises(RuntimeError, match="closed"):
        await owned.chat(ask())
    async with aiohttp.ClientSession() as session:
        async with ExoClient(url, session=session) as borrowed:
            assert (await borrowed.chat(ask())).text == REPLY
        assert not session.closed


async def test_from_config_takes_the_timeouts(serve: Serve) -> None:
    _, url = await serve(flavour="v1", fail_mode="hang")
    config = ExoConfig(request_timeout_s=0.3, poll_interval_s=0.5)
    async with ExoClient.from_config(url + "/", config) as exo:
        assert exo.base_url == url
        assert exo.poll_interval_s == 0.5
        with pytest.raises(ExoTimeoutError, match=r"0\.3 s"):
            await exo.chat(ask())


# --- the real thing: llama.cpp's server, as the controller embeds it ---------------------------


@pytest.mark.model
async def test_openai_flavour_against_the_embedded_llama_server(client: MakeClient) -> None:
    from kowalski.common.errors import EmbeddedModelError
    from kowalski.controller.models.embedded import EmbeddedModel, locate_weights

    pytest.importorskip("xllamacpp")
    try:
        locate_weights()
    except EmbeddedModelError as exc:
        pytest.skip(exc.message)
    async with EmbeddedModel(threads=2, context_tokens=1024, startup_timeout_s=60) as model:
        exo = client(model.base_url)
        assert await exo.detect() == "openai"
        assert await exo.health()
        (listed,) = await exo.ready_models()
        assert listed.context_length == 1024
        request = ask("What is the capital of France?", model=listed.model_id, max_tokens=8,
                      temperature=0.0, seed=1)
        whole = await exo.chat(request)
        *pieces, last = await collect(exo.chat_stream(request))
        assert whole.text
        assert whole.usage is not None
        assert 0 < whole.usage.completion_tokens <= 8
        # Greedy decoding: the stream says the same thing, token for token.
        assert "".join(p.text for p in pieces) == whole.text
        assert last.usage is not None
        assert last.usage.completion_tokens == whole.usage.completion_tokens
        # /v1/models, the plain chat, the stream; detection and health are not counted.
        assert (exo.stats.requests, exo.stats.errors) == (3, 0)
