"""A per-device circuit breaker as a pure state machine.

closed: every request passes; ``failure_threshold`` consecutive failures open it.
open: nothing passes until ``reset_s`` has gone by since it opened; from then on
the circuit is half-open, which is computed from the clock rather than stored,
so no timer has to fire.
half-open: one probe passes; its success closes the circuit, its failure opens
it again for another ``reset_s``.

Times are seconds on one clock chosen by the caller. "Failure" means a fault of
the device (unreachable, crashed, refused), never an error in the user's code.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from kowalski.common.config import ControllerConfig

Phase = Literal["closed", "open", "half_open"]


class CircuitPolicy(msgspec.Struct, frozen=True, kw_only=True):
    failure_threshold: int
    reset_s: float

    @classmethod
    def from_config(cls, config: ControllerConfig) -> CircuitPolicy:
        """The policy set by the controller's config."""
        return cls(
            failure_threshold=config.circuit_failure_threshold, reset_s=config.circuit_reset_s,
        )


class Circuit(msgspec.Struct, frozen=True, kw_only=True):
    # Stored phase: "open" may already be half-open by the clock; see phase().
    state: Literal["closed", "open"] = "closed"
    # Consecutive failures while closed.
    failures: int = 0
    opened_at: float = 0.0
    # The job sent as the half-open probe; others wait until it settles.
    probe_job_id: str | None = None


CLOSED = Circuit()


def phase(circuit: Circuit, now: float, policy: CircuitPolicy) -> Phase:
    """The phase at ``now``: an open circuit is half-open once reset_s has passed."""
    if circuit.state == "closed":
        return "closed"
    if now - circuit.opened_at >= policy.reset_s:
        return "half_open"
    return "open"


def allows(circuit: Circuit, now: float, policy: CircuitPolicy) -> bool:
    """Whether a request may go to the device now (a half-open circuit allows one probe)."""
    if circuit.state == "closed":
        return True
    return circuit.probe_job_id is None and phase(circuit, now, policy) == "half_open"


def on_attempt(circuit: Circuit, now: float, policy: CircuitPolicy, *, job_id: str) -> Circuit:
    """A request was sent; in half-open it becomes the one probe."""
    if circuit.state == "closed" or circuit.probe_job_id is not None:
        return circuit
    if phase(circuit, now, policy) != "half_open":
        return circuit
    return msgspec.structs.replace(circuit, probe_job_id=job_id)


def on_success(circuit: Circuit, now: float, policy: CircuitPolicy) -> Circuit:
    """A request succeeded: the device works, so the circuit closes (any phase)."""
    return CLOSED


def on_failure(circuit: Circuit, now: float, policy: CircuitPolicy) -> Circuit:
    """A request failed: count it while closed, reopen when half-open."""
    if circuit.state == "closed":
        failures = circuit.failures + 1
        if failures >= policy.failure_threshold:
            return Circuit(state="open", failures=failures, opened_at=now)
        return msgspec.structs.replace(circuit, failures=failures)
    if phase(circuit, now, policy) == "half_open":
        return Circuit(state="open", failures=circuit.failures + 1, opened_at=now)
    # A late failure of a request sent before the circuit opened: the open
    # period is not extended, or slow stragglers could keep a device shut.
    return circuit


def on_abandon(circuit: Circuit, *, job_id: str) -> Circuit:
    """A request ended without a verdict (cancelled); a probe slot is freed for another try."""
    if circuit.probe_job_id is not None and circuit.probe_job_id == job_id:
        return msgspec.structs.replace(circuit, probe_job_id=None)
    return circuit
