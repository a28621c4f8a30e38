"""Reading a streamed chat answer: server-sent events into text pieces and a tally."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import aiohttp

from kowalski.controller.models.chat_types import SseDecoder, Usage, WireCompletion
from kowalski.controller.models.exo_errors import StreamError, in_band_error
from kowalski.controller.models.exo_types import decode


@dataclass
class StreamTally:
    """What a stream said besides its text, filled in while it is read."""

    finish: str | None = None
    usage: Usage | None = None
    completion_id: str = ""
    model: str = ""
    done: bool = False
    # The reply text so far, for the error when the stream is cut short.
    arrived: str = ""


async def _payloads(response: aiohttp.ClientResponse) -> AsyncGenerator[str, None]:
    decoder = SseDecoder()
    # iter_any, not line iteration: aiohttp caps line length, and a data line has no cap.
    async for chunk in response.content.iter_any():
        for payload in decoder.feed(chunk):
            yield payload
    for payload in decoder.close():
        yield payload


async def read_stream(
    response: aiohttp.ClientResponse, url: str, tally: StreamTally,
) -> AsyncGenerator[tuple[str, str], None]:
    """(reply text, reasoning text) pieces of a stream; errors sent inside it are raised."""
    async with contextlib.aclosing(_payloads(response)) as payloads:
        async for payload in payloads:
            if payload == "[DONE]":
                tally.done = True
                return
            chunk = decode(payload, WireCompletion, url)
            if chunk.error_text() is not None:
                raise in_band_error(chunk, payload, url)
            tally.completion_id = chunk.id or tally.completion_id
            tally.model = tally.model or chunk.model
            tally.usage = chunk.usage or tally.usage
            for choice in chunk.choices[:1]:
                if choice.finish_reason == "error":
                    raise StreamError(500, payload, url=url)
                tally.finish = choice.finish_reason or tally.finish
                text, reasoning = choice.content(), choice.reasoning()
                tally.arrived += text
                if text or reasoning:
                    yield text, reasoning
