"""Per-client token buckets for work submission; idle clients are forgotten."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from kowalski.common.config import SecurityConfig
from kowalski.common.errors import RateLimitedError

# Clients tracked at once; past this the least recently seen is forgotten (it starts
# again with a full bucket, which is the price of bounded memory under a flood of
# addresses).
DEFAULT_MAX_CLIENTS = 10_000


class RateLimiter:
    """One token bucket per client key: `rate_per_s` refill, `burst` capacity."""

    def __init__(self, *, rate_per_s: float, burst: int,
                 max_clients: int = DEFAULT_MAX_CLIENTS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate_per_s <= 0 or burst < 1 or max_clients < 1:
            raise ValueError("rate_per_s must be positive, burst and max_clients at least 1")
        self._rate = rate_per_s
        self._burst = float(burst)
        self._max_clients = max_clients
        self._clock = clock
        # After this long untouched any bucket is full again, the same as a new one.
        self._refill_s = burst / rate_per_s
        # key -> (tokens, last update); the order is least recently updated first.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    @classmethod
    def from_config(cls, security: SecurityConfig) -> RateLimiter:
        return cls(rate_per_s=security.rate_limit_per_s, burst=security.rate_limit_burst)

    def __len__(self) -> int:
        return len(self._buckets)

    def check(self, key: str) -> None:
        """Take one token from key's bucket, or raise RateLimitedError saying when to retry."""
        now = self._clock()
        self._forget_idle(now)
        tokens, last = self._buckets.pop(key, (self._burst, now))
        tokens = min(self._burst, tokens + max(0.0, now - last) * self._rate)
        if tokens < 1.0:
            # A refused request spends nothing, so a client that waits as told gets in.
            self._buckets[key] = (tokens, now)
            raise RateLimitedError(
                f"too many requests: this client may send {self._rate:g} per second "
                f"(bursts of {self._burst:g})",
                retry_after_s=(1.0 - tokens) / self._rate,
            )
        self._buckets[key] = (tokens - 1.0, now)
        while len(self._buckets) > self._max_clients:
            self._buckets.popitem(last=False)

    def _forget_idle(self, now: float) -> None:
        while self._buckets:
            key, (_, last) = next(iter(self._buckets.items()))
            if now - last < self._refill_s:
                return
            del self._buckets[key]
