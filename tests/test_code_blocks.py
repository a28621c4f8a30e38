"""Code-block extraction: fences of every shape, the indented fallback, languages, line spans."""

import re

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kowalski.common.code_blocks import (
    SUPPORTED_LANGUAGES,
    CodeBlock,
    extract_code_blocks,
    normalize_language,
    normalize_newlines,
    runnable_blocks,
)

# The alias table is part of the contract, so the tests spell it out again.
ALIASES = {
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


def only_block(text: str) -> CodeBlock:
    blocks = extract_code_blocks(text)
    assert len(blocks) == 1, blocks
    return blocks[0]


# Examples


def test_backtick_fence_yields_code_and_canonical_language() -> None:
    block = only_block("Here:\n\n```py\nprint(1)\nprint(2)\n```\nDone.")
    assert block.code == "print(1)\nprint(2)\n"
    assert block.language == "python"
    assert block.raw_language == "py"
    assert block.fenced
    assert block.terminated
    assert block.supported


def test_tilde_fence_yields_block() -> None:
    block = only_block("~~~rust\nfn main() {}\n~~~\n")
    assert block.code == "fn main() {}\n"
    assert block.language == "rust"
    assert block.terminated


def test_four_backtick_fence_contains_three_backtick_block() -> None:
    text = "````markdown\nExample:\n```py\nx = 1\n```\n````\n"
    block = only_block(text)
    assert block.code == "Example:\n```py\nx = 1\n```\n"
    assert block.raw_language == "markdown"
    assert block.language is None


def test_tilde_fence_is_not_closed_by_backticks_or_shorter_tildes() -> None:
    block = only_block("~~~~sh\necho a\n```\n~~~\necho b\n~~~~\n")
    assert block.code == "echo a\n```\n~~~\necho b\n"
    assert block.language == "bash"


def test_info_string_arguments_leave_first_word_as_language() -> None:
    block = only_block('```Python title="main.py" linenums=1\nx = 1\n```\n')
    assert block.language == "python"
    assert block.raw_language == "Python"
    assert block.info == 'Python title="main.py" linenums=1'


def test_tilde_info_string_is_stripped() -> None:
    block = only_block("~~~  js   {.numberLines}\nconsole.log(1)\n~~~\n")
    assert block.info == "js   {.numberLines}"
    assert block.language == "javascript"


def test_backticks_on_one_line_are_inline_code_not_a_block() -> None:
    assert extract_code_blocks("Run ```py print(1)``` now, or `x`.") == []


def test_indented_block_is_fallback_when_no_fence() -> None:
    block = only_block("Code:\n\n    x = 1\n\tprint(x)\n\nEnd.")
    assert block.code == "x = 1\nprint(x)\n"
    assert not block.fenced
    assert block.terminated
    assert block.language is None
    assert block.raw_language == ""
    assert (block.start_line, block.end_line) == (2, 4)


def test_indented_block_ignored_when_fence_exists() -> None:
    text = "Intro:\n\n    not this\n\n```py\nthis\n```\n"
    block = only_block(text)
    assert block.fenced
    assert block.code == "this\n"


def test_unterminated_last_fence_still_yields_block() -> None:
    text = "```py\na = 1\n```\n\nNext:\n\n```py\nb = 2\nc = "
    first, last = extract_code_blocks(text)
    assert first.terminated
    assert not last.terminated
    assert last.code == "b = 2\nc = \n"
    assert last.language == "python"
    assert (last.start_line, last.end_line) == (6, 9)


def test_unterminated_empty_fence_at_end() -> None:
    block = only_block("Let me write:\n```python")
    assert block.code == ""
    assert not block.terminated
    assert block.language == "python"


def test_fence_closed_on_last_line_without_newline_is_terminated() -> None:
    block = only_block("```js\nx\n```")
    assert block.terminated
    assert block.code == "x\n"


def test_empty_fenced_block() -> None:
    block = only_block("```py\n```\n")
    assert block.code == ""
    assert block.terminated


def test_code_keeps_inner_blank_lines_and_tabs() -> None:
    block = only_block("```py\n\tx = 1\n\n\n```\n")
    assert block.code == "\tx = 1\n\n\n"


def test_crlf_input_gives_same_blocks_as_lf() -> None:
    lf = "Text\n\n```py\nx = 1\n\ny = 2\n```\n\n~~~sh\necho\n"
    assert extract_code_blocks(lf.replace("\n", "\r\n")) == extract_code_blocks(lf)
    assert extract_code_blocks(lf.replace("\n", "\r")) == extract_code_blocks(lf)
    assert "\r" not in "".join(block.code for block in extract_code_blocks(lf))


@pytest.mark.parametrize(("alias", "canonical"), sorted(ALIASES.items()))
def test_language_alias_normalises_case_insensitively(alias: str, canonical: str) -> None:
    assert normalize_language(alias) == canonical
    assert normalize_language(alias.upper()) == canonical
    assert only_block(f"```{alias.capitalize()}\nx\n```\n").language == canonical


@pytest.mark.parametrize("name", ["", "  ", "ruby", "text", "zsh", "console", "pycon"])
def test_normalize_language_returns_none_for_empty_or_unsupported(name: str) -> None:
    assert normalize_language(name) is None


def test_supported_languages_are_the_alias_targets() -> None:
    assert frozenset(ALIASES.values()) == SUPPORTED_LANGUAGES


def test_unsupported_language_is_reported_not_dropped() -> None:
    block = only_block("```ruby\nputs 1\n```\n")
    assert block.language is None
    assert block.raw_language == "ruby"
    assert not block.supported
    assert block.code == "puts 1\n"


def test_untagged_fence_has_no_language() -> None:
    block = only_block("```\nplain\n```\n")
    assert block.language is None
    assert block.raw_language == ""
    assert block.info == ""
    assert not block.supported


@pytest.mark.parametrize("text", ["", "\n", "   \n\t\n", "Just prose, no code."])
def test_input_without_code_yields_no_blocks(text: str) -> None:
    assert extract_code_blocks(text) == []


def test_fence_inside_list_item_loses_list_indentation() -> None:
    text = "1. First:\n\n   ```py\n   x = 1\n     y = 2\n   ```\n2. Second\n"
    block = only_block(text)
    assert block.code == "x = 1\n  y = 2\n"
    assert block.terminated
    assert (block.start_line, block.end_line) == (2, 6)


def test_fence_inside_blockquote_loses_quote_markers() -> None:
    block = only_block("> ```sh\n> echo hi\n> ```\n")
    assert block.code == "echo hi\n"
    assert block.language == "bash"


def test_fence_right_after_html_tag_line_is_found() -> None:
    block = only_block("<details>\n```py\nx = 1\n```\n</details>\n")
    assert block.code == "x = 1\n"


def test_multiple_blocks_come_back_in_document_order() -> None:
    text = "```py\na\n```\ntext\n~~~java\nb\n~~~\n- item\n\n  ```rs\n  c\n  ```\n"
    blocks = extract_code_blocks(text)
    assert [(b.language, b.code) for b in blocks] == [
        ("python", "a\n"),
        ("java", "b\n"),
        ("rust", "c\n"),
    ]


def test_line_spans_slice_the_block_source_lines() -> None:
    text = "Intro\r\n\r\n```py\r\nx\r\n```\r\nMiddle\r\n````\r\n```\r\n````\r\n"
    lines = normalize_newlines(text).split("\n")
    spans = [lines[b.start_line : b.end_line] for b in extract_code_blocks(text)]
    assert spans == [["```py", "x", "```"], ["````", "```", "````"]]


def test_runnable_blocks_splits_runnable_from_rejected_in_order() -> None:
    text = "```py\na\n```\n```ruby\nb\n```\n```\nc\n```\n```js\nd\n```\n"
    runnable, rejected = runnable_blocks(extract_code_blocks(text))
    assert [b.code for b in runnable] == ["a\n", "d\n"]
    assert [b.raw_language for b in rejected] == ["ruby", ""]


def test_runnable_blocks_restricts_to_given_languages_by_alias() -> None:
    blocks = extract_code_blocks("```py\na\n```\n```rust\nb\n```\n")
    runnable, rejected = runnable_blocks(blocks, languages=["REPL"])
    assert [b.language for b in runnable] == ["python"]
    assert [b.language for b in rejected] == ["rust"]


def test_runnable_blocks_refuses_unknown_language_name() -> None:
    with pytest.raises(ValueError, match="cobol"):
        runnable_blocks([], languages=["python", "cobol"])


def test_code_block_is_frozen_and_round_trips_through_json() -> None:
    block = only_block("```py\nx\n```\n")
    with pytest.raises(AttributeError):
        block.code = "y"  # type: ignore[misc]
    encoded = msgspec.json.encode(block)
    assert msgspec.json.decode(encoded, type=CodeBlock) == block


# Properties

# No "\n" or "\r" inside a line (lines are joined below; "\r" is a newline to
# CommonMark) and no NUL (CommonMark replaces it with U+FFFD).
code_lines = st.lists(
    st.text(st.characters(blacklist_characters="\n\r\x00"), max_size=30), max_size=8
)
# Prose that cannot open a fence, an HTML block or an unclosed container.
prose = st.text(st.sampled_from("abc XYZ 019 .,:!?-*#>\n"), max_size=60)
cased_alias = st.sampled_from(sorted(ALIASES)).flatmap(
    lambda alias: st.sampled_from([alias, alias.upper(), alias.capitalize()])
)
info_arguments = st.sampled_from(["", ' title="x.py"', " {.numberLines}", "  linenums=1 "])
markdownish_text = st.text(
    st.one_of(st.characters(), st.sampled_from("`~ \t\r\n\x00>-*1.#<")), max_size=300
)


def longest_run(text: str, char: str) -> int:
    return max((len(run) for run in re.findall(f"{re.escape(char)}+", text)), default=0)


@settings(max_examples=200, deadline=None)
@given(
    lines=code_lines,
    alias=cased_alias,
    arguments=info_arguments,
    fence_char=st.sampled_from("`~"),
    before=prose,
    after=prose,
    closed=st.booleans(),
)
def test_rendered_block_round_trips(
    lines: list[str],
    alias: str,
    arguments: str,
    fence_char: str,
    before: str,
    after: str,
    closed: bool,
) -> None:
    code = "".join(line + "\n" for line in lines)
    fence = fence_char * max(3, longest_run(code, fence_char) + 1)
    opening = f"{fence}{alias}{arguments}"
    text = f"{before}\n\n{opening}\n{code}"
    if closed:
        text += f"{fence}\n\n{after}"

    block = only_block(text)

    assert block.code == code
    assert block.language == ALIASES[alias.lower()]
    assert block.raw_language == alias
    assert block.info == opening.removeprefix(fence).strip()
    assert block.terminated == closed
    source = text.split("\n")[block.start_line : block.end_line]
    assert source[0] == opening
    assert source[1 : 1 + len(lines)] == lines
    if closed:
        assert source[-1] == fence


@settings(max_examples=200, deadline=None)
@given(text=markdownish_text)
def test_extraction_never_raises_and_blocks_are_well_formed(text: str) -> None:
    line_count = len(normalize_newlines(text).split("\n"))
    for block in extract_code_blocks(text):
        assert block.code == "" or block.code.endswith("\n")
        assert "\r" not in block.code
        assert 0 <= block.start_line < block.end_line <= line_count
        assert block.language is None or block.language in SUPPORTED_LANGUAGES
        assert block.supported == (block.language is not None)


@settings(max_examples=200, deadline=None)
@given(text=markdownish_text.map(lambda text: text.replace("\r", "")))
def test_crlf_and_lone_cr_give_same_blocks_as_lf(text: str) -> None:
    expected = extract_code_blocks(text)
    assert extract_code_blocks(text.replace("\n", "\r\n")) == expected
    assert extract_code_blocks(text.replace("\n", "\r")) == expected
