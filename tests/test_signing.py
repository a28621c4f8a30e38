"""Request signing: good requests pass; unsigned, tampered, stale and replayed ones do not."""

from __future__ import annotations

import pytest

from kowalski.common.compression import ENCODING_HEADER
from kowalski.common.errors import AuthError
from kowalski.common.signing import (
    META_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Verifier,
    body_digest,
    sign,
)

SECRET = b"k" * 32


def test_signed_request_verifies() -> None:
    headers = sign(SECRET, "POST", "/v1/jobs", b'{"a":1}', now=1000.0)
    Verifier(SECRET).verify("POST", "/v1/jobs", headers, b'{"a":1}', now=1001.0)


@pytest.mark.parametrize(
    ("method", "path", "body", "reason"),
    [
        ("GET", "/v1/jobs", b'{"a":1}', "bad signature"),
        ("POST", "/v1/jobs?x=1", b'{"a":1}', "bad signature"),
        ("POST", "/v1/jobs", b'{"a":2}', "bad signature"),
    ],
)
def test_any_changed_part_breaks_the_signature(
    method: str, path: str, body: bytes, reason: str
) -> None:
    headers = sign(SECRET, "POST", "/v1/jobs", b'{"a":1}', now=1000.0)
    with pytest.raises(AuthError, match=reason):
        Verifier(SECRET).verify(method, path, headers, body, now=1000.0)


def test_wrong_secret_is_refused() -> None:
    headers = sign(b"x" * 32, "GET", "/v1/heartbeat", now=5.0)
    with pytest.raises(AuthError, match="bad signature"):
        Verifier(SECRET).verify("GET", "/v1/heartbeat", headers, b"", now=5.0)


def test_unsigned_request_is_refused() -> None:
    with pytest.raises(AuthError, match="not signed"):
        Verifier(SECRET).verify("GET", "/v1/heartbeat", {}, b"")


def test_stale_request_is_refused() -> None:
    headers = sign(SECRET, "GET", "/", now=1000.0)
    with pytest.raises(AuthError, match=r"outside ±30 s"):
        Verifier(SECRET, clock_skew_s=30).verify("GET", "/", headers, b"", now=1031.0)


def test_replayed_request_is_refused() -> None:
    verifier = Verifier(SECRET)
    headers = sign(SECRET, "POST", "/v1/jobs", b"{}", now=10.0)
    verifier.verify("POST", "/v1/jobs", headers, b"{}", now=10.0)
    with pytest.raises(AuthError, match="replayed"):
        verifier.verify("POST", "/v1/jobs", headers, b"{}", now=11.0)


def test_non_numeric_timestamp_is_refused() -> None:
    headers = sign(SECRET, "GET", "/", now=1.0)
    headers[TIMESTAMP_HEADER] = "soon"
    with pytest.raises(AuthError, match="not a number"):
        Verifier(SECRET).verify("GET", "/", headers, b"", now=1.0)


def test_forged_signature_is_refused() -> None:
    headers = sign(SECRET, "GET", "/", now=1.0)
    headers[SIGNATURE_HEADER] = "0" * 64
    with pytest.raises(AuthError, match="bad signature"):
        Verifier(SECRET).verify("GET", "/", headers, b"", now=1.0)


def test_a_body_known_by_its_digest_verifies_like_the_body_itself() -> None:
    body = b"context " * 1000
    headers = sign(SECRET, "PUT", "/v1/sessions/s", body, now=10.0, meta="bWV0YQ")
    assert headers[META_HEADER] == "bWV0YQ"
    Verifier(SECRET).verify_digest("PUT", "/v1/sessions/s", headers, body_digest(body),
                                   now=10.0)
    # Signing by a digest made beforehand gives the same signature as signing the body.
    again = sign(SECRET, "PUT", "/v1/sessions/s", now=11.0, meta="bWV0YQ",
                 body_hash=body_digest(body))
    Verifier(SECRET).verify("PUT", "/v1/sessions/s", again, body, now=11.0)


def test_the_metadata_header_is_signed_and_cannot_pass_for_the_encoding() -> None:
    headers = sign(SECRET, "PUT", "/v1/sessions/s", b"x", now=10.0, meta="gzip")
    swapped = {**headers, META_HEADER: "other"}
    with pytest.raises(AuthError, match="bad signature"):
        Verifier(SECRET).verify("PUT", "/v1/sessions/s", swapped, b"x", now=10.0)
    # The same value as an encoding instead of metadata is another request.
    moved = {k: v for k, v in headers.items() if k != META_HEADER} | {ENCODING_HEADER: "gzip"}
    with pytest.raises(AuthError, match="bad signature"):
        Verifier(SECRET).verify("PUT", "/v1/sessions/s", moved, b"x", now=10.0)
