"""The dashboard: its event stream, its files, and the page itself in headless Chromium."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import msgspec
import pytest
from controller_env import controller_config, healthy_ids, running_controller
from exo_standin import DEFAULT_MODEL
from procs import AgentProcess

from kowalski.common.messages import DeviceId, JobRequest
from kowalski.controller.api.dashboard import RECONNECT_MS
from kowalski.controller.fleet.device_table import DeviceDiscovered
from kowalski.controller.service import Controller

pytestmark = pytest.mark.timeout(90)

SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "dashboard.png"
# Model output the page must show as text: were it parsed as HTML, a <b> element would appear.
HOSTILE = "<b>characters:</b>"
CONTEXT = "alpha\nbeta\ngamma\n"
EXPECTED = str(sum(len(line) for line in CONTEXT.splitlines()))


def scripted(body: dict[str, Any]) -> str:
    """A model that counts in the REPL, asks a sub-question, prints markup, then answers."""
    messages = body["messages"]
    last = messages[-1]["content"]
    if messages[0]["role"] != "system":
        return f"sub-answer to {last[:20]}"
    if "sub-answer to" in last:
        return "The REPL found it.\nFINAL_VAR(result)"
    return ("Counting characters per line.\n```repl\n"
            "result = sum(len(line) for line in context.splitlines())\n"
            "note = llm_query('what is ' + str(result))\n"
            f"print({HOSTILE!r}, result, note)\n```")


async def read_event(stream: aiohttp.StreamReader) -> dict[str, str]:
    """One SSE event as its fields (the data field JSON text)."""
    raw = await asyncio.wait_for(stream.readuntil(b"\n\n"), 10)
    fields = {}
    for line in raw.decode().strip("\n").split("\n"):
        name, _, value = line.partition(": ")
        fields[name] = value
    return fields


@pytest.fixture
async def bare_controller(tmp_path: Path) -> AsyncIterator[Controller]:
    """A controller with no agents and no exo endpoint: the stream and files alone."""
    async with running_controller(controller_config([], [], tmp_path)) as running:
        yield running


async def test_event_stream_sends_retry_then_pushes_changes_and_ends_on_shutdown(
    tmp_path: Path,
) -> None:
    async with aiohttp.ClientSession() as session:
        async with running_controller(controller_config([], [], tmp_path)) as controller:
            response = await session.get(controller.base_url + "/v1/events")
            assert response.headers["Content-Type"] == "text/event-stream"
            assert await read_event(response.content) == {"retry": str(RECONNECT_MS)}
            first = await read_event(response.content)
            assert first["event"] == "snapshot"
            snapshot = json.loads(first["data"])
            assert snapshot["status"]["devices"] == []
            assert snapshot["snapshot_interval_s"] > 0
            # With nothing changing, a snapshot still comes every snapshot interval.
            quiet = await read_event(response.content)
            assert json.loads(quiet["data"])["status"]["devices"] == []
            # A change is pushed at once, not at the next interval.
            pushed_at = time.monotonic()
            controller.cluster.apply(DeviceDiscovered(
                device_id=DeviceId("ghost"), name="ghost", url="http://127.0.0.1:9",
                source="static", at=controller.cluster.clock()))
            changed = json.loads((await read_event(response.content))["data"])
            assert time.monotonic() - pushed_at < snapshot["snapshot_interval_s"] / 2
            assert [d["device_id"] for d in changed["status"]["devices"]] == ["ghost"]
            stopping_at = time.monotonic()
        # The open stream did not hold the shutdown up until aiohttp's handler timeout.
        assert time.monotonic() - stopping_at < 3.0
        assert await asyncio.wait_for(response.content.read(), 5) == b""
        response.release()


async def test_page_and_its_files_are_served_with_a_strict_policy(
    bare_controller: Controller,
) -> None:
    base = bare_controller.base_url
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/") as response:
            assert response.status == 200
            assert response.content_type == "text/html"
            policy = response.headers["Content-Security-Policy"]
            page = await response.text()
        assert "script-src 'self'" in policy
        assert "default-src 'none'" in policy
        assert '<script type="module" src="/static/app.js">' in page
        for name, kind in (("app.js", "text/javascript"), ("views.js", "text/javascript"),
                           ("style.css", "text/css"), ("favicon.svg", "image/svg+xml")):
            async with session.get(f"{base}/static/{name}") as response:
                assert response.status == 200, name
                assert response.content_type == kind
        for name in ("nope.js", ".hidden.js", "%2e%2e%2fdashboard.py", "..%2Fapp.py"):
            async with session.get(f"{base}/static/{name}") as response:
                assert response.status == 404, name


# --- the page in Chromium ------------------------------------------------------------------


@pytest.fixture
def exo_reply() -> Callable[[dict[str, Any]], str]:
    return scripted


def dense_history(controller: Controller) -> None:
    """A sample at about every heartbeat, so the charts fill within seconds."""
    cluster = controller.cluster
    settings = msgspec.structs.replace(cluster.table.settings, history_window_s=60.0,
                                       history_points=300)
    cluster.table = msgspec.structs.replace(cluster.table, settings=settings)


async def take_screenshot(page: Any, controller: Controller) -> None:
    """docs/dashboard.png: charts with some history, and work in flight on both agents."""
    from playwright.async_api import expect

    await asyncio.sleep(10)
    jobs = [asyncio.create_task(controller.dispatcher.run_job(JobRequest(
        job_id=f"batch-7-item-{n}", language="python",
        code="import time\nend = time.time() + 3\nwhile time.time() < end: pass")))
        for n in range(2)]
    await expect(page.locator("#jobs tbody tr")).to_have_count(2)
    await asyncio.sleep(2)
    await page.screenshot(path=str(SCREENSHOT), full_page=True)
    await asyncio.gather(*jobs)


async def test_page_follows_devices_runs_and_a_controller_restart(
    browser_page: Any, agents: list[AgentProcess], exo: Any, tmp_path: Path,
) -> None:
    from playwright.async_api import expect

    page = browser_page
    requested: list[str] = []
    page.on("request", lambda request: requested.append(urlsplit(request.url).path))
    exo_url = str(exo.make_url("")).rstrip("/")
    config = controller_config(agents, [exo_url], tmp_path)
    health = {agent.agent_id: page.locator(f'#devices tr[data-device="{agent.agent_id}"] .health')
              for agent in agents}
    async with running_controller(config) as controller:
        dense_history(controller)
        assert await controller.cluster.wait_for(lambda t: len(healthy_ids(t)) == 2, timeout_s=15)
        await page.goto(controller.base_url + "/")
        await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        for locator in health.values():
            await expect(locator).to_have_text("healthy")
        endpoint = page.locator(f'#endpoints tr[data-endpoint="{exo_url}"]')
        await expect(endpoint).to_contain_text(DEFAULT_MODEL)
        # The instance list comes from exo v1's /state, read by the dashboard itself.
        await expect(endpoint).to_contain_text("1 node")
        await expect(endpoint).to_contain_text("up")

        job = asyncio.create_task(controller.dispatcher.run_job(JobRequest(
            job_id="dashboard-job", language="python", code="import time; time.sleep(1.5)")))
        job_row = page.locator('#jobs tr[data-job="dashboard-job"]')
        await expect(job_row).to_contain_text("agent")
        assert (await job).status == "ok"
        await expect(job_row).to_have_count(0)
        await expect(page.locator('#job-counters [data-counter="succeeded"]')).to_contain_text("1")

        async with aiohttp.ClientSession() as session, session.post(
            controller.base_url + "/v1/runs", json={"query": "count letters", "context": CONTEXT},
        ) as response:
            assert response.status == 200, await response.text()
            run_id = (await response.json())["run_id"]
        run_row = page.locator(f'#runs tr[data-run="{run_id}"]')
        await expect(run_row.locator(".run-status")).to_contain_text("finished")
        await expect(run_row).to_contain_text("count letters")
        await run_row.locator("button").click()
        trajectory = page.locator("#trajectory")
        await expect(trajectory.locator("pre.code").first).to_contain_text("llm_query(")
        await expect(trajectory.locator("pre.output").first).to_contain_text(HOSTILE)
        await expect(trajectory.locator("pre.final-answer")).to_have_text(EXPECTED)
        assert await page.locator("#trajectory b").count() == 0

        # A run stopped at its iteration limit does not look like an answered one.
        async with aiohttp.ClientSession() as session, session.post(
            controller.base_url + "/v1/runs",
            json={"query": "count letters", "context": CONTEXT, "max_iterations": 1},
        ) as response:
            assert response.status == 200, await response.text()
            limited = await response.json()
        assert limited["stop_reason"] == "max_iterations", limited
        limited_row = page.locator(f'#runs tr[data-run="{limited["run_id"]}"] .run-status')
        await expect(limited_row).to_have_attribute("data-outcome", "stopped")
        await expect(limited_row).to_contain_text("max_iterations")
        await expect(limited_row.locator(".badge")).to_have_class("badge warn")
        await expect(run_row.locator(".run-status")).to_have_attribute("data-outcome", "finished")
        # Work in flight counts model calls as well as jobs on agents; every way a run can
        # end has a word of its own.
        counted = await page.evaluate("""async () => {
            const views = await import("/static/views.js");
            const dom = await import("/static/dom.js");
            const work = views.workInFlight({
                devices: [{in_flight: ["cell-1"]}, {in_flight: []}],
                endpoints: [{in_flight: 2}, {in_flight: 1}]});
            return [work.total, work.onDevices, work.onModels,
                    ...["final", "max_iterations", "timeout", "error", "cancelled", null]
                        .map(dom.runOutcome)];
        }""")
        assert counted == [4, 1, 3, "finished", "stopped", "stopped", "failed", "cancelled",
                           "incomplete"]

        if os.environ.get("KOWALSKI_UPDATE_SCREENSHOT") == "1":
            await take_screenshot(page, controller)

        victim = agents[1]
        await victim.kill()
        await expect(health[victim.agent_id]).to_have_text("unhealthy", timeout=10_000)
        await expect(health[agents[0].agent_id]).to_have_text("healthy")
        port = controller.port

    banner = page.locator("#banner")
    await expect(banner).to_be_visible(timeout=10_000)
    await expect(banner).to_contain_text("reconnecting")
    restarted = controller_config(agents, [exo_url], tmp_path, controller={"port": port})
    async with running_controller(restarted):
        await expect(banner).to_be_hidden(timeout=15_000)
        await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        await expect(health[agents[0].agent_id]).to_have_text("healthy", timeout=10_000)
        # The earlier run is still listed, read back from the trajectory directory.
        await expect(run_row.locator(".run-status")).to_contain_text("finished")
        await expect(run_row).to_contain_text("earlier controller")
    # Pushed, not polled: besides its own files the page asked only for the stream and the
    # trajectory it was told to show.
    asked = {path for path in requested if not path.startswith("/static/")}
    assert asked == {"/", "/v1/events", f"/v1/runs/{run_id}"}
    assert requested.count("/v1/events") <= 12
