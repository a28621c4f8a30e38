"""A short model outage in the middle of a batch: items that fail, and the wall time it costs."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from aiohttp import ClientSession
from exo_standin import DEFAULT_MODEL, ExoStandin, FlakyServer

from bench.report import Section, Table, Target, fmt
from kowalski.common.config import ControllerConfig, ExoConfig
from kowalski.controller.batch.files import read_batch
from kowalski.controller.batch.runner import BatchRun, run_batch
from kowalski.controller.circuit import CircuitPolicy
from kowalski.controller.models.router import LlmRouter
from kowalski.controller.retry import RetryPolicy

CONCURRENCY = 16
ANSWER_S = 0.02
OUTAGE_S = 3.0


async def _batch(total: int, outage: bool) -> tuple[BatchRun, float, float]:
    """One batch at the shipped settings; (its run, wall seconds, seconds the endpoint was down)."""
    answered = [0]
    fifth = asyncio.Event()

    async def reply(body: dict[str, Any]) -> str:
        await asyncio.sleep(ANSWER_S)
        answered[0] += 1
        if answered[0] >= total // 5:
            fifth.set()
        return f"An answer to: {body['messages'][-1]['content']}"

    standin = ExoStandin(reply=reply)
    standin.set_model(DEFAULT_MODEL)
    endpoint = FlakyServer(standin)
    await endpoint.up()
    url = f"http://127.0.0.1:{endpoint.port}"
    settings, exo = ControllerConfig(), ExoConfig(endpoints=[url])
    lines = "\n".join(f'{{"id": "q{n}", "prompt": "question {n}", "temperature": 0}}'
                      for n in range(total))
    items = read_batch(lines.encode(), default_model=DEFAULT_MODEL)
    down_s = [0.0]

    async def go_down_and_back() -> None:
        await fifth.wait()
        went = time.monotonic()
        await endpoint.down()
        await asyncio.sleep(OUTAGE_S)
        await endpoint.up()
        down_s[0] = time.monotonic() - went

    async with ClientSession() as http:
        router = LlmRouter(config=exo, urls=[url], session=http,
                           policy=RetryPolicy.from_config(settings),
                           circuit_policy=CircuitPolicy.from_config(settings),
                           load_penalty=settings.load_penalty)
        refresher = asyncio.create_task(router.run())
        flaky = asyncio.create_task(go_down_and_back()) if outage else None
        try:
            await router.first_probes()
            started = time.monotonic()
            run = await run_batch(items, router, concurrency=CONCURRENCY,
                                  policy=RetryPolicy.from_config(settings))
            wall_s = time.monotonic() - started
            if flaky is not None:
                await flaky
        finally:
            for task in (refresher, flaky):
                if task is not None:
                    task.cancel()
            await asyncio.gather(*(t for t in (refresher, flaky) if t), return_exceptions=True)
            await router.close()
            await endpoint.down()
    return run, wall_s, down_s[0]


async def measure(tmp: Path, quick: bool) -> list[Section]:
    total = 100 if quick else 500
    calm, calm_s, _ = await _batch(total, outage=False)
    stormy, stormy_s, down_s = await _batch(total, outage=True)
    settings = ControllerConfig()
    rows = [
        ["no outage", str(calm.summary.failed), fmt(calm_s), str(calm.summary.retries)],
        [f"{OUTAGE_S:g} s outage", str(stormy.summary.failed), fmt(stormy_s),
         str(stormy.summary.retries)],
    ]
    return [Section(
        key="batch_outage", title=f"A {OUTAGE_S:g}-second model outage in a {total}-item batch",
        method=(
            f"{total} distinct prompts through `run_batch` at concurrency {CONCURRENCY} with the "
            "controller's `LlmRouter` at the shipped `[controller]` and `[exo]` settings "
            f"({settings.retry_max_attempts} attempts, {settings.retry_base_delay_ms} ms base "
            f"back-off, a circuit that opens after {settings.circuit_failure_threshold} failures "
            f"for {settings.circuit_reset_s:g} s), against an exo stand-in in the same process "
            f"answering each chat after {ANSWER_S * 1000:g} ms. In the second run, once a fifth "
            f"of the items are answered, the stand-in closes its listener and its connections, "
            f"stays down {OUTAGE_S:g} s and comes back on the same port."),
        tables=[Table(headers=["run", "failed items", "wall s", "retries"], rows=rows)],
        targets=[Target("failed items in the outage run", float(stormy.summary.failed), 0.0,
                        "items")],
        raw={"wall s (no outage, outage)": [calm_s, stormy_s], "down s": [down_s]},
        notes=[f"The outage cost {fmt(stormy_s - calm_s)} s of wall time: the "
               f"{fmt(down_s)} s it lasted, plus the wait for the circuit to half-open "
               f"{settings.circuit_reset_s:g} s after it opened (`controller.circuit_reset_s`)."],
    )]
