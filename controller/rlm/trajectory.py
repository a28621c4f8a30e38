"""A run's JSONL trajectory file: the writer, the reader and the renderer.

The file is the run's events (events.py), one JSON line each, in the order they happened:
`run_started` first, `run_finished` last. A run still going, or one that died, has no
`run_finished` line; a line cut off mid-write is skipped when reading. Files of the first
format (meta / iteration / final lines) are read as events too (trajectory_v1.py).
"""
from __future__ import annotations

import collections
import datetime
import glob
import os
import re
from collections.abc import Set as AbstractSet
from pathlib import Path

import msgspec

from kowalski.common.errors import NotFoundError, ParseError
from kowalski.controller.rlm.events import (
    AnyRlmEvent,
    CodeExecuted,
    CodeSkipped,
    ContextFolded,
    IterationFinished,
    IterationStarted,
    ModelReplied,
    RunFinished,
    RunResumed,
    RunStarted,
    SessionOpened,
    StopReason,
    SubCallAnswered,
    TokenCount,
)
from kowalski.controller.rlm.trajectory_v1 import (
    V1Final,
    V1Meta,
    V1Record,
    final_event,
    meta_event,
    to_events,
)

__all__ = ["SUFFIX", "StoredRunSummary", "Trajectory", "list_runs",
           "read_trajectory", "render_trajectory", "resolve", "resumed_line", "run_dir"]

SUFFIX = ".jsonl"
# How far back from the end to look for the last line when listing runs.
_TAIL_BYTES = 1 << 16
_decoder = msgspec.json.Decoder(AnyRlmEvent | V1Record)
# What follows a run's id in the ids of the runs below it: `-s1`, `-s1-s3`, ...
_DESCENDANT = re.compile(r"(?:-s\d+)+")
_TRAILING_DESCENDANT = re.compile(r"(?:-s\d+)+$")


class Trajectory(msgspec.Struct, frozen=True, kw_only=True):
    """A run's file as read: its events, `run_started` first."""

    path: str
    events: list[AnyRlmEvent]
    # Runs its sub-calls started, at every depth, parents before children (when asked for).
    descendants: list[Trajectory] = msgspec.field(default_factory=list)

    @property
    def started(self) -> RunStarted:
        first = self.events[0]
        assert isinstance(first, RunStarted)
        return first

    @property
    def finished(self) -> RunFinished | None:
        last = self.events[-1]
        return last if isinstance(last, RunFinished) else None


class StoredRunSummary(msgspec.Struct, frozen=True, kw_only=True):
    """A run of any controller, read from its file's ends: running and dead look alike here."""

    run_id: str
    path: str
    query: str
    model: str
    started_at: float
    # None while running (or when the run died before finishing).
    stop_reason: StopReason | None
    iterations: int | None
    answer: str | None
    sub_calls: int | None = None
    # Runs its sub-calls started, at every depth (told by their file names alone).
    child_runs: int = 0


def run_dir(directory: str | os.PathLike[str]) -> Path:
    """The trajectory directory with ~ expanded."""
    return Path(directory).expanduser()


def resolve(path_or_run_id: str | os.PathLike[str], directory: str | os.PathLike[str]) -> Path:
    """The file of a run given its path, or its id within directory."""
    candidate = Path(path_or_run_id).expanduser()
    if candidate.suffix == SUFFIX or candidate.is_file():
        return candidate
    return run_dir(directory) / f"{path_or_run_id}{SUFFIX}"


def _lines(data: bytes, path: Path) -> list[AnyRlmEvent | V1Record]:
    lines: list[AnyRlmEvent | V1Record] = []
    raw = data.split(b"\n")
    for number, line in enumerate(raw, start=1):
        if not line.strip():
            continue
        try:
            lines.append(_decoder.decode(line))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            # A last line without its newline was cut off mid-write; anything else is damage.
            if number == len(raw):
                break
            raise ParseError(f"{path}:{number}: not a trajectory line: {exc}") from None
    return lines


def read_trajectory(
    path_or_run_id: str | os.PathLike[str], directory: str | os.PathLike[str] = ".",
    *, descendants: bool = False,
) -> Trajectory:
    """Read a run's file, by path or by run id within directory; with its child runs if asked."""
    path = resolve(path_or_run_id, directory)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"no trajectory for {str(path_or_run_id)!r} at {path}",
                            next_step="List the runs there with `kowalski-ctl runs list`, "
                                      "or pass --dir") from None
    trajectory = _parse(data, path)
    if not descendants:
        return trajectory
    below = []
    for child in _descendant_paths(path):
        try:
            below.append(_parse(child.read_bytes(), child))
        except (OSError, ParseError):
            continue  # a child that has not written its first line yet, or a damaged file
    return msgspec.structs.replace(trajectory, descendants=below)


