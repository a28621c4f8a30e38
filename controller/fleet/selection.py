"""Pick a device for an operation: the formulas in `controller.scoring`, a load penalty,
and why no device fits.

``load_penalty`` per job in flight is subtracted so work spreads over equal
devices. Ties go to fewer jobs in flight, then to the smaller device id, so a
choice is deterministic.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Literal

from kowalski.common.errors import NoDevicesAvailableError
from kowalski.controller import circuit as breaker
from kowalski.controller.fleet.device_table import (
    DeviceRow,
    DeviceTable,
    TableSettings,
    is_stale,
)
from kowalski.controller.scoring import FORMULAS, Operation

# Why a row cannot take the job, in the order the checks run.
Exclusion = Literal["unhealthy", "no_language", "excluded", "circuit_open"]


def base_score(row: DeviceRow, operation: Operation) -> float:
    """The operation's formula for the row, in [0, 1], before the load penalty."""
    memory_weight, latency_weight, scale_ms = FORMULAS[operation]
    return memory_weight * row.memory_free_fraction + latency_weight / (
        1.0 + (row.latency_ms or 0.0) / scale_ms
    )


def score(row: DeviceRow, operation: Operation, *, load_penalty: float) -> float:
    """The base score minus the penalty for the row's jobs in flight (may go below 0)."""
    return base_score(row, operation) - load_penalty * len(row.in_flight)


def exclusion_reason(
    row: DeviceRow,
    settings: TableSettings,
    *,
    language: str | None = None,
    exclude: Collection[str] = frozenset(),
    now: float,
) -> Exclusion | None:
    """Why the row cannot take the job now, or None when it can."""
    if row.health != "healthy" or row.lost or is_stale(row, now, settings):
        return "unhealthy"
    if language is not None and language not in row.languages:
        return "no_language"
    if row.device_id in exclude:
        return "excluded"
    if not breaker.allows(row.circuit, now, settings.circuit):
        return "circuit_open"
    return None


def _candidates(
    table: DeviceTable,
    operation: Operation,
    language: str | None,
    exclude: Collection[str],
    now: float,
) -> list[tuple[float, DeviceRow]]:
    """exclusion_reason() and score() unrolled: selection runs per job over every row."""
    settings = table.settings
    timeout_s = settings.failure_timeout_s
    policy = settings.circuit
    penalty = settings.load_penalty
    memory_weight, latency_weight, scale_ms = FORMULAS[operation]
    found = []
    for row in table.devices.values():
        heard_at = row.last_heartbeat_at
        if (
            row.health != "healthy" or row.lost or heard_at is None
            or now - heard_at >= timeout_s
            or (language is not None and language not in row.languages)
            or row.device_id in exclude
            or (row.circuit.state != "closed" and not breaker.allows(row.circuit, now, policy))
        ):
            continue
        value = memory_weight * row.memory_free_fraction + latency_weight / (
            1.0 + (row.latency_ms or 0.0) / scale_ms
        )
        found.append((value - penalty * len(row.in_flight), row))
    return found


def ranked(
    table: DeviceTable,
    operation: Operation,
    *,
    language: str | None = None,
    exclude: Collection[str] = frozenset(),
    now: float,
) -> list[tuple[float, DeviceRow]]:
    """Every row that can take the job, with its score, best first."""
    scored = _candidates(table, operation, language, exclude, now)
    scored.sort(key=lambda item: (-item[0], len(item[1].in_flight), item[1].device_id))
    return scored


def select(
    table: DeviceTable,
    operation: Operation,
    *,
    language: str | None = None,
    exclude: Collection[str] = frozenset(),
    now: float,
) -> DeviceRow:
    """The best row for the job; NoDevicesAvailableError says why there is none."""
    best: DeviceRow | None = None
    best_score = 0.0
    for value, row in _candidates(table, operation, language, exclude, now):
        if (
            best is None
            or value > best_score
            or (
                value == best_score
                and (len(row.in_flight), row.device_id) < (len(best.in_flight), best.device_id)
            )
        ):
            best, best_score = row, value
    if best is None:
        raise NoDevicesAvailableError(
            _explain(table, language=language, exclude=exclude, now=now),
        )
    return best


def _explain(
    table: DeviceTable, *, language: str | None, exclude: Collection[str], now: float,
) -> str:
    """Name the first check that left no candidate, with the counts behind it."""
    rows = list(table.devices.values())
    if not rows:
        return "no devices discovered"
    settings = table.settings
    reasons = [
        exclusion_reason(row, settings, language=language, exclude=exclude, now=now)
        for row in rows
    ]
    healthy = [row for row, reason in zip(rows, reasons, strict=True) if reason != "unhealthy"]
    if not healthy:
        waiting = sum(1 for row in rows if row.health == "unknown")
        if waiting == len(rows):
            return f"{_all(waiting, 'device')} waiting for a first heartbeat"
        text = f"{_all(len(rows), 'device')} unhealthy"
        return f"{text} ({waiting} waiting for a first heartbeat)" if waiting else text
    tried = reasons.count("excluded")
    shut = reasons.count("circuit_open")
    if not tried and not shut:
        available = sorted({lang for row in healthy for lang in row.languages})
        return (
            f"no healthy device runs {language} "
            f"(available: {', '.join(available) or 'none'})"
        )
    if not shut:
        return f"already tried {_all(tried, 'candidate device', verb=False)} for this job"
    runs = f" that can run {language}" if language else ""
    if not tried:
        return f"circuit open on {_all(shut, 'healthy device', verb=False)}{runs}"
    return (
        f"already tried {tried} candidate device{'s' if tried > 1 else ''} for this job, "
        f"circuit open on the other {shut}"
    )


def _all(count: int, noun: str, *, verb: bool = True) -> str:
    if count == 1:
        return f"the only {noun}" + (" is" if verb else "")
    return f"all {count} {noun}s" + (" are" if verb else "")
