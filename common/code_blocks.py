"""Code blocks in model output (Markdown), found by a CommonMark parser.

Fenced blocks (``` or ~~~, any fence length >= 3) are what models are asked
to write; indented blocks are a fallback used only when a reply has no fenced
block at all. A fence left open because the reply was cut off still yields
its block, marked ``terminated=False``.

Conventions:

* Line spans are 0-based and end-exclusive, like Python slices: with
  ``lines = normalize_newlines(text).split("\\n")``, ``lines[start_line:end_line]``
  are the block's source lines, fences included.
* ``code`` is the block's content with every line ending in ``"\\n"``, so it is
  either ``""`` or ends with exactly the newlines the block contained. Fence
  indentation (e.g. inside a list item) is removed, as CommonMark specifies.
* ``\\r\\n`` and a lone ``\\r`` count as ``\\n``; NUL becomes U+FFFD (CommonMark).
"""

from collections.abc import Collection, Iterable
from typing import Final

import msgspec
from markdown_it import MarkdownIt
from markdown_it.token import Token

SUPPORTED_LANGUAGES: Final = frozenset({"python", "rust", "javascript", "bash", "java"})

# `repl` is the Recursive Language Model convention for "run this in the REPL".
# zsh, `console` and `shell-session` are left out on purpose: their syntax or
# prompts do not run as-is under bash.
_ALIASES: Final[dict[str, str]] = {
    "python": "python",
    "py": "python",
    "python3": "python",
    "py3": "python",
    "repl": "python",
    "rust": "rust",
    "rs": "rust",
    "javascript": "javascript",
    "js": "javascript",
    "node": "javascript",
    "nodejs": "javascript",
    "bash": "bash",
    "sh": "bash",
    "shell": "bash",
    "java": "java",
}

# Raw HTML parsing is off: with it on, a fence directly under a line such as
# `<details>` would be swallowed into an HTML block. Inline parsing is off
# because only block structure matters here.
_PARSER: Final = MarkdownIt("commonmark", {"html": False}).disable("inline")


class CodeBlock(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One code block found in a Markdown text."""

    code: str
    # Canonical name (one of SUPPORTED_LANGUAGES), or None if untagged or unsupported.
    language: str | None
    # First word of the info string as written, "" when untagged.
    raw_language: str
    # Whole info string, stripped ("python title=x").
    info: str
    fenced: bool
    # False only for a fence still open at the end of its container (cut-off output).
    terminated: bool
    start_line: int
    end_line: int

    @property
    def supported(self) -> bool:
        """Whether the block is tagged with a language Kowalski can run."""
        return self.language is not None


def normalize_language(name: str) -> str | None:
    """Canonical language for an info-string word, None if empty or unsupported."""
    return _ALIASES.get(name.strip().lower())


def normalize_newlines(text: str) -> str:
    """Text with ``\\r\\n`` and lone ``\\r`` replaced by ``\\n``."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def extract_code_blocks(text: str) -> list[CodeBlock]:
    """Code blocks of ``text`` in document order; indented ones only if none is fenced."""
    tokens = _PARSER.parse(normalize_newlines(text))
    fenced = [_from_fence(token) for token in tokens if token.type == "fence"]
    if fenced:
        return fenced
    return [_from_indented(token) for token in tokens if token.type == "code_block"]


def runnable_blocks(
    blocks: Iterable[CodeBlock], languages: Collection[str] | None = None
) -> tuple[list[CodeBlock], list[CodeBlock]]:
    """Split blocks into (runnable, rejected), keeping order.

    A block is runnable when its canonical language is in ``languages`` (aliases
    accepted; default: all of SUPPORTED_LANGUAGES). Untagged and unsupported
    blocks are rejected; ``raw_language`` says which. An unknown name in
    ``languages`` raises ValueError rather than silently allowing nothing.
    """
    allowed = SUPPORTED_LANGUAGES if languages is None else _canonical_set(languages)
    runnable: list[CodeBlock] = []
    rejected: list[CodeBlock] = []
    for block in blocks:
        (runnable if block.language in allowed else rejected).append(block)
    return runnable, rejected


def _canonical_set(languages: Collection[str]) -> frozenset[str]:
    canonical: set[str] = set()
    for name in languages:
        language = normalize_language(name)
        if language is None:
            raise ValueError(f"unsupported language {name!r}; known: {sorted(_ALIASES)}")
        canonical.add(language)
    return frozenset(canonical)


def _from_fence(token: Token) -> CodeBlock:
    assert token.map is not None  # markdown-it sets a map on every block token
    start_line, end_line = token.map
    content = token.content
    content_lines = content.count("\n")
    if content and not content.endswith("\n"):
        # The last line of the input ends the block without a newline.
        content += "\n"
        content_lines += 1
    # The span is opening fence + content lines (+ closing fence); markdown-it
    # does not say whether a closing fence was found, but the count does.
    terminated = end_line - start_line - 1 - content_lines == 1
    info = token.info.strip()
    words = info.split(maxsplit=1)
    raw_language = words[0] if words else ""
    return CodeBlock(
        code=content,
        language=normalize_language(raw_language),
        raw_language=raw_language,
        info=info,
        fenced=True,
        terminated=terminated,
        start_line=start_line,
        end_line=end_line,
    )


def _from_indented(token: Token) -> CodeBlock:
    assert token.map is not None  # markdown-it sets a map on every block token
    start_line, end_line = token.map
    return CodeBlock(
        code=token.content,
        language=None,
        raw_language="",
        info="",
        fenced=False,
        terminated=True,
        start_line=start_line,
        end_line=end_line,
    )
