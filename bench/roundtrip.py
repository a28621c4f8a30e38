"""Sandboxed job round trip (controller → agent → result) against bare process spawns."""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import cast

from bench.cluster import agents, controller, controller_config
from bench.report import Section, Table, Target, fmt, p50, spread
from bench.spawn import (
    PROGRAMS,
    bwrap_argv,
    interleaved,
    run_bare,
    run_process,
    sandboxed_true,
    step_times,
    timed,
)
from kowalski.agent.languages import SYSTEM_PATH, Toolchain
from kowalski.agent.sandbox import Sandbox
from kowalski.common.config import SandboxConfig, SandboxMode
from kowalski.common.messages import JobRequest, Language
from kowalski.controller.fleet.dispatch import Dispatcher
from kowalski.controller.fleet.sessions import RemoteSession

WARM_TARGET_MS = 5.0
COLD_TARGET_RATIO = 1.5


async def _job(dispatcher: Dispatcher, language: str, ids: itertools.count[int]) -> float:
    """One cold job through the dispatcher; returns the agent's own wall time for it."""
    request = JobRequest(job_id=f"bench-{language}-{next(ids)}",
                         language=cast(Language, language), code=PROGRAMS[language])
    result = await dispatcher.run_job(request)
    if result.status != "ok" or result.stdout.strip() != "1":
        raise RuntimeError(f"{language} job ended {result.status}: {result.stderr[-300:]}")
    return result.wall_time_ms or 0.0


async def measure(tmp: Path, quick: bool) -> list[Section]:
    repeats = 5 if quick else 40
    # The mode the benchmark's agents get: bwrap needs root.
    mode: SandboxMode = "bwrap" if os.geteuid() == 0 else "rlimit"
    sandbox = Sandbox(SandboxConfig(mode=mode), work_root=tmp / "sandbox")
    await sandbox.start()
    try:
        python = sandbox.toolchain("python").executable
        true = shutil.which("true", path=SYSTEM_PATH) or "true"
        bwrap = shutil.which("bwrap", path=SYSTEM_PATH)
        agent_side: list[float] = []
        # Every cold job in a sandbox made for it: bench/pool.py measures ready ones.
        async with agents(tmp, 1, pool_size=0) as started:
            config = controller_config(tmp, agents=[f"127.0.0.1:{started[0].port}"])
            async with controller(config, expect_agents=1) as running:
                ids = itertools.count()
                dispatcher = running.dispatcher

                async def cold() -> None:
                    agent_side.append(await _job(dispatcher, "python", ids))

                actions: dict[str, Callable[[], Awaitable[object]]] = {
                    "bare true": lambda: run_process([true]),
                    "bare python": lambda: run_process([python, "-c", "print(1)"]),
                    "sandboxed true": lambda: sandboxed_true(sandbox),
                    "cold job": cold,
                }
                if bwrap:
                    actions["bwrap true"] = lambda: run_process(bwrap_argv(bwrap, [true]))
                spawned = await interleaved(actions, repeats)
                agent_side = agent_side[1:]
                session = RemoteSession(dispatcher=dispatcher, session_id="bench-warm",
                                        context=None, llm_callback=None, timeout_s=60)
                await session.open()
                try:
                    async def cell() -> None:
                        result = await session.execute("print(1)")
                        if result.stdout != "1\n":
                            raise RuntimeError(f"the cell printed {result.stdout!r}")

                    warm_ms = await timed(cell, repeats * 5, warmup=3)
                finally:
                    await session.close()
                languages = await _languages(dispatcher, sandbox, ids, quick)
        steps = await step_times(sandbox, repeats, tmp / "launcher")
    finally:
        await sandbox.close()
    bare_true, bare_python = spawned["bare true"], spawned["bare python"]
    in_sandbox, cold_ms = spawned["sandboxed true"], spawned["cold job"]
    bwrap_true = spawned.get("bwrap true", [])
    setup_ms = p50(in_sandbox) - p50(bare_true)
    baseline_ms = p50(bare_python) + setup_ms
    rows = [
        ["bare `true` spawn", spread(bare_true), ""],
        ["bare `python3 -c 'print(1)'` spawn", spread(bare_python), ""],
        ["`bwrap … true` (namespaces and mounts only)", spread(bwrap_true) if bwrap_true else
         "no bwrap", ""],
        ["sandboxed `true` (work dir, cgroup, launcher, setpriv, bwrap, clean-up)",
         spread(in_sandbox), ""],
        ["sandbox set-up = sandboxed `true` - bare `true`", fmt(setup_ms), ""],
        ["baseline = bare python + sandbox set-up", fmt(baseline_ms), "1.00"],
        ["cold job `print(1)` via dispatcher → agent → result", spread(cold_ms),
         fmt(p50(cold_ms) / baseline_ms)],
        ["  of which inside the agent's sandbox (its wall_time_ms)", spread(agent_side), ""],
        ["warm session cell `print(1)` via controller → agent session", spread(warm_ms),
         fmt(p50(warm_ms) / p50(bare_python))],
    ]
    round_trip = Section(
        key="roundtrip", title="Sandboxed job round trip",
        method=(
            f"One real agent process (sandbox mode `{sandbox.mode}`, shipped limits, no "
            "sandbox pool) and the "
            "controller's services in the harness process at default settings. A cold job is "
            "`Dispatcher.run_job` of a new Python job `print(1)` (new job id each time: a new "
            "sandboxed process); a warm cell is `RemoteSession.execute('print(1)')` on a "
            "persistent session. Baselines are spawned by the same harness with asyncio: a "
            "bare `python3 -c 'print(1)'` with the interpreter the agent resolved, and "
            "`true` bare and through the agent's own `Sandbox.spawn`; the difference is the "
            f"sandbox set-up. {repeats} rounds after one warm-up round, each round running "
            f"every command once in turn ({repeats * 5} cells after three)."),
        tables=[Table(headers=["what", "ms: p50 (p90, min-max)", "ratio"], rows=rows,
                      caption="ratio: cold job over the baseline; warm cell over a bare "
                              "python spawn")],
        targets=[
            Target("warm session cell p50", p50(warm_ms), WARM_TARGET_MS, "ms"),
            Target("cold job p50 / (bare python spawn + sandbox set-up)",
                   p50(cold_ms) / baseline_ms, COLD_TARGET_RATIO, "x"),
        ],
        raw={"bare true (ms)": bare_true, "bare python (ms)": bare_python,
             "bwrap true (ms)": bwrap_true, "sandboxed true (ms)": in_sandbox,
             "cold job (ms)": cold_ms, "cold job inside the agent (ms)": agent_side,
             "warm cell (ms)": warm_ms},
    )
    breakdown = Section(
        key="sandbox_steps", title="Where a sandboxed start spends its time",
        method=(
            "The steps of the agent's own `Sandbox.spawn` of `true`, timed apart in the "
            "harness: the launchers alone (Python with `-I -S`, and the C one the agent "
            "builds where it finds a compiler; exec of `true`), a move into "
            "a fresh job cgroup after an idle gap and right after another move (the kernel "
            "waits out a grace period on the first), on cgroup v1 each launcher moving itself "
            "after an idle gap (as jobs do there), then a sandboxed `true` split into its "
            f"spawn, its run to exit, stop and removal. {repeats} rounds after one warm-up."),
        tables=[Table(headers=["step", "ms: p50 (p90, min-max)"],
                      rows=[[name, spread(values)] for name, values in steps.items()])],
        raw={f"{name} (ms)": values for name, values in steps.items()})
    return [round_trip, languages, breakdown]


