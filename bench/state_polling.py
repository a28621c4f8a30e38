"""Bytes and CPU per endpoint poll on a 4-node exo v1 state: whole `/state` vs. its sub-trees."""

from __future__ import annotations

import copy
import json
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from exo_standin import sample

from bench.report import Section, Table, spread
from kowalski.controller.models.exo_client import ExoClient

NODES = 4
# Download entries per node in the captured cluster state (one per model card).
DOWNLOADS_PER_NODE = 124


def four_node_state() -> dict[str, Any]:
    """The captured one-node state with an instance, grown to 4 nodes with full downloads."""
    state = sample("v1/state_with_instance.json")
    nodes = [uuid.uuid4().hex for _ in range(NODES)]
    for key in ("lastSeen", "nodeIdentities", "nodeMemory", "nodeDisk", "nodeNetwork",
                "nodeBackends"):
        template = next(iter(state[key].values()))
        state[key] = {node: copy.deepcopy(template) for node in nodes}
    templates = next(iter(state["downloads"].values()))
    downloads: dict[str, list[Any]] = {}
    for node in nodes:
        entries = []
        for index in range(DOWNLOADS_PER_NODE):
            entry = copy.deepcopy(templates[index % len(templates)])
            inner = next(iter(entry.values()))
            inner["nodeId"] = node
            card = next(iter(inner["shardMetadata"].values()))["modelCard"]
            card["modelId"] = f"mlx-community/model-{index}"
            entries.append(entry)
        downloads[node] = entries
    state["downloads"] = downloads
    state["topology"]["nodes"] = nodes
    return state


def _app(state: dict[str, Any], *, sub_trees: bool, sent: list[int]) -> web.Application:
    """exo's /node_id, /state and (when `sub_trees`) /state/{path}, counting bytes sent."""
    whole = json.dumps(state, separators=(",", ":")).encode()
    parts = {key: json.dumps(value, separators=(",", ":")).encode()
             for key, value in state.items()}

    def answer(body: bytes) -> web.Response:
        sent.append(len(body))
        return web.Response(body=body, content_type="application/json")

    async def node_id(_request: web.Request) -> web.Response:
        return web.json_response(state["topology"]["nodes"][0])

    async def whole_state(_request: web.Request) -> web.Response:
        return answer(whole)

    async def part(request: web.Request) -> web.Response:
        return answer(parts[request.match_info["path"]])

    app = web.Application()
    app.router.add_get("/node_id", node_id)
    app.router.add_get("/state", whole_state)
    if sub_trees:
        app.router.add_get("/state/{path}", part)
    return app


async def _poll(state: dict[str, Any], *, sub_trees: bool, polls: int
                ) -> tuple[list[float], list[float]]:
    """Bytes and CPU ms of each poll (ready models, then nodes, as the router does)."""
    sent: list[int] = []
    runner = web.AppRunner(_app(state, sub_trees=sub_trees, sent=sent))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    sizes: list[float] = []
    cpu_ms: list[float] = []
    try:
        async with aiohttp.ClientSession() as http, ExoClient(
                f"http://127.0.0.1:{port}", session=http, flavour="v1") as exo:
            # Warm-up: connections, and (without sub-trees) the one 404 that makes the
            # client fall back to the whole state.
            await exo.ready_models()
            await exo.nodes()
            for _ in range(polls):
                sent.clear()
                started = time.process_time()
                await exo.ready_models()
                await exo.nodes()
                cpu_ms.append((time.process_time() - started) * 1000)
                sizes.append(float(sum(sent)))
    finally:
        await runner.cleanup()
    return sizes, cpu_ms


async def measure(_tmp: Path, quick: bool) -> list[Section]:
    polls = 5 if quick else 200
    state = four_node_state()
    whole_bytes, whole_cpu = await _poll(state, sub_trees=False, polls=polls)
    part_bytes, part_cpu = await _poll(state, sub_trees=True, polls=polls)
    downloads = len(json.dumps(state["downloads"], separators=(",", ":")))
    total = len(json.dumps(state, separators=(",", ":")))
    return [Section(
        key="state_polling", title="exo v1 endpoint poll: whole /state vs. its sub-trees",
        method=(
            f"A {NODES}-node exo v1 state built from the captured one-node state "
            f"(`tests/data/exo/v1/state_with_instance.json`), {DOWNLOADS_PER_NODE} download "
            f"entries per node as in the captured cluster: {total / 1024:.0f} KB, of which "
            f"`downloads` {downloads / 1024:.0f} KB. One poll is what the router does per "
            "endpoint every `exo.poll_interval_s`: `ready_models()` then `nodes()`. Before: an "
            "exo without `/state/{path}`, so the client reads `/state` twice; after: "
            "`/state/instances`, `/state/runners`, then `/state/{topology,lastSeen,"
            "nodeIdentities,nodeMemory}`. Bytes are the answer bodies sent; CPU is "
            "`time.process_time()` of the one process running both the client and a server "
            f"that sends precomputed bodies (exo's own cost is not included). {polls} polls "
            "each after one warm-up poll."),
        tables=[Table(headers=["poll", "bytes per poll", "CPU ms: p50 (p90, min-max)"], rows=[
            ["whole /state (before)", f"{whole_bytes[0]:,.0f}", spread(whole_cpu)],
            ["sub-trees (after)", f"{part_bytes[0]:,.0f}", spread(part_cpu)],
        ])],
        raw={"whole state bytes": whole_bytes, "whole state cpu (ms)": whole_cpu,
             "sub-tree bytes": part_bytes, "sub-tree cpu (ms)": part_cpu})]
