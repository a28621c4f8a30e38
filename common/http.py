"""aiohttp glue both servers share: typed bodies, errors as JSON, signature checks."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from aiohttp import web
from aiohttp.typedefs import Middleware

from kowalski.common import errors
from kowalski.common.messages import ErrorBody, WireError, decode, encode
from kowalski.common.signing import Verifier

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
log = logging.getLogger(__name__)

_STATUS: dict[type[errors.KowalskiError], int] = {
    errors.ParseError: 400,
    errors.UnsupportedLanguageError: 400,
    errors.ConfigError: 400,
    errors.AuthError: 401,
    errors.DeviceNotFoundError: 404,
    errors.SessionNotFoundError: 404,
    errors.ConflictError: 409,
    errors.SessionLostError: 410,
    errors.ContextSizeExceededError: 413,
    errors.RateLimitedError: 429,
    errors.BusyError: 503,
    errors.NoDevicesAvailableError: 503,
    errors.ExoApiError: 502,
    errors.EmbeddedModelError: 503,
    errors.NetworkError: 502,
    errors.ReplTimeoutError: 504,
}


def status_for(error: errors.KowalskiError) -> int:
    """The HTTP status that stands for an error class (nearest listed ancestor)."""
    for cls in type(error).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return 500


def json_response(message: Any, *, status: int = 200, headers: dict[str, str] | None = None
                  ) -> web.Response:
    return web.Response(
        body=encode(message), status=status, content_type="application/json", headers=headers
    )


def error_response(error: errors.KowalskiError) -> web.Response:
    wire = WireError(code=error.code, message=error.user_message(),
                     retryable=error.is_recoverable)
    headers = {}
    if isinstance(error, errors.RateLimitedError | errors.BusyError):
        headers["Retry-After"] = str(max(1, round(error.retry_after_s)))
    return json_response(ErrorBody(error=wire), status=status_for(error), headers=headers)


async def read_body(request: web.Request, kind: type[T]) -> T:
    """Decode a JSON body into a message type; any problem is a ParseError naming it."""
    if request.content_type not in ("application/json", "application/octet-stream", ""):
        raise errors.ParseError(f"expected a JSON body, got content type {request.content_type}")
    body = await request.read()
    try:
        return decode(body, kind)
    except msgspec.ValidationError as exc:
        raise errors.ParseError(f"invalid {kind.__name__}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise errors.ParseError(f"body is not valid JSON: {exc}") from None


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure into a JSON error body; nothing leaks as a bare 500 page."""
    try:
        return await handler(request)
    except errors.KowalskiError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        wire = WireError(code=f"http_{exc.status}", message=exc.text or exc.reason,
                         retryable=False)
        return json_response(ErrorBody(error=wire), status=exc.status,
                             headers={k: v for k, v in exc.headers.items()
                                      if k.lower() in ("allow", "retry-after")})
    except Exception:
        log.exception("unhandled error serving %s %s", request.method, request.path)
        wire = WireError(code="internal", message="internal error; see the server log",
                         retryable=True)
        return json_response(ErrorBody(error=wire), status=500)


def signature_middleware(verifier: Verifier | None, *, open_paths: frozenset[str]
                         ) -> Middleware:
    """Refuse requests that are not signed with the shared secret (None: accept all)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if verifier is not None and request.path not in open_paths:
            body = await request.read()
            verifier.verify(request.method, request.path_qs, request.headers, body)
        return await handler(request)

    return middleware
