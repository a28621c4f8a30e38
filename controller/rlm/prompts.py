"""The text protocol of an RLM run: prompts to the model, and reading its replies."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import msgspec

from kowalski.common.code_blocks import CodeBlock
from kowalski.common.messages import LANGUAGES, CellResult, JobResult

# Lengths listed one by one in the prompt before the rest is summarised (the reference
# implementation lists 100; small models have little room to spare).
MAX_LISTED_CHUNKS = 100
# The query is restated in every feedback message, cut to this many characters.
_QUERY_ECHO_CHARS = 1000


class ContextInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What the model is told about its context: type, size and pieces."""

    type: str
    total_chars: int
    # Characters of each piece: the string itself, a list's items, a dict's values.
    chunk_chars: list[int]


def _piece_chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    try:
        return len(msgspec.json.encode(value))
    except (TypeError, msgspec.EncodeError):
        return len(str(value))


def describe_context(context: Any) -> ContextInfo:
    """Type, total characters and piece lengths of a context."""
    if isinstance(context, str):
        return ContextInfo(type="str", total_chars=len(context), chunk_chars=[len(context)])
    if isinstance(context, list | tuple):
        chunks = [_piece_chars(item) for item in context]
        return ContextInfo(type="list", total_chars=sum(chunks), chunk_chars=chunks)
    if isinstance(context, dict):
        chunks = [_piece_chars(value) for value in context.values()]
        total = sum(chunks) + sum(len(str(key)) for key in context)
        return ContextInfo(type="dict", total_chars=total, chunk_chars=chunks)
    chars = _piece_chars(context)
    return ContextInfo(type=type(context).__name__, total_chars=chars, chunk_chars=[chars])


def _chunk_summary(chunks: list[int]) -> str:
    if len(chunks) <= MAX_LISTED_CHUNKS:
        return str(chunks)
    shown = ", ".join(str(n) for n in chunks[:MAX_LISTED_CHUNKS])
    return f"[{shown}, ... and {len(chunks) - MAX_LISTED_CHUNKS} more]"


def context_sentence(info: ContextInfo) -> str:
    """One sentence stating the context's type, total length and chunk lengths."""
    if info.type == "list":
        return (f"Your context is a list of {len(info.chunk_chars)} items with "
                f"{info.total_chars} total characters; the items' lengths in characters are: "
                f"{_chunk_summary(info.chunk_chars)}.")
    if info.type == "dict":
        return (f"Your context is a dict of {len(info.chunk_chars)} keys with "
                f"{info.total_chars} total characters; the values' lengths in characters are: "
                f"{_chunk_summary(info.chunk_chars)}.")
    return (f"Your context is a {info.type} with {info.total_chars} total characters, "
            f"in one chunk of length {_chunk_summary(info.chunk_chars)}.")


_SYSTEM_PROMPT = """\
You answer a query about a context that is too large to read at once. You work in a \
Python REPL, step by step: each reply of yours may contain ```repl code blocks; they run \
in order, and the next message shows what they printed. You are asked again until you give \
a final answer.

The REPL holds:
1. `context`: the data the query is about. Look at it with code before answering.
2. `llm_query(prompt)`: {sub_call} It sees only the prompt you give it \
(at most about {sub_chars} characters), nothing else; use it to read, classify or summarise \
pieces of the context.
3. `llm_query_batched(prompts)`: runs many llm_query calls at once and returns their answers \
as a list in the same order. Much faster than llm_query in a loop.
4. `print()`: the only way to see a value. Printed output past {output_chars} characters is \
cut, so print counts, short slices and summaries, never the whole context.
Variables persist from one block and one step to the next.

{languages}For example:
```repl
print(type(context), len(context))
print(context[:500])
```

Work like this: look at the context's structure first; search it with plain Python (str \
methods, `re`, splitting into lines) where that is enough; where meaning matters, split it \
into chunks and ask llm_query_batched about each chunk; keep results in variables; combine \
them. For example:
```repl
hits = [line for line in context.splitlines() if "keyword" in line]
print(len(hits), hits[:10])
```
```repl
size = {chunk_chars}
chunks = [context[i:i + size] for i in range(0, len(context), size)]
answers = llm_query_batched([f"Does this text name the winner? Answer briefly.\\n{{c}}" \
for c in chunks])
for i, answer in enumerate(answers):
    print(i, answer[:200])
```

{ending}

{context_sentence}"""

