"""Faults injected into real processes: killed agents, partitions, failing exo, killed batches."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import psutil
import pytest
import tomli_w
from controller_env import controller_config, healthy_ids, running_controller
from exo_standin import CHAT_PATH, DEFAULT_MODEL, STANDIN, ExoStandin, FailMode, make_exo_app
from netns import Lan, make_lan, require_netns
from procs import SECRET, AgentProcess

from kowalski.common.client import SignedClient
from kowalski.common.config import Config
from kowalski.common.messages import DeviceId, Heartbeat, JobRequest, JobResult
from kowalski.common.signing import sign
from kowalski.controller.circuit import CLOSED
from kowalski.controller.fleet.device_table import JobAssigned

pytestmark = pytest.mark.timeout(90)

Server = Any  # pytest-aiohttp's TestServer


async def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def standin(server: Server) -> ExoStandin:
    return server.app[STANDIN]  # type: ignore[no-any-return]


def url_of(server: Server) -> str:
    return str(server.make_url("")).rstrip("/")


async def get_json(base_url: str, path: str) -> Any:
    async with aiohttp.ClientSession() as http, http.get(base_url + path) as response:
        assert response.status == 200
        return await response.json()


async def chat(base_url: str, prompt: str = "ping", *, stream: bool = False) -> tuple[int, Any]:
    """POST /v1/chat/completions; the status and the JSON body (or the SSE text)."""
    body = {"model": DEFAULT_MODEL, "stream": stream,
            "messages": [{"role": "user", "content": prompt}]}
    async with aiohttp.ClientSession() as http, http.post(
            base_url + "/v1/chat/completions", json=body,
            timeout=aiohttp.ClientTimeout(total=30)) as response:
        if stream and response.status == 200:
            return response.status, await response.text()
        return response.status, await response.json()


# --- exo endpoints that fail ------------------------------------------------------------------


@pytest.fixture
async def exo_pair(aiohttp_server: Callable[..., Awaitable[Server]]) -> list[Server]:
    return [await aiohttp_server(make_exo_app(models=(DEFAULT_MODEL,), node_name=name,
                                              reply=lambda body, name=name: f"from {name}"))
            for name in ("bad", "good")]


def exo_config(tmp: Path, urls: list[str]) -> Config:
    """No agents; three attempts per call, circuits that open after two failures."""
    return controller_config(
        [], urls, tmp,
        controller={"retry_max_attempts": 3, "retry_base_delay_ms": 20,
                    "retry_max_delay_ms": 50, "circuit_failure_threshold": 2,
                    "circuit_reset_s": 0.6},
        exo={"request_timeout_s": 1.0, "connect_timeout_s": 1.0, "poll_interval_s": 0.2})


@pytest.mark.parametrize("fault", ["http_500", "malformed_json", "mid_stream_error", "hang",
                                   "slow", "down"])
async def test_a_failing_endpoint_is_routed_around_when_another_serves(
    exo_pair: list[Server], tmp_path: Path, fault: str,
) -> None:
    bad, good = exo_pair
    config = exo_config(tmp_path, [url_of(bad), url_of(good)])
    async with running_controller(config) as running:
        if fault == "down":
            await bad.close()
        elif fault == "slow":
            standin(bad).latency_s = 3.0
        else:
            standin(bad).fail(cast(FailMode, fault))
        # Calls in flight at once spread over both endpoints, so the bad one gets its share;
        # distinct prompts, or the result cache would send only one of them.
        answers = await asyncio.gather(*(chat(running.base_url, f"ping {n}") for n in range(4)))
        assert [status for status, _ in answers] == [200] * 4, answers
        assert {body["choices"][0]["message"]["content"] for _, body in answers} == {"from good"}
        if fault != "down":
            assert standin(bad).counts[CHAT_PATH] >= 1
        # Each prompt was answered once: none lost, none asked twice where it succeeded.
        assert Counter(body["messages"][-1]["content"]
                       for body in standin(good).chat_requests) == {f"ping {n}": 1
                                                                    for n in range(4)}


@pytest.mark.parametrize("fault", ["http_500", "malformed_json", "hang"])
async def test_a_lone_failing_endpoint_fails_clearly_then_its_circuit_opens_and_recovers(
    aiohttp_server: Callable[..., Awaitable[Server]], tmp_path: Path, fault: str,
) -> None:
    server = await aiohttp_server(make_exo_app(models=(DEFAULT_MODEL,)))
    async with running_controller(exo_config(tmp_path, [url_of(server)])) as running:
        standin(server).fail(cast(FailMode, fault))
        status, body = await chat(running.base_url, "first")
        # Two failures open the circuit (threshold 2); the third attempt finds it open.
        assert status == 503, body
        assert "circuit open" in body["error"]["message"]
        assert body["error"]["retryable"] is True
        assert standin(server).counts[CHAT_PATH] == 2
        view = (await get_json(running.base_url, "/v1/status"))["endpoints"][0]
        assert (view["circuit"], view["errors"]) == ("open", 2)
        # While open, calls fail at once without reaching the endpoint.
        status, body = await chat(running.base_url, "second")
        assert status == 503, body
        assert standin(server).counts[CHAT_PATH] == 2
        standin(server).heal()
        opened = time.monotonic()
        while (await get_json(running.base_url, "/v1/status"))["endpoints"][0][
                "circuit"] != "half_open":
            assert time.monotonic() - opened < 3, "the circuit never went half-open"
            await asyncio.sleep(0.05)
        status, body = await chat(running.base_url, "third")
        assert status == 200, body
        assert standin(server).counts[CHAT_PATH] == 3
        view = (await get_json(running.base_url, "/v1/status"))["endpoints"][0]
        assert view["circuit"] == "closed"


async def test_an_error_mid_stream_ends_the_stream_with_an_error_event(
    aiohttp_server: Callable[..., Awaitable[Server]], tmp_path: Path,
) -> None:
    server = await aiohttp_server(make_exo_app(models=(DEFAULT_MODEL,),
                                               reply=lambda body: "one two three"))
    async with running_controller(exo_config(tmp_path, [url_of(server)])) as running:
        status, text = await chat(running.base_url, "healthy", stream=True)
        assert status == 200
        assert text.endswith("data: [DONE]\n\n")
        standin(server).fail("mid_stream_error", times=1)
        status, text = await chat(running.base_url, "broken", stream=True)
        assert status == 200
        events = [json.loads(line.removeprefix("data: ")) for line in text.split("\n\n")
                  if line.startswith("data: {")]
        assert events[0]["choices"][0]["delta"]["content"] == "one "
        assert "runner failed mid-generation" in events[-1]["error"]["message"]
        assert "[DONE]" not in text
        # A stream that cannot start (no endpoint has the model) is a plain error answer.
        standin(server).remove_model(DEFAULT_MODEL)
        await running.router.refresh()
        status, body = await chat(running.base_url, "nowhere", stream=True)
        assert status == 503, body
        assert f"no healthy exo endpoint has {DEFAULT_MODEL!r}" in body["error"]["message"]


# --- agents that die -------------------------------------------------------------------------


@pytest.fixture
def agent_count() -> int:
    return 3


async def test_concurrent_jobs_each_get_one_result_when_an_agent_dies_among_them(
    agents: list[AgentProcess], tmp_path: Path,
) -> None:
    async with running_controller(controller_config(agents, [], tmp_path)) as running:
        cluster = running.cluster
        assert await cluster.wait_for(lambda t: len(healthy_ids(t)) == 3, timeout_s=15)
        # Every third job is short and done before the kill; the others are in flight.
        jobs = [JobRequest(job_id=f"many-{n}", language="python",
                           code=f"import time\ntime.sleep({0.1 if n % 3 == 0 else 2.5})\n"
                                f"print('many-{n}')") for n in range(10)]
        long_ids = {job.job_id for n, job in enumerate(jobs) if n % 3}
        finished_at: dict[str, float] = {}

        async def run(job: JobRequest) -> JobResult:
            result = await running.dispatcher.run_job(job)
            finished_at[job.job_id] = time.monotonic()
            return result

        tasks = [asyncio.create_task(run(job)) for job in jobs]
        await wait_until(lambda: len(finished_at) == len(jobs) - len(long_ids) and {
            job_id for row in cluster.table.devices.values() for job_id in row.in_flight
        } == long_ids, timeout_s=15, what="short jobs done, long jobs running")
        victim_id, victim_row = max(cluster.table.devices.items(),
                                    key=lambda item: len(item[1].in_flight))
        on_victim = set(victim_row.in_flight)
        assert on_victim
        victim = next(agent for agent in agents if agent.agent_id == victim_id)
        await victim.kill()
        killed_at = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 40)
    assert [r.job_id for r in results] == [job.job_id for job in jobs]
    for result in results:
        assert (result.status, result.stdout) == ("ok", f"{result.job_id}\n"), result
        if result.agent_id == victim_id:
            assert finished_at[result.job_id] < killed_at, result
    assert not {r.agent_id for r in results if r.job_id in on_victim} & {victim_id}
    counters = running.dispatcher.counters
    assert (counters.submitted, counters.succeeded, counters.failed) == (10, 10, 0)
    # Only the victim's jobs were sent again, each once.
    assert counters.rerouted == len(on_victim)


# --- a busy agent ------------------------------------------------------------------------------


async def test_a_busy_agent_sends_a_job_submitted_through_the_api_to_another_agent(
    tmp_path: Path,
) -> None:
    busy = AgentProcess(tmp_path, name="busy",
                        agent={"max_concurrent_jobs": 1, "max_queued_jobs": 0})
    spare = AgentProcess(tmp_path, name="spare")
    try:
        for agent in (busy, spare):
            await agent.start()
        # A load penalty larger than any difference in memory or latency: one job that the
        # table counts on the spare agent makes the busy agent the clear first choice.
        config = controller_config([busy, spare], [], tmp_path,
                                   controller={"load_penalty": 1.0})
        async with running_controller(config) as running, aiohttp.ClientSession() as http:
            cluster = running.cluster
            assert await cluster.wait_for(lambda t: len(healthy_ids(t)) == 2, timeout_s=15)
            cluster.apply(JobAssigned(device_id=DeviceId(spare.agent_id), job_id="pinned",
                                      at=cluster.clock()))
            assert running.dispatcher.select("code_execution",
                                             language="python").device_id == busy.agent_id
            # Fill the busy agent's only slot behind the controller's back.
            client = SignedClient(http, secret=SECRET.encode())
            sleeper = asyncio.create_task(client.call(
                "POST", busy.url + "/v1/jobs", JobResult,
                JobRequest(job_id="sleeper", language="bash", code="sleep 4; echo woke"),
                timeout_s=30))
            try:
                async def busy_running() -> bool:
                    beat = await client.call("GET", busy.url + "/v1/heartbeat", Heartbeat,
                                             timeout_s=5)
                    return beat.running_job_ids == ["sleeper"]

                deadline = time.monotonic() + 10
                while not await busy_running():
                    assert time.monotonic() < deadline, "the sleeper never started"
                    await asyncio.sleep(0.05)
                async with http.post(running.base_url + "/v1/jobs", json={
                    "job_id": "rerouted", "language": "python", "code": "print(6 * 7)",
                }) as response:
                    assert response.status == 200, await response.text()
                    result = await response.json()
                assert (result["status"], result["stdout"]) == ("ok", "42\n")
                assert result["agent_id"] == spare.agent_id
                counters = running.dispatcher.counters
                assert (counters.busy, counters.rerouted, counters.succeeded) == (1, 1, 1)
                row = cluster.table.devices[DeviceId(busy.agent_id)]
                assert row.circuit == CLOSED
                assert row.health == "healthy"
                assert (await sleeper).stdout == "woke\n"
            finally:
                sleeper.cancel()
                await asyncio.gather(sleeper, return_exceptions=True)
    finally:
        for agent in (busy, spare):
            await agent.stop()


# --- a batch killed midway -----------------------------------------------------------------


async def test_a_batch_killed_midway_resumes_without_asking_twice(
    aiohttp_server: Callable[..., Awaitable[Server]], tmp_path: Path,
) -> None:
    server = await aiohttp_server(make_exo_app(models=(DEFAULT_MODEL,), latency_s=0.1))
    items = 24
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps({"id": f"item-{n}", "prompt": f"prompt {n}"}) + "\n"
                              for n in range(items)))
    output = tmp_path / "answers.jsonl"
    journal = tmp_path / "answers.jsonl.journal"
    config = tmp_path / "batch.toml"
    config.write_text(tomli_w.dumps({
        "controller": {"discover_mdns": False, "state_dir": str(tmp_path / "state")},
        "exo": {"endpoints": [url_of(server)], "embedded": False, "default_model": DEFAULT_MODEL,
                "poll_interval_s": 0.5, "cache_ttl_s": 0.0},
    }))

    async def batch(*extra: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kowalski.controller", "--config", str(config), "batch",
            str(source), "-o", str(output), "--concurrency", "2", *extra,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def journaled() -> list[dict[str, Any]]:
        text = journal.read_text() if journal.exists() else ""
        return [json.loads(line) for line in text.splitlines() if line.endswith("}")]

    first = await batch()
    await wait_until(lambda: len(journaled()) >= 8 or first.returncode is not None,
                     timeout_s=30, what="eight items in the journal")
    first.send_signal(signal.SIGKILL)
    await first.communicate()
    assert first.returncode == -signal.SIGKILL
    finished = {line["id"] for line in journaled()}
    assert 8 <= len(finished) < items
    assert not output.exists()
    asked_before = len(standin(server).chat_requests)

    second = await batch("--resume")
    _, err = await asyncio.wait_for(second.communicate(), 30)
    assert second.returncode == 0, err.decode()
    asked_again = Counter(body["messages"][-1]["content"].removeprefix("prompt ")
                          for body in standin(server).chat_requests[asked_before:])
    # Finished items are not asked again; every other item is asked exactly once.
    assert set(asked_again) == {str(n) for n in range(items)} - {
        item.removeprefix("item-") for item in finished}
    assert set(asked_again.values()) == {1}
    answers = [json.loads(line) for line in output.read_text().splitlines()]
    assert [answer["id"] for answer in answers] == [f"item-{n}" for n in range(items)]
    assert all(answer["text"] == f"You said: prompt {n}" for n, answer in enumerate(answers))
    assert not journal.exists()


# --- a partitioned agent -------------------------------------------------------------------


@pytest.fixture
def lan() -> Iterator[Lan]:
    require_netns()
    network = make_lan(3)
    yield network
    network.close()


async def in_namespace(lan: Lan, *argv: str, timeout_s: float = 30.0) -> str:
    """Run a command on host 0 of the LAN; its stdout (it must succeed)."""
    process = await asyncio.create_subprocess_exec(
        *lan.exec_argv(0, *argv), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), timeout_s)
    assert process.returncode == 0, err.decode()
    return out.decode()


# Posts a job to the controller from inside its namespace, as a script would.
_POST_JOB = """
import json, sys, urllib.request
request = urllib.request.Request(sys.argv[1] + "/v1/jobs", data=sys.argv[2].encode(),
                                 headers={"Content-Type": "application/json"})
