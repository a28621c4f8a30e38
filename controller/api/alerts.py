"""Alert notices to a webhook: the Prometheus rules' events, sent when they begin or end.

The alerts are read from the same ``Status`` that /metrics is made of, and carry the
names of the rules in deploy/prometheus/alerts.yml. Each check compares what fires now
with what the webhook was last told, and sends only the difference, as one signed JSON
notice, retried with backoff. A notice that cannot be delivered is not lost: the next
check sends the difference again, from what the webhook last acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Literal
from urllib.parse import urlsplit

import aiohttp
import msgspec

from kowalski.common.config import AlertsConfig
from kowalski.common.errors import KowalskiError, NetworkError
from kowalski.common.messages import encode
from kowalski.common.signing import sign
from kowalski.controller.api.status import Status
from kowalski.controller.retry import RetryPolicy, retry

log = logging.getLogger(__name__)

Severity = Literal["critical", "warning"]
AlertKey = tuple[str, str]


class Alert(msgspec.Struct, frozen=True, kw_only=True):
    """One alert that fires: a rule's name, what it is about, and why."""

    # The rule's name in deploy/prometheus/alerts.yml, e.g. KowalskiAgentDown.
    name: str
    # The device id or endpoint URL it is about; empty for the whole cluster.
    subject: str
    severity: Severity
    summary: str


class AlertChange(msgspec.Struct, frozen=True, kw_only=True):
    state: Literal["firing", "resolved"]
    alert: Alert


class AlertNotice(msgspec.Struct, frozen=True, kw_only=True):
    """The webhook's JSON body: what began or ended since the last notice."""

    # The controller's base URL, so one receiver can tell controllers apart.
    controller: str
    sent_at: float
    changes: list[AlertChange]
    # Every alert firing after these changes.
    firing: list[Alert]


class WebhookRefusedError(KowalskiError):
    """The webhook answered with a client error: sending the notice again will not help."""

    code = "webhook_refused"
    hint = "Check alerts.webhook_url and that the receiver accepts Kowalski's JSON notices"


def firing(status: Status, *, busy_recently: bool, runs_failing_min: int
           ) -> dict[AlertKey, Alert]:
    """The alerts that fire for a status, keyed by (name, subject)."""
    found: list[Alert] = []
    for device in status.devices:
        if device.health == "unhealthy":
            found.append(Alert(name="KowalskiAgentDown", subject=device.device_id,
                               severity="warning",
                               summary=f"agent {device.device_id} is not healthy: "
                                       f"{device.last_error or 'no heartbeat'}"))
        if device.circuit == "open":
            found.append(Alert(name="KowalskiAgentCircuitOpen", subject=device.device_id,
                               severity="warning",
                               summary=f"agent {device.device_id} failed work often enough "
                                       "to open its circuit"))
    if status.devices and not any(device.health == "healthy" for device in status.devices):
        found.append(Alert(name="KowalskiNoAgentUp", subject="", severity="critical",
                           summary="no agent is healthy"))
    for endpoint in status.endpoints:
        # An endpoint still being probed for the first time is not known to be down.
        if endpoint.state == "down":
            found.append(Alert(name="KowalskiEndpointDown", subject=endpoint.url,
                               severity="critical",
                               summary=f"exo endpoint {endpoint.url} does not answer: "
                                       f"{endpoint.last_error or 'no answer'}"))
        if endpoint.circuit == "open":
            found.append(Alert(name="KowalskiEndpointCircuitOpen", subject=endpoint.url,
                               severity="warning",
                               summary=f"exo endpoint {endpoint.url} failed calls often "
                                       "enough to open its circuit"))
    failed = sum(1 for run in status.runs if run.status == "failed")
    finished = sum(1 for run in status.runs if run.status == "finished")
    if failed >= runs_failing_min and failed > finished:
        found.append(Alert(name="KowalskiRunsFailing", subject="", severity="warning",
                           summary=f"{failed} of the last RLM runs failed, {finished} finished"))
    if busy_recently:
        found.append(Alert(name="KowalskiQueueFull", subject="", severity="warning",
                           summary="agents refuse work because their queues are full "
                                   f"({status.jobs.busy} refusals so far)"))
    return {(alert.name, alert.subject): alert for alert in found}