def _parse(data: bytes, path: Path) -> Trajectory:
    lines = _lines(data, path)
    first = lines[0] if lines else None
    if isinstance(first, V1Meta):
        rest = [line for line in lines[1:] if isinstance(line, V1Record)]
        return Trajectory(path=str(path), events=to_events(first, rest, str(path)))
    if not isinstance(first, RunStarted):
        raise ParseError(f"{path}: the first line is not the start of a run")
    events = [line for line in lines if not isinstance(line, V1Record)]
    return Trajectory(path=str(path), events=events)


def _descendant_paths(path: Path) -> list[Path]:
    """Files of the runs below this one (child run ids extend their parent's), in tree order."""
    run_id = path.name.removesuffix(SUFFIX)
    found = []
    for candidate in path.parent.glob(f"{glob.escape(run_id)}-s*{SUFFIX}"):
        rest = candidate.name.removesuffix(SUFFIX)[len(run_id):]
        if _DESCENDANT.fullmatch(rest):
            found.append((tuple(int(n) for n in rest.split("-s")[1:]), candidate))
    return [candidate for _, candidate in sorted(found)]


def _summary(path: Path) -> StoredRunSummary | None:
    with path.open("rb") as file:
        first_line = file.readline()
        size = file.seek(0, os.SEEK_END)
        file.seek(max(0, size - _TAIL_BYTES))
        tail = file.read()
    try:
        first = _decoder.decode(first_line)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    started = meta_event(first, str(path)) if isinstance(first, V1Meta) else first
    if not isinstance(started, RunStarted):
        return None
    finished: RunFinished | None = None
    last_line = tail.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    if b'"kind":"run_finished"' in last_line or b'"kind":"final"' in last_line:
        try:
            last = _decoder.decode(last_line)
        except (msgspec.DecodeError, msgspec.ValidationError):
            last = None
        if isinstance(last, V1Final):
            last = final_event(last, [], depth=started.depth, path=str(path))
        finished = last if isinstance(last, RunFinished) else None
    result = finished.result if finished else None
    return StoredRunSummary(
        run_id=started.run_id, path=str(path), query=started.query, model=started.model,
        started_at=started.started_at, stop_reason=result.stop_reason if result else None,
        iterations=result.iterations if result else None,
        answer=result.answer if result else None,
        sub_calls=result.sub_calls if result else None,
    )


def _root_of(run_id: str, present: AbstractSet[str]) -> str | None:
    """The topmost run in present that run_id descends from (by its `-sN` suffixes)."""
    suffix = _TRAILING_DESCENDANT.search(run_id)
    if suffix is None:
        return None
    for piece in re.finditer("-s", suffix.group()):
        parent = run_id[:suffix.start() + piece.start()]
        if parent in present:
            return parent
    return None


def list_runs(directory: str | os.PathLike[str]) -> list[StoredRunSummary]:
    """Root runs in directory, newest first, each with its count of child runs.

    A child run's file is named after its parent's (`ID-s1`, `ID-s1-s2`, ...), so child
    runs are counted from names alone and never opened; `read_trajectory` reads them.
    Files that are not trajectories are skipped.
    """
    folder = run_dir(directory)
    if not folder.is_dir():
        return []
    paths = {path.name.removesuffix(SUFFIX): path for path in folder.glob(f"*{SUFFIX}")}
    roots = {run_id: _root_of(run_id, paths.keys()) for run_id in paths}
    children = collections.Counter(root for root in roots.values() if root is not None)
    runs = []
    for run_id, path in paths.items():
        if roots[run_id] is not None:
            continue
        try:
            summary = _summary(path)
        except OSError:
            continue
        if summary is not None:
            runs.append(msgspec.structs.replace(summary, child_runs=children.get(run_id, 0)))
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


