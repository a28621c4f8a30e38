"""The source tree's shape: modules of a readable size, and no import cycle, lazy or not."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SOURCE = Path(__file__).resolve().parent.parent
ROOMS = ("agent", "controller", "common")
MAX_LINES = 400


def source_modules() -> dict[str, Path]:
    """Every module of the three rooms by its installed name (kowalski.room.…)."""
    modules: dict[str, Path] = {}
    for room in ROOMS:
        for path in sorted((SOURCE / room).rglob("*.py")):
            parts = ("kowalski", *path.relative_to(SOURCE).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of a dotted name that is one of our modules."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in modules:
            return ".".join(parts)
        parts.pop()
    return None


def imported(module: str, path: Path, modules: dict[str, Path]) -> Iterator[str]:
    """Our modules that ``module`` imports anywhere: at the top, in functions, for typing."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            # `from package import name` imports the submodule when there is one.
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                     for alias in node.names]
        else:
            continue
        for name in names:
            target = _known(name, modules)
            if target is not None and target != module:
                yield target


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(cycles)


def import_graph() -> dict[str, set[str]]:
    modules = source_modules()
    return {name: set(imported(name, path, modules)) for name, path in modules.items()}


def test_cycle_finder_sees_lazy_and_type_checking_imports(tmp_path: Path) -> None:
    (tmp_path / "room").mkdir()
    (tmp_path / "room" / "__init__.py").write_text("")
    (tmp_path / "room" / "a.py").write_text("def f():\n    from kowalski.room import b\n")
    (tmp_path / "room" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .c import C\n")
    (tmp_path / "room" / "c.py").write_text("import kowalski.room.a.f\n")
    (tmp_path / "room" / "d.py").write_text("from kowalski.room.a import f\n")
    modules = {f"kowalski.room.{p.stem}" if p.stem != "__init__" else "kowalski.room": p
               for p in (tmp_path / "room").glob("*.py")}
    graph = {name: set(imported(name, path, modules)) for name, path in modules.items()}
    assert graph["kowalski.room.d"] == {"kowalski.room.a"}
    assert import_cycles(graph) == [["kowalski.room.a", "kowalski.room.b", "kowalski.room.c"]]


def test_no_import_cycle_among_kowalski_modules() -> None:
    cycles = import_cycles(import_graph())
    assert cycles == [], "import cycles (a lazy import that hides a cycle is one too):\n" + \
        "\n".join(" <-> ".join(cycle) for cycle in cycles)


def test_no_module_is_over_400_lines() -> None:
    long = {str(path.relative_to(SOURCE)): count for path in source_modules().values()
            if (count := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"modules over {MAX_LINES} lines (usually two nouns): {long}"
