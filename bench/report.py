"""What a benchmark hands back (tables, targets, raw samples) and the Markdown made of it."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

Comparison = Literal["<=", "<"]


@dataclass(frozen=True)
class Target:
    """A goal from the issue, and what this run measured against it."""

    name: str
    measured: float
    limit: float
    unit: str
    comparison: Comparison = "<="

    @property
    def met(self) -> bool:
        if self.comparison == "<":
            return self.measured < self.limit
        return self.measured <= self.limit


@dataclass(frozen=True)
class Table:
    headers: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Section:
    """One benchmark's outcome; `error` or `skipped` say why there are no figures."""

    key: str
    title: str
    method: str
    tables: list[Table] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    # Raw samples by name, in the unit the name states.
    raw: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    skipped: str = ""
    error: str = ""
    duration_s: float = 0.0
    # The machine's 1-minute load average when the benchmark started.
    load_at_start: float = 0.0


def p50(samples: Sequence[float]) -> float:
    return float(statistics.median(samples))


def percentile(samples: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile: the smallest sample with `fraction` of them at or below it."""
    ordered = sorted(samples)
    rank = max(1, min(len(ordered), math.ceil(fraction * len(ordered))))
    return float(ordered[rank - 1])


def fmt(value: float, digits: int = 2) -> str:
    """A number for a table: fixed digits, small ones kept readable."""
    if value != 0 and abs(value) < 10 ** -digits:
        return f"{value:.2g}"
    return f"{value:.{digits}f}"


def spread(samples: Sequence[float], digits: int = 2) -> str:
    """p50 (p90, min-max) of samples, for a table cell."""
    return (f"{fmt(p50(samples), digits)} (p90 {fmt(percentile(samples, 0.9), digits)}, "
            f"{fmt(min(samples), digits)}-{fmt(max(samples), digits)})")


def _table(table: Table) -> list[str]:
    lines = [f"*{table.caption}*", ""] if table.caption else []
    lines.append("| " + " | ".join(table.headers) + " |")
    lines.append("|" + "|".join("---" for _ in table.headers) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in table.rows]
    return [*lines, ""]


def _target_row(number: int, section: Section, target: Target) -> list[str]:
    verdict = "met" if target.met else f"**missed** (cause in {number})"
    return [f"{number}. {section.title}", target.name, f"{fmt(target.measured)} {target.unit}",
            f"{target.comparison} {fmt(target.limit)} {target.unit}", verdict]


def render(sections: list[Section], *, machine: list[tuple[str, str]], command: str,
           quick: bool, shared: bool) -> str:
    """The whole BENCHMARKS.md."""
    lines = [
        "# Benchmarks", "",
        f"Reproduce with `{command}` from the repository root with the project installed "
        "(as root, so that the sandbox runs in bwrap mode): `bash scripts/setup.sh`, then "
        f"`.venv/bin/{command}`. It takes a few minutes and rewrites this file; `--quick` is "
        "a smoke run with tiny sizes whose figures mean little.", "",
        "Every figure below comes from one run of the harness on the machine described here. "
        "Times are medians (p50) of repeated runs unless a row says otherwise, and each "
        "benchmark is compared with its baseline measured in the same run.", "",
    ]
    if quick:
        lines += ["**This is a --quick run: sizes are tiny, figures are not representative.**",
                  ""]
    lines += ["## Machine", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in machine]
    if shared:
        lines += ["", "The machine was not idle when the run started (other work was "
                      "running); that adds noise to the figures. The load average given under "
                      "each benchmark also counts the harness's own earlier work."]
    lines += ["", "## Targets", ""]
    rows = [_target_row(number, section, target)
            for number, section in enumerate(sections, start=1) for target in section.targets]
    if rows:
        lines += _table(Table(headers=["benchmark", "target", "measured", "goal", "verdict"],
                              rows=rows))
    missing = [section for section in sections if section.error or section.skipped]
    for section in missing:
        reason = section.error or section.skipped
        lines.append(f"- {section.title}: {'failed' if section.error else 'skipped'}: {reason}")
    if missing:
        lines.append("")
    for number, section in enumerate(sections, start=1):
        lines += [f"## {number}. {section.title}", "", section.method, ""]
        if section.error:
            lines += [f"**The benchmark failed:** {section.error}", ""]
        if section.skipped:
            lines += [f"Skipped: {section.skipped}", ""]
        for table in section.tables:
            lines += _table(table)
        for note in section.notes:
            lines += [note, ""]
        if section.raw:
            lines += ["<details><summary>Raw samples</summary>", ""]
            for name, samples in section.raw.items():
                values = ", ".join(fmt(value) for value in samples)
                lines.append(f"- {name}: {values}")
            lines += ["", "</details>", ""]
        if section.duration_s:
            lines += [f"*Took {section.duration_s:.1f} s; the 1-minute load average was "
                      f"{section.load_at_start:.2f} when it started.*", ""]
        else:
            lines += ["*Measured in the same run as the section above.*", ""]
    return "\n".join(lines).rstrip() + "\n"
