"""The errors an exo or OpenAI-compatible endpoint can cause, and the mapping from answers."""

from __future__ import annotations

import re

import msgspec

from kowalski.common.errors import ExoApiError, KowalskiError, NetworkError, ParseError
from kowalski.controller.models.chat_types import WireCompletion, WireErrorInfo

_NO_INSTANCE = re.compile(r"No instance found for model (?P<model>[^\s\"]+)")


class ExoTimeoutError(NetworkError, TimeoutError):
    code = "exo_timeout"
    hint = "The server took too long: check the node, or raise exo.request_timeout_s"


class NoInstanceError(ExoApiError):
    """exo v1 has no instance of the model (HTTP 404 `No instance found for model X`)."""

    code = "exo_no_instance"
    hint = ("Place an instance of the model (exo's dashboard, or exo.place_instances = true) "
            "or use another endpoint")

    def __init__(self, status: int, body: str, *, url: str = "", model_id: str = "") -> None:
        super().__init__(status, body, url=url)
        self.model_id = model_id

    @property
    def is_recoverable(self) -> bool:  # type: ignore[override]
        # Another endpoint, or this one once an instance is placed, can serve the model.
        return True


def _reworded(error: KowalskiError, message: str) -> None:
    error.message = message
    error.args = (message,)


class EndpointAuthError(ExoApiError):
    """The server wants an API key, or refused the one sent (HTTP 401 or 403)."""

    code = "exo_unauthorized"
    hint = "Give the endpoint its key: api_key_file or api_key_env in its [[exo.endpoints]] table"


class FirstByteTimeoutError(ExoTimeoutError):
    """No byte of the answer within exo.first_byte_timeout_s: another endpoint may do."""

    code = "exo_first_byte_timeout"
    hint = "The server may be waiting on a lost node; raise exo.first_byte_timeout_s if not"


class ModelNotServedError(ExoApiError):
    """The endpoint cannot run the model it was asked for (exo v0's `Unsupported model`)."""

    code = "exo_model_not_served"
    hint = "Use a model the endpoint serves, or list the endpoint's models in the config"

    def __init__(self, status: int, body: str, *, url: str = "", model_id: str = "") -> None:
        super().__init__(status, body, url=url)
        self.model_id = model_id
        _reworded(self, f"{url or 'the endpoint'} cannot serve the model {model_id!r}: "
                  f"HTTP {status}: {body[:300]}")

    @property
    def is_recoverable(self) -> bool:  # type: ignore[override]
        # Another endpoint may serve the model.
        return True


class UnknownModelError(ModelNotServedError):
    """The endpoint does not know the model at all (exo v0 names its default model instead)."""

    code = "exo_unknown_model"
    hint = "Check the model id against GET /v1/models of a server that serves it"

    @property
    def is_recoverable(self) -> bool:  # type: ignore[override]
        # A misspelt or absent model id: asking again, anywhere, gives the same answer.
        return False

    def __init__(self, status: int, body: str, *, url: str = "", model_id: str = "",
                 substitute: str = "") -> None:
        super().__init__(status, body, url=url, model_id=model_id)
        self.substitute = substitute
        instead = f" (it put its default model {substitute!r} in its place)" if substitute else ""
        _reworded(self, f"{url or 'the endpoint'} does not know the model {model_id!r}{instead}: "
                  f"HTTP {status}: {body[:300]}")


class ModelMismatchError(ExoApiError):
    """An answer from another model than the one asked for: never passed on as the answer."""

    code = "exo_model_mismatch"
    hint = "The server substituted its default model; use a model it serves"

    def __init__(self, *, url: str, asked: str, answered: str) -> None:
        super().__init__(200, f"asked for model {asked!r}, answered by {answered!r}", url=url)
        self.model_id = asked
        self.answered = answered
        _reworded(self, f"{url}: asked for model {asked!r} but the answer came from {answered!r}")

    @property
    def is_recoverable(self) -> bool:  # type: ignore[override]
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


class IncompleteAnswerError(NetworkError):
    """An answer cut short: no finish_reason, or a body that broke off after HTTP 200."""

    code = "exo_answer_incomplete"
    hint = ("The generation was cancelled, its instance deleted, or its runner failed; "
            "exo's log on the node says which")

    def __init__(self, url: str, what: str, arrived: str = "") -> None:
        shown = f"; what arrived: {arrived[:200]!r}" if arrived else ""
        super().__init__(f"{url}: incomplete answer, {what}{shown}")
        self.url = url
        self.arrived = arrived


class IncompleteStreamError(IncompleteAnswerError):
    """A stream ended before its end marker: cancelled, or the server went away."""

    code = "exo_stream_incomplete"


class UnsupportedFlavourError(KowalskiError, NotImplementedError):
    code = "exo_unsupported"
    hint = "Instance placement and cancellation need exo v1"


class PlacementError(ExoApiError):
    """exo refused to place an instance: its own reason (not enough memory, no model card)."""

    code = "exo_placement_failed"
    hint = ("Free memory on the cluster, add a node, or choose a smaller model; "
            "a bare HTTP 500 means exo has no model card for the id")

    def __init__(self, status: int, body: str, *, url: str = "", model_id: str = "") -> None:
        super().__init__(status, body, url=url)
        self.model_id = model_id
        _reworded(self, f"{url or 'exo'} cannot place {model_id!r}: HTTP {status}: "
                  f"{_envelope_message(body)[:300]}")

    @property
    def is_recoverable(self) -> bool:  # type: ignore[override]
        # The same cluster gives the same answer until its nodes or models change.
        return False


class InstanceFailedError(KowalskiError):
    """A placed instance's runner failed while loading: the runner's error, not a timeout."""

    code = "exo_instance_failed"
    is_recoverable = False
    hint = "Read the runner's error; exo's log on the node has the rest"

    def __init__(self, model_id: str, instance_id: str, detail: str) -> None:
        super().__init__(f"instance {instance_id} of {model_id} failed: {detail}")
        self.model_id = model_id
        self.instance_id = instance_id
        self.detail = detail


def _envelope_message(body: str) -> str:
    """The message of exo's error envelope {"error": {"message": ...}}, else the body."""
    try:
        answer = msgspec.json.decode(body, type=WireCompletion)
    except msgspec.DecodeError:
        return body
    return answer.error_text() or body


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
    if status in (401, 403):
        return EndpointAuthError(status, text, url=url)
    return ExoApiError(status, text, url=url)


def in_band_error(answer: WireCompletion, body: bytes | str, url: str) -> StreamError:
    """The error for an answer whose body reports an error despite HTTP 200."""
    code = answer.error.code if isinstance(answer.error, WireErrorInfo) else None
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    return StreamError(code if isinstance(code, int) else 500, text, url=url)
