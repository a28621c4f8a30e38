"""Kowalski side by side with the reference rlm (`rlms` from PyPI) on one scripted model.

Also the scripted model server both talk to: `python -m bench.peer --port-file F`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from exo_standin import DEFAULT_MODEL

from bench import REPO_ROOT, scripted_model, serving
from bench.cluster import ServerProcess, agents, controller, controller_config, wait_until
from bench.compression import make_context
from bench.peer_driver import RESULT_PREFIX
from bench.report import Section, Table, Target, fmt
from kowalski.common.config import EndpointConfig
from kowalski.controller.rlm.events import CodeExecuted, RlmEvent, SessionOpened
from kowalski.controller.rlm.runs import RunRequest
from kowalski.controller.service import Controller

REFERENCE = "rlms==0.1.3"
REFERENCE_ENV = REPO_ROOT / ".bench-env" / "rlms-0.1.3"
INSTALL_TIMEOUT_S = 300.0
SUB_CALL_MS = 50.0
# The reference's llm_query_batched runs 16 sub-calls at a time; Kowalski's run is given 16.
SUB_CALL_CONCURRENCY = 16
FAN_OUT = 200
ITERATIONS = 19
CONTEXT_BYTES = 33 * 1024 * 1024
QUICK_CONTEXT_BYTES = 1024 * 1024
# Kowalski over the reference, at most: 3x faster per iteration, half the time on 33 MB.
ITERATION_LIMIT = 1 / 3
CONTEXT_LIMIT = 0.5
FAN_OUT_LIMIT = 1.1
CASE = re.compile(r"peer case (\w+)")


@dataclass(frozen=True)
class Case:
    name: str
    label: str
    answer: str


CASES = [
    Case("iterations", f"(a) {ITERATIONS} small iterations, then the answer",
         str(sum(range(ITERATIONS)))),
    Case("fanout", f"(b) one llm_query_batched of {FAN_OUT} prompts, {SUB_CALL_MS:g} ms each",
         str(FAN_OUT)),
    Case("context", "(c) a large context, one iteration", ""),
]

# The script, by case and by how many replies the root model has given so far. Both sides
# end a run the same way: a cell sets the REPL's answer dict (rlms 0.1.3 has no FINAL_VAR).
_READY = "answer['content'] = {value}\nanswer['ready'] = True"


def root_reply(case: str, turn: int) -> str:
    if case == "iterations":
        code = ("notes = [0]" if turn == 0 else f"notes.append({turn})" if turn < ITERATIONS
                else _READY.format(value="str(sum(notes))"))
    elif case == "fanout":
        code = (f"answers = llm_query_batched([f'{{context}} item {{i}}' "
                f"for i in range({FAN_OUT})])\n"
                + _READY.format(value="str(sum(a.startswith('seen') for a in answers))"))
    else:
        code = _READY.format(value="str(len(context))")
    return f"Turn {turn}.\n\n```repl\n{code}\n```"


async def reply(body: dict[str, Any]) -> str:
    """Root calls (a system message first) follow the script; sub-calls take 50 ms."""
    messages = body["messages"]
    if messages[0]["role"] != "system":
        await asyncio.sleep(SUB_CALL_MS / 1000)
        return f"seen {str(messages[-1]['content'])[:40]}"
    text = " ".join(str(message.get("content", "")) for message in messages)
    found = CASE.search(text)
    case = found.group(1) if found else "context"
    return root_reply(case, sum(message["role"] == "assistant" for message in messages))


async def build_reference() -> tuple[Path | None, str]:
    """The reference's own venv, built once; its python, or None and why not."""
    python, marker = REFERENCE_ENV / "bin" / "python", REFERENCE_ENV / "installed"
    if marker.exists() and marker.read_text() == REFERENCE:
        return python, ""
    steps = [[sys.executable, "-m", "venv", "--clear", str(REFERENCE_ENV)],
             [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
              REFERENCE]]
    for step in steps:
        process = await asyncio.create_subprocess_exec(
            *step, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            output, _ = await asyncio.wait_for(process.communicate(), INSTALL_TIMEOUT_S)
        except TimeoutError:
            process.kill()
            await process.wait()
            return None, f"installing {REFERENCE} took over {INSTALL_TIMEOUT_S:g} s"
        if process.returncode != 0:
            lines = [line for line in output.decode(errors="replace").splitlines()
                     if line.strip() and not line.startswith("WARNING")]
            return None, (f"{REFERENCE} could not be installed ({' '.join(step[-2:])} "
                          f"exited {process.returncode}: {' '.join(lines[-2:])[:300]})")
    marker.write_text(REFERENCE)
    return python, ""


class Reference:
    """The driver process in the reference's venv: one job in, one result out."""

    def __init__(self, python: Path, base_url: str) -> None:
        self.python, self.base_url = python, base_url
        self.process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Reference:
        self.process = await asyncio.create_subprocess_exec(
            str(self.python), str(Path(__file__).with_name("peer_driver.py")),
            f"{self.base_url}/v1", DEFAULT_MODEL, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, limit=1 << 24)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.process is not None
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), 30)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()

    async def run(self, query: str, context_file: Path) -> dict[str, Any]:
        assert self.process is not None
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        job = {"query": query, "context_file": str(context_file)}
        self.process.stdin.write(json.dumps(job).encode() + b"\n")
        await self.process.stdin.drain()
        while line := await self.process.stdout.readline():
            if line.startswith(RESULT_PREFIX.encode()):
                return dict(json.loads(line[len(RESULT_PREFIX):]))
        raise RuntimeError(f"the reference driver exited {await self.process.wait()}")


