"""exo v0 as a live two-node cluster behaved (tests/data/exo/v0_real/): one test per row of
the captures' table, each showing the stand-in answers as v0 did and what the client does."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from exo_standin import (
    STANDIN,
    V0_DEFAULT_MODEL,
    V0_TROUBLE,
    ExoStandin,
    captured_http,
    make_exo_app,
    v0_cards,
)

from kowalski.common.config import ControllerConfig, ExoConfig
from kowalski.common.errors import ExoApiError, NoModelAvailableError
from kowalski.controller.api.status import Status
from kowalski.controller.circuit import CircuitPolicy
from kowalski.controller.cli.status import status_text
from kowalski.controller.fleet.dispatch import JobCounters
from kowalski.controller.models.chat_types import ChatDelta, ChatMessage, ChatRequest, Usage
from kowalski.controller.models.exo_client import ExoClient
from kowalski.controller.models.exo_errors import (
    ModelMismatchError,
    ModelNotServedError,
    UnknownModelError,
)
from kowalski.controller.models.exo_v0 import enforce_limits
from kowalski.controller.models.router import LlmRouter
from kowalski.controller.retry import RetryPolicy

DUMMY = "dummy"


def ask(model: str = DUMMY, **kwargs: Any) -> ChatRequest:
    return ChatRequest(model=model, messages=[ChatMessage(role="user", content="hi")], **kwargs)


def dummy_reply(body: dict[str, Any]) -> str:
    # The dummy engine's answer: ten tokens, whatever was asked.
    return " ".join([DUMMY] * 10)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def start(aiohttp_server: Any, **kwargs: Any) -> tuple[ExoStandin, str]:
    """A v0 node whose engine serves only `dummy`, as in the captures."""
    kwargs.setdefault("models", (DUMMY,))
    app = make_exo_app(flavour="v0", reply=dummy_reply, **kwargs)
    server = await aiohttp_server(app)
    return app[STANDIN], str(server.make_url("")).rstrip("/")


def make_router(urls: list[str], http: aiohttp.ClientSession, **exo: Any) -> LlmRouter:
    controller = ControllerConfig(retry_max_attempts=3, retry_base_delay_ms=10,
                                  retry_max_delay_ms=20, circuit_failure_threshold=3)
    config = ExoConfig(endpoints=list(urls), poll_interval_s=0.1, **exo)
    return LlmRouter(config=config, urls=list(urls), session=http,
                     policy=RetryPolicy.from_config(controller),
                     circuit_policy=CircuitPolicy.from_config(controller),
                     load_penalty=controller.load_penalty)


async def collect(exo: ExoClient, request: ChatRequest) -> list[ChatDelta]:
    return [delta async for delta in exo.chat_stream(request)]


async def raw(http: aiohttp.ClientSession, method: str, url: str,
              body: bytes | None = None) -> tuple[int, str, bytes]:
    headers = {"Content-Type": "application/json"} if body is not None else None
    async with http.request(method, url, data=body, headers=headers) as response:
        return response.status, response.content_type, await response.read()


def captured(name: str) -> tuple[int, str, bytes]:
    status, headers, body = captured_http(name)
    return status, headers["Content-Type"].split(";")[0], body


# --- every card ready ---------------------------------------------------------------------


async def test_every_card_is_listed_ready_and_none_is_believed(
    aiohttp_server: Any, http: aiohttp.ClientSession,
) -> None:
    _, url = await start(aiohttp_server)
    status, _, body = await raw(http, "GET", url + "/v1/models")
    listed = json.loads(body)["data"]
    real = json.loads(captured("models.http")[2])["data"]
    assert status == 200
    assert len(real) == 73
    assert all(entry["ready"] for entry in real)
    assert [e["id"] for e in listed] == [e["id"] for e in real]
    assert all(entry["ready"] for entry in listed)
    assert (await raw(http, "GET", url + "/models"))[2] == body
    async with ExoClient(url, session=http) as exo:
        assert await exo.detect() == "v0"
        assert await exo.ready_models() == []
    router = make_router([url], http)
    await router.refresh()
    # No default model and nothing known to work: a clear error, not the first of 73 cards.
    assert router.ready_models() == []
    with pytest.raises(NoModelAvailableError, match=r"set exo\.default_model"):
        await router.chat(ask(model=""))
    await router.close()


# --- default-model substitution -----------------------------------------------------------


@pytest.mark.parametrize(("asked", "stream"), [
    ("no-such-model", False), ("no-such-model", True), ("gpt-4o", False),
])
async def test_an_unknown_model_is_an_error_naming_the_model_asked_for(
    asked: str, stream: bool, aiohttp_server: Any, http: aiohttp.ClientSession,
) -> None:
    _, url = await start(aiohttp_server)
    payload = json.dumps({"model": asked, "messages": [{"role": "user", "content": "hi"}],
                          "stream": stream}).encode()
    # As captured: the 400 names v0's default model, not the one asked for.
    assert await raw(http, "POST", url + "/v1/chat/completions", payload) == \
        captured("err_unknown_model_stream.http" if stream else "err_unknown_model.http")
    async with ExoClient(url, session=http) as exo:
        call = collect(exo, ask(model=asked)) if stream else exo.chat(ask(model=asked))
        with pytest.raises(UnknownModelError) as caught:
            await call
    assert caught.value.model_id == asked
    assert caught.value.substitute == V0_DEFAULT_MODEL
    assert f"does not know the model {asked!r}" in caught.value.message
    assert not caught.value.is_recoverable


async def test_with_a_servable_default_the_wrong_model_is_never_passed_on(
    aiohttp_server: Any, http: aiohttp.ClientSession,
) -> None:
    # `exo --default-model dummy`: v0 answers 200 for a model it does not know.
    substituting, bad = await start(aiohttp_server, default_model=DUMMY)
    status, kind, body = await raw(
        http, "POST", bad + "/v1/chat/completions",
        json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode())
    real = captured("defaultmodel_dummy_gpt4o.http")
    assert (status, kind) == real[:2]
    assert json.loads(body)["model"] == json.loads(real[2])["model"] == DUMMY
    async with ExoClient(bad, session=http) as exo:
        with pytest.raises(ModelMismatchError, match="asked for model 'gpt-4o' but the answer "
                                                     "came from 'dummy'"):
            await exo.chat(ask(model="gpt-4o"))
    # Through the router: the wrong answer is dropped and the call goes where the model is.
    # Another v0 node whose engine runs the model: neither counts as serving it yet.
    _, good = await start(aiohttp_server, models=("gpt-4o",))
    router = make_router([bad, good], http)
    await router.refresh()
    router.endpoints[0].latency_ms, router.endpoints[1].latency_ms = 0.1, 50.0
    for _ in range(3):
        result = await router.chat(ask(model="gpt-4o"))
        assert (result.endpoint, result.model) == (good, "gpt-4o")
    # Refused once, the substituting node is not asked for the model again.
    assert len(substituting.chat_requests) == 3
    await router.close()


# --- a listed, "ready" model the engine cannot run ----------------------------------------


async def test_unsupported_model_marks_it_unservable_there_for_a_while(
    aiohttp_server: Any, http: aiohttp.ClientSession,
) -> None:
    standin, url = await start(aiohttp_server)
    payload = json.dumps({"model": V0_DEFAULT_MODEL,
                          "messages": [{"role": "user", "content": "hi"}]}).encode()
    assert await raw(http, "POST", url + "/v1/chat/completions", payload) == \
        captured("err_known_model_wrong_engine.http")
    now = [0.0]
    async with ExoClient(url, session=http, unservable_model_s=60) as exo:
        exo.served.clock = lambda: now[0]
        with pytest.raises(ModelNotServedError, match=r"cannot serve the model 'llama-3\.2-1b'"):
            await exo.chat(ask(model=V0_DEFAULT_MODEL))
        assert not exo.served.allows(V0_DEFAULT_MODEL)
        now[0] = 61.0
        assert exo.served.allows(V0_DEFAULT_MODEL)
    router = make_router([url], http)
    await router.refresh()
    with pytest.raises(NoModelAvailableError, match="refused by"):
        await router.chat(ask(model=V0_DEFAULT_MODEL))
    # One request reached the node through the router; the refusal kept retries away.
    assert len(standin.chat_requests) == 3
    assert (await router.chat(ask())).text == dummy_reply({})
    assert router.ready_models() == [DUMMY]
    await router.close()


# --- ignored max_tokens, stop and seed ----------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_max_tokens_and_stop_are_enforced_here(
    stream: bool, aiohttp_server: Any, http: aiohttp.ClientSession,
) -> None:
    standin, url = await start(aiohttp_server)
    payload = json.dumps({"model": DUMMY, "max_tokens": 3,
                          "messages": [{"role": "user", "content": "hi"}]}).encode()
    _, _, body = await raw(http, "POST", url + "/v1/chat/completions", payload)
    real = json.loads(captured("chat_max_tokens3.http")[2])
    ours = json.loads(body)
    assert ours["usage"]["completion_tokens"] == real["usage"]["completion_tokens"] == 10
    assert ours["choices"][0]["finish_reason"] == real["choices"][0]["finish_reason"] == "stop"
    async with ExoClient(url, session=http) as exo:
        if stream:
            pieces = [d async for d in exo.chat_stream(ask(max_tokens=3))]
            assert "".join(p.text for p in pieces) == "dummy dummy dummy "
            assert pieces[-1].finish_reason == "length"
        else:
            result = await exo.chat(ask(max_tokens=3))
            assert result.finish_reason == "length"
            assert result.usage is not None
            assert result.usage.completion_tokens == 3
            assert len(result.text) == len(dummy_reply({})) * 3 // 10
            stopped = await exo.chat(ask(stop=[" dummy dummy"]))
            assert (stopped.text, stopped.finish_reason) == ("dummy", "stop")
            # Sent, and ignored by v0: the answer came back whole.
            assert standin.chat_requests[-1].get("stop") == [" dummy dummy"]


# --- malformed bodies: 500 text/plain -----------------------------------------------------


@pytest.mark.parametrize(("name", "body"), [
    ("err_bad_json.http", b"{not json"),
    ("err_missing_messages.http", b'{"model": "dummy"}'),
    ("err_message_no_content.http", b'{"model": "dummy", "messages": [{"role": "user"}]}'),
])
async def test_malformed_bodies_get_500_text_plain(
    name: str, body: bytes, aiohttp_server: Any, http: aiohttp.ClientSession,
) -> None:
    _, url = await start(aiohttp_server)
    answer = await raw(http, "POST", url + "/v1/chat/completions", body)
    assert answer == captured(name)
    assert answer[2].decode() == V0_TROUBLE


async def test_a_500_text_plain_is_a_recoverable_api_error(
    aiohttp_server: Any, http: aiohttp.ClientSession,
) -> None:
    standin, url = await start(aiohttp_server)
    standin.fail("http_500", times=1)
    async with ExoClient(url, session=http) as exo:
        with pytest.raises(ExoApiError, match="Server got itself in trouble") as caught:
            await exo.chat(ask())
        assert caught.value.status == 500
        assert caught.value.is_recoverable
        assert (await exo.chat(ask())).model == DUMMY


# --- unknown paths: 404, empty body -------------------------------------------------------


@pytest.mark.parametrize(("name", "method", "path"), [
    ("err_404_path.http", "GET", "/no/such/path"),
    ("err_node_id_v1probe.http", "GET", "/node_id"),
    ("err_state_v1_path.http", "GET", "/state"),
    ("err_health_openaiprobe.http", "GET", "/health"),
    ("err_get_on_chat.http", "GET", "/v1/chat/completions"),
])
async def test_unknown_paths_are_404_with_an_empty_body_and_detection_copes(
    name: str, method: str, path: str, aiohttp_server: Any, http: aiohttp.ClientSession,
) -> None:
    _, url = await start(aiohttp_server)
    assert await raw(http, method, url + path) == captured(name)
    async with ExoClient(url, session=http) as exo:
        assert await exo.detect() == "v0"
        assert (await exo.health()).ok


# --- the real topology shape --------------------------------------------------------------


async def test_topology_shape_and_nodes(aiohttp_server: Any, http: aiohttp.ClientSession) -> None:
    _, one = await start(aiohttp_server, node_id="node-c")
    _, two = await start(aiohttp_server, node_id="node-a", peer_node_ids=("node-b",))
    single = json.loads((await raw(http, "GET", one + "/v1/topology"))[2])
    pair = json.loads((await raw(http, "GET", two + "/v1/topology"))[2])
    real_single = json.loads(captured("topology_single_node.http")[2])
    real_pair = json.loads(captured("topology_nodeA.http")[2])
    for ours, real in ((single, real_single), (pair, real_pair)):
        assert ours.keys() == real.keys()
        assert ours["active_node_id"] is real["active_node_id"] is None
        assert sorted(ours["nodes"]) == sorted(real["nodes"])
        assert {k: type(v) for k, v in ours["nodes"][next(iter(ours["nodes"]))].items()} == \
            {k: type(v) for k, v in next(iter(real["nodes"].values())).items()}
    assert single["peer_graph"] == real_single["peer_graph"] == {}
    assert [e["to_id"] for e in pair["peer_graph"]["node-a"]] == \
        [e["to_id"] for e in real_pair["peer_graph"]["node-a"]]
    async with ExoClient(two, session=http) as exo:
        nodes = await exo.nodes()
    assert sorted(n.node_id for n in nodes) == ["node-a", "node-b"]
    assert all(n.flops_fp16_tflops is None for n in nodes)


# --- streams: message and delta, no [DONE], no usage --------------------------------------


async def test_a_stream_without_done_is_complete(
    aiohttp_server: Any, http: aiohttp.ClientSession,
) -> None:
    _, url = await start(aiohttp_server)
    payload = json.dumps({"model": DUMMY, "stream": True,
                          "messages": [{"role": "user", "content": "hi"}]}).encode()
    status, kind, body = await raw(http, "POST", url + "/v1/chat/completions", payload)
    real = captured("chat_stream.http")
    assert (status, kind) == real[:2]
    for frames in (body, real[2]):
        chunks = [json.loads(line[6:]) for line in frames.decode().splitlines()
                  if line.startswith("data: ")]
        assert len(chunks) == 10
        assert all({"message", "delta"} <= c["choices"][0].keys() for c in chunks)
        assert all("usage" not in c for c in chunks)
        assert b"[DONE]" not in frames
    async with ExoClient(url, session=http) as exo:
        *pieces, last = [d async for d in exo.chat_stream(ask())]
    assert "".join(p.text for p in pieces) == dummy_reply({})
    assert (last.finish_reason, last.usage) == ("stop", None)


# --- two endpoints of one cluster ---------------------------------------------------------


async def test_two_endpoints_of_one_cluster_are_one_cluster(
    aiohttp_server: Any, http: aiohttp.ClientSession,
) -> None:
    node_a, a = await start(aiohttp_server, node_id="node-a", peer_node_ids=("node-b",))
    node_b, b = await start(aiohttp_server, node_id="node-b", peer_node_ids=("node-a",))
    _, other = await start(aiohttp_server, node_id="node-c")
    both = json.loads(captured("chat_nonstream_via_nodeB.http")[2])
    assert both["model"] == DUMMY
    router = make_router([a, b, other], http)
    await router.refresh()
    views = {view.url: view for view in router.views()}
    assert views[a].cluster == views[b].cluster == "node-a"
    assert views[other].cluster == "node-c"
    assert views[a].nodes == views[b].nodes == 2
    # Calls in flight through one endpoint of a cluster weigh on the other one too.
    for endpoint in router.endpoints:
        endpoint.latency_ms = 1.0
    router.endpoints[0].in_flight = 3
    assert router.choose(DUMMY, "llm_inference").url == other
    status = Status(version="test", time=0.0, devices=[], endpoints=router.views(),
                    jobs=JobCounters(), runs=[], cache={})
    text = status_text(status)
    assert text.count("cluster node-a (2 nodes)") == 2
    assert "2 clusters, 3 nodes" in text
    await router.close()
    assert node_a.counts["/v1/topology"] == node_b.counts["/v1/topology"] == 1


# --- node loss: chats hang; the first-byte timeout moves them ----------------------------


async def test_a_chat_with_no_first_byte_is_retried_on_another_endpoint(
    aiohttp_server: Any, http: aiohttp.ClientSession,
) -> None:
    stuck, a = await start(aiohttp_server, node_id="node-a")
    _, b = await start(aiohttp_server, node_id="node-b")
    # As when node-b of node-a's cluster died: node-a holds every chat without answering.
    stuck.fail("hang")
    router = make_router([a, b], http, first_byte_timeout_s=0.3, default_model=DUMMY)
    await router.refresh()
    router.endpoints[0].latency_ms, router.endpoints[1].latency_ms = 0.1, 50.0
    started = asyncio.get_running_loop().time()
    result = await router.chat(ask())
    assert result.endpoint == b
    assert asyncio.get_running_loop().time() - started < 5
    assert len(stuck.chat_requests) == 1
    assert "no answer began within 0.3 s" in router.endpoints[0].last_error
    await router.close()


def test_the_captures_cover_every_card_id() -> None:
    assert len(v0_cards()) == len(set(v0_cards())) == 73
    assert {DUMMY, V0_DEFAULT_MODEL} <= set(v0_cards())


@pytest.mark.parametrize(("max_tokens", "completion_tokens"), [(0, 0), (0, 5), (-3, 0), (2, 4)])
def test_a_token_limit_is_applied_to_any_count_without_failing(
    max_tokens: int, completion_tokens: int,
) -> None:
    usage = Usage(prompt_tokens=1, completion_tokens=completion_tokens,
                  total_tokens=1 + completion_tokens)
    request = ChatRequest(model="m", messages=[], max_tokens=max_tokens)
    text, finish, kept = enforce_limits("abcdefgh", "stop", usage, request)
    assert kept is not None
    assert kept.completion_tokens == min(completion_tokens, max(max_tokens, 0))
    assert len(text) <= 8
    assert finish == ("length" if completion_tokens > max(max_tokens, 0) else "stop")