print(urllib.request.urlopen(request, timeout=60).read().decode())
"""


@pytest.mark.netns
async def test_a_job_on_a_partitioned_agent_finishes_elsewhere(lan: Lan, tmp_path: Path) -> None:
    agents = [AgentProcess(tmp_path, name=f"node{i}", netns=lan.names[i], host=lan.address(i))
              for i in (1, 2)]
    for agent in agents:
        await agent.start()
    config = tmp_path / "controller.toml"
    config.write_text(tomli_w.dumps({
        "controller": {"host": lan.address(0), "port": 0, "discover_mdns": False,
                       "static_agents": [f"{a.host}:{a.port}" for a in agents],
                       "heartbeat_interval_s": 0.2, "heartbeat_timeout_s": 0.5,
                       "failure_timeout_s": 1.0, "retry_base_delay_ms": 50,
                       "state_dir": str(tmp_path / "state")},
        "exo": {"embedded": False},
        "security": {"allow_open_api": True},
    }))
    port_file = tmp_path / "controller.port"
    with (tmp_path / "controller.log").open("wb") as log:
        controller = await asyncio.create_subprocess_exec(
            *lan.exec_argv(0, sys.executable, "-m", "kowalski.controller", "--config",
                           str(config), "serve", "--port-file", str(port_file)),
            stdout=log, stderr=log, env={**os.environ, "KOWALSKI_SECRET": SECRET})
    try:
        await wait_until(lambda: port_file.exists() and bool(port_file.read_text().strip()),
                         timeout_s=20, what="the controller to listen")
        url = f"http://{lan.address(0)}:{int(port_file.read_text())}"

        async def devices() -> dict[str, Any]:
            out = await in_namespace(lan, sys.executable, "-m", "kowalski.controller",
                                     "devices", "--json", "--url", url)
            return {device["device_id"]: device for device in json.loads(out)}

        deadline = time.monotonic() + 20
        while (seen := await devices()) and [d["health"] for d in seen.values()] != [
                "healthy"] * 2:
            assert time.monotonic() < deadline, seen
        job = {"job_id": "across-a-cut", "language": "bash", "code": "sleep 2.5; echo done"}
        posted = asyncio.create_task(in_namespace(
            lan, sys.executable, "-c", _POST_JOB, url, json.dumps(job), timeout_s=60))
        deadline = time.monotonic() + 20
        while not (holders := [d for d, row in (await devices()).items()
                               if "across-a-cut" in row["in_flight"]]):
            assert time.monotonic() < deadline, "the job never started"
        victim_id = holders[0]
        index = next(i for i, a in zip((1, 2), agents, strict=True) if a.agent_id == victim_id)
        lan.set_link(index, up=False)
        result = json.loads(await asyncio.wait_for(posted, 60))
        assert (result["status"], result["stdout"]) == ("ok", "done\n")
        assert result["agent_id"] not in (victim_id, ""), result
        assert (await devices())[victim_id]["health"] == "unhealthy"
        lan.set_link(index, up=True)
        deadline = time.monotonic() + 15
        while (await devices())[victim_id]["health"] != "healthy":
            assert time.monotonic() < deadline, "the partitioned agent never came back"
    finally:
        controller.send_signal(signal.SIGTERM)
        await asyncio.wait_for(controller.wait(), 20)
        for agent in agents:
            await agent.stop()


# --- hostile session code against the agent's memory -----------------------------------------

# Cell code that writes straight to the driver's reply pipe (its second argument), 1 MiB at
# a time, as a line with no end or as one enormous, well-formed JSON line.
PIPE_FLOOD = {
    "endless": "import os, sys\nfd = int(sys.argv[2])\nfor _ in range(250):\n"
               "    os.write(fd, b'x' * (1 << 20))\n",
    "json_line": "import os, sys\nfd = int(sys.argv[2])\n"
                 "os.write(fd, b'{\"op\": \"result\", \"stdout\": \"')\nfor _ in range(250):\n"
                 "    os.write(fd, b'a' * (1 << 20))\nos.write(fd, b'\"}\\n')\n",
}


def agent_rss_peak(pid: int, stop: asyncio.Event, peak: list[int]) -> None:
    """Sample the agent's resident memory every 10 ms until stop is set."""
    process = psutil.Process(pid)
    while not stop.is_set():
        peak[0] = max(peak[0], process.memory_info().rss)
        time.sleep(0.01)


