"""docs/ARCHITECTURE.md stays true: every path it names exists, every wing is described."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "ARCHITECTURE.md"
# A backticked path into one of the three rooms, a file or a folder.
PATH = re.compile(r"`((?:agent|controller|common)/[\w./]*)`")


def named_paths() -> list[str]:
    return sorted(set(PATH.findall(DOC.read_text(encoding="utf-8"))))


def test_the_walkthrough_names_real_modules() -> None:
    paths = named_paths()
    assert len(paths) > 30, "the page should walk through the modules by name"
    missing = [path for path in paths if not (ROOT / path).exists()]
    assert not missing, f"docs/ARCHITECTURE.md names paths that do not exist: {missing}"


def test_every_controller_wing_is_on_the_map() -> None:
    wings = {path.name for path in (ROOT / "controller").iterdir()
             if (path / "__init__.py").is_file()}
    described = {path.split("/")[1] for path in named_paths()
                 if path.startswith("controller/") and path.count("/") >= 1}
    assert wings, "the controller has no subpackages"
    assert wings <= described, f"wings missing from docs/ARCHITECTURE.md: {wings - described}"


def test_every_top_level_controller_module_is_on_the_map() -> None:
    modules = {f"controller/{path.name}" for path in (ROOT / "controller").glob("*.py")
               if path.name not in ("__init__.py", "__main__.py")}
    missing = modules - set(named_paths())
    assert not missing, f"top-level modules missing from docs/ARCHITECTURE.md: {missing}"
