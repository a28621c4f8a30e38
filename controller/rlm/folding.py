"""Context folding: older turns of a long conversation become a summary so it fits the window.

The conversation of an RLM run is: the system prompt, the task (first user message), then
turns of (assistant reply, user feedback). Folding keeps the system prompt, the task and
the last turns word for word, asks the model (operation "context_compression") to summarise
the turns in between, and writes that summary, plus the names of every variable the code has
assigned so far (FINAL_VAR needs them), into the task message. When no model answers, a
mechanical digest of the folded turns stands in for the summary.
"""

from __future__ import annotations

import ast
import logging
import re
from collections.abc import Iterable, Sequence
from typing import Literal

import msgspec

from kowalski.common.errors import KowalskiError
from kowalski.controller.models.chat_types import (
    ChatBackend,
    ChatMessage,
    ChatRequest,
    ChatResult,
)

log = logging.getLogger(__name__)

# A cheap token estimate: English text and code average about four characters a token.
CHARS_PER_TOKEN = 4
# Messages after the system prompt and the task.
_HEAD = 2
# The summariser's reply is capped at this share of the window.
_SUMMARY_SHARE = 0.2
_SUMMARY_HEADER = "\n\n--- Progress so far (earlier steps folded into this summary) ---\n"
_KEEP_EDGE_CHARS = 200
# Room for the "[... N characters folded away ...]" marker.
_MARKER_CHARS = 48

_SUMMARY_INSTRUCTION = """\
Below are earlier steps of your work on the task above: your replies and the REPL output \
they produced. Summarise all your progress so far (with any earlier summary in the task) for \
yourself in a few short paragraphs: what you have found (keep numbers, names, variable names \
and exact values), what you tried that did not work, and what to do next. Write only the \
summary."""


class FoldResult(msgspec.Struct, frozen=True, kw_only=True):
    """The shorter conversation and how it was made."""

    messages: list[ChatMessage]
    # "model": summarised by the LLM; "truncation": the local fallback; "none": nothing folded.
    method: Literal["model", "truncation", "none"]
    folded_turns: int
    summary: str
    tokens_before: int
    tokens_after: int
    # What the summary call cost, when it was made.
    chat: ChatResult | None = None
    error: str = ""


