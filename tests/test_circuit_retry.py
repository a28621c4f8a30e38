"""The circuit breaker with a fake clock, and retries with a seeded random source."""

from __future__ import annotations

import asyncio
import itertools
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kowalski.common.config import ControllerConfig
from kowalski.common.errors import (
    ConfigError,
    ExoApiError,
    NetworkError,
    NoDevicesAvailableError,
    RateLimitedError,
    ReplError,
    ReplTimeoutError,
)
from kowalski.controller.circuit import (
    CLOSED,
    Circuit,
    CircuitPolicy,
    allows,
    on_abandon,
    on_attempt,
    on_failure,
    on_success,
    phase,
)
from kowalski.controller.retry import Jitter, RetryPolicy, retry, retry_helps, with_failover

POLICY = CircuitPolicy(failure_threshold=3, reset_s=10.0)


def failed(times: int, *, at: float = 0.0, circuit: Circuit = CLOSED) -> Circuit:
    for _ in range(times):
        circuit = on_failure(circuit, at, POLICY)
    return circuit


# Circuit breaker


def test_circuit_policy_comes_from_config() -> None:
    config = ControllerConfig(circuit_failure_threshold=5, circuit_reset_s=2.5)
    assert CircuitPolicy.from_config(config) == CircuitPolicy(failure_threshold=5, reset_s=2.5)


def test_closed_circuit_opens_at_the_failure_threshold() -> None:
    circuit = failed(2)
    assert phase(circuit, 0.0, POLICY) == "closed"
    assert allows(circuit, 0.0, POLICY)
    circuit = on_failure(circuit, 4.0, POLICY)
    assert phase(circuit, 4.0, POLICY) == "open"
    assert not allows(circuit, 4.0, POLICY)


def test_only_consecutive_failures_count() -> None:
    circuit = on_success(failed(2), 1.0, POLICY)
    circuit = failed(2, circuit=circuit)
    assert phase(circuit, 1.0, POLICY) == "closed"


def test_open_circuit_turns_half_open_after_reset() -> None:
    circuit = failed(3, at=100.0)
    assert phase(circuit, 109.999, POLICY) == "open"
    assert not allows(circuit, 109.999, POLICY)
    assert phase(circuit, 110.0, POLICY) == "half_open"
    assert allows(circuit, 110.0, POLICY)


def test_half_open_circuit_lets_one_probe_through() -> None:
    circuit = on_attempt(failed(3), 10.0, POLICY, job_id="probe")
    assert circuit.probe_job_id == "probe"
    assert not allows(circuit, 10.0, POLICY)
    assert on_attempt(circuit, 10.0, POLICY, job_id="second") is circuit


def test_successful_probe_closes_the_circuit() -> None:
    circuit = on_attempt(failed(3), 10.0, POLICY, job_id="probe")
    circuit = on_success(circuit, 10.5, POLICY)
    assert circuit == CLOSED
    assert allows(circuit, 10.5, POLICY)


def test_failed_probe_reopens_for_another_reset_period() -> None:
    circuit = on_attempt(failed(3), 10.0, POLICY, job_id="probe")
    circuit = on_failure(circuit, 12.0, POLICY)
    assert phase(circuit, 12.0, POLICY) == "open"
    assert circuit.probe_job_id is None
    assert not allows(circuit, 21.9, POLICY)
    assert allows(circuit, 22.0, POLICY)


def test_abandoned_probe_frees_the_slot_and_others_do_not() -> None:
    circuit = on_attempt(failed(3), 10.0, POLICY, job_id="probe")
    assert on_abandon(circuit, job_id="other") is circuit
    circuit = on_abandon(circuit, job_id="probe")
    assert allows(circuit, 10.0, POLICY)


def test_late_failure_does_not_extend_the_open_period() -> None:
    circuit = failed(3, at=0.0)
    assert on_failure(circuit, 5.0, POLICY) is circuit
    assert allows(circuit, 10.0, POLICY)


def test_attempts_while_closed_or_open_are_not_probes() -> None:
    assert on_attempt(CLOSED, 0.0, POLICY, job_id="j") is CLOSED
    circuit = failed(3)
    assert on_attempt(circuit, 5.0, POLICY, job_id="j") is circuit


operations = st.lists(
    st.tuples(
        st.sampled_from(["success", "failure", "attempt", "abandon"]),
        st.floats(min_value=0.0, max_value=30.0),
    ),
    max_size=50,
)


@given(operations)
def test_circuit_invariants_hold_for_any_history(steps: list[tuple[str, float]]) -> None:
    circuit, now = CLOSED, 0.0
    for action, delay in steps:
        now += delay
        if action == "success":
            circuit = on_success(circuit, now, POLICY)
        elif action == "failure":
            circuit = on_failure(circuit, now, POLICY)
        elif action == "attempt":
            circuit = on_attempt(circuit, now, POLICY, job_id="j")
        else:
            circuit = on_abandon(circuit, job_id="j")
        current = phase(circuit, now, POLICY)
        if current == "closed":
            assert allows(circuit, now, POLICY)
            assert circuit.failures < POLICY.failure_threshold
            assert circuit.probe_job_id is None
        elif current == "open":
            assert not allows(circuit, now, POLICY)
        else:
            assert allows(circuit, now, POLICY) == (circuit.probe_job_id is None)


