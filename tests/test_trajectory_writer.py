"""The trajectory writer: posted lines are written soon, in order, and never lost."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from controller_env import controller_config, running_controller

from kowalski.common.config import RlmConfig
from kowalski.controller.rlm import trajectory_writer
from kowalski.controller.rlm.events import RunStarted, SubCallAnswered, TokenCount
from kowalski.controller.rlm.trajectory_writer import LINGER_S, TrajectoryWriter


def sub_call(number: int) -> SubCallAnswered:
    return SubCallAnswered(
        run_id="run", depth=0, iteration=1, block=1, prompt_chars=1, answer_chars=1,
        latency_ms=1.0, tokens=TokenCount(), prompt=f"prompt {number}", answer=f"answer {number}")


def prompts(path: Path) -> list[str]:
    return [json.loads(line)["prompt"] for line in path.read_bytes().splitlines()]


async def test_posted_lines_reach_the_file_without_a_write(tmp_path: Path) -> None:
    writer = TrajectoryWriter(tmp_path, "run")
    for number in range(3):
        writer.post(sub_call(number))
    # post() never waits for the disk: nothing is written yet.
    assert not writer.path.exists()
    # The linger's timer has fired by then (timers fire in order); its flush may still run.
    await asyncio.sleep(2 * LINGER_S)
    await asyncio.gather(*writer._flushes)
    assert prompts(writer.path) == ["prompt 0", "prompt 1", "prompt 2"]


async def test_a_write_lands_after_the_lines_posted_before_it(tmp_path: Path) -> None:
    writer = TrajectoryWriter(tmp_path, "run")
    writer.post(sub_call(0))
    writer.post(sub_call(1))
    await writer.write(sub_call(2))
    # On return, without waiting out the linger: the posted lines first, in order.
    assert prompts(writer.path) == ["prompt 0", "prompt 1", "prompt 2"]
    await asyncio.sleep(2 * LINGER_S)
    assert len(prompts(writer.path)) == 3


async def test_lines_that_could_not_be_written_wait_for_the_next_write(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The run directory cannot be made: a file stands where its parent should be.
    blocker = tmp_path / "runs"
    blocker.write_text("not a directory")
    writer = TrajectoryWriter(blocker / "deeper", "run")
    with caplog.at_level(logging.WARNING):
        writer.post(sub_call(0))
        await asyncio.sleep(2 * LINGER_S)
        await asyncio.gather(*writer._flushes)
    assert "could not write to the trajectory" in caplog.text
    with pytest.raises(NotADirectoryError):
        await writer.write(sub_call(1))
    blocker.unlink()
    await writer.write(sub_call(2))
    assert prompts(writer.path) == ["prompt 0", "prompt 1", "prompt 2"]


async def test_flush_writes_what_was_posted_at_once(tmp_path: Path) -> None:
    writer = TrajectoryWriter(tmp_path, "run")
    writer.post(sub_call(0))
    await writer.flush()
    assert prompts(writer.path) == ["prompt 0"]
    # Nothing left for the linger to write twice.
    await asyncio.sleep(2 * LINGER_S)
    assert prompts(writer.path) == ["prompt 0"]


async def test_a_write_cut_short_leaves_no_part_line_and_the_retry_is_exact(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = TrajectoryWriter(tmp_path, "run")
    await writer.write(sub_call(0))
    real_write = os.write
    failures = [True]

    def disk_fills_up(fd: int, data: Any) -> int:
        # Half of the first batch lands, then the disk is full.
        if failures and os.readlink(f"/proc/self/fd/{fd}") == str(writer.path):
            failures.clear()
            real_write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(trajectory_writer.os, "write", disk_fills_up)
    writer.post(sub_call(1))
    with pytest.raises(OSError, match="No space left"):
        await writer.write(sub_call(2))
    assert prompts(writer.path) == ["prompt 0"]
    await writer.write(sub_call(3))
    assert prompts(writer.path) == ["prompt 0", "prompt 1", "prompt 2", "prompt 3"]


def started(run_id: str, runs: Path) -> RunStarted:
    return RunStarted(run_id=run_id, depth=0, query="q", model="m", context_type="str",
                      context_chars=1, trajectory_path=str(runs / f"{run_id}.jsonl"),
                      context_chunks=1, started_at=0.0, config=RlmConfig())


async def test_a_read_of_a_running_run_sees_every_sub_call_already_reported(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Posted lines wait far longer than the read takes: only the read's flush writes them.
    monkeypatch.setattr(trajectory_writer, "LINGER_S", 60.0)
    runs = tmp_path / "runs"
    async with running_controller(controller_config([], [], tmp_path)) as running:
        root, child = TrajectoryWriter(runs, "rlm-live"), TrajectoryWriter(runs, "rlm-live-s1")
        other = TrajectoryWriter(runs, "rlm-livelier")
        for writer in (root, child, other):
            await writer.write(started(writer.path.stem, runs))
            writer.post(sub_call(1))
        async with aiohttp.ClientSession() as http, http.get(
                f"{running.base_url}/v1/runs/rlm-live?descendants=1") as response:
            assert response.status == 200, await response.text()
            body = await response.json()
        assert [event["kind"] for event in body["events"]] == ["run_started", "sub_call"]
        [below] = body["descendants"]
        assert [event["kind"] for event in below["events"]] == ["run_started", "sub_call"]
        # Another run's queue is left to its own linger.
        assert len(other.path.read_bytes().splitlines()) == 1
        await other.flush()
