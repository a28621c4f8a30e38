"""What a benchmark hands back: tables, targets, raw samples, and the number formats."""

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
    # A section kept from a report written before results were stored: its Markdown body,
    # verbatim, stands for the method, tables, notes and raw samples.
    legacy_markdown: str = ""


# Rows of a machine description that belong to the run, not to the machine.
RUN_ROWS = ("date", "load average (1, 5, 15 min)")


@dataclass
class StoredRun:
    """One benchmark's sections with the run that measured them: when, where, how."""

    key: str
    sections: list[Section]
    machine: dict[str, str] = field(default_factory=dict)
    command: str = ""
    quick: bool = False
    # The machine was busy with other work when the run started.
    shared: bool = False

    @property
    def date(self) -> str:
        return self.machine.get("date", "an unknown date")

    def machine_identity(self) -> tuple[tuple[str, str], ...]:
        """The rows that tell one machine from another (the date and load are the run's)."""
        return tuple((name, value) for name, value in self.machine.items()
                     if name not in RUN_ROWS)


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


def _machine_labels(runs: list[StoredRun]) -> dict[tuple[tuple[str, str], ...], str]:
    """A letter per distinct machine, in the order the runs first name it."""
    labels: dict[tuple[tuple[str, str], ...], str] = {}
    for run in runs:
        labels.setdefault(run.machine_identity(), chr(ord("A") + len(labels)))
    return labels


def _machines(runs: list[StoredRun], numbers: list[list[int]]) -> list[str]:
    labels = _machine_labels(runs)
    rows = list(dict.fromkeys(name for identity in labels for name, _ in identity))
    lines = ["| | " + " | ".join(f"machine {label}" for label in labels.values()) + " |",
             "|---|" + "---|" * len(labels)]
    for row in rows:
        cells = [dict(identity).get(row, "") for identity in labels]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    measured = []
    for identity in labels:
        sections = [number for run, run_numbers in zip(runs, numbers, strict=True)
                    if run.machine_identity() == identity for number in run_numbers]
        measured.append(", ".join(str(number) for number in sections))
    lines.append("| sections measured | " + " | ".join(measured) + " |")
    return [*lines, ""]


def _provenance(run: StoredRun, label: str) -> str:
    load = run.machine.get("load average (1, 5, 15 min)", "")
    busy = "; the machine was busy with other work" if run.shared else ""
    return (f"*Measured on {run.date} on machine {label} by `{run.command}`"
            + (f"; load average {load}" if load else "") + f"{busy}.*")


def _body(section: Section) -> list[str]:
    if section.legacy_markdown:
        return [section.legacy_markdown.strip(), ""]
    lines = [section.method, ""]
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
    return lines


def render(runs: list[StoredRun], *, command: str) -> str:
    """The whole BENCHMARKS.md, from every stored run in the order given."""
    lines = [
        "# Benchmarks", "",
        f"Reproduce with `{command}` from the repository root with the project installed "
        "(as root, so that the sandbox runs in bwrap mode): `bash scripts/setup.sh`, then "
        f"`.venv/bin/{command}`. Each benchmark's last full run is stored in "
        "`bench/results/KEY.json` and this file is rendered from all of them "
        "(`--only KEY` measures one and keeps the others; `--render` re-renders without "
        "measuring); `--quick` is a smoke run with tiny sizes whose figures mean little and "
        "are never stored.", "",
        "Each section says when, on which machine and by which command it was measured. "
        "Times are medians (p50) of repeated runs unless a row says otherwise, and each "
        "benchmark is compared with its baseline measured in the same run.", "",
    ]
    if any(run.quick for run in runs):
        lines += ["**This is a --quick run: sizes are tiny, figures are not representative.**",
                  ""]
    numbers: list[list[int]] = []
    count = 0
    for run in runs:
        numbers.append(list(range(count + 1, count + len(run.sections) + 1)))
        count += len(run.sections)
    lines += ["## Machines", ""]
    lines += _machines(runs, numbers)
    lines += ["## Targets", ""]
    numbered = [(number, section) for run, run_numbers in zip(runs, numbers, strict=True)
                for number, section in zip(run_numbers, run.sections, strict=True)]
    rows = [_target_row(number, section, target)
            for number, section in numbered for target in section.targets]
    if rows:
        lines += _table(Table(headers=["benchmark", "target", "measured", "goal", "verdict"],
                              rows=rows))
    missing = [section for _, section in numbered if section.error or section.skipped]
    for section in missing:
        reason = section.error or section.skipped
        lines.append(f"- {section.title}: {'failed' if section.error else 'skipped'}: {reason}")
    if missing:
        lines.append("")
    labels = _machine_labels(runs)
    for run, run_numbers in zip(runs, numbers, strict=True):
        for number, section in zip(run_numbers, run.sections, strict=True):
            lines += [f"## {number}. {section.title}", ""]
            lines += _body(section)
            if number == run_numbers[0]:
                lines += [_provenance(run, labels[run.machine_identity()]), ""]
    return "\n".join(lines).rstrip() + "\n"
