"""Stored results: one `bench/results/KEY.json` per benchmark, the outcome of its last run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from bench import REPO_ROOT
from bench.report import Section, StoredRun, Table, Target

RESULTS_DIR = REPO_ROOT / "bench" / "results"


def section_json(section: Section) -> dict[str, Any]:
    data = dataclasses.asdict(section)
    if not section.legacy_markdown:
        del data["legacy_markdown"]
    data["targets"] = [{**dataclasses.asdict(target), "met": target.met}
                       for target in section.targets]
    return data


def run_json(run: StoredRun) -> dict[str, Any]:
    """The stored form: what `--json` writes, plus the key, the command and the busy flag."""
    return {"key": run.key, "quick": run.quick, "command": run.command,
            "shared": run.shared, "machine": run.machine,
            "sections": [section_json(section) for section in run.sections]}


def section_from_json(data: dict[str, Any]) -> Section:
    known = {item.name for item in dataclasses.fields(Section)}
    fields = {name: value for name, value in data.items() if name in known}
    fields["tables"] = [Table(**table) for table in data.get("tables", [])]
    fields["targets"] = [Target(**{name: value for name, value in target.items()
                                   if name != "met"})
                         for target in data.get("targets", [])]
    return Section(**fields)


def load(path: Path) -> StoredRun:
    """A stored result, named by its file; older `--json` files (no command) load too."""
    data = json.loads(path.read_text())
    key = path.stem
    return StoredRun(
        key=key, sections=[section_from_json(section) for section in data["sections"]],
        machine={str(name): str(value) for name, value in data.get("machine", {}).items()},
        command=str(data.get("command") or f"python -m bench.run --only {key}"),
        quick=bool(data.get("quick", False)), shared=bool(data.get("shared", False)))


def save(run: StoredRun, results_dir: Path) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{run.key}.json"
    path.write_text(json.dumps(run_json(run), indent=1, ensure_ascii=False) + "\n")
    return path


def load_all(results_dir: Path, order: list[str]) -> list[StoredRun]:
    """Every stored result, in the given key order; keys not in it follow by name."""
    paths = {path.stem: path for path in sorted(results_dir.glob("*.json"))}
    keys = [key for key in order if key in paths]
    keys += sorted(set(paths) - set(order))
    return [load(paths[key]) for key in keys]
