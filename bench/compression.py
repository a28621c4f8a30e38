"""A 33 MB context's time to the agent, plain and compressed, on loopback and at 100 Mbit/s."""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
from procs import SECRET, AgentProcess

from bench.cluster import agent_sandbox
from bench.report import Section, Table, fmt, p50, spread
from kowalski.common import compression
from kowalski.common.client import SignedClient
from kowalski.common.messages import SessionId
from kowalski.controller.fleet.agent_client import AgentClient
from kowalski.controller.fleet.context_body import ContextBody

CONTEXT_BYTES = 33 * 1024 * 1024
RATE_MBIT = 100
_WORDS = ("the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as",
          "by", "at", "from", "his", "her", "it", "an", "were", "are", "which", "this", "be",
          "or", "has", "had", "not", "but", "also", "first", "one", "their", "its", "new",
          "after", "who", "they", "two", "she", "been", "other", "when", "during", "there",
          "all", "into", "time", "may", "years", "more", "most", "only", "over", "city",
          "some", "world", "would", "where", "later", "up", "such", "used", "many", "can",
          "state", "about", "national", "out", "known", "university", "united", "then",
          "made")


def make_context(size_bytes: int, seed: int = 7) -> str:
    """Prose-like text: common words with numbers and names, about 2.5x smaller with zstd."""
    rng = random.Random(seed)
    parts: list[str] = []
    total = 0
    while total < size_bytes:
        sentence = " ".join(rng.choice(_WORDS) if rng.random() < 0.85 else
                            f"{rng.choice(_WORDS).title()}{rng.randrange(10_000)}"
                            for _ in range(rng.randrange(8, 25)))
        parts.append(sentence.capitalize() + ". ")
        total += len(sentence) + 2
    return "".join(parts)[:size_bytes]


def _ip(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=10)


def shaped_link_unavailable() -> str | None:
    """Why a rate-limited veth pair cannot be made here, or None."""
    if os.geteuid() != 0:
        return "a network namespace and tc need root"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    return f"{', '.join(missing)} not installed" if missing else None


def _make_link(namespace: str, outside: str, inside: str, prefix: str, rate_mbit: int) -> None:
    _ip("ip", "netns", "add", namespace)
    _ip("ip", "-n", namespace, "link", "set", "lo", "up")
    _ip("ip", "link", "add", outside, "type", "veth", "peer", "name", inside,
        "netns", namespace)
    _ip("ip", "addr", "add", f"{prefix}.1/30", "dev", outside)
    _ip("ip", "-n", namespace, "addr", "add", f"{prefix}.2/30", "dev", inside)
    _ip("ip", "link", "set", outside, "up")
    _ip("ip", "-n", namespace, "link", "set", inside, "up")
    # A token bucket on each end's egress: requests and answers both see the rate.
    for tc, device in ((("tc",), outside), (("tc", "-n", namespace), inside)):
        _ip(*tc, "qdisc", "add", "dev", device, "root", "tbf",
            "rate", f"{rate_mbit}mbit", "burst", "64kb", "latency", "100ms")


def _remove_link(namespace: str, outside: str) -> None:
    subprocess.run(["ip", "link", "del", outside], capture_output=True, timeout=10)
    subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=10)


@asynccontextmanager
async def shaped_namespace(rate_mbit: int) -> AsyncIterator[tuple[str, str]]:
    """A namespace cabled to this host by a veth pair limited to rate_mbit both ways.

    Yields (namespace, the namespace's address).
    """
    tag = secrets.token_hex(3)
    namespace, outside, inside = f"kwb{tag}", f"kwb{tag}o", f"kwb{tag}i"
    prefix = f"10.{150 + secrets.randbelow(40)}.{secrets.randbelow(250)}"
    try:
        await asyncio.to_thread(_make_link, namespace, outside, inside, prefix, rate_mbit)
        yield namespace, f"{prefix}.2"
    finally:
        await asyncio.to_thread(_remove_link, namespace, outside)


