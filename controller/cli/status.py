"""kowalski-ctl status / devices: the live table for people, or JSON for scripts."""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl as ssl_module
import sys

import aiohttp
import msgspec

from kowalski.common.errors import NetworkError, NoControllerError, ParseError
from kowalski.controller.api.status import DeviceStatus, Status


def no_controller(url: str, error: BaseException) -> NoControllerError:
    """The error for a controller URL that does not answer, with the cause in a few words."""
    cause = getattr(error, "os_error", error)
    if isinstance(cause, OSError) and cause.errno:
        why = os.strerror(cause.errno).lower()
    elif isinstance(error, TimeoutError):
        why = "no answer in time"
    else:
        why = str(error) or type(error).__name__
    return NoControllerError(f"no controller answers at {url} ({why})")


async def fetch_status(url: str, *, timeout_s: float = 10.0,
                       ssl: ssl_module.SSLContext | None = None) -> Status:
    try:
        async with aiohttp.ClientSession() as session, session.get(
            url.rstrip("/") + "/v1/status", timeout=aiohttp.ClientTimeout(total=timeout_s),
            ssl=ssl or True,
        ) as response:
            body = await response.read()
            status = response.status
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise no_controller(url, exc) from None
    if status != 200:
        raise NetworkError(f"{url}/v1/status answered {status}: {body[:200]!r}")
    try:
        return msgspec.json.decode(body, type=Status)
    except msgspec.MsgspecError as exc:
        raise ParseError(f"{url}/v1/status: unexpected answer: {exc}") from None


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.1f}G"


def device_table_text(devices: list[DeviceStatus]) -> str:
    header = ("DEVICE", "HEALTH", "SCORE", "MEM FREE", "CPU%", "RTT ms", "JOBS", "CIRCUIT",
              "LANGUAGES")
    rows = [header]
    for d in devices:
        metrics = d.metrics
        rows.append((
            d.device_id, d.health + (" (lost)" if d.lost else ""),
            f"{d.scores.get('code_execution', 0.0):.3f}",
            "-" if metrics is None else
            f"{_gib(metrics.memory_available_bytes)}/{_gib(metrics.memory_total_bytes)}",
            "-" if metrics is None else f"{metrics.cpu_percent:.0f}",
            "-" if d.latency_ms is None else f"{d.latency_ms:.1f}",
            str(len(d.in_flight)), d.circuit, ",".join(d.languages) or "-",
        ))
    if len(rows) == 1:
        return "no devices yet (agents appear over mDNS or from controller.static_agents)\n"
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                   + "\n" for row in rows)


def status_text(status: Status) -> str:
    lines = [device_table_text(status.devices)]
    lines.append("EXO ENDPOINTS")
    # Endpoints reporting the same nodes are one cluster: its machines are counted once.
    clusters: dict[str, int] = {}
    for e in status.endpoints:
        clusters.setdefault(e.cluster or e.url, e.nodes)
    for e in status.endpoints:
        latency = "-" if e.latency_ms is None else f"{e.latency_ms:.1f} ms"
        cluster = f"  cluster {e.cluster} ({e.nodes} nodes)" if e.nodes > 1 else ""
        lines.append(f"  {e.url}  {e.state}  {e.flavour or '?'}  {latency}  circuit {e.circuit}"
                     f"{cluster}  ready: {', '.join(e.ready_models) or 'none'}")
        if e.state == "down" and e.last_error:
            lines.append(f"    {e.last_error}")
    if len(clusters) < len(status.endpoints):
        lines.append(f"  {len(clusters)} clusters, {sum(clusters.values())} nodes")
    if not status.endpoints:
        lines.append("  none")
    jobs = status.jobs
    lines.append(f"JOBS  submitted {jobs.submitted}  ok {jobs.succeeded}  failed {jobs.failed}"
                 f"  rerouted {jobs.rerouted}")
    running = [r for r in status.runs if r.status == "running"]
    lines.append(f"RLM RUNS  {len(status.runs)} recent, {len(running)} running")
    return "\n".join(lines) + "\n"


def run_status(args: argparse.Namespace, *, devices_only: bool,
               ssl: ssl_module.SSLContext | None = None) -> int:
    status = asyncio.run(fetch_status(args.url, ssl=ssl))
    if args.json:
        payload = status.devices if devices_only else status
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(payload)).decode() + "\n")
    else:
        sys.stdout.write(device_table_text(status.devices) if devices_only
                         else status_text(status))
    return 0
