"""A batch's JSONL: parsed input lines, result lines, the journal, the output file."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, BinaryIO

import msgspec
from msgspec import Meta

from kowalski.common.errors import KowalskiError, ParseError
from kowalski.controller.models.chat_types import ChatMessage, ChatRequest, Usage

ItemId = str | int


class ItemError(msgspec.Struct, frozen=True, kw_only=True):
    code: str
    message: str
    retryable: bool

    @classmethod
    def of(cls, error: Exception) -> ItemError:
        if isinstance(error, KowalskiError):
            return cls(code=error.code, message=error.message, retryable=error.retry_elsewhere)
        return cls(code="internal", message=f"{type(error).__name__}: {error}", retryable=False)


class BatchItem(msgspec.Struct, frozen=True, kw_only=True):
    id: ItemId
    # Position among the input's items (from 0), and line in the input (from 1).
    index: int
    line: int
    request: ChatRequest


class ItemSuccess(msgspec.Struct, frozen=True, kw_only=True):
    id: ItemId
    index: int
    line: int
    ok: bool = True
    text: str
    finish_reason: str | None
    usage: Usage | None
    # The server's latency; for a cached answer, how long this item waited for it.
    latency_ms: float
    endpoint: str
    cached: bool
    attempts: int


class ItemFailure(msgspec.Struct, frozen=True, kw_only=True):
    id: ItemId
    index: int
    line: int
    ok: bool = False
    error: ItemError
    # 0 for a line that could not be parsed.
    attempts: int = 0


ItemResult = ItemSuccess | ItemFailure

_encoder = msgspec.json.Encoder()


def encode_result(result: ItemResult) -> bytes:
    """One output line."""
    return _encoder.encode(result) + b"\n"


def decode_result(line: bytes | str) -> ItemResult | None:
    """An output or journal line, or None when it is not one (a line torn by a crash)."""
    try:
        raw = msgspec.json.decode(line)
        if isinstance(raw, dict) and raw.get("ok") is True:
            return msgspec.convert(raw, ItemSuccess)
        return msgspec.convert(raw, ItemFailure)
    except msgspec.MsgspecError:
        return None


# --- input -----------------------------------------------------------------------------------


class _Line(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    id: ItemId | None = None
    prompt: str | None = None
    # Goes before the prompt; with messages, put the system message among them.
    system: str | None = None
    messages: list[ChatMessage] | None = None
    model: str | None = None
    max_tokens: Annotated[int, Meta(gt=0)] | None = None
    temperature: Annotated[float, Meta(ge=0)] | None = None
    top_p: Annotated[float, Meta(gt=0, le=1)] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None


_line_decoder = msgspec.json.Decoder(_Line)


def _id_of(text: str, line: int) -> ItemId:
    # The id of a line that failed validation, when it has a usable one.
    try:
        raw = msgspec.json.decode(text)
    except msgspec.DecodeError:
        return line
    value = raw.get("id") if isinstance(raw, dict) else None
    return value if isinstance(value, str | int) and not isinstance(value, bool) else line


def parse_batch_line(
    text: str | bytes, *, index: int, line: int, default_model: str,
) -> BatchItem | ItemFailure:
    """One input line as a request, or as a failed item that says what is wrong with it."""

    def bad(message: str, item_id: ItemId = line) -> ItemFailure:
        error = ItemError(code=ParseError.code, message=f"line {line}: {message}", retryable=False)
        return ItemFailure(id=item_id, index=index, line=line, error=error)

    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            return bad(f"not UTF-8 ({exc.reason} at byte {exc.start})")
    try:
        parsed = _line_decoder.decode(text)
    except msgspec.MsgspecError as exc:
        return bad(str(exc), _id_of(text, line))
    item_id = line if parsed.id is None else parsed.id
    if (parsed.prompt is None) == (parsed.messages is None):
        return bad("give either `prompt` or `messages`", item_id)
    if parsed.messages is not None and parsed.system is not None:
        return bad("`system` goes with `prompt`; put it among the `messages`", item_id)
    if parsed.messages == []:
        return bad("`messages` is empty", item_id)
    model = parsed.model or default_model
    if not model:
        return bad("no model: set `model` on the line or give a default model", item_id)
    messages = parsed.messages or [ChatMessage(role="user", content=parsed.prompt or "")]
    if parsed.system is not None:
        messages.insert(0, ChatMessage(role="system", content=parsed.system))
    request = ChatRequest(
        model=model, messages=messages, max_tokens=parsed.max_tokens,
        temperature=parsed.temperature, top_p=parsed.top_p, stop=parsed.stop, seed=parsed.seed,
    )
    return BatchItem(id=item_id, index=index, line=line, request=request)


def read_batch(data: bytes, *, default_model: str) -> list[BatchItem | ItemFailure]:
    """Every non-blank line of a JSONL input, parsed; bad lines become failed items."""
    items: list[BatchItem | ItemFailure] = []
    for number, text in enumerate(data.splitlines(), start=1):
        if text.strip():
            items.append(
                parse_batch_line(text, index=len(items), line=number, default_model=default_model),
            )
    return items


# --- result files ------------------------------------------------------------------------------


def journal_path(output_path: Path) -> Path:
    """Where a batch writing ``output_path`` keeps its finished items until it is done."""
    return output_path.with_name(output_path.name + ".journal")


def _still_counts(result: ItemResult, items: Sequence[BatchItem | ItemFailure]) -> bool:
    # Only an answer for the same item at the same place counts; a failure that a retry
    # could fix is tried again.
    if not 0 <= result.index < len(items):
        return False
    item = items[result.index]
    if not isinstance(item, BatchItem) or item.id != result.id or item.line != result.line:
        return False
    return isinstance(result, ItemSuccess) or not result.error.retryable


def load_finished(
    output_path: Path, items: Sequence[BatchItem | ItemFailure],
) -> list[ItemResult]:
    """What an earlier run finished for these items, from its output file and its journal."""
    found: dict[int, ItemResult] = {}
    for path in (output_path, journal_path(output_path)):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        for line in data.splitlines():
            result = decode_result(line)
            if result is not None and _still_counts(result, items):
                found[result.index] = result
    return [found[index] for index in sorted(found)]


def write_atomically(path: Path, results: Sequence[ItemResult]) -> None:
    """Replace the file with these results, or leave it as it was: temp file, fsync, rename."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("wb") as file:
            file.writelines(encode_result(result) for result in results)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


class Journal:
    """Finished results in the order they land, each flushed at once."""

    def __init__(self, path: Path, kept: Sequence[ItemResult]) -> None:
        # Rewriting first drops a torn last line and results that no longer count.
        write_atomically(path, kept)
        self.path = path
        self._file = path.open("ab")

    def write(self, result: ItemResult) -> None:
        self._file.write(encode_result(result))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class InOrderWriter:
    """Writes results to a stream in input order, each as soon as all before it are out."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._next = 0
        self._held: dict[int, ItemResult] = {}

    def write(self, result: ItemResult) -> None:
        self._held[result.index] = result
        while self._next in self._held:
            self._stream.write(encode_result(self._held.pop(self._next)))
            self._next += 1
        self._stream.flush()


def read_input(path: str) -> bytes:
    """The whole input; "-" is stdin."""
    return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
