"""Stored contexts of runs nobody resumed are removed after rlm.keep_contexts_days."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from controller_env import controller_config, running_controller

from kowalski.common.config import RlmConfig
from kowalski.common.errors import NotFoundError, RunNotResumableError
from kowalski.controller.rlm.durable import (
    RunLock,
    close_run,
    context_name,
    expire_contexts,
    load_context,
    store_context,
)
from kowalski.controller.rlm.events import RunStarted
from kowalski.controller.rlm.trajectory import read_trajectory
from kowalski.controller.rlm.trajectory_writer import TrajectoryWriter

DAY_S = 86400.0


async def make_run(runs: Path, run_id: str, *, ended: bool, file: bool = True,
                   age_days: float = 3.0) -> Path:
    """A run's stored context, and its file (with an end or not), last changed age_days ago."""
    name = context_name(run_id, "the context")
    store_context(runs, name, "the context")
    touched = [runs / name]
    if file:
        writer = TrajectoryWriter(runs, run_id)
        await writer.write(RunStarted(
            run_id=run_id, depth=0, query="q", model="m", context_type="str", context_chars=11,
            trajectory_path=str(writer.path), context_chunks=1, started_at=time.time(),
            config=RlmConfig(trajectory_dir=str(runs)), context_file=name))
        if ended:
            await close_run(read_trajectory(run_id, runs), RunNotResumableError("stopped"))
        touched.append(writer.path)
    then = time.time() - age_days * DAY_S
    for path in touched:
        os.utime(path, (then, then))
    return runs / name


async def test_only_contexts_no_resume_is_waiting_for_expire(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    ended_old = await make_run(runs, "rlm-ended-old", ended=True)
    orphan = await make_run(runs, "rlm-orphan", ended=False, file=False)
    # A copy cut off mid-write by a crash, left beside the others.
    partial = runs / "contexts" / "rlm-crashed.txt.1234.part"
    partial.write_text("half")
    then = time.time() - 3 * DAY_S
    os.utime(partial, (then, then))
    kept = [
        await make_run(runs, "rlm-ended-new", ended=True, age_days=1.0),
        # No end: the controller resumes it when it starts.
        await make_run(runs, "rlm-unfinished", ended=False),
        await make_run(runs, "rlm-held", ended=True),
    ]
    lock = RunLock.take(runs, "rlm-held")
    assert lock is not None
    try:
        removed = expire_contexts(runs, 2 * DAY_S)
    finally:
        lock.release()
    assert sorted(removed) == sorted([ended_old.name, orphan.name, partial.name])
    assert [path.exists() for path in kept] == [True, True, True]
    assert not ended_old.exists()
    # A resume asked for later says where the context went.
    with pytest.raises(NotFoundError, match=r"rlm\.keep_contexts_days"):
        load_context(runs / "rlm-ended-old.jsonl", f"contexts/{ended_old.name}")
    # Nothing to look at is not an error.
    assert expire_contexts(tmp_path / "nowhere", DAY_S) == []


async def test_a_serving_controller_expires_old_contexts_and_zero_keeps_them(
        tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    old = await make_run(runs, "rlm-ended-old", ended=True, age_days=30.0)
    forever = controller_config([], [], tmp_path, rlm={"keep_contexts_days": 0})
    async with running_controller(forever):
        await asyncio.sleep(0.3)
    assert old.exists()
    config = controller_config([], [], tmp_path, rlm={"keep_contexts_days": 7})
    async with running_controller(config):
        deadline = time.monotonic() + 10
        while old.exists():
            assert time.monotonic() < deadline, "the old context was not removed"
            await asyncio.sleep(0.02)
