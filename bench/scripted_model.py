"""A lean OpenAI-compatible server for a scripted model: chat completions, streamed or not.

The peer benchmark's sub-calls arrive 16 at a time; the test stand-in (tests/exo_standin.py)
spends about 0.4 ms of one core on each, enough to stretch every wave of 50 ms answers and
hide what the two RLM systems themselves cost. This one does no more than a model server
must: read the request, ask the script, answer in OpenAI's shape.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web

__all__ = ["make_app"]

Script = Callable[[dict[str, Any]], Awaitable[str]]
_encode = msgspec.json.Encoder().encode


def make_app(model: str, script: Script) -> web.Application:
    """The server's routes: GET /v1/models and POST /v1/chat/completions."""

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": model, "object": "model", "created": 0, "owned_by": "script"}]})

    async def chat(request: web.Request) -> web.StreamResponse:
        body = msgspec.json.decode(await request.read())
        text = await script(body)
        prompt = sum(len(str(m.get("content", ""))) for m in body["messages"]) // 4
        completion = max(1, len(text) // 4)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion,
                 "total_tokens": prompt + completion}
        made, ident = int(time.time()), f"chatcmpl-{time.time_ns()}"
        if not body.get("stream"):
            return web.Response(body=_encode({
                "id": ident, "object": "chat.completion", "created": made, "model": model,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}],
                "usage": usage}), content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for delta, finish, extra in (({"role": "assistant", "content": text}, None, {}),
                                     ({}, "stop", {"usage": usage})):
            chunk = {"id": ident, "object": "chat.completion.chunk", "created": made,
                     "model": model, "choices": [{"index": 0, "delta": delta,
                                                  "finish_reason": finish}], **extra}
            await response.write(b"data: " + _encode(chunk) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application(client_max_size=256 * 1024 * 1024)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    return app