async def kowalski_run(running: Controller, query: str, context: str) -> dict[str, Any]:
    started = time.perf_counter()
    events: list[RlmEvent] = []
    # When the session holds the context (it opens beside the first model call).
    opened_s: list[float] = []

    def observe(event: RlmEvent) -> None:
        events.append(event)
        if isinstance(event, SessionOpened) and not opened_s:
            opened_s.append(time.perf_counter() - started)

    result = await running.state.runs.run(
        RunRequest(query=query, context=context, model=DEFAULT_MODEL), observer=observe)
    wall_s = time.perf_counter() - started
    if result.stop_reason not in ("final", "answer_dict"):
        raise RuntimeError(f"the Kowalski run stopped with {result.stop_reason}: "
                           f"{result.detail}")
    cells = [event.wall_time_ms / 1000 for event in events if isinstance(event, CodeExecuted)]
    return {"wall_s": wall_s, "answer": result.answer, "cell_s": cells,
            "open_s": opened_s[0]}


@asynccontextmanager
async def model_server(tmp: Path) -> AsyncIterator[str]:
    server = ServerProcess(tmp, "peer-model")
    try:
        ports = await server.start(["-m", "bench.peer", "--port-file", str(server.port_file)])
        yield f"http://127.0.0.1:{ports[0]}"
    finally:
        await server.stop()


def _check(side: str, case: Case, outcome: dict[str, Any], context: str) -> None:
    expected = case.answer or str(len(context))
    if str(outcome["answer"]).strip() != expected:
        raise RuntimeError(f"{side} answered {str(outcome['answer'])[:80]!r} in case "
                           f"{case.name}, not {expected!r}")


async def measure(tmp: Path, quick: bool) -> list[Section]:
    rounds = 1 if quick else 5
    python, why_not = (await build_reference() if not quick or
                       (REFERENCE_ENV / "installed").exists() else
                       (None, "a --quick run does not build the reference's venv"))
    contexts = {"iterations": "", "fanout": "", "context": make_context(
        QUICK_CONTEXT_BYTES if quick else CONTEXT_BYTES)}
    context_file = tmp / "context.txt"
    context_file.write_text(contexts["context"])
    times: dict[tuple[str, str], list[float]] = {}
    fan_out_cells: list[float] = []
    async with model_server(tmp) as url, agents(tmp, 1) as [agent]:
        base = controller_config(tmp, agents=[f"127.0.0.1:{agent.port}"])
        config = msgspec.structs.replace(
            base, exo=msgspec.structs.replace(base.exo, endpoints=[EndpointConfig(url=url)]),
            rlm=msgspec.structs.replace(
                base.rlm, sub_call_concurrency=SUB_CALL_CONCURRENCY, max_iterations=30,
                final_protocol="answer_dict", context_window_tokens=131072))
        async with controller(config, expect_agents=1) as running, \
                _maybe_reference(python, url) as reference:
            if not await wait_until(lambda: all(e.healthy for e in running.router.endpoints),
                                    30):
                raise RuntimeError("the scripted model server did not come up")
            # Round 0 warms both sides up and is not counted.
            for number in range(rounds + 1):
                for case in CASES:
                    await _round(running, reference, case, number, contexts, tmp, times,
                                 fan_out_cells)
                if number:
                    times.setdefault(("fanout", "floor"), []).append(await _floor(url))
    return [_section(times, fan_out_cells, python is not None, why_not, quick, rounds)]