# Backoff delays

RETRY = RetryPolicy(max_attempts=5, base_delay_ms=100, max_delay_ms=1000)


def test_retry_policy_comes_from_config() -> None:
    config = ControllerConfig(
        retry_max_attempts=7, retry_base_delay_ms=20, retry_max_delay_ms=900,
    )
    assert RetryPolicy.from_config(config, jitter="decorrelated") == RetryPolicy(
        max_attempts=7, base_delay_ms=20, max_delay_ms=900, jitter="decorrelated",
    )


def test_ceiling_doubles_up_to_the_cap() -> None:
    assert [RETRY.ceiling_ms(attempt) for attempt in range(1, 7)] == [
        100, 200, 400, 800, 1000, 1000,
    ]
    assert RETRY.ceiling_ms(10_000) == 1000


def test_full_jitter_stays_below_the_ceiling_and_varies() -> None:
    rng = random.Random(7)
    for attempt in range(1, 12):
        delays = [RETRY.delay_ms(attempt, rng) for _ in range(200)]
        assert all(0.0 <= delay <= RETRY.ceiling_ms(attempt) for delay in delays)
        # Jitter spreads the waits over most of the range, not one value.
        assert max(delays) - min(delays) > 0.5 * RETRY.ceiling_ms(attempt)


def test_decorrelated_jitter_stays_between_base_and_cap() -> None:
    policy = RetryPolicy(max_attempts=50, base_delay_ms=100, max_delay_ms=1000,
                         jitter="decorrelated")
    rng = random.Random(11)
    delays = list(policy.delays(rng))
    assert len(delays) == 49
    assert all(100.0 <= delay <= 1000.0 for delay in delays)
    assert delays[0] <= 300.0
    for previous, delay in itertools.pairwise(delays):
        assert delay <= 3 * previous
    assert len(set(delays)) > 10


def test_same_seed_gives_the_same_delays() -> None:
    assert list(RETRY.delays(random.Random(3))) == list(RETRY.delays(random.Random(3)))
    assert list(RETRY.delays(random.Random(3))) != list(RETRY.delays(random.Random(4)))


@given(
    attempt=st.integers(1, 10_000), seed=st.integers(0, 2**32),
    base=st.integers(1, 10_000), cap_factor=st.integers(1, 100),
    jitter=st.sampled_from(["full", "decorrelated"]),
    previous=st.none() | st.floats(0, 1e12),
)
def test_every_delay_is_within_zero_and_the_cap(
    attempt: int, seed: int, base: int, cap_factor: int, jitter: Jitter, previous: float | None,
) -> None:
    policy = RetryPolicy(
        max_attempts=3, base_delay_ms=base, max_delay_ms=base * cap_factor, jitter=jitter,
    )
    delay = policy.delay_ms(attempt, random.Random(seed), previous_ms=previous)
    assert 0.0 <= delay <= policy.max_delay_ms


# The retry helper


