"""The model's reply as it is generated: streamed pieces, the cache, /v1/runs and the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import sys
import time
from collections.abc import AsyncIterator, Callable
from io import StringIO
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from exo_standin import DEFAULT_MODEL, STANDIN, make_exo_app
from procs import AgentProcess

from kowalski.common.config import ControllerConfig, ExoConfig
from kowalski.controller.circuit import CircuitPolicy
from kowalski.controller.cli.live import LiveReply
from kowalski.controller.cli.run import RunWatch
from kowalski.controller.models.cache import CachedBackend, ResultCache
from kowalski.controller.models.chat_types import ChatMessage, ChatRequest
from kowalski.controller.models.router import LlmRouter
from kowalski.controller.retry import RetryPolicy
from kowalski.controller.rlm.events import CellOutput, CodeExecuted
from kowalski.controller.rlm.streaming import ask_streamed
from kowalski.controller.service import Controller

pytestmark = pytest.mark.timeout(120)

REPLY = ("Let me count the lines of the context first.\n```repl\n"
         "result = len(context.splitlines())\n```\nFINAL_VAR(result)")
TOKEN_DELAY_S = 0.03


def scripted(body: dict[str, Any]) -> str:
    return REPLY


@pytest.fixture
def exo_reply() -> Callable[[dict[str, Any]], str]:
    return scripted


@pytest.fixture
def agent_count() -> int:
    return 1


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def make_router(url: str, http: aiohttp.ClientSession) -> LlmRouter:
    controller = ControllerConfig(retry_max_attempts=2, retry_base_delay_ms=10,
                                  retry_max_delay_ms=20)
    return LlmRouter(config=ExoConfig(endpoints=[url], poll_interval_s=0.1), urls=[url],
                     session=http, policy=RetryPolicy.from_config(controller),
                     circuit_policy=CircuitPolicy.from_config(controller),
                     load_penalty=controller.load_penalty)


class Pieces:
    """What a sink received, and when."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.counts: list[int] = []
        self.first_at = 0.0

    async def __call__(self, text: str, pieces: int) -> None:
        if not self.texts:
            self.first_at = time.monotonic()
        self.texts.append(text)
        self.counts.append(pieces)


async def test_a_reply_streams_in_pieces_and_a_deterministic_one_is_cached_whole(
    aiohttp_server: Any, http: aiohttp.ClientSession,
) -> None:
    server = await aiohttp_server(make_exo_app(reply=scripted, token_delay_s=TOKEN_DELAY_S))
    router = make_router(str(server.make_url("")).rstrip("/"), http)
    await router.refresh()
    backend = CachedBackend(router, ResultCache(max_entries=10, ttl_s=60))
    request = ChatRequest(model=DEFAULT_MODEL, temperature=0.0,
                          messages=[ChatMessage(role="user", content="count")])
    try:
        pieces = Pieces()
        started = time.monotonic()
        result, cached = await ask_streamed(backend, request, pieces)
        ended = time.monotonic()
        assert not cached
        assert result.text == REPLY
        assert "".join(pieces.texts) == REPLY
        assert len(pieces.texts) > 1
        assert pieces.counts == sorted(pieces.counts)
        # The first piece came long before the reply was done, not all at the end.
        assert pieces.first_at - started < (ended - started) / 2
        assert result.finish_reason == "stop"
        assert result.endpoint == router.endpoints[0].url

        again = Pieces()
        result, cached = await ask_streamed(backend, request, again)
        assert cached
        assert result.text == REPLY
        assert again.texts == []

        # At the server's default temperature every call is a fresh sample, streamed again.
        sampled = Pieces()
        result, cached = await ask_streamed(
            backend, ChatRequest(model=DEFAULT_MODEL, messages=request.messages), sampled)
        assert not cached
        assert "".join(sampled.texts) == REPLY
    finally:
        await router.close()


async def test_a_stream_refused_before_any_text_is_answered_by_a_plain_call(
    aiohttp_server: Any, http: aiohttp.ClientSession,
) -> None:
    server = await aiohttp_server(make_exo_app(reply=scripted))
    server.app[STANDIN].fail("http_500", times=1)
    router = make_router(str(server.make_url("")).rstrip("/"), http)
    await router.refresh()
    request = ChatRequest(model=DEFAULT_MODEL, messages=[ChatMessage(role="user", content="x")])
    try:
        pieces = Pieces()
        result, cached = await ask_streamed(router, request, pieces)
        assert result.text == REPLY
        assert not cached
        assert pieces.texts == []
    finally:
        await router.close()


async def test_streams_count_for_circuits_and_latency_as_plain_calls_do(
    aiohttp_server: Any, http: aiohttp.ClientSession,
) -> None:
    failing = await aiohttp_server(make_exo_app(reply=scripted))
    failing.app[STANDIN].fail("http_500", scope="chat")
    healthy = await aiohttp_server(make_exo_app(reply=scripted))
    urls = [str(server.make_url("")).rstrip("/") for server in (failing, healthy)]
    controller = ControllerConfig(retry_max_attempts=2, retry_base_delay_ms=10,
                                  retry_max_delay_ms=20, circuit_failure_threshold=2)
    router = LlmRouter(config=ExoConfig(endpoints=urls, poll_interval_s=60), urls=list(urls),
                       session=http, policy=RetryPolicy.from_config(controller),
                       circuit_policy=CircuitPolicy.from_config(controller),
                       load_penalty=controller.load_penalty)
    await router.refresh()
    bad, good = router.endpoints
    # The failing endpoint looks the better one until its streams have failed.
    bad.latency_ms, good.latency_ms = 1.0, 500.0
    request = ChatRequest(model=DEFAULT_MODEL, messages=[ChatMessage(role="user", content="x")])
    try:
        for _ in range(3):
            result, _cached = await ask_streamed(router, request, Pieces())
            assert result.text == REPLY
        # Two refused streams opened the failing endpoint's circuit: the third went straight
        # to the healthy one, whose streams brought its latency down from the made-up 500 ms.
        assert bad.circuit.state == "open"
        # One refused stream and one refused plain call, then never again; a stream that
        # did not count would have sent each of the three calls' streams there first.
        assert failing.app[STANDIN].counts["/v1/chat/completions"] == 2
        assert bad.in_flight == 0
        assert good.in_flight == 0
        assert good.circuit.failures == 0
        assert good.latency_ms is not None
        assert good.latency_ms < 500.0
        assert result.endpoint == good.url
    finally:
        await router.close()


