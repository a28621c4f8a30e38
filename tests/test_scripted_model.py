"""The benchmarks' scripted model server answers Kowalski's client as OpenAI's API would."""

from __future__ import annotations

from typing import Any

import aiohttp
import msgspec

from bench.scripted_model import make_handler
from kowalski.controller.models.chat_types import ChatMessage, ChatRequest
from kowalski.controller.models.exo_client import ExoClient

MODEL = "scripted/model"


async def echo(body: dict[str, Any]) -> str:
    """Names the last message and how many came, so each answer is checked end to end."""
    return f"{len(body['messages'])}: {str(body['messages'][-1]['content'])[:20]}"


def request(content: str) -> ChatRequest:
    return ChatRequest(model=MODEL, messages=[
        ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content=content)])


async def test_plain_and_streamed_answers_carry_the_text_and_usage(aiohttp_raw_server: Any
                                                                    ) -> None:
    server = await aiohttp_raw_server(make_handler(MODEL, echo))
    async with ExoClient(str(server.make_url(""))) as client:
        assert await client.detect() == "openai"
        assert [m.model_id for m in await client.models()] == [MODEL]
        plain = await client.chat(request("what is two and two"))
        deltas = [delta async for delta in client.chat_stream(request("stream it"))]
    assert plain.text == "2: what is two and two"
    assert plain.finish_reason == "stop"
    assert plain.usage is not None
    assert plain.usage.prompt_tokens == len("be briefwhat is two and two") // 4
    assert plain.usage.completion_tokens == len(plain.text) // 4
    assert "".join(delta.text for delta in deltas) == "2: stream it"
    assert deltas[-1].done
    assert deltas[-1].finish_reason == "stop"
    assert deltas[-1].usage is not None
    assert deltas[-1].usage.completion_tokens == len("2: stream it") // 4


async def test_a_body_over_a_mebibyte_is_read_whole(aiohttp_raw_server: Any) -> None:
    server = await aiohttp_raw_server(make_handler(MODEL, echo))
    async with ExoClient(str(server.make_url(""))) as client:
        answer = await client.chat(request("x" * (3 * 1024 * 1024)))
    assert answer.text == "2: " + "x" * 20
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == (3 * 1024 * 1024 + len("be brief")) // 4


async def test_bad_requests_get_openai_error_bodies(aiohttp_raw_server: Any) -> None:
    server = await aiohttp_raw_server(make_handler(MODEL, echo))
    async with aiohttp.ClientSession() as http:
        async with http.post(server.make_url("/v1/chat/completions"), data=b"{") as broken:
            status, body = broken.status, msgspec.json.decode(await broken.read())
        async with http.get(server.make_url("/v1/embeddings")) as missing:
            missing_status = missing.status
            missing_body = msgspec.json.decode(await missing.read())
    assert status == 400
    assert body["error"]["message"].startswith("not a chat request")
    assert missing_status == 404
    assert "/v1/embeddings" in missing_body["error"]["message"]
