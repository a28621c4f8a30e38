"""Any OpenAI-compatible server as an endpoint: no /health, API keys, per-endpoint settings,
and llama.cpp's own server started as an ordinary endpoint."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import tomli_w
from exo_standin import STANDIN, ExoStandin, make_exo_app

from kowalski.common import config as configuration
from kowalski.common.config import ControllerConfig, EndpointConfig, ExoConfig
from kowalski.common.errors import ConfigError, NoModelAvailableError
from kowalski.controller.circuit import CircuitPolicy
from kowalski.controller.models.chat_types import ChatMessage, ChatRequest
from kowalski.controller.models.embedded import locate_weights
from kowalski.controller.models.exo_client import ExoClient
from kowalski.controller.models.exo_errors import EndpointAuthError
from kowalski.controller.models.router import LlmRouter
from kowalski.controller.retry import RetryPolicy

MODEL = "qwen2.5-7b-instruct"
KEY = "sk-test-0123456789abcdef"


def ask(model: str = MODEL, **kwargs: Any) -> ChatRequest:
    return ChatRequest(model=model, messages=[ChatMessage(role="user", content="hi")], **kwargs)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def start(aiohttp_server: Any, **kwargs: Any) -> tuple[ExoStandin, str]:
    kwargs.setdefault("models", (MODEL,))
    app = make_exo_app(flavour="openai", **kwargs)
    server = await aiohttp_server(app)
    return app[STANDIN], str(server.make_url("")).rstrip("/")


def make_router(entries: list[str | EndpointConfig], http: aiohttp.ClientSession,
                **exo: Any) -> LlmRouter:
    controller = ControllerConfig(retry_max_attempts=2, retry_base_delay_ms=10,
                                  retry_max_delay_ms=20)
    config = ExoConfig(endpoints=entries, poll_interval_s=0.1, **exo)
    return LlmRouter(config=config, urls=entries, session=http,
                     policy=RetryPolicy.from_config(controller),
                     circuit_policy=CircuitPolicy.from_config(controller),
                     load_penalty=controller.load_penalty)


async def test_a_server_with_only_models_and_chat_is_healthy_and_answers(
    aiohttp_server: Any, http: aiohttp.ClientSession,
) -> None:
    standin, url = await start(aiohttp_server, bare=True, reply=lambda b: "hello")
    router = make_router([url], http)
    for _ in range(3):
        await router.refresh()
    [view] = router.views()
    assert (view.healthy, view.flavour, view.ready_models) == (True, "openai", [MODEL])
    # /health is asked once, found missing, and not asked again.
    assert standin.counts["/health"] == 1
    assert standin.counts["/v1/models"] >= 3
    result = await router.chat(ask())
    assert (result.text, result.endpoint) == ("hello", url)
    await router.close()


async def test_a_server_with_health_is_checked_there(
    aiohttp_server: Any, http: aiohttp.ClientSession,
) -> None:
    standin, url = await start(aiohttp_server)
    async with ExoClient(url, session=http) as exo:
        for _ in range(2):
            assert (await exo.health()).ok
    assert standin.counts["/health"] == 2


async def test_without_the_key_the_error_says_how_to_give_it(
    aiohttp_server: Any, http: aiohttp.ClientSession,
) -> None:
    _, url = await start(aiohttp_server, api_key=KEY)
    async with ExoClient(url, session=http) as exo:
        with pytest.raises(EndpointAuthError, match="HTTP 401") as caught:
            await exo.detect()
        assert "api_key_file" in caught.value.user_message()
        health = await exo.health()
    assert not health.ok
    assert "401" in health.error
    async with ExoClient(url, session=http, api_key="wrong") as exo:
        with pytest.raises(EndpointAuthError):
            await exo.chat(ask())


@pytest.mark.parametrize("source", ["file", "env"])
async def test_the_key_from_a_file_or_the_environment_is_sent_as_a_bearer_token(
    source: str, aiohttp_server: Any, http: aiohttp.ClientSession, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    standin, url = await start(aiohttp_server, api_key=KEY, bare=True, reply=lambda b: "in")
    if source == "file":
        (tmp_path / "key").write_text(KEY + "\n")
        entry = EndpointConfig(url=url, api_key_file=str(tmp_path / "key"))
    else:
        monkeypatch.setenv("TEST_LLM_KEY", KEY)
        entry = EndpointConfig(url=url, api_key_env="TEST_LLM_KEY")
    router = make_router([entry], http)
    await router.refresh()
    assert router.views()[0].healthy
    assert (await router.chat(ask())).text == "in"
    assert standin.chat_requests
    await router.close()


def test_endpoints_are_urls_or_tables(tmp_path: Path) -> None:
    config = configuration.loads(
        'exo.endpoints = ["http://10.0.0.5:52415"]\n', source="plain.toml")
    assert config.exo.endpoint_settings() == [EndpointConfig(url="http://10.0.0.5:52415")]
    text = """