def estimate_tokens(messages: Iterable[ChatMessage]) -> int:
    """Tokens of messages, estimated from their length (plus a little per message)."""
    return sum(len(m.content) // CHARS_PER_TOKEN + 4 for m in messages)


def fold_limit(window_tokens: int, threshold: float) -> int:
    """The conversation size, in tokens, at which folding starts."""
    return max(1, int(window_tokens * threshold))


def needs_fold(tokens: int, *, window_tokens: int, threshold: float) -> bool:
    """Whether a conversation of this many tokens should be folded."""
    return tokens > fold_limit(window_tokens, threshold)


class _Binder(ast.NodeVisitor):
    """Names a module-level cell binds; nested scopes bind nothing outside except `global`."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def _add(self, name: str) -> None:
        if name not in self.names:
            self.names.append(name)

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Store | ast.Del):
            self._add(node.id)

    def _scope(self, node: ast.AST) -> None:
        for child in ast.walk(node):
            if isinstance(child, ast.Global):
                for name in child.names:
                    self._add(name)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._add(node.name)
        self._scope(node)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._add(node.name)
        self._scope(node)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._add(node.name)
        self._scope(node)

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._scope(node)

    def _comprehension(self, node: ast.AST) -> None:
        # Loop variables stay inside; a walrus inside binds in the enclosing scope.
        for child in ast.walk(node):
            if isinstance(child, ast.NamedExpr) and isinstance(child.target, ast.Name):
                self._add(child.target.id)

    visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = _comprehension

    def visit_alias(self, node: ast.alias) -> None:
        if node.name != "*":
            self._add(node.asname or node.name.split(".")[0])

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.name:
            self._add(node.name)
        self.generic_visit(node)

    def visit_MatchAs(self, node: ast.MatchAs) -> None:
        if node.name:
            self._add(node.name)
        self.generic_visit(node)

    def visit_MatchStar(self, node: ast.MatchStar) -> None:
        if node.name:
            self._add(node.name)

    def visit_MatchMapping(self, node: ast.MatchMapping) -> None:
        if node.rest:
            self._add(node.rest)
        self.generic_visit(node)


def assigned_names(code: str) -> list[str]:
    """Top-level names a Python cell assigns, in order; none if it does not parse."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return []
    binder = _Binder()
    binder.visit(tree)
    return binder.names


def names_in(cells: Iterable[str]) -> list[str]:
    """Names assigned across cells, first appearance first, without `_`-private ones."""
    seen: dict[str, None] = {}
    for code in cells:
        for name in assigned_names(code):
            if not name.startswith("_"):
                seen.setdefault(name, None)
    return list(seen)


_MARKER = re.compile(r"\n\[\.\.\. (\d+) characters folded away \.\.\.\]\n")


def _cut_middle(text: str, keep_chars: int) -> str:
    """The start and end of text around a marker counting every character not shown.

    A marker left by an earlier cut that falls in (or touches) the cut is swallowed and
    its count carried over, so after many folds the count is still that of the original.
    """
    if len(text) <= keep_chars:
        return text
    head = max(keep_chars * 2 // 3, 1)
    tail = max(keep_chars - head, 0)
    start, end = head, len(text) - tail
    earlier = list(_MARKER.finditer(text))
    changed = True
    while changed:
        changed = False
        for marker in earlier:
            if marker.start() < end and marker.end() > start and (
                    marker.start() < start or marker.end() > end):
                start, end = min(start, marker.start()), max(end, marker.end())
                changed = True
    dropped = end - start
    for marker in earlier:
        if start <= marker.start() and marker.end() <= end:
            dropped += int(marker.group(1)) - len(marker.group(0))
    return f"{text[:start]}\n[... {dropped} characters folded away ...]\n{text[end:]}"


def _shares(lengths: Sequence[int], budget: int) -> list[int]:
    """Characters each message may keep: short ones whole, the rest split what is left."""
    shares = [0] * len(lengths)
    left, todo = budget, sorted(range(len(lengths)), key=lambda i: lengths[i])
    while todo:
        fair = max(left // len(todo), _KEEP_EDGE_CHARS)
        index = todo.pop(0)
        shares[index] = min(lengths[index], fair)
        left = max(left - shares[index], 0)
    return shares


def _transcript(turns: Sequence[ChatMessage], budget_chars: int) -> str:
    # Short messages are shown whole, so only the longest ones lose their middle.
    shares = _shares([len(m.content) + 32 for m in turns], budget_chars)
    parts = []
    for message, share in zip(turns, shares, strict=True):
        who = "You wrote" if message.role == "assistant" else "The REPL answered"
        parts.append(f"[{who}]\n{_cut_middle(message.content, share)}")
    return _cut_middle("\n\n".join(parts), budget_chars)


def _digest(turns: Sequence[ChatMessage], earlier: str, budget_chars: int) -> str:
    """The local fallback: an earlier summary and the first line of each folded message.

    It has a fixed budget: past it the middle is cut (with a marker), so repeated
    fallback folds do not grow the task message.
    """
    lines = []
    for message in turns:
        first = " ".join(message.content.split())[:_KEEP_EDGE_CHARS]
        who = "you" if message.role == "assistant" else "repl"
        lines.append(f"- {who}: {first}")
    digest = "(summary unavailable; the start of each folded message:)\n" + "\n".join(lines)
    return _cut_middle(f"{earlier}\n{digest}" if earlier else digest, budget_chars)


def _variables_line(names: Sequence[str]) -> str:
    if not names:
        return "Variables assigned in the REPL so far: none."
    return ("Variables assigned in the REPL so far (they still exist; FINAL_VAR can return "
            f"them): {', '.join(names)}.")


def _split_task(task: ChatMessage) -> tuple[str, str]:
    """The task's own text and the summary an earlier fold added to it ("" if none)."""
    base, _, folded = task.content.partition(_SUMMARY_HEADER)
    return base, folded.rsplit("\n\n", 1)[0] if folded else ""


def _with_summary(task: ChatMessage, summary: str, names: Sequence[str]) -> ChatMessage:
    base, _ = _split_task(task)
    content = f"{base}{_SUMMARY_HEADER}{summary.strip()}\n\n{_variables_line(names)}"
    return ChatMessage(role=task.role, content=content)


def shrink(messages: list[ChatMessage], target_tokens: int) -> list[ChatMessage]:
    """Cut the middle of the oldest long messages after the task until target_tokens fit."""
    excess = (estimate_tokens(messages) - target_tokens) * CHARS_PER_TOKEN
    shrunk = list(messages)
    # Oldest first; the newest message (the latest output) and the task go last.
    order = [*range(_HEAD, len(shrunk) - 1), len(shrunk) - 1, 1]
    for index in order:
        if excess <= 0:
            break
        content = shrunk[index].content
        keep = max(2 * _KEEP_EDGE_CHARS, len(content) - excess - _MARKER_CHARS)
        cut = _cut_middle(content, keep)
        if len(cut) < len(content):
            excess -= len(content) - len(cut)
            shrunk[index] = ChatMessage(role=shrunk[index].role, content=cut)
    return shrunk


async def fold(
    messages: list[ChatMessage],
    *,
    backend: ChatBackend,
    model: str,
    keep_last_turns: int,
    variable_names: Sequence[str],
    window_tokens: int,
    threshold: float,
    tokens: int | None = None,
) -> FoldResult:
    """Fold all turns but the last keep_last_turns into a summary, then shrink to fit.

    ``tokens`` is the conversation's size as the server counted it, when known; where it is
    above the estimate, the estimate is scaled up to match.
    """
    if len(messages) < _HEAD:
        raise ValueError("a conversation starts with a system prompt and a task")
    estimate = estimate_tokens(messages)
    before = tokens or estimate
    scale = max(1.0, before / max(estimate, 1))
    limit = int(fold_limit(window_tokens, threshold) / scale)
    body = messages[_HEAD:]
    head = messages[:_HEAD]
    summary_tokens = max(64, int(window_tokens * _SUMMARY_SHARE))
    # Room the task takes once it holds a summary and the variables line.
    task_tokens = estimate_tokens([head[0], ChatMessage(
        role="user", content=_split_task(head[1])[0] + _variables_line(variable_names))])
    # Turns are (reply, feedback) pairs; an odd tail (a pending message) stays as it is.
    keep = min(len(body), 2 * keep_last_turns + len(body) % 2)
    # Kept turns stay whole: when they do not fit beside the summary, fewer are kept and
    # the rest are summarised; only a last turn too big on its own is cut (by shrink).
    while keep > 2 and (task_tokens + summary_tokens
                        + estimate_tokens(body[len(body) - keep:]) > limit):
        keep -= 2
    old, kept = body[: len(body) - keep], body[len(body) - keep:]
    method: Literal["model", "truncation", "none"] = "none"
    summary, error, chat = "", "", None
    if old:
        # The summariser sees the task, the folded turns and the instruction within its window.
        room = window_tokens - estimate_tokens(head) - summary_tokens - 64
        transcript = _transcript(old, max(room, 256) * CHARS_PER_TOKEN)
        request = ChatRequest(model=model, max_tokens=summary_tokens, messages=[
            *head,
            ChatMessage(role="user", content=f"{_SUMMARY_INSTRUCTION}\n\n{transcript}"),
        ])
        try:
            chat = await backend.chat(request, operation="context_compression")
            summary, method = chat.text, "model"
        except Exception as exc:
            # Whatever went wrong with the summary, folding never fails the run.
            message = exc.message if isinstance(exc, KowalskiError) else repr(exc)
            log.warning("context folding: the summary call failed (%s); digesting instead",
                        message)
            error = message
        if not summary.strip():
            # Without the model, an earlier summary is kept and the new turns are digested.
            summary = _digest(old, _split_task(head[1])[1], summary_tokens * CHARS_PER_TOKEN)
            method = "truncation"
        head = [head[0], _with_summary(head[1], summary, variable_names)]
    folded = shrink([*head, *kept], limit)
    if method == "none" and folded != [*head, *kept]:
        method = "truncation"
    return FoldResult(
        messages=folded, method=method, folded_turns=len(old) // 2, summary=summary,
        tokens_before=before, tokens_after=int(estimate_tokens(folded) * scale), chat=chat,
        error=error,
    )
