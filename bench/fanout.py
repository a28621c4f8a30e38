"""One RLM run's sub-calls fanned out over 1, 2 and 4 model endpoints: throughput and shares.

Also the stand-in endpoint it runs against: `python -m bench.fanout --port-file F`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
from exo_standin import DEFAULT_MODEL, make_exo_app

from bench import serving
from bench.cluster import ServerProcess, agents, controller, controller_config, wait_until
from bench.report import Section, Table, Target, fmt
from kowalski.common.config import EndpointConfig
from kowalski.controller.rlm.events import CodeExecuted, RlmEvent, SubCallAnswered
from kowalski.controller.rlm.runs import RunRequest

LATENCY_MS = 50.0
CAPACITY = 8
SLOW_FACTOR = 5
SUB_CALLS = 400
# At least 0.9 of linear: 4 endpoints take at most 1/0.9 of a quarter of one's time.
SCALING_LIMIT = 1 / 0.9
# The slow endpoint's share of the sub-calls, over its share by speed.
SHARE_LIMIT = 1.5
# The root model's first reply: every sub-call in one llm_query_batched; then FINAL.
FAN_OUT = ("```repl\ntag, count = context.split()\n"
           "answers = llm_query_batched([f'{tag} item {i}' for i in range(int(count))])\n"
           "print(len(answers))\n```")


def reply(body: dict[str, Any]) -> str:
    """The root loop is scripted; a sub-call gets a short answer naming its prompt."""
    messages = body["messages"]
    if messages[0]["role"] != "system":
        return f"seen {str(messages[-1]['content'])[:40]}"
    replied = sum(message["role"] == "assistant" for message in messages)
    return FAN_OUT if replied == 0 else "FINAL(done)"


@asynccontextmanager
async def _endpoints(tmp: Path, latencies_ms: list[float]) -> AsyncIterator[list[str]]:
    """One stand-in process per latency; their base URLs."""
    async with AsyncExitStack() as stack:
        urls = []
        for number, latency_ms in enumerate(latencies_ms):
            process = ServerProcess(tmp, f"fanout{number}-{len(latencies_ms)}")
            stack.push_async_callback(process.stop)
            ports = await process.start(["-m", "bench.fanout", "--port-file",
                                         str(process.port_file), "--latency-ms",
                                         str(latency_ms)])
            urls.append(f"http://127.0.0.1:{ports[0]}")
        yield urls


async def _fan_out(tmp: Path, agent: str, latencies_ms: list[float], calls: int, trials: int
                   ) -> tuple[list[float], Counter[str], list[str]]:
    """Cell seconds per trial, sub-calls answered per endpoint over all trials, the URLs."""
    async with _endpoints(tmp, latencies_ms) as urls:
        base = controller_config(tmp, agents=[agent])
        config = msgspec.structs.replace(
            base,
            exo=msgspec.structs.replace(base.exo, endpoints=[
                EndpointConfig(url=url, max_concurrency=CAPACITY) for url in urls]),
            # The run's own limit leaves the endpoints' capacity as the only bound.
            rlm=msgspec.structs.replace(base.rlm, sub_call_concurrency=CAPACITY * 4))
        seconds: list[float] = []
        shares: Counter[str] = Counter()
        async with controller(config, expect_agents=1) as running:
            router = running.router
            if not await wait_until(lambda: all(e.healthy for e in router.endpoints), 30):
                raise RuntimeError("the stand-in endpoints did not all come up")
            for trial in range(trials):
                events: list[RlmEvent] = []
                # A fresh tag per trial: no answer comes from the controller's cache.
                result = await running.state.runs.run(RunRequest(
                    query="Fan out.", context=f"t{trial}-{len(urls)} {calls}",
                    model=DEFAULT_MODEL), observer=events.append)
                if result.stop_reason != "final":
                    raise RuntimeError(f"the run stopped with {result.stop_reason}: "
                                       f"{result.detail}")
                answered = [e for e in events if isinstance(e, SubCallAnswered)]
                if len(answered) != calls or any(e.error for e in answered):
                    raise RuntimeError(f"{len(answered)} of {calls} sub-calls answered, "
                                       f"{sum(bool(e.error) for e in answered)} failed")
                [cell] = [e for e in events if isinstance(e, CodeExecuted)]
                seconds.append(cell.wall_time_ms / 1000)
                shares.update(e.endpoint for e in answered)
    return seconds, shares, urls


async def measure(tmp: Path, quick: bool) -> list[Section]:
    calls, trials = (80, 1) if quick else (SUB_CALLS, 3)
    rows: list[list[str]] = []
    wall: dict[int, float] = {}
    raw: dict[str, list[float]] = {}
    async with agents(tmp, 1) as started:
        agent = f"127.0.0.1:{started[0].port}"
        for count in (1, 2, 4):
            seconds, _, _ = await _fan_out(tmp, agent, [LATENCY_MS] * count, calls, trials)
            wall[count] = statistics.median(seconds)
            raw[f"{count} endpoints: cell (s)"] = seconds
            ideal = calls / (count * CAPACITY) * LATENCY_MS / 1000
            rows.append([str(count), fmt(wall[count], 3), fmt(calls / wall[count], 0),
                         fmt(wall[1] / wall[count], 2), fmt(ideal, 3)])
        latencies = [LATENCY_MS] * 3 + [LATENCY_MS * SLOW_FACTOR]
        _, shares, urls = await _fan_out(tmp, agent, latencies, calls, trials)
    speeds = [1 / latency for latency in latencies]
    total = sum(shares.values())
    share_rows = []
    for url, latency, speed in zip(urls, latencies, speeds, strict=True):
        share_rows.append([url.rsplit(":", 1)[1], fmt(latency, 0), str(shares[url]),
                           f"{shares[url] / total:.1%}", f"{speed / sum(speeds):.1%}"])
    slow_share = shares[urls[-1]] / total
    fair_share = speeds[-1] / sum(speeds)
    return [Section(
        key="fanout", title="Sub-calls of one run over several endpoints",
        method=(
            f"One RLM run through a controller in the harness process and one agent process; "
            f"the root model's first reply asks {calls} sub-calls in one "
            f"`llm_query_batched`. Each endpoint is an exo stand-in process answering after "
            f"{LATENCY_MS:g} ms, configured with `max_concurrency = {CAPACITY}`; the run's "
            f"`rlm.sub_call_concurrency` is {CAPACITY * 4}, so the endpoints are the bound. "
            f"Time: the fan-out cell's wall time (median of {trials}). Then 4 endpoints, one "
            f"{SLOW_FACTOR}x slower, and how many sub-calls each answered."),
        tables=[
            Table(headers=["endpoints", "cell s", "sub-calls/s", "speed-up", "ideal s"],
                  rows=rows),
            Table(headers=["endpoint port", "ms per answer", "sub-calls", "share",
                           "share by speed"], rows=share_rows,
                  caption=f"4 endpoints, one {SLOW_FACTOR}x slower, {trials} runs"),
        ],
        targets=[
            Target("4 endpoints: time / (1 endpoint's ÷ 4)", wall[4] / (wall[1] / 4),
                   SCALING_LIMIT, "x"),
            Target("slow endpoint's share / its share by speed", slow_share / fair_share,
                   SHARE_LIMIT, "x"),
        ],
        raw=raw,
    )]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout", description=__doc__)
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--latency-ms", type=float, default=LATENCY_MS)
    args = parser.parse_args(argv)
    app = make_exo_app(flavour="v1", models=(DEFAULT_MODEL,), reply=reply,
                       latency_s=args.latency_ms / 1000)
    return serving.run(lambda: serving.serve_sites(app, 1, args.port_file))


if __name__ == "__main__":
    sys.exit(main())
