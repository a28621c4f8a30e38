"""A run's JSONL trajectory file: its records, the writer, the reader and the renderer.

In the file, line 1 is the run's metadata (with the system prompt and the task message),
then one line per iteration (the model's reply, each code block and its output, sub-calls,
folding, the feedback sent back), then a final line with the answer and totals. A run still
going, or one that died, has no final line; a line cut off mid-write is skipped when reading.
The events and the result a run reports live in rlm_events.py and are re-exported here.
"""
from __future__ import annotations

import asyncio
import datetime
import os
from pathlib import Path
from typing import Any, Literal

import msgspec

from kowalski.common.config import RlmConfig
from kowalski.common.errors import ParseError
from kowalski.common.messages import WireError
from kowalski.controller.rlm.events import (
    AnyRlmEvent,
    CodeExecuted,
    ContextFolded,
    IterationStarted,
    ModelReplied,
    RlmEvent,
    RlmResult,
    RunFinished,
    RunStarted,
    StepTiming,
    StopReason,
    SubCallAnswered,
    TokenCount,
)

# The events and the result are defined in rlm_events and re-exported for readers.
__all__ = [
    "SUB_CALL_CHARS", "SUFFIX", "AnyRlmEvent", "CodeExecuted", "CodeRecord", "ContextFolded",
    "FinalRecord", "FoldRecord", "IterationRecord", "IterationStarted", "ModelReplied",
    "Record", "RlmEvent", "RlmResult", "RunFinished", "RunMeta", "RunStarted", "RunSummary",
    "StepTiming", "StopReason", "SubCallAnswered", "SubCallRecord", "TokenCount", "Trajectory",
    "TrajectoryWriter", "list_runs", "read_trajectory", "render_trajectory", "resolve",
    "run_dir", "to_json",
]

SUFFIX = ".jsonl"
# Sub-call prompts and answers are stored cut to this many characters.
SUB_CALL_CHARS = 2000
# How far back from the end to look for the final line when listing runs.
_TAIL_BYTES = 1 << 16