async def test_a_run_over_http_streams_reply_deltas_that_the_trajectory_leaves_out(
    controller: Controller, exo: Any, agents: list[AgentProcess],
) -> None:
    exo.app[STANDIN].token_delay_s = TOKEN_DELAY_S
    lines: list[tuple[float, dict[str, Any]]] = []
    live: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as session, session.post(
        controller.base_url + "/v1/runs",
        json={"query": "count lines", "context": "a\nb\nc\n", "stream": True},
    ) as response:
        assert response.status == 200, await response.text()
        async for line in response.content:
            lines.append((time.monotonic(), json.loads(line)))
            if lines[-1][1].get("kind") == "reply_delta" and not live:
                # The status the dashboard draws holds the reply as it grows.
                async with session.get(controller.base_url + "/v1/status") as status:
                    live.extend(run for run in (await status.json())["runs"]
                                if run["reply_so_far"])
    kinds = [item.get("kind") for _, item in lines]
    assert "reply_delta" in kinds
    first_delta = kinds.index("reply_delta")
    replied = kinds.index("model_replied")
    assert kinds.index("iteration_started") < first_delta < replied
    deltas = [item for _, item in lines[:replied] if item.get("kind") == "reply_delta"]
    assert "".join(delta["text"] for delta in deltas) == lines[replied][1]["text"] == REPLY
    assert all(delta["iteration"] == 1 and delta["depth"] == 0 for delta in deltas)
    assert lines[replied][0] - lines[first_delta][0] > TOKEN_DELAY_S * 5
    assert live, "no run in /v1/status had a reply so far"
    assert live[0]["reply_iteration"] == 1
    assert REPLY.startswith(live[0]["reply_so_far"])
    result = lines[-1][1]["result"]
    assert result["answer"] == "3"
    stored = [json.loads(line)["kind"]
              for line in Path(result["trajectory_path"]).read_text().splitlines()]
    assert "model_replied" in stored
    assert "reply_delta" not in stored


async def test_ctl_run_on_a_terminal_shows_the_reply_growing_under_a_status_line(
    controller: Controller, exo: Any, agents: list[AgentProcess],
) -> None:
    exo.app[STANDIN].token_delay_s = 0.1
    primary, secondary = pty.openpty()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kowalski.controller", "run", "count lines", "--url",
        controller.base_url, stdout=secondary, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200"})
    os.close(secondary)
    seen = b""
    first_text_at = None
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    try:
        async with asyncio.timeout(60):
            while True:
                try:
                    chunk = await loop.run_in_executor(None, os.read, primary, 4096)
                except OSError:  # the terminal closes when the process ends
                    break
                if not chunk:
                    break
                seen += chunk
                if first_text_at is None and b"Let me count" in seen:
                    first_text_at = time.monotonic()
    finally:
        os.close(primary)
    assert await process.wait() == 0, await process.stderr.read() if process.stderr else ""
    ended = time.monotonic()
    text = seen.decode(errors="replace")
    assert "── iteration 1" in text
    assert "tok/s" in text, text
    assert "\r\x1b[K" in text
    assert "=== answer (final_var) ===\r\n0\r\n" in text
    assert first_text_at is not None
    # About 20 pieces at 0.1 s each: the first words were on screen well before the end.
    assert ended - first_text_at > 1.0, (first_text_at - started, ended - started)


def test_a_blocks_output_is_printed_in_whole_lines_as_it_comes_on_a_terminal() -> None:
    screen = StringIO()
    watch = RunWatch(screen, LiveReply(screen))

    def piece(stream: str, text: str) -> None:
        watch(CellOutput(run_id="r", depth=0, iteration=1, block=2, language="rust",
                         stream=stream, text=text))

    piece("stdout", "one\ntw")
    assert screen.getvalue().endswith("▶ block 2 (rust) running:\n│ one\n")
    piece("stdout", "o\nthree")
    assert screen.getvalue().endswith("│ one\n│ two\n")
    watch(CodeExecuted(run_id="r", depth=0, iteration=1, block=2, code="...", status="error",
                       output="[rust] stdout:\none\ntwo\nthree\n[rust code failed (exit 1): x]",
                       wall_time_ms=12.0, device_id="node1", language="rs", ran_as="rust"))
    shown = screen.getvalue()
    # The unfinished line is printed once the block ends; the output is not repeated, its
    # failure note is.
    assert shown.endswith("│ three\n▶ block 2 (rust) on node1: error (12 ms)\n"
                          "│ [rust code failed (exit 1): x]\n")
    assert shown.count("│ one") == 1