_FINAL_ENDING = """\
When you have the answer, give it on a line of its own, outside any code block, in one of \
two ways:
FINAL(the answer as text)
FINAL_VAR(variable_name)   (the value of a REPL variable)
FINAL_VAR needs a variable that exists: assign it in a ```repl block first (code in the \
same reply runs before FINAL_VAR is read). Do not write FINAL before you know the answer, \
and answer the query itself."""

_ANSWER_ENDING = """\
The REPL also holds `answer`, a dict: `answer = {{"content": "", "ready": False}}`. When you \
have the answer, set it in a ```repl block:
```repl
answer["content"] = result   # the answer, as text
answer["ready"] = True
```
The run ends with answer["content"] once answer["ready"] is True. Do not set it ready \
before you know the answer, and answer the query itself."""


def languages_note(languages: Sequence[str], context_type: str) -> str:
    """What the system prompt says about the languages whose blocks run."""
    others = [language for language in LANGUAGES if language != "python" and language in languages]
    python = ("Only ```repl (or ```python) blocks run in the REPL" if "python" in languages
              else "Python blocks do not run in this run")
    if not others:
        return (f"{python}; blocks in other languages or without a language are not run. ")
    tags = ", ".join(f"```{language}" for language in others)
    file = "context.txt" if context_type == "str" else "context.json"
    how = "as text" if context_type == "str" else "as JSON"
    compiled = " or ".join(name.capitalize() for name in ("rust", "java") if name in others)
    wrapped = f"{compiled} statements without a main are wrapped in one. " if compiled else ""
    return (f"{python}. Blocks tagged {tags} also run, each as a fresh one-shot program on "
            f"the same machine: nothing persists between them and they cannot call llm_query, "
            f"but the context is in their working directory as the file `{file}` ({how}). "
            "Their output comes back labelled with the language; a compile error comes back "
            f"as an error to fix. {wrapped}Blocks without a language are not run. ")