async def _round(running: Controller, reference: Reference | None, case: Case, number: int,
                 contexts: dict[str, str], tmp: Path, times: dict[tuple[str, str], list[float]],
                 fan_out_cells: list[float]) -> None:
    """One case on both sides, the side going first alternating by round."""
    # A fresh tag per round: no answer comes from the controller's cache.
    query = f"Answer the question, peer case {case.name}, round {number}."
    context = contexts[case.name] or f"r{number}"
    context_file = tmp / f"{case.name}-{number}.txt"
    if not contexts[case.name]:
        context_file.write_text(context)
    else:
        context_file = tmp / "context.txt"
    sides = ["kowalski", "reference"] if number % 2 else ["reference", "kowalski"]
    for side in sides:
        if side == "kowalski":
            outcome = await kowalski_run(running, query, context)
        elif reference is not None:
            outcome = await reference.run(query, context_file)
        else:
            continue
        _check(side, case, outcome, context)
        if number:
            times.setdefault((case.name, side), []).append(outcome["wall_s"])
            if side == "kowalski" and case.name == "fanout":
                fan_out_cells.append(max(outcome["cell_s"]))
            if side == "kowalski":
                times.setdefault((case.name, "kowalski session open"), []).append(
                    outcome["open_s"])


@asynccontextmanager
async def _maybe_reference(python: Path | None, url: str) -> AsyncIterator[Reference | None]:
    if python is None:
        yield None
        return
    async with Reference(python, url) as reference:
        yield reference


async def _floor(url: str) -> float:
    """The model server's own floor: a bare client sending the fan-out's prompts, 16 at once."""
    slots = asyncio.Semaphore(SUB_CALL_CONCURRENCY)
    async with aiohttp.ClientSession() as http:

        async def one(number: int) -> None:
            async with slots, http.post(url + "/v1/chat/completions", json={
                    "model": DEFAULT_MODEL,
                    "messages": [{"role": "user", "content": f"floor item {number}"}]}) as answer:
                await answer.read()

        started = time.perf_counter()
        await asyncio.gather(*(one(number) for number in range(FAN_OUT)))
        return time.perf_counter() - started


