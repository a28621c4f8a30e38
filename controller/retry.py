"""Exponential backoff with jitter, a helper that retries a call, and one that fails over.

Jitter spreads the retries of many callers that failed together, so they do
not hit a recovering device in lockstep: "full" waits a uniform time below the
exponential ceiling, "decorrelated" draws between the base and three times the
previous wait. Both are capped at ``max_delay_ms``.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Awaitable, Callable, Hashable, Iterator
from typing import Literal, TypeVar

import msgspec

from kowalski.common.config import ControllerConfig
from kowalski.common.errors import KowalskiError, NoDevicesAvailableError

T = TypeVar("T")
Target = TypeVar("Target")
Key = TypeVar("Key", bound=Hashable)

Jitter = Literal["full", "decorrelated"]

# 2**62 times any base delay is past every cap; a bound keeps the float finite.
_MAX_EXPONENT = 62

_default_rng = random.Random()


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    # Attempts in all, the first one included.
    max_attempts: int
    base_delay_ms: float
    max_delay_ms: float
    jitter: Jitter = "full"

    @classmethod
    def from_config(cls, config: ControllerConfig, *, jitter: Jitter = "full") -> RetryPolicy:
        """The policy set by the controller's config."""
        return cls(
            max_attempts=config.retry_max_attempts,
            base_delay_ms=config.retry_base_delay_ms,
            max_delay_ms=config.retry_max_delay_ms,
            jitter=jitter,
        )

    def ceiling_ms(self, attempt: int) -> float:
        """The exponential bound on the wait after ``attempt`` failed attempts (1-based)."""
        exponent = min(max(attempt - 1, 0), _MAX_EXPONENT)
        return min(self.max_delay_ms, self.base_delay_ms * 2.0**exponent)

    def delay_ms(
        self, attempt: int, rng: random.Random, *, previous_ms: float | None = None,
    ) -> float:
        """The wait after ``attempt`` failed attempts; decorrelated jitter needs the last wait."""
        if self.jitter == "full":
            return rng.uniform(0.0, self.ceiling_ms(attempt))
        previous = self.base_delay_ms if previous_ms is None else previous_ms
        low = min(self.base_delay_ms, self.max_delay_ms)
        return min(self.max_delay_ms, rng.uniform(low, max(low, previous * 3)))

    def delays(self, rng: random.Random) -> Iterator[float]:
        """The waits between all attempts, in order (max_attempts - 1 of them)."""
        previous: float | None = None
        for attempt in range(1, self.max_attempts):
            previous = self.delay_ms(attempt, rng, previous_ms=previous)
            yield previous


def retry_helps(error: Exception) -> bool:
    """The default retry rule: Kowalski errors that say sending the work again can help."""
    return isinstance(error, KowalskiError) and bool(error.retry_elsewhere)



def _server_wait_ms(error: Exception, policy: RetryPolicy) -> float:
    # A server that names its wait (rate limited, busy) knows better than the
    # backoff; the cap still holds so one reply cannot stall a caller for long.
    retry_after_s = getattr(error, "retry_after_s", None)
    if isinstance(retry_after_s, int | float) and math.isfinite(retry_after_s):
        return min(max(float(retry_after_s), 0.0) * 1000.0, policy.max_delay_ms)
    return 0.0


async def retry(
    fn: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    is_retryable: Callable[[Exception], bool] = retry_helps,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    on_retry: Callable[[int, Exception, float], object] | None = None,
    rng: random.Random | None = None,
) -> T:
    """Await ``fn()`` until it succeeds, fails for good, or attempts run out.

    The last error is re-raised unchanged. ``on_retry(attempt, error, delay_ms)``
    runs before each wait. Cancellation is a BaseException and is never caught.
    """
    rng = _default_rng if rng is None else rng
    previous_ms: float | None = None
    attempt = 0
    while True:
        attempt += 1
        try:
            return await fn()
        except Exception as error:
            if attempt >= policy.max_attempts or not is_retryable(error):
                raise
            delay_ms = policy.delay_ms(attempt, rng, previous_ms=previous_ms)
            previous_ms = delay_ms
            delay_ms = max(delay_ms, _server_wait_ms(error, policy))
            if on_retry is not None:
                on_retry(attempt, error, delay_ms)
        # Sleep outside the except block so the failed attempt's traceback is released.
        await sleep(delay_ms / 1000.0)


async def with_failover(
    call: Callable[[Target], Awaitable[T]],
    policy: RetryPolicy,
    *,
    choose: Callable[[frozenset[Key]], Target],
    key: Callable[[Target], Key],
    is_retryable: Callable[[Exception], bool] = retry_helps,
    on_retry: Callable[[int, Exception, float], object] | None = None,
    rng: random.Random | None = None,
) -> T:
    """Run ``call`` on the best target, then on the next best each time one fails.

    ``choose(exclude)`` picks the best target whose key is not in ``exclude``, or raises
    NoDevicesAvailableError. A target whose call failed retryably is excluded; once every
    target was tried, the choice starts over from all of them (after the back-off).
    """
    tried: set[Key] = set()

    async def attempt() -> T:
        try:
            target = choose(frozenset(tried))
        except NoDevicesAvailableError:
            if not tried:
                raise
            tried.clear()
            target = choose(frozenset())
        try:
            return await call(target)
        except Exception as error:
            if is_retryable(error):
                tried.add(key(target))
            raise

    return await retry(attempt, policy, is_retryable=is_retryable, on_retry=on_retry, rng=rng)