def changes(told: Mapping[AlertKey, Alert], now: Mapping[AlertKey, Alert]
            ) -> list[AlertChange]:
    """What began and what ended between what the webhook was told and what fires now."""
    ended = [AlertChange(state="resolved", alert=alert)
             for key, alert in told.items() if key not in now]
    began = [AlertChange(state="firing", alert=alert)
             for key, alert in now.items() if key not in told]
    return ended + began


class Alerter:
    """Checks the status every interval and posts changes to the webhook."""

    def __init__(self, *, config: AlertsConfig, snapshot: Callable[[], Status],
                 http: aiohttp.ClientSession, secret: bytes | None, controller_url: str,
                 clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self._config = config
        self._snapshot = snapshot
        self._http = http
        self._secret = secret
        self._controller_url = controller_url
        self._clock = clock
        self._rng = rng or random.Random()
        self._policy = RetryPolicy(max_attempts=config.webhook_attempts,
                                   base_delay_ms=config.webhook_retry_base_delay_ms,
                                   max_delay_ms=config.webhook_retry_max_delay_ms,
                                   jitter="full")
        # What the webhook acknowledged last; a failed notice leaves it as it was.
        self.told: dict[AlertKey, Alert] = {}
        self.delivered = 0
        self._busy_count = 0
        self._busy_grew_at: float | None = None

    async def run(self) -> None:
        """Check and notify until cancelled; a failed check is logged, never fatal."""
        while True:
            try:
                await self.check()
            except Exception:
                log.exception("alert check failed; trying again in %g s",
                              self._config.check_interval_s)
            await asyncio.sleep(self._config.check_interval_s)

    def current(self) -> dict[AlertKey, Alert]:
        """What fires now; also notes whether the busy count grew since the last look."""
        status = self._snapshot()
        now = self._clock()
        if status.jobs.busy > self._busy_count:
            self._busy_grew_at = now
        self._busy_count = status.jobs.busy
        busy_recently = (self._busy_grew_at is not None
                         and now - self._busy_grew_at <= self._config.queue_full_window_s)
        return firing(status, busy_recently=busy_recently,
                      runs_failing_min=self._config.runs_failing_min)

    async def check(self) -> list[AlertChange]:
        """Send what changed since the webhook was last told; returns the changes sent."""
        now = self.current()
        changed = changes(self.told, now)
        if not changed:
            return []
        notice = AlertNotice(controller=self._controller_url, sent_at=time.time(),
                             changes=changed, firing=list(now.values()))
        try:
            await retry(lambda: self._post(notice), self._policy, rng=self._rng,
                        on_retry=self._log_retry)
        except KowalskiError as exc:
            log.warning("alert webhook: %s; the next check sends the changes again",
                        exc.user_message())
            return []
        self.told = now
        self.delivered += 1
        return changed

    @staticmethod
    def _log_retry(attempt: int, error: Exception, delay_ms: float) -> None:
        log.info("alert webhook attempt %d failed (%s); again in %.0f ms",
                 attempt, error, delay_ms)

    async def _post(self, notice: AlertNotice) -> None:
        url = self._config.webhook_url
        body = encode(notice)
        headers = {"Content-Type": "application/json"}
        if self._secret is not None:
            parts = urlsplit(url)
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            headers.update(sign(self._secret, "POST", path or "/", body))
        timeout = aiohttp.ClientTimeout(total=self._config.webhook_timeout_s)
        try:
            async with self._http.post(url, data=body, headers=headers,
                                       timeout=timeout) as response:
                status, text = response.status, (await response.text())[:200]
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise NetworkError(f"POST {url} failed: {exc or type(exc).__name__}") from None
        if status >= 500 or status == 429:
            raise NetworkError(f"POST {url} answered {status}: {text}")
        if status >= 400:
            raise WebhookRefusedError(f"POST {url} answered {status}: {text}")
