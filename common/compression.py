"""Compressed bodies between controller and agents: zstd where both sides have it, else gzip.

Negotiated by headers of our own, so neither aiohttp nor a proxy decodes a body before its
signature is checked: each side names what it can decode in ``ACCEPT_HEADER`` (requests and
answers alike), and a body over ``COMPRESS_FROM_BYTES`` goes compressed in the best encoding
the other side named, with ``ENCODING_HEADER`` saying which. Signatures cover the bytes as
sent and the encoding's name, so nothing is decompressed before it is authenticated.
"""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import Callable, Mapping
from types import ModuleType

from kowalski.common.errors import ParseError

ENCODING_HEADER = "X-Kowalski-Content-Encoding"
ACCEPT_HEADER = "X-Kowalski-Accept-Encoding"
# Below this a body goes as it is: compressing a heartbeat saves nothing.
COMPRESS_FROM_BYTES = 64 * 1024
# Fast levels: the point is a shorter transfer, not the smallest file.
_ZSTD_LEVEL = 3
_GZIP_LEVEL = 1


def _zstd_module() -> ModuleType | None:
    try:
        import zstandard
    except ImportError:
        return None
    return zstandard


_ZSTD = _zstd_module()
# Best first: what this process can encode and decode.
SUPPORTED: tuple[str, ...] = ("zstd", "gzip") if _ZSTD is not None else ("gzip",)
ACCEPT_VALUE = ", ".join(SUPPORTED)
_ZSTD_ERROR: type[Exception] = zlib.error if _ZSTD is None else _ZSTD.ZstdError


def parse_accept(value: str) -> tuple[str, ...]:
    """The encodings a peer's accept header names that this process also has, best first."""
    named = {part.split(";")[0].strip().lower() for part in value.split(",")}
    return tuple(encoding for encoding in SUPPORTED if encoding in named)


def choose(peer_accepts: tuple[str, ...], size_bytes: int) -> str | None:
    """The encoding for a body of size_bytes to a peer, or None to send it as it is."""
    if size_bytes < COMPRESS_FROM_BYTES or not peer_accepts:
        return None
    return peer_accepts[0]


def compress(body: bytes, encoding: str) -> bytes:
    """body in encoding ("zstd" or "gzip")."""
    if encoding == "zstd" and _ZSTD is not None:
        compressed: bytes = _ZSTD.ZstdCompressor(level=_ZSTD_LEVEL).compress(body)
        return compressed
    if encoding == "gzip":
        return gzip.compress(body, compresslevel=_GZIP_LEVEL, mtime=0)
    raise ValueError(f"cannot encode {encoding!r}")


def decompress(body: bytes, encoding: str, *, max_bytes: int) -> bytes:
    """The body as it was before encoding; ParseError if it is bad or over max_bytes."""
    readers: dict[str, Callable[[], bytes]] = {"gzip": lambda: _gunzip(body, max_bytes)}
    if _ZSTD is not None:
        readers["zstd"] = lambda: _unzstd(body, max_bytes)
    reader = readers.get(encoding.strip().lower())
    if reader is None:
        raise ParseError(f"body encoding {encoding!r} is not supported here; "
                         f"send one of: {ACCEPT_VALUE}")
    try:
        data = reader()
    except _TooLargeError:
        data = b""
        too_large = True
    except Exception as exc:
        if not isinstance(exc, zlib.error | EOFError | OSError | _ZSTD_ERROR):
            raise
        raise ParseError(f"{encoding} body cannot be decoded: {exc}") from None
    else:
        too_large = len(data) > max_bytes
    if too_large:
        # A small body that expands past the limit must not fill memory (a compression bomb).
        raise ParseError(f"{encoding} body decodes to over {max_bytes} bytes, the limit")
    return data


class _TooLargeError(Exception):
    """The body declares a decoded size over the limit."""


def _gunzip(body: bytes, max_bytes: int) -> bytes:
    inflater = zlib.decompressobj(wbits=31)
    data = inflater.decompress(body, max_bytes + 1)
    if len(data) <= max_bytes and not inflater.eof:
        raise zlib.error("the gzip stream is cut short")
    return data


def _unzstd(body: bytes, max_bytes: int) -> bytes:
    assert _ZSTD is not None
    declared = _ZSTD.get_frame_parameters(body).content_size
    if declared != _ZSTD.CONTENTSIZE_UNKNOWN and declared > max_bytes:
        raise _TooLargeError
    # A cut or lying frame fails here ("did not decompress full frame"), and a frame
    # without a declared size stops at max_bytes.
    data: bytes = _ZSTD.ZstdDecompressor().decompress(body, max_output_size=max_bytes)
    return data


async def compress_async(body: bytes, encoding: str) -> bytes:
    """compress() in a thread: a 30 MB body would hold the event loop for a while."""
    return await asyncio.to_thread(compress, body, encoding)


async def decompress_async(body: bytes, encoding: str, *, max_bytes: int) -> bytes:
    """decompress() in a thread."""
    return await asyncio.to_thread(decompress, body, encoding, max_bytes=max_bytes)


def encoding_of(headers: Mapping[str, str]) -> str:
    """The body's encoding named in headers; empty for a body sent as it is."""
    return headers.get(ENCODING_HEADER, "").strip().lower()