def system_prompt(info: ContextInfo, *, output_chars: int, sub_chars: int,
                  recursive_sub_calls: bool, protocol: str = "final",
                  languages: Sequence[str] = ("python",)) -> str:
    """The system prompt: the REPL, its functions, how to end (protocol) and the context."""
    sub_call = (
        "starts a sub-model with a REPL of its own, whose `context` is your prompt, and "
        "returns its final answer as a string." if recursive_sub_calls else
        "asks a language model one question and returns its answer as a string."
    )
    return _SYSTEM_PROMPT.format(
        sub_call=sub_call, sub_chars=sub_chars, output_chars=output_chars,
        chunk_chars=max(1000, sub_chars // 2), context_sentence=context_sentence(info),
        ending=(_ANSWER_ENDING if protocol == "answer_dict" else _FINAL_ENDING).format(),
        languages=languages_note(languages, info.type),
    )


def _echo(query: str) -> str:
    if len(query) <= _QUERY_ECHO_CHARS:
        return query
    return query[:_QUERY_ECHO_CHARS] + " [...]"


def task_prompt(query: str) -> str:
    """The first user message: the query, and a nudge to look before answering."""
    return (f"Query: {query}\n\nYou have not looked at the context yet. Start by exploring it "
            "with a ```repl block; do not give a final answer yet. Your next action:")


def continue_prompt(query: str, protocol: str = "final") -> str:
    """The end of every feedback message: the query again, and what to do next."""
    how = ('set answer["content"] and answer["ready"] = True in a ```repl block'
           if protocol == "answer_dict" else "write FINAL(...) or FINAL_VAR(...) on its own line")
    return (f"Continue with the REPL (it holds `context` and your variables) to answer the "
            f"query: \"{_echo(query)}\"\nWhen you know the answer, {how}. Your next action:")


def final_request(iterations: int, protocol: str = "final") -> str:
    """The last message when the step limit is reached."""
    if protocol == "answer_dict":
        return (f"You have used all {iterations} steps. Give your final answer now, in one "
                'short ```repl block that sets answer["content"] and answer["ready"] = True.')
    return (f"You have used all {iterations} steps. Give your final answer now, on a line of "
            "its own: FINAL(the answer) or FINAL_VAR(variable_name). Do not write more code.")


def reply_notes(final_note: str, *, cut_at: int, nothing_ran: bool) -> list[str]:
    """What the feedback says about the reply itself: a FINAL that did not end the run, a
    reply cut at cut_at tokens (0: not cut), a reply with nothing to run."""
    notes = [final_note] if final_note else []
    if cut_at:
        notes.append(f"Your last reply was cut off at {cut_at} tokens, the most a reply may "
                     "have. Be shorter: one small ```repl block or a FINAL(...) line per "
                     "reply, no long explanations.")
    if nothing_ran:
        notes.append("Your reply had no ```repl block and no FINAL(...) line, so nothing ran.")
    return notes


# --- feedback -------------------------------------------------------------------------------


def truncate(text: str, limit: int, *, keep: Literal["head", "tail"] = "head") -> str:
    """Text cut to limit characters with a marker saying how much is missing."""
    if len(text) <= limit:
        return text
    missing = len(text) - limit
    marker = f"[... output truncated: {missing} more characters not shown ...]"
    if keep == "tail":
        return f"{marker}\n{text[-limit:]}"
    return f"{text[:limit]}\n{marker}"


# What went wrong when a cell did not finish, if the result carries no message of its own.
_STATUS_NOTES = {
    "timeout": "the code ran past its time limit and was stopped",
    "killed": "the code was stopped at a resource limit (memory, processes or output)",
    "failed": "the code could not be run",
}


def format_output(result: CellResult | JobResult, limit: int, *, label: str = "") -> str:
    """A cell's or job's stdout and stderr as the model sees them, about limit characters.

    With a label (a job's language) each stream is named, and a failure's reason is added.
    """
    stdout, stderr = result.stdout, result.stderr
    # A traceback's last lines matter most: stderr keeps its tail, stdout its head.
    stderr_room = min(len(stderr), max(limit // 4, limit - len(stdout)))
    parts = []
    named = {"stdout": f"[{label}] stdout:\n", "stderr": f"[{label}] stderr:\n"} if label else {}
    if stdout:
        parts.append(named.get("stdout", "")
                     + truncate(stdout.rstrip("\n"), max(limit - stderr_room, 0) or 1))
    if stderr:
        parts.append(named.get("stderr", "")
                     + truncate(stderr.rstrip("\n"), max(stderr_room, 1), keep="tail"))
    if result.stdout_truncated or result.stderr_truncated:
        parts.append("[... the agent cut this output at its size limit ...]")
    default = _STATUS_NOTES.get(result.status)
    if label and result.status == "error" and result.error is not None:
        # Jobs fail by exit code or at compilation: say which, as the compiler does.
        default = result.error.message
    if default is not None:
        parts.append(f"[{result.error.message if result.error is not None else default}]")
    return "\n".join(parts) if parts else "(no output)"


def skipped_block_note(number: int, block: CodeBlock,
                       languages: Sequence[str] = ("python",)) -> str:
    """Why a block in the reply was not run."""
    if not block.fenced:
        return (f"Block {number} (indented) was not run: put code in a ```repl block.")
    enabled = ", ".join(f"```{language}" for language in LANGUAGES if language in languages)
    runnable = (f"the languages that run here are {enabled} (```repl is Python)" if enabled
                else "no language runs in this run")
    if block.raw_language:
        return f"Block {number} (```{block.raw_language}) was not run: {runnable}."
    return f"Block {number} has no language tag and was not run: {runnable}."
