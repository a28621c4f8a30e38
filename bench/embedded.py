"""The embedded model's tokens/s through the controller's router vs. calling its server directly."""

from __future__ import annotations

import time
from pathlib import Path

import aiohttp

from bench.cluster import controller, controller_config
from bench.report import Section, Table, fmt, p50, spread
from kowalski.common.errors import EmbeddedModelError
from kowalski.controller.models.chat_types import ChatMessage, ChatRequest
from kowalski.controller.models.embedded import MODEL_NAME, locate_weights, require_server_package
from kowalski.controller.models.router import LlmRouter

PROMPT = "Write a long story about a robot who learns to paint. Use many details."


def _request(max_tokens: int) -> ChatRequest:
    return ChatRequest(model=MODEL_NAME, messages=[ChatMessage(role="user", content=PROMPT)],
                       max_tokens=max_tokens, temperature=0.0)


async def _direct(session: aiohttp.ClientSession, url: str, max_tokens: int) -> tuple[int, float]:
    """(completion tokens, seconds) for one call straight to llama.cpp's server."""
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": max_tokens, "temperature": 0.0}
    started = time.perf_counter()
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        answer = await response.json()
    return int(answer["usage"]["completion_tokens"]), time.perf_counter() - started


async def _routed(router: LlmRouter, max_tokens: int) -> tuple[int, float]:
    """(completion tokens, seconds) for one call through the controller's router."""
    started = time.perf_counter()
    result = await router.chat(_request(max_tokens))
    elapsed = time.perf_counter() - started
    if result.usage is None:
        raise RuntimeError("the embedded server reported no usage")
    return result.usage.completion_tokens, elapsed


async def measure(tmp: Path, quick: bool) -> list[Section]:
    title = "Embedded model through the full stack"
    try:
        require_server_package()
        locate_weights()
    except EmbeddedModelError as exc:
        return [Section(key="embedded", title=title, method="", skipped=exc.message)]
    pairs, max_tokens = (1, 8) if quick else (10, 64)
    # On a busy machine generation slows tenfold: stop early rather than run for minutes.
    budget_s = 20.0 if quick else 90.0
    direct: list[float] = []
    routed: list[float] = []
    tokens: list[float] = []
    config = controller_config(tmp, embedded=True)
    started = time.perf_counter()
    async with controller(config, embedded_model=True) as running, aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=300)) as session:
        startup_s = time.perf_counter() - started
        url = running.router.endpoints[0].url
        # One call each way first: the server's first request pays for warming up.
        await _direct(session, url, max_tokens)
        await _routed(running.router, max_tokens)
        deadline = time.perf_counter() + budget_s
        for _ in range(pairs):
            if direct and time.perf_counter() > deadline:
                break
            for kind in ("direct", "routed"):
                count, seconds = (await _direct(session, url, max_tokens) if kind == "direct"
                                  else await _routed(running.router, max_tokens))
                (direct if kind == "direct" else routed).append(count / seconds)
                tokens.append(count)
    ratio = p50(routed) / p50(direct)
    settings = config.exo
    return [Section(
        key="embedded", title=title,
        method=(
            f"The controller's services start the embedded {MODEL_NAME} (llama.cpp server in "
            f"a child process, {settings.embedded_threads} threads, "
            f"{settings.embedded_context_tokens}-token context). The same chat request "
            f"(temperature 0, at most {max_tokens} completion tokens) is sent alternately "
            "straight to the server with aiohttp and through `LlmRouter.chat` (endpoint "
            f"choice, retry wrapper, circuit breaker, `ExoClient`); {len(direct)} pairs "
            f"(of at most {pairs} within {budget_s:g} s) after one "
            "warm-up each. Tokens/s is completion tokens over the call's wall time, so it "
            "includes prompt processing."),
        tables=[Table(headers=["path", "completion tokens/s: p50 (p90, min-max)"], rows=[
            ["direct to the llama.cpp server (baseline)", spread(direct, 1)],
            ["controller router → llama.cpp server", spread(routed, 1)],
            ["router / direct (p50 over p50)", fmt(ratio, 3)],
            ["router / direct (best run of each)", fmt(max(routed) / max(direct), 3)],
        ])],
        notes=[(f"Overhead of the stack: {fmt((1 - ratio) * 100, 1)} % of throughput "
                "(p50 over p50)." if ratio < 1 else
                "No overhead of the stack shows: the routed calls were as fast as the direct "
                "ones within the noise of the runs.")
               + f" The model started in {startup_s:.1f} s; completions had "
               f"{fmt(min(tokens), 0)}-{fmt(max(tokens), 0)} tokens."],
        raw={"direct tokens/s": direct, "routed tokens/s": routed},
    )]
