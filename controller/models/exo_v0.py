"""What servers get wrong, checked on our side: substituted models and ignored limits.

exo v0 answers for an unknown model with its default model, and ignores `max_tokens`
and `stop`; other servers may too. Nothing here trusts the server to have done it.
"""

from __future__ import annotations

import re

from kowalski.common.errors import ExoApiError
from kowalski.controller.models.chat_types import ChatRequest, Usage
from kowalski.controller.models.exo_errors import (
    ModelMismatchError,
    ModelNotServedError,
    NoInstanceError,
    UnknownModelError,
)
from kowalski.controller.models.exo_types import Flavour

# exo v0: {"detail": "Unsupported model: NAME with inference engine ..."}; NAME is the
# default model when the one asked for is not a known card.
_UNSUPPORTED = re.compile(r"Unsupported model: (?P<model>[^\s\"']+)")
# OpenAI, Ollama, LM Studio: 404 with the model named in a "not found"/"does not exist" text.
_NOT_FOUND = re.compile(r"model\b.*\b(not found|does not exist)", re.IGNORECASE | re.DOTALL)
# A hosted API answers "gpt-4o" with the dated snapshot "gpt-4o-2024-08-06".
_SNAPSHOT = re.compile(r"-\d{4}-\d{2}-\d{2}$")


def model_error(error: ExoApiError, asked: str) -> ExoApiError:
    """The typed error for an answer refusing the model, else the error unchanged."""
    match = _UNSUPPORTED.search(error.body)
    if error.status == 400 and match:
        named = match.group("model")
        if named == asked:
            return ModelNotServedError(error.status, error.body, url=error.url, model_id=asked)
        return UnknownModelError(error.status, error.body, url=error.url, model_id=asked,
                                 substitute=named)
    if (error.status == 404 and not isinstance(error, NoInstanceError) and asked
            and asked in error.body and _NOT_FOUND.search(error.body)):
        return UnknownModelError(error.status, error.body, url=error.url, model_id=asked)
    return error


def same_model(asked: str, answered: str) -> bool:
    """Whether an answer's `model` is the model asked for, as servers spell it."""
    if not asked or not answered or asked.lower() == answered.lower():
        return True
    base = _SNAPSHOT.sub("", answered)
    # llama.cpp's server serves one file whatever the name, and answers with the file's name.
    return (base == asked or answered.endswith(".gguf")
            or answered in (f"{asked}:latest", asked.rsplit("/", 1)[-1]))


def check_model(asked: str, answered: str, url: str) -> None:
    """Raise when the answer came from another model than the one asked for."""
    if not same_model(asked, answered):
        raise ModelMismatchError(url=url, asked=asked, answered=answered)


def stop_strings(request: ChatRequest) -> list[str]:
    stop = request.stop
    return [s for s in ([stop] if isinstance(stop, str) else stop or []) if s]


def enforce_limits(
    text: str, finish: str | None, usage: Usage | None, request: ChatRequest,
) -> tuple[str, str | None, Usage | None]:
    """Apply `stop` and `max_tokens` to a whole answer where the server did not."""
    cuts = [text.find(s) for s in stop_strings(request) if s in text]
    if cuts:
        text, finish = text[: min(cuts)], "stop"
    limit = None if request.max_tokens is None else max(request.max_tokens, 0)
    if limit is not None and usage is not None and usage.completion_tokens > limit:
        # No tokenizer here: keep the share of the text the allowed tokens make up.
        keep = len(text) * limit // usage.completion_tokens
        text, finish = text[:keep], "length"
        usage = Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=limit,
                      total_tokens=usage.prompt_tokens + limit)
    return text, finish, usage


def one_token_per_chunk(flavour: Flavour | None) -> bool:
    """exo v0 streams one token per chunk, so a chunk count is a token count."""
    return flavour == "v0"