async def test_session_code_flooding_its_pipe_is_killed_and_agent_memory_stays_bounded(
    tmp_path: Path,
) -> None:
    agent = await AgentProcess(tmp_path, name="flood", agent={"max_sessions": 4},
                               sandbox={"max_output_bytes": 1 << 20}).start()
    assert agent.process is not None
    try:
        async with aiohttp.ClientSession() as http:

            async def post(path: str, body: dict[str, Any]) -> tuple[int, Any]:
                data = json.dumps(body).encode()
                headers = {"Content-Type": "application/json"}
                headers.update(sign(SECRET.encode(), "POST", path, data))
                async with http.post(agent.url + path, data=data, headers=headers) as answer:
                    return answer.status, await answer.json()

            names = [f"{kind}-{n}" for kind in PIPE_FLOOD for n in range(2)]
            for name in names:
                status, _ = await post("/v1/sessions", {"session_id": name})
                assert status == 201
            baseline = psutil.Process(agent.process.pid).memory_info().rss
            stop, peak = asyncio.Event(), [baseline]
            sampler = asyncio.ensure_future(asyncio.to_thread(
                agent_rss_peak, agent.process.pid, stop, peak))
            try:
                results = await asyncio.gather(*(
                    post(f"/v1/sessions/{name}/exec",
                         {"cell_id": "c1", "code": PIPE_FLOOD[name.rsplit("-", 1)[0]]})
                    for name in names))
            finally:
                stop.set()
                await sampler
            for status, result in results:
                assert status == 200, result
                assert result["status"] == "killed", result
                assert result["error"]["code"] == "output_limit", result
                assert "control pipe carried a line over" in result["error"]["message"]
            # Four sessions wrote 1 GB between them; the agent read at most 2 lines' worth each.
            grown_mb = (peak[0] - baseline) / 2**20
            assert grown_mb < 64, f"agent RSS grew by {grown_mb:.0f} MB"
            status, answer = await post("/v1/sessions", {"session_id": "after"})
            assert status == 201, answer
            status, answer = await post("/v1/sessions/after/exec",
                                        {"cell_id": "c1", "code": "print(6 * 7)"})
            assert (status, answer["stdout"]) == (200, "42\n"), answer
    finally:
        assert await agent.stop() == 0, agent.read_log()


@pytest.mark.parametrize("text", ["y" * 1000, "\x00" * 1000, "\U0001f600" * 1000, "é\n\"" * 300])
def test_driver_output_fits_its_cap_as_json_however_it_escapes(text: str) -> None:
    from kowalski.agent.repl_driver import fit

    kept, cut = fit(text, 100)
    assert cut
    # Within one character (at most 12 escaped bytes) of the cap, never over it.
    assert 88 <= len(json.dumps(kept)) - 2 <= 100, kept
    assert text.startswith(kept)
    assert fit("y" * 100, 100) == ("y" * 100, False)
