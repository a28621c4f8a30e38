"""An item's wait for a model while its endpoint's circuit is open, instead of failing."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from kowalski.common.errors import ModelNotYetAvailableError
from kowalski.controller.retry import RetryPolicy

T = TypeVar("T")


class ModelWait:
    """One item's waits for a model: open circuits, probes in flight, a health outage.

    Each refusal says how long to wait (until a circuit half-opens, the next health check,
    or a short poll while a probe is out). The item waits at most ``max_attempts`` times
    the longest such wait in all, so a short outage is ridden out and a long one still
    fails the item.
    """

    def __init__(self, policy: RetryPolicy, on_wait: Callable[[float, bool], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._policy = policy
        self._on_wait = on_wait
        self._clock = clock
        # Made at the first wait: seeding one costs a system call, and most items never wait.
        self._rng: random.Random | None = None
        self._polls = 0
        self._waited_s = 0.0
        self._longest_s = policy.max_delay_ms / 1000
        self.gave_up = False

    async def call(self, ask: Callable[[], Awaitable[T]]) -> T:
        policy = self._policy
        while True:
            try:
                return await ask()
            except ModelNotYetAvailableError as error:
                rng = self._rng = self._rng or random.Random()
                self._longest_s = max(self._longest_s, error.wait_s)
                if error.probe_pending:
                    # The probe settles soon once the server is back; poll slower the longer
                    # it takes, so hundreds of waiting items do not spin.
                    self._polls += 1
                    wait_s = policy.delay_ms(self._polls, rng) / 1000
                else:
                    # Jitter keeps the waiting items from all asking in the same tick.
                    wait_s = error.wait_s + rng.uniform(0, policy.base_delay_ms / 1000)
                if self._waited_s + wait_s > policy.max_attempts * self._longest_s:
                    self.gave_up = True
                    raise
                self._on_wait(wait_s, error.probe_pending)
            started = self._clock()
            await asyncio.sleep(wait_s)
            self._waited_s += self._clock() - started
