"""What the controller's HTTP handlers reach, and the bearer-token check for writes."""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass

from aiohttp import web

from kowalski.common.errors import AuthError
from kowalski.common.signing import Verifier
from kowalski.common.version import VERSION
from kowalski.controller.api.status import Status, device_statuses
from kowalski.controller.fleet.cluster import Cluster
from kowalski.controller.fleet.dispatch import Dispatcher
from kowalski.controller.models.cache import CachedBackend, ResultCache
from kowalski.controller.models.router import LlmRouter
from kowalski.controller.rlm.runs import RunRegistry


@dataclass
class ControllerState:
    cluster: Cluster
    dispatcher: Dispatcher
    router: LlmRouter
    cache: ResultCache
    backend: CachedBackend
    runs: RunRegistry
    verifier: Verifier | None
    api_token: bytes | None

    def status(self) -> Status:
        stats = self.cache.stats()
        return Status(
            version=VERSION, time=time.time(),
            devices=device_statuses(self.cluster.table, self.cluster.clock()),
            endpoints=self.router.views(), jobs=self.dispatcher.counters,
            runs=self.runs.summaries(),
            cache={"hits": stats.hits, "misses": stats.misses, "entries": stats.entries,
                   "evictions": stats.evictions},
        )


STATE = web.AppKey("state", ControllerState)


def require_token(request: web.Request) -> None:
    """Writes need the bearer token when one is configured."""
    token = request.app[STATE].api_token
    if token is None:
        return
    given = request.headers.get("Authorization", "")
    if not given.startswith("Bearer "):
        raise AuthError("this controller needs 'Authorization: Bearer <token>' for writes")
    # A header that is not UTF-8 arrives with surrogates: a wrong token, not a crash.
    presented = given.removeprefix("Bearer ").strip().encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(presented, token):
        raise AuthError("wrong bearer token")
