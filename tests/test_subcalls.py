"""Abandoned sub-calls stop: none reaches the model once its cell or its run has ended."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from exo_standin import make_exo_app
from local_session import LocalSession

from kowalski.agent.sandbox import Sandbox
from kowalski.agent.sessions import SessionManager
from kowalski.common.config import RlmConfig, SandboxConfig
from kowalski.common.messages import (
    LlmCallback,
    SessionCreate,
)
from kowalski.controller.models.chat_types import ChatRequest, ChatResult
from kowalski.controller.models.exo_client import ExoClient
from kowalski.controller.rlm.events import CodeExecuted, RlmEvent
from kowalski.controller.rlm.loop import RlmRun

MODEL = "scripted/model"
# A cell that asks for far more sub-calls than fit in its time limit.
FLOOD = "```repl\nanswers = llm_query_batched([f'sub {i}' for i in range(400)])\n```"


class CountingModel:
    """Root replies from a script; each sub-call takes a while and is stamped on arrival."""

    def __init__(self, *replies: str) -> None:
        self.replies = list(replies)
        self.sub_call_times: list[float] = []

    async def __call__(self, body: dict[str, Any]) -> str:
        messages = body["messages"]
        if messages[0]["role"] != "system":
            self.sub_call_times.append(time.monotonic())
            await asyncio.sleep(0.1)
            return "sub answer"
        return self.replies.pop(0) if self.replies else "FINAL(out of replies)"


class Backend:
    def __init__(self, client: ExoClient) -> None:
        self.client = client

    async def chat(self, request: ChatRequest, *, operation: str = "llm_inference"
                   ) -> ChatResult:
        return await self.client.chat(request)


class Rig:
    def __init__(self, model: CountingModel, backend: Backend, runs_dir: Path) -> None:
        self.model, self.backend, self.runs_dir = model, backend, runs_dir
        self.manager: SessionManager | None = None
        self.runs: dict[str, RlmRun] = {}
        self.events: list[tuple[float, RlmEvent]] = []

    async def relay(self, callback: LlmCallback, prompts: list[str]) -> list[str]:
        return await self.runs[callback.token].answer_sub_calls(prompts)

    async def factory(self, context: Any, run: RlmRun) -> LocalSession:
        assert self.manager is not None
        self.runs[run.run_id] = run
        await self.manager.create(SessionCreate(
            session_id=run.run_id, context=context,
            llm_callback=LlmCallback(url="local", token=run.run_id, depth=run.depth + 1)))
        return LocalSession(self.manager, run.run_id)

    def new_run(self, *, cell_timeout_ms: int | None = None, **config: Any) -> RlmRun:
        return RlmRun("q", "c", backend=self.backend, session_factory=self.factory,
                      config=RlmConfig(trajectory_dir=str(self.runs_dir),
                                       sub_call_concurrency=4, **config),
                      model=MODEL, cell_timeout_ms=cell_timeout_ms,
                      observer=lambda event: self.events.append((time.monotonic(), event)))


@pytest.fixture
async def rig(aiohttp_server: Any, tmp_path: Path) -> AsyncIterator[Rig]:
    model = CountingModel()
    server = await aiohttp_server(make_exo_app(flavour="v1", models=(MODEL,), reply=model))
    client = ExoClient(str(server.make_url("")))
    mode = "bwrap" if os.geteuid() == 0 else "rlimit"
    box = Sandbox(SandboxConfig(mode=mode, memory_limit_mb=512, pids_limit=64, pool_size=0),
                  work_root=tmp_path / "jobs")
    await box.start()
    made = Rig(model, Backend(client), tmp_path / "runs")
    made.manager = SessionManager(box, max_sessions=2, idle_timeout_s=60, llm_handler=made.relay)
    yield made
    await made.manager.close()
    await box.close()
    await client.close()


def after(times: list[float], moment: float) -> int:
    return sum(stamp > moment for stamp in times)


async def test_sub_calls_of_a_timed_out_cell_stop_reaching_the_model(rig: Rig) -> None:
    rig.model.replies = [FLOOD, "FINAL(done)"]
    result = await rig.new_run(cell_timeout_ms=600).run()
    assert (result.stop_reason, result.answer) == ("final", "done")
    [(ended, cell)] = [(at, e) for at, e in rig.events if isinstance(e, CodeExecuted)]
    assert cell.status == "timeout"
    asked = len(rig.model.sub_call_times)
    # Some sub-calls ran before the time limit; nowhere near all 400.
    assert 4 <= asked < 100
    await asyncio.sleep(0.5)
    assert len(rig.model.sub_call_times) == asked
    assert after(rig.model.sub_call_times, ended) == 0


async def test_sub_calls_stop_when_the_run_ends_mid_cell(rig: Rig) -> None:
    rig.model.replies = [FLOOD]
    started = time.monotonic()
    result = await rig.new_run(run_timeout_s=1.0).run()
    ended = time.monotonic()
    assert result.stop_reason == "timeout"
    assert ended - started < 10
    asked = len(rig.model.sub_call_times)
    assert 4 <= asked < 100
    await asyncio.sleep(0.5)
    assert after(rig.model.sub_call_times, ended) == 0
    assert len(rig.model.sub_call_times) == asked


# --- through a controller and a real agent process, where sub-calls arrive over HTTP ---------


@pytest.fixture
def exo_reply() -> Any:
    async def reply(body: dict[str, Any]) -> str:
        if body["messages"][0]["role"] != "system":
            await asyncio.sleep(0.1)
            return "sub answer"
        return FLOOD

    return reply


@pytest.fixture
def agent_count() -> int:
    return 1


@pytest.mark.timeout(120)
async def test_a_finished_runs_sub_calls_over_http_stop_reaching_the_model(
    controller: Any, exo: Any,
) -> None:
    import aiohttp
    from exo_standin import STANDIN

    standin = exo.app[STANDIN]

    def sub_calls() -> int:
        return sum(body["messages"][0]["role"] != "system" for body in standin.chat_requests)

    async with aiohttp.ClientSession() as session, session.post(
            controller.base_url + "/v1/runs",
            json={"query": "q", "context": "c", "run_timeout_s": 2.0}) as response:
        assert response.status == 200, await response.text()
        result = await response.json()
    assert result["stop_reason"] == "timeout"
    asked = sub_calls()
    assert 4 <= asked < 200
    await asyncio.sleep(1.0)
    # Nothing the finished run asked for reached the model after it ended.
    assert sub_calls() == asked
