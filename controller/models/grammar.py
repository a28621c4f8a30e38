"""GBNF grammars (llama.cpp's) that hold a small model's replies to the REPL protocol's shape."""

from __future__ import annotations

__all__ = ["REPL_GRAMMAR", "reply_grammar"]

# One reply of the RLM loop: at most two short lines of prose, then either one fenced
# ```repl / ```python block or a FINAL(...) / FINAL_VAR(name) line, and nothing after it.
# Inside the block, the first line starts a statement at the left margin, a line ending in
# ":" is followed by indented lines and other lines are not indented: a 135M model's most
# common IndentationErrors cannot be written. Lines and blocks are bounded so the closing
# fence fits inside a 256-token reply.
REPL_GRAMMAR = r"""
root ::= prose (block | final)
prose ::= (line "\n"){0,2}
line ::= [^`\n] [^\n]{0,200}
block ::= "```" ("repl" | "python") "\n" code "```"
code ::= statement (statement | "\n"){0,14}
statement ::= header body | simple
header ::= start [^\n]{0,120} ":" "\n"
body ::= ("    " [^\n]{1,120} "\n"){1,6}
simple ::= start ([^\n]{0,120} [^:\n])? "\n"
start ::= [^`\n \t#:)\]}]
final ::= "FINAL(" [^\n)]{1,200} ")" | "FINAL_VAR(" [a-zA-Z_] [a-zA-Z0-9_]{0,40} ")"
"""

_GRAMMARS: dict[str, str] = {"repl": REPL_GRAMMAR}


def reply_grammar(name: str) -> str | None:
    """The grammar text a config names; None for "" (replies left free)."""
    return _GRAMMARS.get(name)
