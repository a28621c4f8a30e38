"""Controller time per RLM iteration, with the model's and the code's time taken out."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.cluster import agents, controller, controller_config
from bench.report import Section, Table, Target, fmt, p50, percentile, spread
from kowalski.common.config import RlmConfig
from kowalski.controller.fleet.dispatch import Dispatcher
from kowalski.controller.fleet.sessions import RemoteSession
from kowalski.controller.models.chat_types import ChatRequest, ChatResult, Usage
from kowalski.controller.rlm.events import IterationStarted, RlmEvent
from kowalski.controller.rlm.loop import RlmRun

TARGET_MS = 2.0


class InstantModel:
    """A scripted model in the harness process: a cheap code block per turn, then FINAL."""

    def __init__(self, turns: int) -> None:
        self.turns = turns
        self.calls = 0

    async def chat(self, request: ChatRequest, *, operation: str = "llm_inference"
                   ) -> ChatResult:
        self.calls += 1
        turn = sum(1 for message in request.messages if message.role == "assistant") + 1
        if turn < self.turns:
            text = (f"Step {turn}: keep a running note.\n\n```repl\nnote_{turn} = {turn} * 2\n"
                    "```")
        else:
            text = "FINAL(done)"
        return ChatResult(text=text, finish_reason="stop",
                          usage=Usage(prompt_tokens=100, completion_tokens=20,
                                      total_tokens=120),
                          latency_ms=0.0, endpoint="instant", id=f"instant-{self.calls}")


class _Clock:
    """Observer that notes when each iteration starts."""

    def __init__(self) -> None:
        self.starts: dict[int, float] = {}

    def __call__(self, event: RlmEvent) -> None:
        if isinstance(event, IterationStarted):
            self.starts[event.iteration] = time.perf_counter()


async def _one_run(dispatcher: Dispatcher, tmp: Path, number: int, turns: int
                   ) -> tuple[list[float], list[float], list[float]]:
    """(overhead, model, code) milliseconds for each iteration but the last of one run."""
    clock = _Clock()

    async def open_session(context: Any, run: RlmRun) -> RemoteSession:
        session = RemoteSession(dispatcher=dispatcher, session_id=run.run_id, context=context,
                                llm_callback=None, timeout_s=60)
        await session.open()
        return session

    config = RlmConfig(trajectory_dir=str(tmp / "runs"), max_iterations=turns)
    run = RlmRun("Summarise the context.", "word " * 200, backend=InstantModel(turns),
                 session_factory=open_session, config=config, model="instant",
                 observer=clock, run_id=f"bench-rlm-{number}")
    result = await run.run()
    if result.stop_reason != "final" or result.iterations != turns:
        raise RuntimeError(f"the run stopped with {result.stop_reason} after "
                           f"{result.iterations} iterations: {result.detail}")
    overhead, model, code = [], [], []
    # The last iteration's end is the run's clean-up (closing the session), so it is left out.
    for step in result.steps[:-1]:
        wall_ms = (clock.starts[step.iteration + 1] - clock.starts[step.iteration]) * 1000
        overhead.append(wall_ms - step.model_ms - step.code_ms)
        model.append(step.model_ms)
        code.append(step.code_ms)
    return overhead, model, code


async def measure(tmp: Path, quick: bool) -> list[Section]:
    runs, turns = (1, 6) if quick else (10, RlmConfig().max_iterations)
    overhead: list[float] = []
    model: list[float] = []
    code: list[float] = []
    async with agents(tmp, 1) as started:
        config = controller_config(tmp, agents=[f"127.0.0.1:{started[0].port}"])
        async with controller(config, expect_agents=1) as running:
            # One run first to warm the session path; its figures are not counted.
            await _one_run(running.dispatcher, tmp, 0, 3)
            for number in range(1, runs + 1):
                got = await _one_run(running.dispatcher, tmp, number, turns)
                overhead += got[0]
                model += got[1]
                code += got[2]
    return [Section(
        key="rlm", title="Controller overhead per RLM iteration",
        method=(
            f"{runs} RLM runs of {turns} iterations (`RlmRun` with the default RLM config), "
            "each with a scripted model answering instantly in the harness process and a "
            "real persistent session on one agent process through the controller's "
            "dispatcher. Every reply but the last holds one small ```repl block. Per "
            "iteration: the time from one `IterationStarted` event to the next, minus the "
            "step's `model_ms` and `code_ms` from the result (code time includes the HTTP "
            "round trip to the agent). What is left is the loop's own work: prompts, the "
            "fold check, code-block parsing, FINAL detection, events and the trajectory "
            "line written off the event loop."),
        tables=[Table(headers=["per iteration", "ms: p50 (p90, min-max)"], rows=[
            ["controller overhead", spread(overhead, 3)],
            ["model (instant, in-process)", spread(model, 3)],
            ["code (session cell via the agent)", spread(code, 3)],
        ])],
        targets=[Target("overhead per iteration p50", p50(overhead), TARGET_MS, "ms")],
        notes=[f"p99 overhead: {fmt(percentile(overhead, 0.99), 3)} ms over "
               f"{len(overhead)} iterations."],
        raw={"overhead (ms)": overhead},
    )]
