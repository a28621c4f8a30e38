"""A lean OpenAI-compatible server for a scripted model: chat completions, streamed or not.

The benchmarks' sub-calls arrive 16 or more at a time and all wait the same 50 ms, so
each wave of answers is built one after another on one event loop: whatever a request
costs here stretches every wave and hides what the systems under test cost. This server
does no more than a model server must: aiohttp's low-level server (no application,
router, middleware or access log) on the daemons' event loop, keep-alive, the request
decoded by msgspec into just the fields it reads, and the answer in OpenAI's shape.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from bench import serving

__all__ = ["Script", "make_handler", "serve"]

Script = Callable[[dict[str, Any]], Awaitable[str]]
CHAT_PATH = "/v1/chat/completions"
_JSON = {"Content-Type": "application/json"}
_SSE = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_encode = msgspec.json.Encoder().encode


class _Message(msgspec.Struct):
    role: str = "user"
    content: Any = ""


class _Chat(msgspec.Struct):
    """What the server reads of a chat request; the other fields are accepted and ignored."""

    messages: list[_Message]
    stream: bool = False


_decode_chat = msgspec.json.Decoder(_Chat).decode


def _error(status: int, message: str) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "code": status}}
    return web.Response(status=status, body=_encode(body), headers=_JSON)


def make_handler(model: str, script: Script
                 ) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
    """The handler of GET /v1/models and POST /v1/chat/completions, for `web.Server`."""
    listing = _encode({"object": "list", "data": [
        {"id": model, "object": "model", "created": 0, "owned_by": "script"}]})

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if request.path == CHAT_PATH and request.method == "POST":
            return await chat(request)
        if request.path == "/v1/models" and request.method == "GET":
            return web.Response(body=listing, headers=_JSON)
        return _error(404, f"no route {request.method} {request.path}")

    async def chat(request: web.BaseRequest) -> web.StreamResponse:
        # Read to the end without aiohttp's 1 MiB cap: root prompts carry large contexts.
        data = await request.content.read()
        try:
            parsed = _decode_chat(data)
        except msgspec.DecodeError as exc:
            return _error(400, f"not a chat request: {exc}")
        messages = [{"role": m.role, "content": m.content} for m in parsed.messages]
        text = await script({"messages": messages, "stream": parsed.stream})
        prompt = sum(len(str(m.content)) for m in parsed.messages) // 4
        completion = max(1, len(text) // 4)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion,
                 "total_tokens": prompt + completion}
        made, ident = int(time.time()), f"chatcmpl-{time.time_ns()}"
        if not parsed.stream:
            return web.Response(body=_encode({
                "id": ident, "object": "chat.completion", "created": made, "model": model,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}],
                "usage": usage}), headers=_JSON)
        response = web.StreamResponse(headers=_SSE)
        await response.prepare(request)
        frames = [b"data: " + _encode({
            "id": ident, "object": "chat.completion.chunk", "created": made, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})
            + b"\n\n" for delta, finish, extra in (
                ({"role": "assistant", "content": text}, None, {}),
                ({}, "stop", {"usage": usage}))]
        # One write for the whole answer: the text is known at once.
        await response.write(b"".join(frames) + b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    return handle


async def serve(model: str, script: Script, port_file: Path) -> None:
    """Serve the script on one port of 127.0.0.1 until SIGTERM."""
    # Made here: a low-level server takes the loop that is running when it is made.
    server = web.Server(make_handler(model, script), access_log=None)
    await serving.serve_sites(server, 1, port_file)
