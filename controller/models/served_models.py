"""Which models one endpoint has shown it serves, and which it refused, for a while."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field


@dataclass
class ServedModels:
    """exo v0 calls every card ready, so a model counts as served once it has answered."""

    # Models the config says the endpoint serves; when set, they are the whole list.
    allowed: tuple[str, ...] = ()
    unservable_s: float = 300.0
    clock: Callable[[], float] = time.monotonic
    _answered: dict[str, None] = field(default_factory=dict)
    _refused_until: dict[str, float] = field(default_factory=dict)

    def answered(self, model: str) -> None:
        self._answered[model] = None
        self._refused_until.pop(model, None)

    def refused(self, model: str) -> None:
        """The endpoint said it cannot serve the model: do not ask it again for a while."""
        self._answered.pop(model, None)
        self._refused_until[model] = self.clock() + self.unservable_s

    def is_refused(self, model: str) -> bool:
        until = self._refused_until.get(model)
        if until is None:
            return False
        if self.clock() >= until:
            del self._refused_until[model]
            return False
        return True

    def allows(self, model: str) -> bool:
        """Whether the endpoint may be asked for the model at all."""
        return (not self.allowed or model in self.allowed) and not self.is_refused(model)

    def known(self, listed: Iterable[str] = ()) -> list[str]:
        """The models to count as ready: configured, else answered plus those listed."""
        if self.allowed:
            return list(self.allowed)
        return [m for m in dict.fromkeys([*self._answered, *listed]) if not self.is_refused(m)]
