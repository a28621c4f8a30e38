"""HMAC-SHA256 request signing between controller and agents."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping

from kowalski.common.compression import ENCODING_HEADER
from kowalski.common.errors import AuthError

TIMESTAMP_HEADER = "X-Kowalski-Timestamp"
NONCE_HEADER = "X-Kowalski-Nonce"
SIGNATURE_HEADER = "X-Kowalski-Signature"
# Metadata of a request whose body is raw data (a session's context): signed with it.
META_HEADER = "X-Kowalski-Meta"


def body_digest(body: bytes) -> str:
    """The body's hash as a signature covers it; a streamed body is hashed as it comes."""
    return hashlib.sha256(body).hexdigest()


def _canonical(method: str, path: str, timestamp: str, nonce: str, body_hash: str,
               encoding: str = "", meta: str = "") -> bytes:
    fields: tuple[str, ...] = (method.upper(), path, timestamp, nonce, body_hash)
    # A compressed body's encoding is signed too, so its name cannot be swapped; an
    # uncompressed body signs as it always did. Metadata comes seventh, after an encoding
    # field even when that is empty, so no value can pass for the other.
    if encoding or meta:
        fields += (encoding,)
    if meta:
        fields += (meta,)
    # Headers that are not UTF-8 reach us with surrogates; they must fail the check, not crash it.
    text = "\n".join(fields)
    return text.encode("utf-8", "surrogateescape")


def sign(
    secret: bytes, method: str, path: str, body: bytes = b"", *, now: float | None = None,
    encoding: str = "", meta: str = "", body_hash: str | None = None,
) -> dict[str, str]:
    """Headers that sign one request; path includes the query string, body is as sent.

    body_hash (body_digest of the body) stands for the body when the caller has it already;
    meta is sent as META_HEADER and signed with the rest.
    """
    timestamp = f"{time.time() if now is None else now:.3f}"
    nonce = secrets.token_hex(16)
    digest = hmac.new(secret, _canonical(method, path, timestamp, nonce,
                                         body_digest(body) if body_hash is None else body_hash,
                                         encoding, meta), hashlib.sha256)
    headers = {
        TIMESTAMP_HEADER: timestamp,
        NONCE_HEADER: nonce,
        SIGNATURE_HEADER: digest.hexdigest(),
    }
    if meta:
        headers[META_HEADER] = meta
    return headers


class Verifier:
    """Checks signatures, clock skew, and refuses a nonce seen inside the window."""

    def __init__(self, secret: bytes, *, clock_skew_s: float = 30.0, max_nonces: int = 100_000):
        self._secret = secret
        self._skew_s = clock_skew_s
        self._max_nonces = max_nonces
        self._seen: OrderedDict[str, float] = OrderedDict()

    def verify(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes,
        *,
        now: float | None = None,
    ) -> None:
        """Raise AuthError naming the reason when the request is not acceptable."""
        self.verify_digest(method, path, headers, body_digest(body), now=now)

    def check_fresh(self, headers: Mapping[str, str], *, now: float | None = None) -> None:
        """The checks that need no body: signed at all, and within the clock skew."""
        now = time.time() if now is None else now
        timestamp = headers.get(TIMESTAMP_HEADER)
        if not (timestamp and headers.get(NONCE_HEADER) and headers.get(SIGNATURE_HEADER)):
            raise AuthError("request is not signed")
        try:
            sent_at = float(timestamp)
        except ValueError:
            raise AuthError("signature timestamp is not a number") from None
        # not <=: a NaN timestamp compares false both ways and must not pass as fresh.
        if not abs(now - sent_at) <= self._skew_s:
            raise AuthError(
                f"signature timestamp is {now - sent_at:+.1f} s off, outside ±{self._skew_s:g} s"
            )

    def verify_digest(self, method: str, path: str, headers: Mapping[str, str],
                      body_hash: str, *, now: float | None = None) -> None:
        """verify() for a body known by its body_digest, as a streamed body is."""
        now = time.time() if now is None else now
        self.check_fresh(headers, now=now)
        timestamp, nonce = headers[TIMESTAMP_HEADER], headers[NONCE_HEADER]
        signature = headers[SIGNATURE_HEADER]
        encoding = headers.get(ENCODING_HEADER, "")
        expected = hmac.new(
            self._secret, _canonical(method, path, timestamp, nonce, body_hash, encoding,
                                     headers.get(META_HEADER, "")),
            hashlib.sha256,
        ).hexdigest()
        if not hmac.compare_digest(expected, signature):
            raise AuthError("bad signature")
        self._forget_older_than(now - 2 * self._skew_s)
        if nonce in self._seen:
            raise AuthError("replayed request (nonce already used)")
        self._seen[nonce] = now
        while len(self._seen) > self._max_nonces:
            self._seen.popitem(last=False)

    def _forget_older_than(self, cutoff: float) -> None:
        while self._seen:
            nonce, seen_at = next(iter(self._seen.items()))
            if seen_at >= cutoff:
                return
            del self._seen[nonce]
