"""The errors an exo or OpenAI-compatible endpoint can cause, and the mapping from answers."""

from __future__ import annotations

import re

from kowalski.common.errors import ExoApiError, KowalskiError, NetworkError, ParseError
from kowalski.controller.models.chat_types import WireCompletion, WireErrorInfo

_NO_INSTANCE = re.compile(r"No instance found for model (?P<model>[^\s\"]+)")


class ExoTimeoutError(NetworkError, TimeoutError):
    code = "exo_timeout"
    hint = "The server took too long: check the node, or raise exo.request_timeout_s"


class NoInstanceError(ExoApiError):
    """exo v1 has no instance of the model (HTTP 404 `No instance found for model X`)."""

    code = "exo_no_instance"
    hint = "Place an instance of the model (POST /place_instance) or use another endpoint"

    def __init__(self, status: int, body: str, *, url: str = "", model_id: str = "") -> None:
        super().__init__(status, body, url=url)
        self.model_id = model_id

    @property
    def is_recoverable(self) -> bool:  # type: ignore[override]
        # Another endpoint, or this one once an instance is placed, can serve the model.
        return True


class StreamError(ExoApiError):
    """The server reported an error inside an HTTP 200 answer (mid-stream, or in the body)."""

    code = "exo_stream_error"


class MalformedAnswerError(ExoApiError, ParseError):
    """An answer that is not what the API promises: the server's fault, so another may do."""

    code = "exo_malformed"

    def __init__(self, message: str, *, url: str = "") -> None:
        KowalskiError.__init__(self, message)
        self.status = 200
        self.body = ""
        self.url = url

    @property
    def is_recoverable(self) -> bool:  # type: ignore[override]
        return True


class IncompleteStreamError(NetworkError):
    """A stream ended before its end marker: cancelled, or the server went away."""

    code = "exo_stream_incomplete"


class UnsupportedFlavourError(KowalskiError, NotImplementedError):
    code = "exo_unsupported"
    hint = "Instance placement and cancellation need exo v1"


class InstanceNotReadyError(KowalskiError, TimeoutError):
    code = "exo_not_ready"
    is_recoverable = True
    hint = "Check the runners in exo's /state; a Failed runner's errorMessage says why"

    def __init__(self, model_id: str, timeout_s: float, detail: str) -> None:
        super().__init__(f"model {model_id} was not ready within {timeout_s:g} s: {detail}")
        self.model_id = model_id
        self.detail = detail


def http_error(status: int, body: bytes, url: str) -> ExoApiError:
    """The typed error for an HTTP error answer."""
    text = body.decode("utf-8", "replace")
    match = _NO_INSTANCE.search(text)
    if status == 404 and match:
        return NoInstanceError(status, text, url=url, model_id=match.group("model"))
    return ExoApiError(status, text, url=url)


def in_band_error(answer: WireCompletion, body: bytes | str, url: str) -> StreamError:
    """The error for an answer whose body reports an error despite HTTP 200."""
    code = answer.error.code if isinstance(answer.error, WireErrorInfo) else None
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    return StreamError(code if isinstance(code, int) else 500, text, url=url)