async def _languages(dispatcher: Dispatcher, sandbox: Sandbox, ids: itertools.count[int],
                     quick: bool) -> Section:
    rows: list[list[str]] = []
    raw: dict[str, list[float]] = {}
    notes: list[str] = []
    for language in PROGRAMS:
        if language not in sandbox.languages:
            notes.append(f"{language}: not offered here ({sandbox.unavailable.get(language)}).")
            continue
        toolchain = sandbox.toolchain(language)
        slow = language in ("rust", "java")
        repeats = 1 if quick else (5 if slow else 20)
        warmup = 0 if quick and slow else 1

        async def bare_run(toolchain: Toolchain = toolchain) -> None:
            await run_bare(toolchain)

        async def job(language: str = language) -> None:
            await _job(dispatcher, language, ids)

        timings = await interleaved({"bare": bare_run, "cold": job}, repeats, warmup=warmup)
        bare, cold = timings["bare"], timings["cold"]
        raw[f"{language} bare (ms)"] = bare
        raw[f"{language} cold job (ms)"] = cold
        version = toolchain.version.split(" (")[0]
        rows.append([language, version, str(repeats), fmt(p50(bare)), fmt(p50(cold)),
                     fmt(p50(cold) - p50(bare)), fmt(p50(cold) / p50(bare))])
    return Section(
        key="languages", title="Cold jobs per language",
        method=(
            "The same one-line program (print 1) per language as a cold job through the "
            "dispatcher, against the same command run bare by the harness in a temporary "
            "directory (same toolchain and command line, no sandbox, no HTTP), taking turns. "
            "Rust and Java compile in a step of their own (`rustc -C opt-level=1`, `javac`), "
            "then run."),
        tables=[Table(headers=["language", "toolchain", "runs", "bare p50 ms", "cold job p50 ms",
                               "added ms", "ratio"], rows=rows)],
        raw=raw, notes=notes)