[[exo.endpoints]]
url = "http://10.0.0.5:52415"

[[exo.endpoints]]
url = "https://llm.example.com/v1"
api_key_env = "LLM_KEY"
models = ["a", "b"]
max_concurrency = 2
"""
    settings = configuration.loads(text, source="tables.toml").exo.endpoint_settings()
    assert settings[1] == EndpointConfig(url="https://llm.example.com/v1", api_key_env="LLM_KEY",
                                         models=["a", "b"], max_concurrency=2)
    round_trip = configuration.loads(configuration.dumps(configuration.loads(text)))
    assert round_trip.exo.endpoint_settings() == settings


@pytest.mark.parametrize(("text", "message"), [
    ('[[exo.endpoints]]\nurl = "ftp://x"\n', r"k\.toml:exo\.endpoints\.0\.url: expected an http"),
    ('[[exo.endpoints]]\nurl = "http://x"\napi_key_file = "f"\napi_key_env = "E"\n',
     "api_key_file or api_key_env, not both"),
    ('[[exo.endpoints]]\nurl = "http://x"\napi_key = "sk-in-the-file"\n',
     "unknown field `api_key`"),
    ('[[exo.endpoints]]\napi_key_env = "E"\n', "missing required field `url`"),
])
def test_bad_endpoint_tables_are_named(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        configuration.loads(text, source="k.toml")


async def test_a_missing_key_is_a_config_error_naming_where_it_was_looked_for(
    http: aiohttp.ClientSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(ConfigError, match="NO_SUCH_KEY_VAR"):
        make_router([EndpointConfig(url="http://x", api_key_env="NO_SUCH_KEY_VAR")], http)
    with pytest.raises(ConfigError, match="absent"):
        make_router([EndpointConfig(url="http://x", api_key_file=str(tmp_path / "absent"))],
                    http)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        make_router([EndpointConfig(url="http://x", api_key_file=str(tmp_path / "empty"))], http)


async def test_max_concurrency_bounds_calls_in_flight_on_one_endpoint(
    aiohttp_server: Any, http: aiohttp.ClientSession,
) -> None:
    active, peak = 0, 0

    async def slow(_body: dict[str, Any]) -> str:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.05)
        active -= 1
        return "ok"

    _, url = await start(aiohttp_server, reply=slow)
    router = make_router([EndpointConfig(url=url, max_concurrency=2)], http)
    await router.refresh()
    answers = await asyncio.gather(*(router.chat(ask()) for _ in range(6)))
    assert [a.text for a in answers] == ["ok"] * 6
    assert peak == 2
    await router.close()


async def test_a_model_list_in_the_config_decides_what_the_endpoint_serves(
    aiohttp_server: Any, http: aiohttp.ClientSession,
) -> None:
    _, url = await start(aiohttp_server, models=(MODEL, "other"))
    router = make_router([EndpointConfig(url=url, models=["other"])], http)
    await router.refresh()
    assert router.ready_models() == ["other"]
    with pytest.raises(NoModelAvailableError, match=f"no healthy exo endpoint has '{MODEL}'"):
        await router.chat(ask())
    await router.close()


# --- llama.cpp's own server, started as any endpoint would be -----------------------------

_LLAMA_SERVER = """
import sys, xllamacpp
params = xllamacpp.CommonParams()
params.model.path = sys.argv[1]
params.model_alias = {"smollm2"}
params.n_ctx = 1024
params.n_parallel = 1
params.cpuparams.n_threads = 2
params.cpuparams_batch.n_threads = 2
params.hostnames = ["127.0.0.1"]
params.port = 0
params.offline = True
params.ui = False
params.api_keys = [sys.argv[2]]
server = xllamacpp.Server(params)
print(server.listening_address, flush=True)
sys.stdin.read()
"""


@pytest.mark.model
async def test_llama_cpp_server_with_an_api_key_as_an_ordinary_endpoint(
    http: aiohttp.ClientSession, tmp_path: Path,
) -> None:
    pytest.importorskip("xllamacpp")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _LLAMA_SERVER, str(locate_weights()), KEY,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 120)
        url = line.decode().strip()
        assert url.startswith("http://127.0.0.1:")
        async with ExoClient(url, session=http) as bare:
            with pytest.raises(EndpointAuthError):
                await bare.chat(ask("smollm2"))
        (tmp_path / "key").write_text(KEY)
        router = make_router([EndpointConfig(url=url, api_key_file=str(tmp_path / "key"))],
                             http, request_timeout_s=120)
        await router.refresh()
        [view] = router.views()
        assert (view.healthy, view.flavour, view.ready_models) == (True, "openai", ["smollm2"])
        result = await router.chat(ask("smollm2", max_tokens=4, temperature=0.0))
        assert result.text
        assert result.usage is not None
        assert 0 < result.usage.completion_tokens <= 4
        await router.close()
    finally:
        if process.stdin is not None:
            process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()


# --- kowalski-ctl run --endpoint / --model-file, without a config file ---------------------


async def _ctl(*argv: str, home: Path, timeout_s: float = 60) -> tuple[int, str, str]:
    # A fresh HOME: no config file, and runs are written under it.
    env = {**os.environ, "HOME": str(home)}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kowalski.controller", *argv, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env)
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout_s)
    finally:
        if process.returncode is None:
            # Ctrl-C: the CLI stops its agent and model on the way out.
            process.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()
                await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_cli_run_against_an_endpoint_that_wants_a_key(
    aiohttp_server: Any, tmp_path: Path,
) -> None:
    standin, url = await start(aiohttp_server, api_key=KEY, bare=True,
                               reply=lambda b: "FINAL(42)")
    (tmp_path / "key").write_text(KEY)
    code, out, err = await _ctl("run", "what is six times seven", "--endpoint", url,
                                "--api-key-file", str(tmp_path / "key"), "--json",
                                home=tmp_path)
    assert code == 0, err
    result = json.loads(out)
    assert (result["answer"], result["stop_reason"]) == ("42", "final")
    assert result["endpoints"] == [url]
    assert standin.chat_requests[0]["model"] == MODEL
    code, _, err = await _ctl("run", "q", "--endpoint", url, "--json", home=tmp_path)
    assert code != 0
    assert "HTTP 401" in err


@pytest.mark.parametrize(("argv", "message"), [
    (["--model-file", "/nonexistent/model.gguf"], "no such file"),
    (["--api-key-file", "k"], "--api-key-file goes with --endpoint URL"),
    (["--endpoint", "localhost:8080"], "expected an http:// or https:// URL"),
    (["--endpoint", "http://x", "--url", "http://y"], "leave out --url"),
])
async def test_cli_model_flags_say_what_is_wrong(
    argv: list[str], message: str, tmp_path: Path,
) -> None:
    code, _, err = await _ctl("run", "q", *argv, home=tmp_path)
    assert code != 0
    assert message in err
    assert "Traceback" not in err


@pytest.mark.model
@pytest.mark.timeout(420)
async def test_cli_run_with_a_model_file_serves_that_gguf(tmp_path: Path) -> None:
    pytest.importorskip("xllamacpp")
    gguf = tmp_path / "my-model.gguf"
    shutil.copyfile(locate_weights(), gguf)
    # A small window keeps each reply short: on 2 busy cores a long one takes minutes.
    config = tmp_path / "small.toml"
    config.write_text(tomli_w.dumps({
        "rlm": {"context_window_tokens": 2048, "run_timeout_s": 300},
        "exo": {"embedded_context_tokens": 2048},
        "sandbox": {"memory_limit_mb": 256},
    }))
    code, out, err = await _ctl("--config", str(config), "run", "Say hello.", "--model-file",
                                str(gguf), "--model", "my-model", "--max-iterations", "1",
                                "--json", home=tmp_path, timeout_s=360)
    assert code in (0, 5), err
    result = json.loads(out)
    # The file is served under its own name: a run asking for it reaches the model.
    started = json.loads(Path(result["trajectory_path"]).read_text().splitlines()[0])
    assert started["model"] == "my-model", started
    assert result["iterations"] == 1, result
    # On 2 busy cores one reply of a 135M model can outlast the run; else it counted tokens.
    assert result["stop_reason"] in ("final", "final_var", "max_iterations", "timeout"), result
    if result["stop_reason"] != "timeout":
        assert result["tokens"]["completion_tokens"] > 0, result
        assert result["endpoints"][0].startswith("http://127.0.0.1:")
