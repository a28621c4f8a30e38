"""A signed JSON client for controller↔agent calls; a peer's error comes back as RemoteError."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import msgspec

from kowalski.common import compression, errors
from kowalski.common.addresses import is_loopback
from kowalski.common.http import RESPONSE_SIGNATURE_HEADER, response_signature
from kowalski.common.job_stream import NDJSON, stream_signature
from kowalski.common.messages import ErrorBody, JobStreamEnd, WireError, decode, encode
from kowalski.common.signing import META_HEADER, NONCE_HEADER, body_digest, sign

T = TypeVar("T")
_STREAM_FROM_BYTES = 512 * 1024
# A large body goes out in pieces of this size.
_PIECE_BYTES = 1024 * 1024
# The largest answer body accepted after decoding; a job's output is capped far below.
MAX_ANSWER_BYTES = 256 * 1024 * 1024


class SignedClient:
    """Sends msgspec messages as JSON, signed when a secret is set.

    With a secret, a successful answer must carry the peer's signature over this
    request's nonce, so an impostor at the address (a spoofed mDNS record, a hijacked
    address) cannot pass off heartbeats or results. Error answers are errors either way.

    Bodies over ``compression.COMPRESS_FROM_BYTES`` go compressed to a peer whose earlier
    answers named an encoding both sides have; answers come compressed the same way.
    """

    def __init__(self, session: aiohttp.ClientSession, *, secret: bytes | None,
                 ssl: Any = None, encodings: tuple[str, ...] = compression.SUPPORTED,
                 compress_loopback: bool = False) -> None:
        self._session = session
        self._secret = secret
        self._ssl = ssl
        # What this client compresses requests with, best first; () sends every body plain.
        self._encodings = encodings
        # On loopback compressing costs more time than the transfer it saves (see the
        # benchmark), so bodies to this host go plain unless asked otherwise.
        self._compress_loopback = compress_loopback
        # scheme://host:port to the encodings that peer said it decodes, best first.
        self._peer_accepts: dict[str, tuple[str, ...]] = {}

    @property
    def signs(self) -> bool:
        """Whether requests go signed (a secret is set)."""
        return self._secret is not None

    async def call(self, method: str, url: str, kind: type[T], message: Any = None, *,
                   timeout_s: float) -> T:
        """One request; raises NetworkError, RemoteError or ParseError."""
        if message is None:
            return await self.call_raw(method, url, kind, timeout_s=timeout_s)
        return await self.call_raw(method, url, kind, encode(message), timeout_s=timeout_s,
                                   content_type="application/json")

    async def call_raw(self, method: str, url: str, kind: type[T], body: bytes = b"", *,
                       timeout_s: float, content_type: str = "", meta: str = "",
                       body_hash: str | None = None) -> T:
        """call() with a body as it is; meta goes signed beside it (signing.META_HEADER).

        body_hash, the body's signing.body_digest when the caller has it, spares hashing
        it again (unless it goes compressed).
        """
        headers = {"Content-Type": content_type} if content_type else {}
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        encoding = ""
        if self._compress_loopback or not is_loopback(parts.hostname or ""):
            headers[compression.ACCEPT_HEADER] = compression.ACCEPT_VALUE
            encoding = compression.choose(self._peer_accepts.get(origin, ()), len(body)) or ""
        if encoding:
            body = await compression.compress_async(body, encoding)
            headers[compression.ENCODING_HEADER] = encoding
            body_hash = None
        if self._secret is not None:
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            if body_hash is None and len(body) > _STREAM_FROM_BYTES:
                # Hashing tens of MB would hold the event loop; hashlib lets go of the GIL.
                body_hash = await asyncio.to_thread(body_digest, body)
            headers.update(sign(self._secret, method, path, body, encoding=encoding,
                                meta=meta, body_hash=body_hash))
        elif meta:
            headers[META_HEADER] = meta
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        try:
            data: Any = body or None
            if len(body) > _STREAM_FROM_BYTES:
                # Pieces, not bytes, which aiohttp warns would block the loop; and views of
                # the body, not a BytesIO, which copies it out 64 KiB at a time.
                data = _pieces(body)
                headers["Content-Length"] = str(len(body))
            async with self._session.request(method, url, data=data, headers=headers,
                                             timeout=timeout, ssl=self._ssl) as response:
                payload = await response.read()
                status = response.status
                answer_signature = response.headers.get(RESPONSE_SIGNATURE_HEADER, "")
                retry_after = response.headers.get("Retry-After", "")
                answer_encoding = compression.encoding_of(response.headers)
                accepts = response.headers.get(compression.ACCEPT_HEADER)
        except (aiohttp.ClientError, OSError) as exc:
            raise errors.NetworkError(f"{method} {url} failed: {exc or type(exc).__name__}"
                                      ) from None
        except TimeoutError:
            raise errors.NetworkError(f"{method} {url} timed out after {timeout_s:g} s") from None
        if status >= 400:
            if answer_encoding:
                payload = await self._decoded(payload, answer_encoding, url)
            raise _remote_error(status, payload, url, _seconds(retry_after))
        if self._secret is not None:
            expected = response_signature(self._secret, headers[NONCE_HEADER], status, payload,
                                          answer_encoding)
            if not hmac.compare_digest(expected, answer_signature):
                how = "a bad signature" if answer_signature else "no signature"
                raise errors.UnverifiedAnswerError(
                    f"{method} {url} answered with {how}: the peer does not hold this secret")
        if accepts is not None:
            # Learned only from a verified answer: an impostor cannot choose our encoding.
            self._peer_accepts[origin] = tuple(
                encoding for encoding in compression.parse_accept(accepts)
                if encoding in self._encodings)
        if answer_encoding:
            payload = await self._decoded(payload, answer_encoding, url)
        try:
            return decode(payload, kind)
        except msgspec.MsgspecError as exc:
            raise errors.ParseError(f"unexpected answer from {url}: {exc}") from None

    async def stream(self, method: str, url: str, message: Any, *, timeout_s: float,
                     on_line: Callable[[bytes], None]) -> None:
        """One request answered with NDJSON lines, each passed to on_line as it arrives.

        With a secret, the last line must be an end line signing every byte before it:
        the lines already passed on are authenticated only then (UnverifiedAnswerError).
        """
        body = encode(message)
        headers = {"Content-Type": "application/json"}
        if self._secret is not None:
            path = urlsplit(url).path
            headers.update(sign(self._secret, method, path, body))
        digest = hashlib.sha256()
        end: JobStreamEnd | None = None
        try:
            async with self._session.request(
                    method, url, data=body, headers=headers,
                    timeout=aiohttp.ClientTimeout(total=timeout_s), ssl=self._ssl) as response:
                if response.status >= 400 or response.content_type != NDJSON:
                    payload = await response.read()
                    encoding = compression.encoding_of(response.headers)
                    if encoding:
                        payload = await self._decoded(payload, encoding, url)
                    if response.status < 400:
                        raise errors.ParseError(f"{url} did not stream its answer")
                    raise _remote_error(response.status, payload, url,
                                        _seconds(response.headers.get("Retry-After", "")))
                # By hand: a result line (the whole capped output) passes aiohttp's line limit.
                pending = b""
                async for chunk in response.content.iter_any():
                    *lines, pending = (pending + chunk).split(b"\n")
                    for line in lines:
                        if end is not None:
                            continue
                        if line.startswith(b'{"kind":"end"'):
                            end = decode(line, JobStreamEnd)
                            continue
                        digest.update(line + b"\n")
                        on_line(line)
        except (aiohttp.ClientError, OSError) as exc:
            raise errors.NetworkError(f"{method} {url} failed: {exc or type(exc).__name__}"
                                      ) from None
        except TimeoutError:
            raise errors.NetworkError(f"{method} {url} timed out after {timeout_s:g} s") from None
        except msgspec.MsgspecError as exc:
            raise errors.ParseError(f"unexpected answer from {url}: {exc}") from None
        if self._secret is None:
            return
        expected = stream_signature(self._secret, headers[NONCE_HEADER], digest.hexdigest())
        if end is None or not hmac.compare_digest(expected, end.signature):
            how = "a bad signature" if end is not None else "no signature"
            raise errors.UnverifiedAnswerError(
                f"{method} {url} streamed with {how}: the peer does not hold this secret")

    @staticmethod
    async def _decoded(payload: bytes, encoding: str, url: str) -> bytes:
        try:
            return await compression.decompress_async(payload, encoding,
                                                      max_bytes=MAX_ANSWER_BYTES)
        except errors.ParseError as exc:
            raise errors.ParseError(f"unexpected answer from {url}: {exc.message}") from None


async def _pieces(body: bytes) -> AsyncIterator[memoryview]:
    view = memoryview(body)
    for start in range(0, len(body), _PIECE_BYTES):
        yield view[start:start + _PIECE_BYTES]


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
