"""aiohttp glue both servers share: typed bodies, errors as JSON, signatures, rate limits."""

from __future__ import annotations

import hashlib
import hmac
import logging
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TypeVar

import msgspec
from aiohttp import web
from aiohttp.http import HttpProcessingError
from aiohttp.typedefs import Middleware

from kowalski.common import compression, errors
from kowalski.common.messages import ErrorBody, WireError, decode, encode
from kowalski.common.ratelimit import RateLimiter
from kowalski.common.signing import NONCE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, Verifier

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
log = logging.getLogger(__name__)

RESPONSE_SIGNATURE_HEADER = "X-Kowalski-Response-Signature"
# Set on a request whose signature verified: only answers to those are signed, so no
# one without the secret can get a signed answer for a nonce of their choosing.
VERIFIED_NONCE = web.RequestKey("verified_nonce", str)
SIGNED_HEADERS = (TIMESTAMP_HEADER, NONCE_HEADER, SIGNATURE_HEADER)
# A compressed request's body after decoding, set by compression_middleware.
DECODED_BODY = web.RequestKey("decoded_body", bytes)
# On a streamed route: the verifier its handler must check the body's digest with.
BODY_VERIFIER = web.RequestKey("body_verifier", Verifier)
# Routes, as (method, canonical path), whose handlers read the body as it arrives: the
# middlewares leave it unread, and the handler verifies it (verify_streamed) and decodes it.
Streamed = frozenset[tuple[str, str]]

