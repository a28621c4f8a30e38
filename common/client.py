"""A signed JSON client for controller↔agent calls; a peer's error comes back as RemoteError."""

from __future__ import annotations

import hmac
import io
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import msgspec

from kowalski.common import errors
from kowalski.common.http import RESPONSE_SIGNATURE_HEADER, response_signature
from kowalski.common.messages import ErrorBody, WireError, decode, encode
from kowalski.common.signing import NONCE_HEADER, sign

T = TypeVar("T")
_STREAM_FROM_BYTES = 512 * 1024


class SignedClient:
    """Sends msgspec messages as JSON, signed when a secret is set.

    With a secret, a successful answer must carry the peer's signature over this
    request's nonce, so an impostor at the address (a spoofed mDNS record, a hijacked
    address) cannot pass off heartbeats or results. Error answers are errors either way.
    """

    def __init__(self, session: aiohttp.ClientSession, *, secret: bytes | None,
                 ssl: Any = None) -> None:
        self._session = session
        self._secret = secret
        self._ssl = ssl

    async def call(self, method: str, url: str, kind: type[T], message: Any = None, *,
                   timeout_s: float) -> T:
        """One request; raises NetworkError, RemoteError or ParseError."""
        body = b"" if message is None else encode(message)
        headers = {"Content-Type": "application/json"} if message is not None else {}
        if self._secret is not None:
            parts = urlsplit(url)
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            headers.update(sign(self._secret, method, path, body))
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        try:
            # A stream, not bytes: aiohttp warns that a large bytes body blocks the loop.
            data = io.BytesIO(body) if len(body) > _STREAM_FROM_BYTES else (body or None)
            async with self._session.request(method, url, data=data, headers=headers,
                                             timeout=timeout, ssl=self._ssl) as response:
                payload = await response.read()
                status = response.status
                answer_signature = response.headers.get(RESPONSE_SIGNATURE_HEADER, "")
                retry_after = response.headers.get("Retry-After", "")
        except (aiohttp.ClientError, OSError) as exc:
            raise errors.NetworkError(f"{method} {url} failed: {exc or type(exc).__name__}"
                                      ) from None
        except TimeoutError:
            raise errors.NetworkError(f"{method} {url} timed out after {timeout_s:g} s") from None
        if status >= 400:
            raise _remote_error(status, payload, url, _seconds(retry_after))
        if self._secret is not None:
            expected = response_signature(self._secret, headers[NONCE_HEADER], status, payload)
            if not hmac.compare_digest(expected, answer_signature):
                how = "a bad signature" if answer_signature else "no signature"
                raise errors.UnverifiedAnswerError(
                    f"{method} {url} answered with {how}: the peer does not hold this secret")
        try:
            return decode(payload, kind)
        except msgspec.MsgspecError as exc:
            raise errors.ParseError(f"unexpected answer from {url}: {exc}") from None


def _seconds(header: str) -> float | None:
    try:
        return float(header) if header else None
    except ValueError:
        return None


def _remote_error(status: int, payload: bytes, url: str, retry_after_s: float | None
                  ) -> errors.RemoteError:
    try:
        wire = decode(payload, ErrorBody).error
    except msgspec.MsgspecError:
        # Not one of ours (a proxy's page, a crash): the status alone says whether to retry.
        text = payload[:300].decode(errors="replace")
        wire = WireError(code=f"http_{status}", message=f"{url} answered {status}: {text}",
                         retryable=status >= 500)
    return errors.error_from_wire(wire, status=status, retry_after_s=retry_after_s)