async def _send_times(agent: AgentProcess, context: str, repeats: int
                      ) -> dict[str, list[float]]:
    """Seconds to create a session holding context, per encoding, taking turns."""
    variants = {"plain": (), **{name: (name,) for name in compression.SUPPORTED}}
    times: dict[str, list[float]] = {name: [] for name in variants}
    async with aiohttp.ClientSession() as http:
        clients = {name: AgentClient(SignedClient(http, secret=SECRET.encode(),
                                                  encodings=encodings, compress_loopback=True))
                   for name, encodings in variants.items()}
        for client in clients.values():
            # The first answer tells each client what the agent decodes.
            await client.heartbeat(agent.url, timeout_s=10)
        for round_number in range(repeats + 1):
            for name, client in clients.items():
                session_id = SessionId(f"bench-{name}-{round_number}")
                started = time.perf_counter()
                body = await ContextBody.of(context)
                await client.open_session(agent.url, session_id, body, None, timeout_s=300)
                elapsed = time.perf_counter() - started
                await client.delete_session(agent.url, session_id, timeout_s=30)
                if round_number:  # the first round warms the agent's interpreters up
                    times[name].append(elapsed)
    return times


async def measure(tmp: Path, quick: bool) -> list[Section]:
    size = 2 * 1024 * 1024 if quick else CONTEXT_BYTES
    repeats = 1 if quick else 5
    context = make_context(size)
    body = context.encode()
    sizes: dict[str, int] = {"plain": len(body)}
    encode_ms: dict[str, float] = {}
    for name in compression.SUPPORTED:
        started = time.perf_counter()
        sizes[name] = len(await asyncio.to_thread(compression.compress, body, name))
        encode_ms[name] = (time.perf_counter() - started) * 1000
    links: dict[str, dict[str, list[float]]] = {}
    notes: list[str] = []
    agent = AgentProcess(tmp, name="loopback", sandbox=agent_sandbox())
    await agent.start(timeout_s=60)
    try:
        links["loopback"] = await _send_times(agent, context, repeats)
    finally:
        await agent.stop()
    reason = shaped_link_unavailable()
    if reason is None:
        async with shaped_namespace(RATE_MBIT) as (namespace, address):
            shaped = AgentProcess(tmp, name="shaped", netns=namespace, host=address,
                                  sandbox=agent_sandbox())
            await shaped.start(timeout_s=60)
            try:
                links[f"{RATE_MBIT} Mbit/s veth"] = await _send_times(shaped, context, repeats)
            finally:
                await shaped.stop()
    else:
        notes.append(f"No rate-limited link: {reason}.")
    rows = []
    for link, times in links.items():
        plain = p50(times["plain"])
        for name, samples in times.items():
            rows.append([link, name, f"{sizes[name] / 1e6:.1f}",
                         fmt(encode_ms[name]) if name in encode_ms else "",
                         spread(samples), fmt(plain / p50(samples))])
    return [Section(
        key="compression", title="A large context's time to the agent, plain and compressed",
        method=(
            f"A {size / 2**20:.0f} MiB prose-like context (common words, names and numbers, "
            "seeded) sent to one real agent process as a session's body, the way the "
            "controller opens sessions (`ContextBody.of`, then `AgentClient.open_session`: "
            "the str's UTF-8 bytes), timed from the call to the agent's answer (the agent "
            "writes the body as it arrives, checks its signature, decodes it when compressed, "
            "starts the session's interpreter and hands it the context), once per "
            "encoding in turn, after one warm-up round. The client's encodings are chosen "
            "with `SignedClient(encodings=..., compress_loopback=True)` (by default the "
            "client sends plain bodies to this host, for the reason the loopback rows show). "
            "On loopback, and through a veth pair into a "
            f"network namespace with a `tc` token bucket of {RATE_MBIT} Mbit/s each way. "
            f"Encoding time is `compression.compress` alone, once, in this process."),
        tables=[Table(headers=["link", "encoding", "body MB on the wire", "encode ms",
                               "s: p50 (p90, min-max)", "speed-up"], rows=rows,
                      caption="speed-up: plain p50 over this encoding's p50")],
        raw={f"{link} {name} (s)": samples for link, times in links.items()
             for name, samples in times.items()},
        notes=notes)]
