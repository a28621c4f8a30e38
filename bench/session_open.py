"""A run's session open through the controller: with a warm session on the agent, and cold."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from procs import AgentProcess

from bench.cluster import agent_sandbox, controller, controller_config
from bench.report import Section, Table, Target, fmt, p50, spread
from kowalski.common.errors import KowalskiError
from kowalski.controller.fleet.dispatch import Dispatcher
from kowalski.controller.fleet.sessions import RemoteSession
from kowalski.controller.service import Controller

TARGET_MS = 5.0
# The RLM benchmark's context: a short text.
SMALL_CONTEXT = "word " * 200
# A larger context: the same upload path (body, file, second init) takes longer.
LARGE_CONTEXT = "word " * 200_000


async def _warm_ready(running: Controller, url: str, wanted: int) -> bool:
    try:
        beat = await running.dispatcher.agents.heartbeat(url, timeout_s=5)
    except KowalskiError:
        return False
    return beat.warm_sessions >= wanted


async def _open_ms(dispatcher: Dispatcher, number: int, context: str) -> tuple[float, bool]:
    """Milliseconds to open one run's session, and whether the agent gave a warm one."""
    session = RemoteSession(dispatcher=dispatcher, session_id=f"bench-open-{number}",
                            context=context, llm_callback=None, timeout_s=60)
    started = time.perf_counter()
    await session.open()
    elapsed_ms = (time.perf_counter() - started) * 1000
    result = await session.execute("print(len(context))")
    await session.close()
    if result.stdout != f"{len(context)}\n":
        raise RuntimeError(f"the session saw another context: {result.stdout!r}")
    return elapsed_ms, session.warm


async def _series(tmp: Path, name: str, warm_sessions: int, samples: int
                  ) -> dict[str, list[float]]:
    """Open times (ms) per context size on one agent with warm_sessions; warm opens only."""
    agent = AgentProcess(tmp, name=name, sandbox=agent_sandbox(),
                         agent={"warm_sessions": warm_sessions})
    await agent.start(timeout_s=60)
    times: dict[str, list[float]] = {"small": [], "large": []}
    try:
        config = controller_config(tmp / name, agents=[f"127.0.0.1:{agent.port}"])
        async with controller(config, expect_agents=1) as running:
            number = 0
            # One open of each first, to warm the HTTP and sandbox paths; not counted.
            for round_number in range(samples + 1):
                for size, context in (("small", SMALL_CONTEXT), ("large", LARGE_CONTEXT)):
                    if warm_sessions:
                        # A run that arrives after the pool refilled, as runs a few
                        # seconds apart do.
                        await _await_refill(running, agent.url)
                    number += 1
                    elapsed_ms, warm = await _open_ms(running.dispatcher, number, context)
                    if warm != bool(warm_sessions):
                        raise RuntimeError(f"open {number} warm={warm}, expected "
                                           f"{bool(warm_sessions)}")
                    if round_number:
                        times[size].append(elapsed_ms)
    finally:
        await agent.stop()
    return times


async def _await_refill(running: Controller, url: str) -> None:
    async def ready() -> bool:
        return await _warm_ready(running, url, 1)

    deadline = time.monotonic() + 30
    while not await ready():
        if time.monotonic() > deadline:
            raise RuntimeError("the agent did not refill its warm session within 30 s")
        await asyncio.sleep(0.02)


async def measure(tmp: Path, quick: bool) -> list[Section]:
    samples = 3 if quick else 30
    warm = await _series(tmp, "warm", 1, samples)
    cold = await _series(tmp, "cold", 0, samples)
    speedup = p50(cold["small"]) / p50(warm["small"])
    return [Section(
        key="session_open", title="A run's session open, warm and cold",
        method=(
            f"{samples} session opens per row, each as an RLM run opens its session: a "
            "`RemoteSession.open()` through the controller's dispatcher to one agent process "
            "with the shipped sandbox limits, timed from the call to its return; the session "
            "then runs one cell that checks it holds its context, and is closed. Warm: the "
            "agent keeps `agent.warm_sessions = 1`, and each open waits until the pool has "
            "refilled (as runs that arrive a few seconds apart find it); the agent adopts the "
            "warm session and loads the context into it. Cold: `agent.warm_sessions = 0`, "
            "every open starts the session's sandboxed process. The small context is 1 KB "
            "of text (the RLM benchmark's), the large one 1 MB; both go the same way "
            "(request body, then a file in the session's work dir). One open of each kind "
            "first is not counted."),
        tables=[Table(headers=["session open", "ms: p50 (p90, min-max)"], rows=[
            ["warm, 1 KB context", spread(warm["small"], 2)],
            ["cold, 1 KB context", spread(cold["small"], 2)],
            ["warm, 1 MB context", spread(warm["large"], 2)],
            ["cold, 1 MB context", spread(cold["large"], 2)],
        ])],
        targets=[Target("warm session open p50", p50(warm["small"]), TARGET_MS, "ms")],
        notes=[f"cold / warm p50 with the 1 KB context: {fmt(speedup, 1)}x."],
        raw={"warm open 1 KB (ms)": warm["small"], "cold open 1 KB (ms)": cold["small"],
             "warm open 1 MB (ms)": warm["large"], "cold open 1 MB (ms)": cold["large"]},
    )]
