"""FINAL(...) keeps the whole answer: its end is the ")" a reader would take as the end."""

from __future__ import annotations

import io

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kowalski.common.code_blocks import extract_code_blocks
from kowalski.controller.rlm.final import find_final


def read(reply: str) -> tuple[str, str] | None:
    marker = find_final(reply, extract_code_blocks(reply))
    return None if marker is None else (marker.kind, marker.value)


@pytest.mark.parametrize(("reply", "answer"), [
    # Numbered lists and smileys in prose never cut the answer.
    ("FINAL(The three reasons are: 1) cost, 2) speed, 3) safety)",
     "The three reasons are: 1) cost, 2) speed, 3) safety"),
    ("FINAL(Great :) the answer is 42)", "Great :) the answer is 42"),
    ("FINAL(a) first, b) second)", "a) first, b) second"),
    # Multi-line answers, with list items that end in ")" inside them.
    ("FINAL(The reasons:\n1) cost\n2) speed\n3) safety)",
     "The reasons:\n1) cost\n2) speed\n3) safety"),
    ("FINAL(line one\nline two)", "line one\nline two"),
    # Nested, balanced parentheses belong to the answer.
    ("FINAL(f(x) = (a + b) * (c - d))", "f(x) = (a + b) * (c - d)"),
    ("FINAL(Paris (France))", "Paris (France)"),
    # FINAL at the end of a reply, after prose and code.
    ("I counted the lines.\n```repl\nprint(len(context))\n```\nFINAL(12)", "12"),
    # FINAL followed by more prose: on the next lines, or on the same line.
    ("FINAL(Tampere)\n\nI found it in the third chunk (see above).", "Tampere"),
    ("FINAL(42) is my answer", "42"),
    ("FINAL(42).", "42"),
    ("FINAL(Tampere)   \nThat is all.", "Tampere"),
    # A list item in later prose does not pull the end past the marker's own ")".
    ("FINAL(yes)\nReasons: 1) it fits", "yes"),
    # An indented FINAL line is a marker, not an indented code block.
    ("Here it is:\n\n    FINAL(42)", "42"),
    ("    FINAL(the answer: 1) x, 2) y)", "the answer: 1) x, 2) y"),
    # Unclosed: everything after FINAL(.
    ("FINAL(an unclosed ( paren", "an unclosed ( paren"),
])
def test_final_keeps_the_whole_answer(reply: str, answer: str) -> None:
    assert read(reply) == ("final", answer)


def test_an_empty_final_is_found_with_an_empty_value() -> None:
    # The loop answers an empty FINAL() with feedback instead of ending the run.
    assert read("FINAL()") == ("final", "")
    assert read("FINAL(   )") == ("final", "")


def test_final_var_ends_at_its_closing_parenthesis() -> None:
    assert read("FINAL_VAR(answer)\nThe variable holds it (as text).") == ("final_var", "answer")


def test_final_inside_a_fence_is_code_even_when_indented() -> None:
    assert read("```repl\n    FINAL(1)\n```") is None


# Pieces of prose: words, enumerations and smileys whose ")" has no "(", and balanced asides.
_WORD = st.text(alphabet="abcdefghij.,:;-", min_size=1, max_size=8).filter(
    lambda word: not word.endswith(":"))
_PIECE = st.one_of(_WORD, st.integers(1, 9).map(lambda n: f"{n})"), st.just(":)"),
                   _WORD.map(lambda word: f"({word})"))


@st.composite
def answers(draw: st.DrawFn) -> str:
    """An answer of one or more lines, none of which ends in a ")" of its own."""
    lines = []
    for _ in range(draw(st.integers(1, 4))):
        pieces = draw(st.lists(_PIECE, min_size=0, max_size=6))
        lines.append(" ".join([*pieces, draw(_WORD)]))
    return "\n".join(lines)


# Prose may follow on later lines; on the marker's own line only a full stop (what follows
# there on the same line is ambiguous, and the first ")" wins: see "FINAL(42) is my answer").
@given(answer=answers(), after=st.sampled_from(["", ".", "\n", "\nok (1)", "\n\nMore 1) here."]))
def test_any_prose_answer_comes_back_whole(answer: str, after: str) -> None:
    assert read(f"FINAL({answer}){after}") == ("final", answer.strip())


def test_the_cli_shows_reasoning_apart_from_the_reply() -> None:
    from kowalski.controller.cli.run import print_event
    from kowalski.controller.rlm.events import ModelReplied, TokenCount

    out = io.StringIO()
    print_event(ModelReplied(
        run_id="r", depth=0, iteration=1, phase="turn", text="FINAL(12)", model_ms=5.0,
        tokens=TokenCount(total_tokens=9), endpoint="http://exo", messages_sent=2,
        prompt_chars=10, reasoning="Maybe FINAL(13)? No, count again."), out)
    text = out.getvalue()
    assert "┆ Maybe FINAL(13)? No, count again." in text
    assert text.index("┆ Maybe") < text.index("FINAL(12)")