_STATUS: dict[type[errors.KowalskiError], int] = {
    errors.ParseError: 400,
    errors.UnsupportedLanguageError: 400,
    errors.ConfigError: 400,
    errors.AuthError: 401,
    errors.DeviceNotFoundError: 404,
    errors.SessionNotFoundError: 404,
    errors.NotFoundError: 404,
    errors.ConflictError: 409,
    errors.CancelledJobError: 409,
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


# A peer's refusal of the caller's own input, passed on as the peer answered it.
_PASSED_ON = frozenset({400, 409, 413})


def error_response(error: errors.KowalskiError) -> web.Response:
    code, status = error.code, status_for(error)
    if isinstance(error, errors.RemoteError):
        # The peer's other failures (its auth, its faults) are a bad gateway from here.
        code = error.remote_code
        status = error.status if error.status in _PASSED_ON else 502
    wire = WireError(code=code, message=error.user_message(), retryable=error.retry_elsewhere)
    headers = {}
    if isinstance(error, errors.RateLimitedError | errors.BusyError):
        headers["Retry-After"] = str(max(1, round(error.retry_after_s)))
    return json_response(ErrorBody(error=wire), status=status, headers=headers)


async def read_body(request: web.Request, kind: type[T]) -> T:
    """Decode a JSON body into a message type; any problem is a ParseError naming it."""
    if request.content_type not in ("application/json", "application/octet-stream", ""):
        raise errors.ParseError(f"expected a JSON body, got content type {request.content_type}")
    body = request.get(DECODED_BODY)
    if body is None:
        body = await request.read()
    try:
        return decode(body, kind)
    except msgspec.ValidationError as exc:
        raise errors.ParseError(f"invalid {kind.__name__}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise errors.ParseError(f"body is not valid JSON: {exc}") from None
    except UnicodeDecodeError as exc:
        # msgspec checks UTF-8 only inside strings, and says so with a plain ValueError.
        raise errors.ParseError(f"body is not valid UTF-8: byte {exc.start} of a string "
                                "cannot be decoded; send JSON encoded as UTF-8") from None
    except RecursionError:
        # Free-form fields (a context) decode to Python objects, as deep as the JSON is.
        raise errors.ParseError("body is nested too deeply") from None


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
    except HttpProcessingError as exc:
        # The body's framing was broken (bad chunked encoding, short Content-Length).
        server_log(request).malformed(remote_address(request), exc)
        wire = WireError(code="parse_error", message=f"malformed HTTP request: {exc.message}",
                         retryable=False)
        return json_response(ErrorBody(error=wire), status=400)
    except ConnectionResetError:
        # The client hung up before its body arrived: no fault here, and nobody left to answer.
        log.debug("client left during %s %s", request.method, request.path)
        wire = WireError(code="client_gone", message="the client closed the connection",
                         retryable=True)
        return json_response(ErrorBody(error=wire), status=400)
    except Exception:
        log.exception("unhandled error serving %s %s", request.method, request.path)
        wire = WireError(code="internal", message="internal error; see the server log",
                         retryable=True)
        return json_response(ErrorBody(error=wire), status=500)


async def verify_request(verifier: Verifier, request: web.Request) -> None:
    """Check the request's signature (AuthError if bad) and mark it for a signed answer."""
    # Refuse the plainly unsigned before reading (and hashing) a body of up to max_body_bytes.
    if not all(request.headers.get(name) for name in SIGNED_HEADERS):
        raise errors.AuthError("request is not signed")
    body = await request.read()
    verifier.verify(request.method, request.path_qs, request.headers, body)
    request[VERIFIED_NONCE] = request.headers[NONCE_HEADER]


def verify_streamed(request: web.Request, body_hash: str) -> None:
    """On a streamed route, once the body has arrived: check it by its body_digest."""
    verifier = request.get(BODY_VERIFIER)
    if verifier is None:
        return
    verifier.verify_digest(request.method, request.path_qs, request.headers, body_hash)
    request[VERIFIED_NONCE] = request.headers[NONCE_HEADER]


def _route(request: web.Request) -> tuple[str, str]:
    resource = request.match_info.route.resource
    return request.method, "" if resource is None else resource.canonical


def signature_middleware(verifier: Verifier | None, *, open_paths: frozenset[str],
                         streamed: Streamed = frozenset()) -> Middleware:
    """Refuse requests that are not signed with the shared secret (None: accept all).

    On a streamed route only what needs no body is checked here; its handler must call
    verify_streamed before it uses anything the body carried.
    """

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if verifier is not None and request.path not in open_paths:
            if _route(request) in streamed:
                verifier.check_fresh(request.headers)
                request[BODY_VERIFIER] = verifier
            else:
                await verify_request(verifier, request)
        return await handler(request)

    return middleware


def compression_middleware(*, max_body_bytes: int, streamed: Streamed = frozenset()
                           ) -> Middleware:
    """Decode compressed request bodies (up to max_body_bytes) and compress large answers.

    Put it after the signature check: a body is decoded only once it is authenticated.
    Every answer names the encodings this side decodes, so callers learn them. A streamed
    route's handler decodes its body itself.
    """

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        encoding = compression.encoding_of(request.headers)
        if encoding and _route(request) not in streamed:
            request[DECODED_BODY] = await compression.decompress_async(
                await request.read(), encoding, max_bytes=max_body_bytes)
        response = await handler(request)
        if not isinstance(response, web.Response) or response.prepared:
            return response
        response.headers[compression.ACCEPT_HEADER] = compression.ACCEPT_VALUE
        body = response.body
        chosen = compression.choose(
            compression.parse_accept(request.headers.get(compression.ACCEPT_HEADER, "")),
            len(body) if isinstance(body, bytes | bytearray) else 0)
        if chosen is not None and isinstance(body, bytes | bytearray):
            response.body = await compression.compress_async(bytes(body), chosen)
            response.headers[compression.ENCODING_HEADER] = chosen
        return response

    return middleware


def response_signature(secret: bytes, nonce: str, status: int, body: bytes,
                       encoding: str = "") -> str:
    """HMAC over the request's nonce, the status and the body: ties an answer to its request."""
    # Four fields where a request signature has five: the two can never be mistaken.
    fields: tuple[str, ...] = ("response", nonce, str(status), hashlib.sha256(body).hexdigest())
    # A compressed answer (body as sent) signs its encoding's name as a fifth field, which
    # still cannot pass for a request: those start with the method, never "response".
    if encoding:
        fields += (encoding,)
    message = "\n".join(fields)
    return hmac.new(secret, message.encode("utf-8", "surrogateescape"),
                    hashlib.sha256).hexdigest()


def sign_responses(app: web.Application, secret: bytes | None) -> None:
    """Sign every answer to a verified request, errors included, so callers can tell impostors."""
    if secret is None:
        return

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        nonce = request.get(VERIFIED_NONCE)
        if nonce is None or not isinstance(response, web.Response):
            return
        body = response.body
        if body is None or isinstance(body, bytes | bytearray):
            response.headers[RESPONSE_SIGNATURE_HEADER] = response_signature(
                secret, nonce, response.status, bytes(body or b""),
                response.headers.get(compression.ENCODING_HEADER, ""))

    app.on_response_prepare.append(on_prepare)


def remote_address(request: web.Request) -> str:
    """The peer's address, the default rate-limit key."""
    return request.remote or "unknown"


def rate_limit_middleware(limiter: RateLimiter | None, *, limited: frozenset[tuple[str, str]],
                          key: Callable[[web.Request], str] = remote_address) -> Middleware:
    """Answer 429 + Retry-After when a client sends (method, route) pairs in `limited` too fast."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.resource
        if (limiter is not None and route is not None
                and (request.method, route.canonical) in limited):
            limiter.check(key(request))
        return await handler(request)

    return middleware


class ServerLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's server log: a malformed request is one WARNING per peer per interval."""

    def __init__(self, logger: logging.Logger | None = None, *, interval_s: float = 60.0,
                 max_peers: int = 10_000) -> None:
        super().__init__(logger or logging.getLogger("aiohttp.server"), {})
        self._interval_s = interval_s
        self._max_peers = max_peers
        # Peer to when it was last logged and how many it sent since.
        self._last: dict[str, tuple[float, int]] = {}

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        exc_info = kwargs.get("exc_info")
        error = sys.exc_info()[1] if exc_info is True else exc_info
        if isinstance(error, HttpProcessingError):
            # aiohttp logs "Error handling request from %s" with the peer as the argument.
            peer = str(args[0]) if args and args[0] is not None else "unknown"
            self.malformed(peer, error)
            return
        super().log(level, msg, *args, **kwargs)

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]
                ) -> tuple[Any, MutableMapping[str, Any]]:
        return msg, kwargs

    def malformed(self, peer: str, error: HttpProcessingError) -> None:
        """Log a malformed request from peer unless one was logged within the interval."""
        now = time.monotonic()
        last, dropped = self._last.get(peer, (float("-inf"), 0))
        if now - last < self._interval_s:
            self._last[peer] = (last, dropped + 1)
            return
        if len(self._last) >= self._max_peers:
            # A flood from many addresses must not grow the table without end.
            self._last = {key: value for key, value in self._last.items()
                          if now - value[0] < self._interval_s}
        self._last[peer] = (now, 0)
        more = f" ({dropped} more since the last line)" if dropped else ""
        # Peer-chosen text: one short line of printable characters.
        first = (error.message or type(error).__name__).strip().splitlines() or ["?"]
        reason = "".join(c if c.isprintable() else "?" for c in first[0][:200])
        self.logger.warning("malformed HTTP request from %s: %s%s", peer, reason, more)


# For apps served without a ServerLog of their own (tests' in-process servers).
_DEFAULT_SERVER_LOG = ServerLog()


def server_log(request: web.Request) -> ServerLog:
    """The ServerLog the daemon passed to its AppRunner as logger=, which counts each peer."""
    logger = getattr(request.protocol, "logger", None)
    return logger if isinstance(logger, ServerLog) else _DEFAULT_SERVER_LOG
