"""How a run ends: FINAL(answer) and FINAL_VAR(name) in a model's reply (where they are,
where they end, the stop each one makes or why it does not end the run), and the REPL's
`answer` dict once a cell sets answer["ready"]."""

from __future__ import annotations

import re
from typing import Literal, Protocol

import msgspec

from kowalski.common.code_blocks import CodeBlock, normalize_newlines
from kowalski.common.messages import CellResult, VariableValue
from kowalski.controller.rlm.events import Stop

# A FINAL_VAR value longer than this is cut (the answer then says so).
FINAL_VAR_MAX_CHARS = 1_000_000
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# FINAL / FINAL_VAR at the start of a line (leading blanks allowed), then "(".
_MARKER = re.compile(r"^[ \t]*(FINAL_VAR|FINAL)[ \t]*\(")
# What may follow the ")" that ends FINAL(...) on its line.
_ENDS_LINE = re.compile(r"[.!]?[ \t]*(?:\n|$)")


class FinalMarker(msgspec.Struct, frozen=True, kw_only=True):
    """A FINAL(answer) or FINAL_VAR(name) found in a reply."""

    kind: Literal["final", "final_var"]
    # The answer text for FINAL, the variable name (quotes stripped) for FINAL_VAR.
    value: str


class Variables(Protocol):
    """Where FINAL_VAR's variable is read: the run's session."""

    async def get_variable(self, name: str, max_chars: int = 100_000) -> VariableValue: ...


def find_final(text: str, blocks: list[CodeBlock]) -> FinalMarker | None:
    """The first FINAL(...) / FINAL_VAR(...) starting a line outside the fenced code blocks."""
    lines = normalize_newlines(text).split("\n")
    in_code = [False] * len(lines)
    # Only fences are code here: an indented FINAL line is a marker, not an indented block.
    for block in blocks:
        if block.fenced:
            for index in range(block.start_line, min(block.end_line, len(lines))):
                in_code[index] = True
    offset = 0
    flat = "\n".join(lines)
    for index, line in enumerate(lines):
        match = None if in_code[index] else _MARKER.match(line)
        if match is not None:
            inner = final_argument(flat, offset + match.end())
            kind: Literal["final", "final_var"] = (
                "final_var" if match.group(1) == "FINAL_VAR" else "final")
            value = inner.strip()
            if kind == "final_var":
                value = value.strip("\"'` ")
            return FinalMarker(kind=kind, value=value)
        offset += len(line) + 1
    return None


def final_argument(text: str, start: int) -> str:
    """FINAL's argument: text from start to the ")" a reader takes as the marker's end.

    A ")" that closes a "(" opened inside the argument belongs to the argument. Of the others
    ("1) cost", ":)" and the marker's own), the end is the first one that ends its line
    (only spaces or a full stop may follow it), else the first one, else the end of the text.
    """
    opened = 0
    first: int | None = None
    for index in range(start, len(text)):
        char = text[index]
        if char == "(":
            opened += 1
        elif char == ")":
            if opened:
                opened -= 1
                continue
            if _ENDS_LINE.match(text, index + 1):
                return text[start:index]
            if first is None:
                first = index
    return text[start:first] if first is not None else text[start:]


def is_identifier(name: str) -> bool:
    """Whether FINAL_VAR's argument can name a variable."""
    return _IDENTIFIER.fullmatch(name) is not None


async def resolve(marker: FinalMarker, variables: Variables) -> tuple[Stop | None, str]:
    """The stop a FINAL marker makes, or why it does not end the run."""
    if marker.kind == "final" and not marker.value:
        return None, ("FINAL() is empty, so the run goes on: write the answer inside the "
                      "parentheses, e.g. FINAL(42), or use FINAL_VAR(variable_name).")
    if marker.kind == "final":
        return Stop(reason="final", answer=marker.value), ""
    name = marker.value
    if not is_identifier(name):
        return None, (f"FINAL_VAR({name}) is not final: FINAL_VAR takes the name of one "
                      "variable; assign the value to a variable first.")
    value = await variables.get_variable(name, max_chars=FINAL_VAR_MAX_CHARS)
    if not value.found:
        return None, (f"FINAL_VAR({name}) is not final: there is no variable named "
                      f"{name!r} in the REPL. Assign it in a ```repl block first.")
    detail = (f"the value of {name} was cut at {FINAL_VAR_MAX_CHARS} characters"
              if value.truncated else "")
    return Stop(reason="final_var", answer=value.value, detail=detail), ""


def answer_stop(result: CellResult) -> Stop | None:
    """The stop a cell makes by leaving answer["ready"] set, else None."""
    if result.answer is None:
        return None
    detail = ("the answer was cut to fit the session's message limit"
              if result.answer_truncated else "")
    return Stop(reason="answer_dict", answer=result.answer, detail=detail)