def _section(times: dict[tuple[str, str], list[float]], fan_out_cells: list[float],
             compared: bool, why_not: str, quick: bool, rounds: int) -> Section:
    median = {key: statistics.median(values) for key, values in times.items()}
    ideal_s = FAN_OUT / SUB_CALL_CONCURRENCY * SUB_CALL_MS / 1000
    size = QUICK_CONTEXT_BYTES if quick else CONTEXT_BYTES
    rows = []
    for case in CASES:
        mine = median[(case.name, "kowalski")]
        theirs = median.get((case.name, "reference"))
        label = case.label.replace("a large context", f"a {size / 2**20:g} MiB context")
        rows.append([label, fmt(mine, 3), fmt(median[(case.name, "kowalski session open")], 3),
                     "" if theirs is None else fmt(theirs, 3),
                     "" if theirs is None else fmt(mine / theirs, 2),
                     "" if theirs is None else fmt(theirs / mine, 1)])
    fan_out_s = statistics.median(fan_out_cells)
    targets = [Target(f"{FAN_OUT}-prompt fan-out cell / ideal", fan_out_s / ideal_s,
                      FAN_OUT_LIMIT, "x")]
    if compared:
        targets = [
            Target("per iteration: Kowalski / reference",
                   median[("iterations", "kowalski")] / median[("iterations", "reference")],
                   ITERATION_LIMIT, "x"),
            *targets,
            Target(f"{size / 2**20:g} MiB context: Kowalski / reference",
                   median[("context", "kowalski")] / median[("context", "reference")],
                   CONTEXT_LIMIT, "x"),
        ]
    floor_s = median.get(("fanout", "floor"), 0.0)
    whole_s = -(-FAN_OUT // SUB_CALL_CONCURRENCY) * SUB_CALL_MS / 1000
    notes = [f"The fan-out cell alone (Kowalski, the `CodeExecuted` wall time): "
             f"{fmt(fan_out_s, 3)} s against the ideal {FAN_OUT} / {SUB_CALL_CONCURRENCY} x "
             f"{SUB_CALL_MS:g} ms = {fmt(ideal_s, 3)} s. The model server's own floor, a bare "
             f"aiohttp client sending the same number of prompts {SUB_CALL_CONCURRENCY} at a "
             f"time to it in the same rounds: {fmt(floor_s, 3)} s, so Kowalski's cell takes "
             f"{fmt(fan_out_s / floor_s if floor_s else 0.0, 2)}x what this server allows. "
             f"Whole calls cannot do better than {-(-FAN_OUT // SUB_CALL_CONCURRENCY)} "
             f"one after another in a slot ({fmt(whole_s, 3)} s, "
             f"{fmt(whole_s / ideal_s, 2)}x); the rest of the floor is the per-request "
             "work of aiohttp's client and server, done one answer after another for each "
             f"wave of {SUB_CALL_CONCURRENCY} that arrives together. The floor is itself "
             f"{fmt(floor_s / ideal_s, 2)}x the ideal: the target of "
             f"{FAN_OUT_LIMIT:g}x leaves a run {fmt(ideal_s * FAN_OUT_LIMIT - floor_s, 3)} s "
             "over a bare client for the rest of its path: the prompts' trip from the "
             "sandbox through the agent to the controller and back (about 2 to 3 ms), the "
             "router, and the records of each sub-call.",
             "Opening the session is the time from the call to the run's `session_opened` "
             "event: the context's trip to the agent (a str as its UTF-8 bytes, signed, "
             "written on the agent while it arrives, checked) and into the sandboxed "
             "interpreter, which the reference does in its own process by writing a file and "
             "reading it back. It overlaps the first model call, so the run's time is less "
             "than this plus the rest."]
    return Section(
        key="peer", title="Side by side with the reference rlm",
        method=(
            f"The same scripted OpenAI-compatible model (`bench/scripted_model.py` in its own "
            "process, aiohttp's low-level server on uvloop; root replies at once, sub-calls "
            f"after {SUB_CALL_MS:g} ms) "
            f"drives both. The reference is `{REFERENCE}` from PyPI in its own venv, one "
            "driver process calling `RLM(backend='openai', environment='local')."
            "completion(context, root_prompt=query)` (the in-process REPL, no sandbox; 16 "
            "sub-calls at a time, its default). Kowalski is a `Controller` in the harness "
            "process with one real agent process: each run opens a sandboxed persistent "
            f"session, `rlm.sub_call_concurrency = {SUB_CALL_CONCURRENCY}`. Both end a run "
            "the same way, a cell that sets `answer['ready']` (the reference 0.1.3 has no "
            "FINAL_VAR). Time: the whole run, from the call to its answer (the reference "
            "sets up its REPL and context, Kowalski its session, in that time). "
            f"{rounds} round{'s' if rounds > 1 else ''} after one warm-up round; in each "
            "round every case runs once per side, the side that goes first alternating. The "
            "answers are checked."),
        tables=[Table(headers=["case", "Kowalski s (p50)", "of which opening the session",
                               "reference s (p50)", "Kowalski / reference", "speed-up"],
                      rows=rows)],
        targets=targets, notes=notes,
        raw={f"{case} {side} (s)": values for (case, side), values in times.items()}
        | {"fan-out cell, Kowalski (s)": fan_out_cells},
        skipped="" if compared else f"the reference did not run: {why_not}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peer", description=__doc__)
    parser.add_argument("--port-file", type=Path, required=True)
    args = parser.parse_args(argv)
    return serving.run(lambda: scripted_model.serve(DEFAULT_MODEL, reply, args.port_file))


if __name__ == "__main__":
    sys.exit(main())
