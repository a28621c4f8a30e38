"""A batch of prompts against a stand-in endpoint with fixed latency: wall time vs. the ideal."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import aiohttp
import psutil

from bench.cluster import controller, controller_config, start_standin
from bench.report import Section, Table, Target, fmt, p50
from bench.standin import MODEL
from kowalski.controller.batch.runner import BatchItem, run_batch
from kowalski.controller.models.cache import CachedBackend, ResultCache
from kowalski.controller.models.chat_types import ChatMessage, ChatRequest
from kowalski.controller.models.router import LlmRouter

T = TypeVar("T")
LATENCY_MS = 50.0
CONCURRENCY = 64
TARGET_RATIO = 1.1


def _items(count: int, tag: str) -> list[BatchItem]:
    # Temperature 0: only deterministic requests may be answered from the cache.
    return [BatchItem(id=f"{tag}-{n}", index=n, line=n + 1, request=ChatRequest(
        model=MODEL, messages=[ChatMessage(role="user", content=f"{tag}: question {n}")],
        temperature=0.0)) for n in range(count)]


async def _bare(url: str, count: int, tag: str) -> float:
    """The same requests from plain aiohttp with the same concurrency: seconds."""
    pending = list(range(count))

    async def worker(session: aiohttp.ClientSession) -> None:
        while pending:
            n = pending.pop()
            body = {"model": MODEL, "messages": [{"role": "user", "content": f"{tag}: {n}"}]}
            async with session.post(url + "/v1/chat/completions", json=body) as response:
                response.raise_for_status()
                await response.read()

    started = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(min(CONCURRENCY, count))))
    return time.perf_counter() - started


async def _batch(router: LlmRouter, cache: ResultCache, items: list[BatchItem]) -> float:
    run = await run_batch(items, CachedBackend(router, cache), concurrency=CONCURRENCY)
    if run.summary.failed:
        failure = next(result for result in run.results if not result.ok)
        raise RuntimeError(f"{run.summary.failed} items failed, e.g. {failure}")
    return run.summary.wall_s


class _Cpu:
    """CPU cores used by the stand-in and by this process (the controller) during a call."""

    def __init__(self, standin_pid: int) -> None:
        self._standin = psutil.Process(standin_pid)
        self._self = psutil.Process()
        self.standin: list[float] = []
        self.harness: list[float] = []

    async def measure(self, call: Awaitable[T]) -> T:
        before = (self._standin.cpu_times(), self._self.cpu_times(), time.perf_counter())
        result = await call
        elapsed = time.perf_counter() - before[2]
        for process, start, samples in ((self._standin, before[0], self.standin),
                                        (self._self, before[1], self.harness)):
            now = process.cpu_times()
            samples.append((now.user + now.system - start.user - start.system) / elapsed)
        return result


async def measure(tmp: Path, quick: bool) -> list[Section]:
    count, repeats = (128, 1) if quick else (1000, 3)
    ideal_s = count / CONCURRENCY * LATENCY_MS / 1000
    standin, url = await start_standin(tmp, latency_ms=LATENCY_MS)
    cold: list[float] = []
    warm: list[float] = []
    bare: list[float] = []
    try:
        config = controller_config(tmp, exo_urls=[url])
        async with controller(config) as running:
            await running.router.first_probes()
            if MODEL not in running.router.ready_models():
                raise RuntimeError(f"the stand-in at {url} has no {MODEL} ready")
            bare_cpu, cold_cpu = _Cpu(standin.pid), _Cpu(standin.pid)
            for number in range(repeats):
                bare.append(await bare_cpu.measure(_bare(url, count, f"bare{number}")))
                cache = ResultCache.from_config(config.exo)
                items = _items(count, f"run{number}")
                cold.append(await cold_cpu.measure(_batch(running.router, cache, items)))
                warm.append(await _batch(running.router, cache, items))
                if cache.stats().hits < count:
                    raise RuntimeError(f"the warm run hit the cache {cache.stats().hits} times")
    finally:
        await standin.stop()
    ratio = p50(cold) / ideal_s
    # The stand-in answers on one event loop: a wave's answers are built one after another.
    serial_ms = p50(bare_cpu.standin) * p50(bare) / count * 1000
    waves = -(-count // CONCURRENCY)
    with_serial_s = waves * (LATENCY_MS + CONCURRENCY * serial_ms) / 1000
    notes = [
        f"CPU in use during the plain client's run: stand-in {fmt(p50(bare_cpu.standin))} "
        f"cores, client {fmt(p50(bare_cpu.harness))}; during the cold batch: stand-in "
        f"{fmt(p50(cold_cpu.standin))}, controller {fmt(p50(cold_cpu.harness))} "
        f"(p50; this machine has {psutil.cpu_count()} cores). The stand-in spends "
        f"{fmt(serial_ms, 3)} ms of CPU per answer.",
        f"The server's own floor, the plain aiohttp client sending the same number of prompts "
        f"{CONCURRENCY} at a time in the same rounds: {fmt(p50(bare), 3)} s "
        f"({fmt(p50(bare) / ideal_s)}x ideal), so the batch takes "
        f"{fmt(p50(cold) / p50(bare))}x what this server allows."]
    if ratio > TARGET_RATIO:
        excess_s, plain_excess_s = p50(cold) - ideal_s, p50(bare) - ideal_s
        notes.append(
            f"Why the target is missed: of the batch's {fmt(excess_s, 3)} s over the ideal, "
            f"{fmt(plain_excess_s, 3)} s ({fmt(100 * plain_excess_s / excess_s, 0)} %) are "
            "there with a plain aiohttp client too, so most of the gap is in the endpoint and "
            "the HTTP exchange rather than in the batch path"
            if plain_excess_s > excess_s / 2 else
            f"Why the target is missed: of the batch's {fmt(excess_s, 3)} s over the ideal, "
            f"only {fmt(plain_excess_s, 3)} s are there with a plain aiohttp client, so most "
            "of the gap is in the batch path (cache, router, client)")
        notes[-1] += (
            f". The ideal counts no time for answering. The stand-in answers on one event "
            f"loop: the {CONCURRENCY} requests of a wave arrive together, wait "
            f"{LATENCY_MS:g} ms together, and are then answered one after another, "
            f"{fmt(serial_ms, 3)} ms each; {waves} waves of {LATENCY_MS:g} ms + "
            f"{CONCURRENCY} x {fmt(serial_ms, 3)} ms come to {fmt(with_serial_s, 3)} s.")
    rows = [
        ["ideal: n / concurrency x latency", fmt(ideal_s, 3), "1.00",
         fmt(count / ideal_s, 0)],
        ["ideal plus the stand-in's serial work per wave", fmt(with_serial_s, 3),
         fmt(with_serial_s / ideal_s), fmt(count / with_serial_s, 0)],
        ["plain aiohttp client, same concurrency", fmt(p50(bare), 3),
         fmt(p50(bare) / ideal_s), fmt(count / p50(bare), 0)],
        ["`run_batch` → cache → router → stand-in (cold cache)", fmt(p50(cold), 3),
         fmt(ratio), fmt(count / p50(cold), 0)],
        ["the same batch again (warm cache)", fmt(p50(warm), 4), fmt(p50(warm) / ideal_s, 4),
         fmt(count / p50(warm), 0)],
    ]
    return [Section(
        key="batch", title="Batch of prompts against a 50 ms endpoint",
        method=(
            f"{count} distinct prompts through `run_batch` at concurrency {CONCURRENCY}, with "
            "the controller's `CachedBackend` over its `LlmRouter`, against the exo stand-in "
            f"running as a separate process that answers each chat after {LATENCY_MS:g} ms. "
            f"Ideal wall time: {count} / {CONCURRENCY} x {LATENCY_MS:g} ms = "
            f"{ideal_s * 1000:.1f} ms (whole waves would take "
            f"{-(-count // CONCURRENCY) * LATENCY_MS:g} ms). Then the same items again, all "
            f"answered by the cache. {repeats} rounds, each with fresh prompts and a fresh "
            "cache; a plain aiohttp client sends the same number of requests as a baseline "
            "for the stand-in and HTTP alone."),
        tables=[Table(headers=["what", "wall s (p50)", "x ideal", "items/s"], rows=rows)],
        targets=[Target("cold batch wall / ideal", ratio, TARGET_RATIO, "x")],
        raw={"cold batch (s)": cold, "warm batch (s)": warm, "plain aiohttp (s)": bare},
        notes=notes,
    )]
