"""Snippets run as written: Java statements get a class with main, Rust statements fn main."""

from __future__ import annotations

import re
from dataclasses import dataclass

# What a complete Java program's first top-level type is called when it has none.
JAVA_MAIN_CLASS = "Main"

_JAVA_TYPE = re.compile(
    r"\s*((?:(?:public|protected|private|abstract|final|static|strictfp|sealed|non-sealed)\s+"
    r"|@\w+(?:\([^)]*\))?\s+)*)(class|interface|enum|record)\s+([A-Za-z_$][\w$]*)")
_JAVA_MAIN = re.compile(r"\bstatic\s+(?:final\s+)?void\s+main\s*\(")
_JAVA_IMPORT = re.compile(r"^\s*(import|package)\b")
_RUST_ITEM = re.compile(
    r"^(?:pub(?:\s*\([^)]*\))?\s+)?(?:(?:unsafe|async|const|extern\s*(?:\"[^\"]*\")?)\s+)*"
    r"(?:(?:use|fn|struct|enum|impl|trait|mod|const|static|type|union|extern)\b|macro_rules\s*!)")
_RUST_ATTRIBUTE = re.compile(r"^#\s*\[[^\]]*\]\s*")
_RUST_MAIN = re.compile(r"^(?:pub\s+)?(?:async\s+)?fn\s+main\s*\(")


@dataclass(frozen=True)
class Program:
    """Source ready to compile: its file name, its text and (Java) the class to run."""

    source_file: str
    source: str
    main_class: str = ""
    wrapped: bool = False


def _blank_literals(code: str, *, rust: bool) -> str:
    """The code with comments, strings and char literals blanked out, same length."""
    out = list(code)
    i, n = 0, len(code)

    def blank(start: int, end: int) -> None:
        for k in range(start, min(end, n)):
            if out[k] != "\n":
                out[k] = " "

    while i < n:
        char = code[i]
        if code.startswith("//", i):
            end = code.find("\n", i)
            end = n if end < 0 else end
            blank(i, end)
            i = end
        elif code.startswith("/*", i):
            # Rust block comments nest; Java's do not.
            depth, j = 1, i + 2
            while j < n and depth:
                if rust and code.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif code.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            blank(i, j)
            i = j
        elif rust and char in "br" and (match := re.match(r'b?r(#*)"', code[i:i + 260])) and (
                i == 0 or not (code[i - 1].isalnum() or code[i - 1] == "_")):
            closing = '"' + match.group(1)
            end = code.find(closing, i + match.end())
            end = n if end < 0 else end + len(closing)
            blank(i, end)
            i = end
        elif not rust and code.startswith('"""', i):
            end = code.find('"""', i + 3)
            end = n if end < 0 else end + 3
            blank(i, end)
            i = end
        elif char == '"' or (char == "'" and _is_char_literal(code, i, rust)):
            j = i + 1
            while j < n and code[j] != char:
                j += 2 if code[j] == "\\" else 1
            blank(i, j + 1)
            i = j + 1
        else:
            i += 1
    return "".join(out)


def _is_char_literal(code: str, i: int, rust: bool) -> bool:
    # In Rust 'a may start a lifetime or a label; a char literal closes after one char.
    if not rust:
        return True
    if code.startswith("\\", i + 1):
        return True
    return i + 2 < len(code) and code[i + 2] == "'"


def _top_level_chunks(code: str, plain: str) -> list[tuple[str, str]]:
    """Split at depth 0 after ';' or a closing '}': (original text, literal-free text)."""
    chunks: list[tuple[str, str]] = []
    depth, start = 0, 0
    for index, char in enumerate(plain):
        if char in "{([":
            depth += 1
        elif char in "})]":
            depth = max(0, depth - 1)
        if depth == 0 and char in ";}":
            chunks.append((code[start:index + 1], plain[start:index + 1]))
            start = index + 1
    if code[start:].strip():
        chunks.append((code[start:], plain[start:]))
    return chunks


def _rust_item(plain: str) -> bool:
    text = plain.strip()
    return text.startswith("#!") or bool(_RUST_ITEM.match(_strip_attributes(text)))


def _strip_attributes(text: str) -> str:
    while match := _RUST_ATTRIBUTE.match(text):
        text = text[match.end():]
    return text


def rust_program(code: str) -> Program:
    """main.rs: the code as it is if it has fn main, else its statements put into one."""
    plain = _blank_literals(code, rust=True)
    chunks = _top_level_chunks(code, plain)
    items = [(text, bare) for text, bare in chunks if _rust_item(bare)]
    if any(_RUST_MAIN.match(_strip_attributes(bare.strip())) for _, bare in items):
        return Program("main.rs", code)
    outside = "".join(text for text, _ in items).strip("\n")
    inside = "".join(text for text, bare in chunks if not _rust_item(bare)).strip("\n")
    body = "\n".join("    " + line if line.strip() else line for line in inside.splitlines())
    source = f"{outside}\n\nfn main() {{\n{body}\n}}\n" if outside else (
        f"fn main() {{\n{body}\n}}\n")
    return Program("main.rs", source, wrapped=True)


def _java_types(plain: str) -> list[tuple[str, str, int]]:
    """The top-level type declarations: (modifiers, name, offset), in order."""
    found: list[tuple[str, str, int]] = []
    depth = 0
    line_start = True
    for index, char in enumerate(plain):
        if depth == 0 and (line_start or plain[index - 1] in ";}"):
            match = _JAVA_TYPE.match(plain, index)
            if match and not any(name == match.group(3) for _, name, _ in found):
                found.append((match.group(1), match.group(3), index))
        if char == "{":
            depth += 1
        elif char == "}":
            depth = max(0, depth - 1)
        line_start = char == "\n"
    return found


def java_program(code: str) -> Program:
    """A complete program keeps its classes; statements are wrapped in Main.main."""
    plain = _blank_literals(code, rust=False)
    types = _java_types(plain)
    if types:
        public = next((name for modifiers, name, _ in types if "public" in modifiers.split()),
                      "")
        ends = [offset for _, _, offset in types[1:]] + [len(plain)]
        with_main = [name for (_, name, start), end in zip(types, ends, strict=True)
                     if _JAVA_MAIN.search(plain, start, end)]
        # javac wants a public class in a file of its name; the first class with a main runs.
        return Program(f"{public or JAVA_MAIN_CLASS}.java", code,
                       main_class=(with_main or [types[0][1]])[0])
    head: list[str] = []
    body: list[str] = []
    for line, bare in zip(code.split("\n"), plain.split("\n"), strict=True):
        (head if _JAVA_IMPORT.match(bare) and not body else body).append(line)
    indented = "\n".join("        " + line if line.strip() else line for line in body)
    imports = "\n".join(head).strip("\n")
    source = (f"{imports}\n\n" if imports else "") + (
        f"public class {JAVA_MAIN_CLASS} {{\n"
        "    public static void main(String[] args) throws Exception {\n"
        f"{indented}\n    }}\n}}\n")
    return Program(f"{JAVA_MAIN_CLASS}.java", source, main_class=JAVA_MAIN_CLASS, wrapped=True)
