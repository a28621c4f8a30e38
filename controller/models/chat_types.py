"""OpenAI chat-completion structs: the request Kowalski sends, what comes back, stream decoding."""

from __future__ import annotations

from typing import Any, Literal, Protocol

import msgspec

Role = Literal["system", "user", "assistant", "developer", "tool"]


class ChatMessage(msgspec.Struct, frozen=True, kw_only=True):
    role: Role
    content: str


class ChatRequest(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The OpenAI request body; fields left as None are not sent, so the server's defaults apply."""

    model: str
    messages: list[ChatMessage]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    # A GBNF grammar the reply must follow: llama.cpp's extension, sent to its server only.
    grammar: str | None = None


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ChatResult(msgspec.Struct, frozen=True, kw_only=True):
    """One finished completion, with what it cost."""

    text: str
    finish_reason: str | None
    # None when the server reports no usage (exo v0 streams, exo's bench answers).
    usage: Usage | None
    latency_ms: float
    # Base URL of the server that answered.
    endpoint: str
    # The server's completion id; on exo v1 it is also the command id that /v1/cancel takes.
    id: str
    model: str = ""
    # A reasoning model's thinking, kept apart from the reply: never parsed as the answer.
    reasoning: str = ""


class ChatBackend(Protocol):
    """Where model calls go: the router over exo endpoints, a cache before it, or one client."""

    async def chat(self, request: ChatRequest, *, operation: str = "llm_inference"
                   ) -> ChatResult:
        """One completion; failures raise KowalskiError subclasses."""
        ...


class ChatDelta(msgspec.Struct, frozen=True, kw_only=True):
    """A piece of streamed text; the last item has done=True, no text, and the totals."""

    text: str = ""
    done: bool = False
    finish_reason: str | None = None
    usage: Usage | None = None
    latency_ms: float | None = None
    endpoint: str = ""
    id: str = ""
    # A piece of a reasoning model's thinking (exo's `reasoning_content`), not of the reply.
    reasoning: str = ""


# --- what servers send back (unknown fields are ignored: every server adds its own) ------


class WireMessage(msgspec.Struct, frozen=True, kw_only=True):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None


class WireChoice(msgspec.Struct, frozen=True, kw_only=True):
    index: int = 0
    # Complete answers carry `message`, stream chunks `delta`; exo v0 chunks carry both.
    message: WireMessage | None = None
    delta: WireMessage | None = None
    finish_reason: str | None = None

    def content(self) -> str:
        """The text this choice adds, preferring the delta of a stream chunk."""
        part = self.delta if self.delta is not None else self.message
        return (part.content or "") if part is not None else ""

    def reasoning(self) -> str:
        """The thinking this choice adds (`reasoning_content`), kept apart from the content."""
        part = self.delta if self.delta is not None else self.message
        return (part.reasoning_content or "") if part is not None else ""


class WireErrorInfo(msgspec.Struct, frozen=True, kw_only=True):
    message: str = ""
    type: str = ""
    param: str | None = None
    code: int | str | None = None


class WireCompletion(msgspec.Struct, frozen=True, kw_only=True):
    """A completion, a stream chunk, or an error envelope: all share this one shape."""

    id: str = ""
    object: str = ""
    model: str = ""
    choices: list[WireChoice] = msgspec.field(default_factory=list)
    usage: Usage | None = None
    # OpenAI-style envelope {"error": {...}}; some servers send a bare string.
    error: WireErrorInfo | str | None = None
    # FastAPI and exo v0 put errors here ({"detail": "..."} or a list of field errors).
    detail: Any = None

    def error_text(self) -> str | None:
        """The error this body reports, or None when it is a normal answer."""
        if isinstance(self.error, WireErrorInfo):
            return self.error.message or self.error.type or "error"
        if self.error is None and self.detail is not None and not self.choices:
            return str(self.detail)
        return self.error


def encode_request(
    request: ChatRequest, *, stream: bool, extra: dict[str, Any] | None = None,
) -> bytes:
    """The JSON body for a chat request, None fields left out."""
    body: dict[str, Any] = msgspec.to_builtins(request)
    body["stream"] = stream
    if extra:
        body.update(extra)
    return msgspec.json.encode(body)


class SseDecoder:
    """Splits a server-sent event stream into data payloads; comment lines are dropped."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []
        self.comments = 0

    def feed(self, chunk: bytes) -> list[str]:
        """Payloads completed by this chunk of bytes."""
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        events: list[str] = []
        for raw in lines:
            self._line(raw.rstrip(b"\r").decode("utf-8", "replace"), events)
        return events

    def close(self) -> list[str]:
        """Payloads left when the stream ends without a final blank line."""
        events: list[str] = []
        if self._buffer:
            self._line(self._buffer.rstrip(b"\r").decode("utf-8", "replace"), events)
            self._buffer = b""
        self._line("", events)
        return events

    def _line(self, line: str, events: list[str]) -> None:
        if not line:
            if self._data:
                events.append("\n".join(self._data))
                self._data = []
        elif line.startswith(":"):
            # exo's keep-alive, prefill_progress and generation_stats lines.
            self.comments += 1
        elif line.startswith("data:"):
            value = line[5:]
            self._data.append(value[1:] if value.startswith(" ") else value)
        # Other fields (event:, id:, retry:) carry nothing a chat stream needs.
