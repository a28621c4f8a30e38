"""A streamed job's or cell's answer: NDJSON lines of output while it runs, then its result."""

from __future__ import annotations

import asyncio
import codecs
import hashlib
import hmac
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from kowalski.common.errors import KowalskiError
from kowalski.common.messages import (
    JobOutput,
    JobStreamEnd,
    JobStreamError,
    JobStreamResult,
    WireError,
    encode,
)

# Told each piece of output as text: the stream's name ("stdout" or "stderr") and the text.
TextListener = Callable[[str, str], None]
NDJSON = "application/x-ndjson"
R = TypeVar("R")


def stream_signature(secret: bytes, nonce: str, body_sha256: str) -> str:
    """HMAC over the request's nonce and every byte of a stream before its end line."""
    # Its first field tells it apart from request and whole-answer signatures.
    message = "\n".join(("response-stream", nonce, body_sha256))
    return hmac.new(secret, message.encode("utf-8", "surrogateescape"),
                    hashlib.sha256).hexdigest()


def text_listener(listener: TextListener) -> Callable[[str, bytes], None]:
    """Bytes to text per stream, never splitting a UTF-8 character between lines."""
    decoders: dict[str, codecs.IncrementalDecoder] = {}

    def hear(stream: str, data: bytes) -> None:
        decoder = decoders.get(stream)
        if decoder is None:
            decoder = decoders[stream] = codecs.getincrementaldecoder("utf-8")("replace")
        text = decoder.decode(data)
        if text:
            listener(stream, text)

    return hear


def _job_line(result: Any) -> msgspec.Struct:
    return JobStreamResult(result=result)


async def stream_job(request: web.Request, run: Callable[[TextListener], Awaitable[R]],
                     *, secret: bytes | None = None, nonce: str | None = None,
                     signed: bool = False,
                     result_line: Callable[[R], msgspec.Struct] = _job_line
                     ) -> web.StreamResponse:
    """Answer with the job's (or cell's) output as it comes, then result_line(its result).

    The answer starts with the first piece of output, so a job refused before any (busy,
    cancelled) is a plain error answer the caller may send elsewhere. With signed, the
    last line signs every byte before it (when a secret and a verified nonce are known).
    """
    lines: asyncio.Queue[JobOutput] = asyncio.Queue()
    task = asyncio.ensure_future(run(lambda stream, data: lines.put_nowait(
        JobOutput(stream="stderr" if stream == "stderr" else "stdout", data=data))))
    response: web.StreamResponse | None = None
    digest = hashlib.sha256()

    async def write(line: msgspec.Struct) -> None:
        nonlocal response
        if response is None:
            response = web.StreamResponse(headers={"Content-Type": NDJSON})
            await response.prepare(request)
        data = encode(line) + b"\n"
        digest.update(data)
        await response.write(data)

    try:
        while True:
            getter = asyncio.ensure_future(lines.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                break
            await write(getter.result())
        while not lines.empty():
            await write(lines.get_nowait())
        last: msgspec.Struct
        try:
            last = result_line(task.result())
        except KowalskiError as exc:
            if response is None:
                raise
            last = JobStreamError(error=WireError(code=exc.code, message=exc.user_message(),
                                                  retryable=exc.retry_elsewhere))
        await write(last)
        if signed:
            signature = ("" if secret is None or nonce is None
                         else stream_signature(secret, nonce, digest.hexdigest()))
            await write(JobStreamEnd(signature=signature))
    finally:
        if not task.done():
            task.cancel()
    assert response is not None
    await response.write_eof()
    return response
