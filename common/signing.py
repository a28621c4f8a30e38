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


def _canonical(method: str, path: str, timestamp: str, nonce: str, body: bytes,
               encoding: str = "") -> bytes:
    body_hash = hashlib.sha256(body).hexdigest()
    fields: tuple[str, ...] = (method.upper(), path, timestamp, nonce, body_hash)
    # A compressed body's encoding is signed too, so its name cannot be swapped; an
    # uncompressed body signs as it always did.
    if encoding:
        fields += (encoding,)
    # Headers that are not UTF-8 reach us with surrogates; they must fail the check, not crash it.
    text = "\n".join(fields)
    return text.encode("utf-8", "surrogateescape")


def sign(
    secret: bytes, method: str, path: str, body: bytes = b"", *, now: float | None = None,
    encoding: str = "",
) -> dict[str, str]:
    """Headers that sign one request; path includes the query string, body is as sent."""
    timestamp = f"{time.time() if now is None else now:.3f}"
    nonce = secrets.token_hex(16)
    digest = hmac.new(secret, _canonical(method, path, timestamp, nonce, body, encoding),
                      hashlib.sha256)
    return {
        TIMESTAMP_HEADER: timestamp,
        NONCE_HEADER: nonce,
        SIGNATURE_HEADER: digest.hexdigest(),
    }


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
        now = time.time() if now is None else now
        timestamp = headers.get(TIMESTAMP_HEADER)
        nonce = headers.get(NONCE_HEADER)
        signature = headers.get(SIGNATURE_HEADER)
        if not (timestamp and nonce and signature):
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
        encoding = headers.get(ENCODING_HEADER, "")
        expected = hmac.new(
            self._secret, _canonical(method, path, timestamp, nonce, body, encoding),
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