def _iteration(events: list[AnyRlmEvent], limit: int) -> list[str]:
    """One iteration's events (from its IterationStarted on) as text."""
    reply = next((e for e in events if isinstance(e, ModelReplied)), None)
    finished = next((e for e in events if isinstance(e, IterationFinished)), None)
    phase = reply.phase if reply else finished.phase if finished else "turn"
    number = reply.iteration if reply else events[0].iteration if isinstance(
        events[0], IterationStarted) else 0
    title = {"final_request": "Final request", "direct": "Direct call"}.get(
        phase, f"Iteration {number}")
    facts = [f"model {reply.model_ms:.0f} ms" if reply else "no reply",
             f"code {finished.code_ms:.0f} ms" if finished else "",
             _tokens(reply.tokens) if reply else "", reply.endpoint if reply else ""]
    lines = [f"── {title} ── " + ", ".join(fact for fact in facts if fact)]
    for opened in (e for e in events if isinstance(e, SessionOpened)):
        lines.append(f"[session opened on {opened.device_id} in {opened.open_ms:.0f} ms]")
    for fold in (e for e in events if isinstance(e, ContextFolded)):
        lines.append(f"[context folded by {fold.method}: {fold.folded_turns} turns, "
                     f"~{fold.tokens_before} -> ~{fold.tokens_after} tokens"
                     + (f"; {fold.error}" if fold.error else "") + "]")
    if reply is not None:
        lines += ["Model:", _indent(_cut(reply.text, limit))]
    for block in events:
        if isinstance(block, CodeSkipped):
            lines.append(f"[block {block.block}: ```{block.language or '(untagged)'} not run]")
        elif isinstance(block, CodeExecuted):
            where = f" on {block.device_id}" if block.device_id else ""
            language = f" {block.ran_as}" if block.ran_as != "python" else ""
            lines.append(f"[block {block.block}{language}: {block.status}, "
                         f"{block.wall_time_ms:.0f} ms{where}]")
            lines += [_indent(_cut(block.code.rstrip("\n"), limit), "  > "),
                      _indent(_cut(block.output, limit), "  | ")]
    calls = [e for e in events if isinstance(e, SubCallAnswered)]
    for count, call in enumerate(calls, start=1):
        child = f", child run {call.child_run_id}" if call.child_run_id else ""
        # Files written before sub-calls named their cell have block 0.
        cell = f" from block {call.block}" if call.block else ""
        lines.append(f"[sub-call {count}{cell}: {call.prompt_chars} chars in, {call.answer_chars} "
                     f"out, {call.latency_ms:.0f} ms, {call.tokens.total_tokens} tokens{child}]")
        if call.error:
            lines.append(f"  error: {call.error}")
        lines.append(_indent(f"Q: {_cut(call.prompt, 300)}\nA: {_cut(call.answer, 300)}", "  "))
    if finished is not None and finished.final_kind:
        marker = f"{finished.final_kind.upper()}({finished.final_value})"
        # The note names the marker itself ("FINAL_VAR(x) is not final: ...").
        lines.append(f"[{finished.final_note or marker}]")
    return lines


def _by_iteration(events: list[AnyRlmEvent]) -> list[list[AnyRlmEvent]]:
    """The events between run_started and run_finished, cut at each IterationStarted."""
    groups: list[list[AnyRlmEvent]] = []
    for event in events:
        if isinstance(event, RunStarted | RunFinished):
            continue
        if isinstance(event, IterationStarted | RunResumed) or not groups:
            groups.append([])
        groups[-1].append(event)
    return groups


def resumed_line(event: RunResumed) -> str:
    """The seam of a resumed run, as one line."""
    return (f"── Resumed at iteration {event.iteration} ({event.reason}, "
            f"{_when(event.resumed_at)}) ── replayed {event.replayed_cells} cell(s) and "
            f"{event.replayed_sub_calls} sub-call answer(s) from the record; limit "
            f"{event.max_iterations} iterations")


def render_trajectory(trajectory: Trajectory, *, max_chars: int = 4000) -> str:
    """A run as readable text; long texts are cut at max_chars (0: never)."""
    start = trajectory.started
    parent = f", sub-call of {start.parent_run_id}" if start.parent_run_id else ""
    lines = [
        f"Run {start.run_id} (model {start.model or 'default'}, depth {start.depth}{parent})",
        f"Started: {_when(start.started_at)}",
        f"Context: {start.context_type}, {start.context_chars} characters in "
        f"{start.context_chunks} chunk(s)",
        "Query:", _indent(_cut(start.query, max_chars)), "",
    ]
    for group in _by_iteration(trajectory.events):
        first = group[0]
        if isinstance(first, RunResumed):
            lines += [resumed_line(first), ""]
            continue
        lines += [*_iteration(group, max_chars), ""]
    finished = trajectory.finished
    if finished is None:
        lines.append("── Not finished ── (running, or stopped without a final record)")
        return "\n".join(lines) + "\n"
    final = finished.result
    lines += [
        f"── Finished: {final.stop_reason} ── after {final.iterations} iterations, "
        f"{final.sub_calls} sub-calls, {final.latency_ms / 1000:.1f} s",
        f"Tokens: {_tokens(final.tokens)}; sub-calls: {_tokens(final.sub_call_tokens)}",
    ]
    if final.detail:
        lines.append(f"Why: {final.detail}")
    if final.devices:
        lines.append(f"Devices: {', '.join(final.devices)}")
    if final.cached_tokens.total_tokens:
        lines.append(f"Answered by the cache (not spent): {_tokens(final.cached_tokens)}")
    if final.answer or final.stop_reason in ("final", "final_var", "answer_dict", "direct"):
        lines += ["Answer:", _indent(_cut(final.answer, max_chars))]
    else:
        lines += ["No answer; the model's last reply was:",
                  _indent(_cut(final.last_reply, max_chars))]
    return "\n".join(lines) + "\n"