class _Record(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    run_id: str


class RunMeta(_Record, frozen=True, tag="meta"):
    query: str
    model: str
    context_type: str
    context_chars: int
    context_chunks: int
    config: RlmConfig
    started_at: float
    depth: int = 0
    parent_run_id: str = ""
    system_prompt: str = ""
    task: str = ""


class SubCallRecord(msgspec.Struct, frozen=True, kw_only=True):
    prompt: str
    answer: str
    prompt_chars: int
    answer_chars: int
    tokens: TokenCount
    latency_ms: float
    endpoint: str = ""
    error: str = ""
    # Set when the sub-call was itself an RLM run (depth below max_depth).
    child_run_id: str = ""


class CodeRecord(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    language: str
    code: str
    executed: bool
    status: str = ""
    # The output as the model saw it (truncated at rlm.max_output_chars).
    output: str = ""
    wall_time_ms: float = 0.0
    device_id: str = ""


class FoldRecord(msgspec.Struct, frozen=True, kw_only=True):
    method: str
    folded_turns: int
    tokens_before: int
    tokens_after: int
    summary: str
    error: str = ""


class IterationRecord(_Record, frozen=True, tag="iteration"):
    iteration: int
    started_at: float
    messages_sent: int
    prompt_chars: int
    response: str
    tokens: TokenCount
    model_ms: float
    # "turn": a normal step; "final_request": the extra request at the iteration limit.
    phase: Literal["turn", "final_request"] = "turn"
    finish_reason: str | None = None
    endpoint: str = ""
    code_ms: float = 0.0
    code: list[CodeRecord] = msgspec.field(default_factory=list)
    sub_calls: list[SubCallRecord] = msgspec.field(default_factory=list)
    fold: FoldRecord | None = None
    # FINAL / FINAL_VAR as found in the reply, and why it did not end the run (if it did not).
    final_kind: str = ""
    final_value: str = ""
    final_note: str = ""
    # The user message sent back (REPL output and notes); empty when the run ended here.
    feedback: str = ""


class FinalRecord(_Record, frozen=True, tag="final"):
    answer: str
    stop_reason: StopReason
    iterations: int
    sub_calls: int
    tokens: TokenCount
    sub_call_tokens: TokenCount
    latency_ms: float
    finished_at: float
    detail: str = ""
    devices: list[str] = msgspec.field(default_factory=list)
    error: WireError | None = None


Record = RunMeta | IterationRecord | FinalRecord
_decoder = msgspec.json.Decoder(Record)
_encoder = msgspec.json.Encoder()


class Trajectory(msgspec.Struct, frozen=True, kw_only=True):
    path: str
    meta: RunMeta
    iterations: list[IterationRecord]
    final: FinalRecord | None


class RunSummary(msgspec.Struct, frozen=True, kw_only=True):
    run_id: str
    path: str
    query: str
    model: str
    started_at: float
    # None while running (or when the run died before finishing).
    stop_reason: StopReason | None
    iterations: int | None
    answer: str | None


def run_dir(directory: str | os.PathLike[str]) -> Path:
    """The trajectory directory with ~ expanded."""
    return Path(directory).expanduser()


class TrajectoryWriter:
    """Appends a run's records to its file, one JSON line each, off the event loop."""

    def __init__(self, directory: str | os.PathLike[str], run_id: str) -> None:
        self.path = run_dir(directory) / f"{run_id}{SUFFIX}"
        self._lock = asyncio.Lock()

    def _append(self, line: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as file:
            file.write(line)

    async def write(self, record: Record) -> None:
        line = _encoder.encode(record) + b"\n"
        async with self._lock:
            await asyncio.to_thread(self._append, line)


def resolve(path_or_run_id: str | os.PathLike[str], directory: str | os.PathLike[str]) -> Path:
    """The file of a run given its path, or its id within directory."""
    candidate = Path(path_or_run_id).expanduser()
    if candidate.suffix == SUFFIX or candidate.is_file():
        return candidate
    return run_dir(directory) / f"{path_or_run_id}{SUFFIX}"


def _records(data: bytes, path: Path) -> list[Record]:
    records: list[Record] = []
    lines = data.split(b"\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(_decoder.decode(line))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            # A last line without its newline was cut off mid-write; anything else is damage.
            if number == len(lines):
                break
            raise ParseError(f"{path}:{number}: not a trajectory record: {exc}") from None
    return records


def read_trajectory(
    path_or_run_id: str | os.PathLike[str], directory: str | os.PathLike[str] = ".",
) -> Trajectory:
    """Read a run's file, by path or by run id within directory."""
    path = resolve(path_or_run_id, directory)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ParseError(f"no trajectory for {str(path_or_run_id)!r} at {path}") from None
    records = _records(data, path)
    if not records or not isinstance(records[0], RunMeta):
        raise ParseError(f"{path}: the first line is not a run's metadata")
    iterations = [r for r in records if isinstance(r, IterationRecord)]
    finals = [r for r in records if isinstance(r, FinalRecord)]
    return Trajectory(path=str(path), meta=records[0], iterations=iterations,
                      final=finals[-1] if finals else None)


def _summary(path: Path) -> RunSummary | None:
    with path.open("rb") as file:
        first = file.readline()
        size = file.seek(0, os.SEEK_END)
        file.seek(max(0, size - _TAIL_BYTES))
        tail = file.read()
    try:
        meta = _decoder.decode(first)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if not isinstance(meta, RunMeta):
        return None
    final: FinalRecord | None = None
    last = tail.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    if b'"kind":"final"' in last:
        try:
            record = _decoder.decode(last)
        except (msgspec.DecodeError, msgspec.ValidationError):
            record = None
        final = record if isinstance(record, FinalRecord) else None
    return RunSummary(
        run_id=meta.run_id, path=str(path), query=meta.query, model=meta.model,
        started_at=meta.started_at, stop_reason=final.stop_reason if final else None,
        iterations=final.iterations if final else None, answer=final.answer if final else None,
    )


def list_runs(directory: str | os.PathLike[str]) -> list[RunSummary]:
    """Runs in directory, newest first; files that are not trajectories are skipped."""
    folder = run_dir(directory)
    if not folder.is_dir():
        return []
    runs = []
    for path in folder.glob(f"*{SUFFIX}"):
        try:
            summary = _summary(path)
        except OSError:
            continue
        if summary is not None:
            runs.append(summary)
    return sorted(runs, key=lambda run: (run.started_at, run.run_id), reverse=True)


# --- rendering ------------------------------------------------------------------------------


def _when(timestamp: float) -> str:
    moment = datetime.datetime.fromtimestamp(timestamp, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _indent(text: str, prefix: str = "  ") -> str:
    return "\n".join(prefix + line if line else line for line in text.splitlines()) or prefix


def _cut(text: str, limit: int) -> str:
    if limit <= 0 or len(text) <= limit:
        return text
    return f"{text[:limit]}\n[... {len(text) - limit} more characters ...]"


def _tokens(tokens: TokenCount) -> str:
    return (f"{tokens.total_tokens} tokens ({tokens.prompt_tokens} prompt + "
            f"{tokens.completion_tokens} completion)")


def _iteration(record: IterationRecord, limit: int) -> list[str]:
    title = "Final request" if record.phase == "final_request" else f"Iteration {record.iteration}"
    lines = [f"── {title} ── model {record.model_ms:.0f} ms, code {record.code_ms:.0f} ms, "
             f"{_tokens(record.tokens)}" + (f", {record.endpoint}" if record.endpoint else "")]
    if record.fold is not None:
        fold = record.fold
        lines.append(f"[context folded by {fold.method}: {fold.folded_turns} turns, "
                     f"~{fold.tokens_before} -> ~{fold.tokens_after} tokens"
                     + (f"; {fold.error}" if fold.error else "") + "]")
    lines += ["Model:", _indent(_cut(record.response, limit))]
    for block in record.code:
        if not block.executed:
            lines.append(f"[block {block.index}: ```{block.language or '(untagged)'} not run]")
            continue
        where = f" on {block.device_id}" if block.device_id else ""
        lines.append(f"[block {block.index}: {block.status}, {block.wall_time_ms:.0f} ms{where}]")
        lines += [_indent(_cut(block.code.rstrip("\n"), limit), "  > "),
                  _indent(_cut(block.output, limit), "  | ")]
    for number, call in enumerate(record.sub_calls, start=1):
        child = f", child run {call.child_run_id}" if call.child_run_id else ""
        lines.append(f"[sub-call {number}: {call.prompt_chars} chars in, {call.answer_chars} "
                     f"out, {call.latency_ms:.0f} ms, {call.tokens.total_tokens} tokens{child}]")
        if call.error:
            lines.append(f"  error: {call.error}")
        lines.append(_indent(f"Q: {_cut(call.prompt, 300)}\nA: {_cut(call.answer, 300)}", "  "))
    if record.final_kind:
        marker = f"{record.final_kind.upper()}({record.final_value})"
        # The note names the marker itself ("FINAL_VAR(x) is not final: ...").
        lines.append(f"[{record.final_note or marker}]")
    return lines


def render_trajectory(trajectory: Trajectory, *, max_chars: int = 4000) -> str:
    """A run as readable text; long texts are cut at max_chars (0: never)."""
    meta = trajectory.meta
    parent = f", sub-call of {meta.parent_run_id}" if meta.parent_run_id else ""
    lines = [
        f"Run {meta.run_id} (model {meta.model or 'default'}, depth {meta.depth}{parent})",
        f"Started: {_when(meta.started_at)}",
        f"Context: {meta.context_type}, {meta.context_chars} characters in "
        f"{meta.context_chunks} chunk(s)",
        "Query:", _indent(_cut(meta.query, max_chars)), "",
    ]
    for record in trajectory.iterations:
        lines += [*_iteration(record, max_chars), ""]
    final = trajectory.final
    if final is None:
        lines.append("── Not finished ── (running, or stopped without a final record)")
        return "\n".join(lines) + "\n"
    lines += [
        f"── Finished: {final.stop_reason} ── after {final.iterations} iterations, "
        f"{final.sub_calls} sub-calls, {final.latency_ms / 1000:.1f} s",
        f"Tokens: {_tokens(final.tokens)}; sub-calls: {_tokens(final.sub_call_tokens)}",
    ]
    if final.detail:
        lines.append(f"Why: {final.detail}")
    if final.devices:
        lines.append(f"Devices: {', '.join(final.devices)}")
    lines += ["Answer:", _indent(_cut(final.answer, max_chars))]
    return "\n".join(lines) + "\n"


def to_json(trajectory: Trajectory) -> Any:
    """The trajectory as plain JSON data (for the HTTP API and dashboards)."""
    return msgspec.to_builtins(trajectory)
