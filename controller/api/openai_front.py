"""An OpenAI-compatible front: `rlm:<model>` runs an RLM job, other models pass through.

`rlm:<root>+<sub>` (or the extension field `sub_model`) names the model that answers the
run's llm_query sub-calls; the root model runs the loop.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import msgspec
from aiohttp import web
from msgspec import Meta

from kowalski.common.errors import KowalskiError, ParseError
from kowalski.common.http import json_response, read_body
from kowalski.controller.api.state import STATE, require_token
from kowalski.controller.models.chat_types import ChatDelta, ChatMessage, ChatRequest, Usage
from kowalski.controller.rlm.runs import RunRequest

RLM_PREFIX = "rlm:"


class ContentPart(msgspec.Struct, frozen=True, kw_only=True):
    type: str
    text: str = ""


class InMessage(msgspec.Struct, frozen=True, kw_only=True):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None


class CompletionBody(msgspec.Struct, frozen=True, kw_only=True):
    """What OpenAI clients send; fields this front does not use are ignored."""

    model: str
    messages: list[InMessage]
    stream: bool = False
    # As OpenAI's: at least one token when given.
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Meta(ge=1)] | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    # Kowalski's extension (extra_body): the long document an RLM run works on.
    context: Any = None
    # Kowalski's extension (extra_body): the model for the run's sub-calls.
    sub_model: str = ""


def _texts(message: InMessage) -> list[str]:
    if message.content is None:
        return []
    if isinstance(message.content, str):
        return [message.content]
    return [part.text for part in message.content if part.type == "text"]


def split_query(body: CompletionBody) -> tuple[str, Any]:
    """The last user message's first text is the query; the rest is the context."""
    users = [m for m in body.messages if m.role == "user"]
    if not users:
        raise ParseError("an rlm: request needs a user message holding the query")
    query, *attached = _texts(users[-1]) or [""]
    if not query.strip():
        raise ParseError("the last user message is empty: it should hold the query")
    documents = [text for m in users[:-1] for text in _texts(m)] + attached
    if body.context is not None:
        return query, body.context
    return query, "\n\n".join(documents)


def rlm_models(body: CompletionBody, served: list[str]) -> tuple[str, str]:
    """The root and sub-call models an rlm: request names (empty: the defaults)."""
    name = body.model.removeprefix(RLM_PREFIX)
    if name in served:
        # A served model whose own name holds a "+" is not split.
        return name, body.sub_model
    root, _, sub = name.partition("+")
    return root, body.sub_model or sub


def _completion(*, completion_id: str, model: str, text: str, finish: str,
                usage: Usage | None, reasoning: str = "") -> dict[str, Any]:
    message = {"role": "assistant", "content": text}
    if reasoning:
        message["reasoning_content"] = reasoning
    return {
        "id": completion_id, "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": msgspec.to_builtins(usage or Usage()),
    }


def _chunk(*, completion_id: str, model: str, delta: dict[str, str], finish: str | None,
           usage: Usage | None = None) -> bytes:
    body: dict[str, Any] = {
        "id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()),
        "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage is not None:
        body["usage"] = msgspec.to_builtins(usage)
    return b"data: " + msgspec.json.encode(body) + b"\n\n"


async def _stream(request: web.Request, chunks: list[bytes]) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    for chunk in chunks:
        await response.write(chunk)
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def chat_completions(request: web.Request) -> web.StreamResponse:
    require_token(request)
    state = request.app[STATE]
    body = await read_body(request, CompletionBody)
    max_tokens = body.max_completion_tokens or body.max_tokens
    if body.model.startswith(RLM_PREFIX):
        query, context = split_query(body)
        root, sub = rlm_models(body, state.router.ready_models())
        result = await state.runs.run(RunRequest(query=query, context=context, model=root,
                                                 sub_model=sub))
        usage = Usage(prompt_tokens=result.tokens.prompt_tokens,
                      completion_tokens=result.tokens.completion_tokens,
                      total_tokens=result.tokens.total_tokens)
        finish, text = "stop", result.answer
        if not result.answer and result.stop_reason not in ("final", "final_var", "answer_dict",
                                                           "direct"):
            # Never pass the model's raw last reply (often code) off as the answer.
            finish = "length"
            text = (f"The run stopped without an answer ({result.stop_reason}"
                    f"{': ' + result.detail if result.detail else ''}); its trajectory is run "
                    f"{result.run_id}.")
        if body.stream:
            return await _stream(request, [
                _chunk(completion_id=result.run_id, model=body.model,
                       delta={"role": "assistant", "content": text}, finish=None),
                _chunk(completion_id=result.run_id, model=body.model, delta={},
                       finish=finish, usage=usage),
            ])
        return web.json_response(_completion(completion_id=result.run_id, model=body.model,
                                             text=text, finish=finish, usage=usage))
    chat = ChatRequest(
        model=body.model,
        messages=[ChatMessage(role=m.role if m.role != "developer" else "system",
                              content="\n".join(_texts(m)))
                  for m in body.messages if m.role in ("system", "user", "assistant",
                                                       "developer")],
        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, stop=body.stop,
        seed=body.seed)
    if body.stream:
        deltas = state.router.chat_stream(chat)
        # Until the first piece comes, a failure (no endpoint has the model) can still be an
        # error answer of its own; after it, the stream has to carry the error.
        first = await anext(deltas, None)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        completion_id = ""
        try:
            async for delta in _chain(first, deltas):
                completion_id = completion_id or delta.id or f"chatcmpl-{time.time_ns()}"
                if delta.done:
                    await response.write(_chunk(completion_id=completion_id, model=body.model,
                                                delta={}, finish=delta.finish_reason or "stop",
                                                usage=delta.usage))
                elif delta.text or delta.reasoning:
                    # A reasoning model's thinking goes out as the servers that make it send
                    # it (`reasoning_content`), never mixed into the reply.
                    piece = {"reasoning_content": delta.reasoning} if delta.reasoning else {}
                    piece |= {"content": delta.text} if delta.text else {}
                    await response.write(_chunk(completion_id=completion_id, model=body.model,
                                                delta=piece, finish=None))
        except KowalskiError as exc:
            # As OpenAI's servers do: an error event, and the stream ends without [DONE].
            error = {"code": exc.code, "message": exc.user_message(), "type": "server_error",
                     "retryable": exc.retry_elsewhere}
            await response.write(b"data: " + msgspec.json.encode({"error": error}) + b"\n\n")
            await response.write_eof()
            return response
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
    answer = await state.backend.chat(chat)
    return web.json_response(_completion(
        completion_id=answer.id or f"chatcmpl-{time.time_ns()}", model=answer.model or body.model,
        text=answer.text, finish=answer.finish_reason or "stop", usage=answer.usage,
        reasoning=answer.reasoning))


async def _chain(first: ChatDelta | None, rest: AsyncIterator[ChatDelta]
                 ) -> AsyncIterator[ChatDelta]:
    if first is not None:
        yield first
    async for delta in rest:
        yield delta


async def list_models(request: web.Request) -> web.Response:
    ready = request.app[STATE].router.ready_models()
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "kowalski"}
            for model in ready for name in (model, RLM_PREFIX + model)]
    return json_response({"object": "list", "data": data})