class Flaky:
    """Fails with the given errors in turn, then returns "done"."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


class Sleeps:
    def __init__(self) -> None:
        self.seconds: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.seconds.append(seconds)


async def test_retry_returns_after_transient_failures() -> None:
    flaky, sleeps = Flaky(NetworkError("reset"), NetworkError("reset")), Sleeps()
    seen: list[tuple[int, str, float]] = []
    result = await retry(
        flaky, RETRY, sleep=sleeps, rng=random.Random(1),
        on_retry=lambda attempt, error, delay_ms: seen.append((attempt, str(error), delay_ms)),
    )
    assert result == "done"
    assert flaky.calls == 3
    assert [attempt for attempt, _, _ in seen] == [1, 2]
    assert sleeps.seconds == pytest.approx([delay_ms / 1000 for _, _, delay_ms in seen])
    expected = list(RETRY.delays(random.Random(1)))[:2]
    assert [delay_ms for _, _, delay_ms in seen] == pytest.approx(expected)


async def test_retry_stops_at_a_non_retryable_error() -> None:
    error = ReplError("python", "ZeroDivisionError", 1)
    flaky, sleeps = Flaky(error), Sleeps()
    with pytest.raises(ReplError) as caught:
        await retry(flaky, RETRY, sleep=sleeps)
    assert caught.value is error
    assert (flaky.calls, sleeps.seconds) == (1, [])


async def test_retry_reraises_the_last_error_when_attempts_run_out() -> None:
    errors = [NetworkError(f"try {number}") for number in range(1, 6)]
    flaky, sleeps = Flaky(*errors, NetworkError("never reached")), Sleeps()
    with pytest.raises(NetworkError) as caught:
        await retry(flaky, RETRY, sleep=sleeps)
    assert caught.value is errors[-1]
    assert flaky.calls == 5
    assert len(sleeps.seconds) == 4


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (NetworkError("down"), True),
        (ExoApiError(503, "busy"), True),
        (ExoApiError(400, "bad request"), False),
        (ConfigError("bad"), False),
        # Recoverable (the model can fix the code), but the same code fails anywhere.
        (ReplTimeoutError("python", 1000), False),
        (ValueError("not ours"), False),
    ],
)
async def test_default_retryability_follows_retry_elsewhere(
    error: Exception, retried: bool,
) -> None:
    assert retry_helps(error) is retried
    flaky = Flaky(error)
    if retried:
        assert await retry(flaky, RETRY, sleep=Sleeps()) == "done"
    else:
        with pytest.raises(type(error)):
            await retry(flaky, RETRY, sleep=Sleeps())
    assert flaky.calls == (2 if retried else 1)


async def test_custom_retryability_is_used() -> None:
    flaky = Flaky(KeyError("x"))
    assert await retry(flaky, RETRY, sleep=Sleeps(), is_retryable=lambda e: True) == "done"


async def test_server_named_wait_is_honoured_within_the_cap() -> None:
    sleeps = Sleeps()
    flaky = Flaky(RateLimitedError("slow down", 0.5), RateLimitedError("slow down", 60.0))
    await retry(flaky, RETRY, sleep=sleeps, rng=random.Random(2))
    assert sleeps.seconds[0] >= 0.5
    assert sleeps.seconds[1] == pytest.approx(1.0)


async def test_cancellation_raised_by_the_call_is_never_retried() -> None:
    async def cancelled() -> str:
        raise asyncio.CancelledError

    sleeps = Sleeps()
    with pytest.raises(asyncio.CancelledError):
        await retry(cancelled, RETRY, sleep=sleeps, is_retryable=lambda e: True)
    assert sleeps.seconds == []


async def test_cancelling_during_the_backoff_stops_the_retries() -> None:
    started = asyncio.Event()
    flaky = Flaky(*(NetworkError("down") for _ in range(5)))

    async def call() -> str:
        started.set()
        return await flaky()

    slow = RetryPolicy(max_attempts=5, base_delay_ms=60_000, max_delay_ms=60_000,
                       jitter="decorrelated")
    task = asyncio.create_task(retry(call, slow))
    await started.wait()
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert flaky.calls == 1


# Failover over ranked targets


class Ranked:
    """Targets ranked best first; each fails with the errors queued for it, then answers."""

    def __init__(self, names: str, **errors: list[Exception]) -> None:
        self.names = list(names)
        self.errors = errors
        self.calls: list[str] = []
        self.excluded: list[frozenset[str]] = []

    def choose(self, exclude: frozenset[str]) -> str:
        self.excluded.append(exclude)
        for name in self.names:
            if name not in exclude:
                return name
        raise NoDevicesAvailableError(f"all of {''.join(self.names)} excluded")

    async def call(self, name: str) -> str:
        self.calls.append(name)
        queued = self.errors.get(name, [])
        if queued:
            raise queued.pop(0)
        return f"answer from {name}"


FAST = RetryPolicy(max_attempts=5, base_delay_ms=1, max_delay_ms=2)


async def failover(targets: Ranked, policy: RetryPolicy = FAST) -> str:
    return await with_failover(targets.call, policy, choose=targets.choose,
                               key=lambda name: name, rng=random.Random(3))


async def test_failover_moves_to_the_next_best_target_after_a_fault() -> None:
    targets = Ranked("abc", a=[NetworkError("a down")])
    assert await failover(targets) == "answer from b"
    assert targets.calls == ["a", "b"]
    assert targets.excluded == [frozenset(), frozenset("a")]


async def test_failover_starts_over_once_every_target_was_tried() -> None:
    targets = Ranked("ab", a=[NetworkError("a down")], b=[NetworkError("b down")])
    assert await failover(targets) == "answer from a"
    assert targets.calls == ["a", "b", "a"]


async def test_failover_keeps_a_target_that_refused_the_input_and_stops() -> None:
    refused = ConfigError("bad input")
    targets = Ranked("ab", a=[refused])
    with pytest.raises(ConfigError) as caught:
        await failover(targets)
    assert caught.value is refused
    assert targets.calls == ["a"]


async def test_failover_with_no_target_raises_why_after_the_attempts() -> None:
    targets = Ranked("")
    policy = RetryPolicy(max_attempts=2, base_delay_ms=1, max_delay_ms=2)
    with pytest.raises(NoDevicesAvailableError, match="excluded"):
        await failover(targets, policy)
    assert (targets.calls, len(targets.excluded)) == ([], 2)
