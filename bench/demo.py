"""`bash scripts/demo.sh` timed from its own output on a terminal: first token and total time."""

from __future__ import annotations

import asyncio
import os
import pty
import re
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import REPO_ROOT
from bench.report import Section, Table, Target, fmt, p50
from kowalski.common.errors import EmbeddedModelError
from kowalski.controller.cli.run import ANSWERED
from kowalski.controller.models.embedded import locate_weights, require_server_package

DEMO = REPO_ROOT / "scripts" / "demo.sh"
# The goals: the first token within 10 s of the model loading, the end within 90 s.
FIRST_TOKEN_LIMIT_S = 10.0
TOTAL_LIMIT_S = 90.0
# The right answer to the demo's question about examples/warehouses.txt.
ANSWER = "Tampere"
# Past this the demo counts as hung and is stopped (its own limit is 75 s of run time).
_KILL_AFTER_S = 240.0
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")
# Printed by the CLI once the model has loaded and the agent answers: the run has begun.
_RUN_STARTED = re.compile(r"^run \S+: model ", re.MULTILINE)
# Printed by the live reply with the first piece of the model's first reply.
_FIRST_TOKEN = "── iteration 1\n"
_ANSWER_HEADER = re.compile(r"^=== (answer|no answer) \(([^):]+)", re.MULTILINE)


def demo_question() -> tuple[str, Path]:
    """The question and context file scripts/demo.sh uses when given none."""
    script = DEMO.read_text()
    question = re.search(r'question="\$\{1:-(.*)\}"', script)
    context = re.search(r'context="\$\{2:-(.*)\}"', script)
    if question is None or context is None:
        raise RuntimeError(f"{DEMO} no longer sets its default question and context file")
    return question.group(1), REPO_ROOT / context.group(1)


@dataclass
class DemoRun:
    """Seconds from the start of the script to each line that marks a stage, and its end."""

    # The script's own: 0 also when the run stopped at a limit (the stop reason says so).
    exit_code: int = -1
    model_loaded_s: float | None = None
    first_token_s: float | None = None
    total_s: float = 0.0
    answered: bool = False
    stop_reason: str = ""
    has_answer: bool = False
    output: list[str] = field(default_factory=list)

    @property
    def first_token_after_load_s(self) -> float | None:
        if self.model_loaded_s is None or self.first_token_s is None:
            return None
        return self.first_token_s - self.model_loaded_s


def _read_terminal(fd: int, run: DemoRun, started: float) -> None:
    """Read the demo's terminal until it closes, noting when each marker first shows."""
    text = ""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: every process holding the terminal has exited
            break
        if not chunk:
            break
        now = time.monotonic() - started
        text += _ANSI.sub("", chunk.decode(errors="replace"))
        if run.model_loaded_s is None and _RUN_STARTED.search(text):
            run.model_loaded_s = now
        if run.first_token_s is None and _FIRST_TOKEN in text:
            run.first_token_s = now
    run.output = text.splitlines()


def run_demo(timeout_s: float = _KILL_AFTER_S) -> DemoRun:
    """Run scripts/demo.sh once on a pseudo-terminal (the live reply needs one)."""
    run = DemoRun()
    main, terminal = pty.openpty()
    env = {**os.environ, "KOWALSKI_SKIP_SETUP": "1", "COLUMNS": "120", "TERM": "xterm"}
    started = time.monotonic()
    process = subprocess.Popen(["bash", str(DEMO)], cwd=REPO_ROOT, stdin=terminal,
                               stdout=terminal, stderr=terminal, env=env,
                               start_new_session=True)
    os.close(terminal)
    try:
        _read_terminal(main, run, started)
        run.exit_code = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        run.exit_code = process.wait()
    finally:
        os.close(main)
    run.total_s = time.monotonic() - started
    text = "\n".join(run.output)
    header = _ANSWER_HEADER.search(text)
    if header is not None:
        run.stop_reason = header.group(2).strip()
        run.answered = run.stop_reason in ANSWERED
        run.has_answer = ANSWER in text[header.start():].split("\n---", 1)[0]
    return run


def _seconds(value: float | None) -> str:
    return "-" if value is None else fmt(value, 1)


async def measure(tmp: Path, quick: bool) -> list[Section]:
    title = "The demo, end to end: first token and total time"
    try:
        require_server_package()
        locate_weights()
    except EmbeddedModelError as exc:
        return [Section(key="demo", title=title, method="", skipped=exc.message)]
    count = 1 if quick else 3
    runs = [await asyncio.to_thread(run_demo) for _ in range(count)]
    rows = [[str(number), str(run.exit_code), _seconds(run.model_loaded_s),
             _seconds(run.first_token_after_load_s), _seconds(run.total_s),
             run.stop_reason or "-", "yes" if run.has_answer else "no"]
            for number, run in enumerate(runs, start=1)]
    after_load = [s for run in runs if (s := run.first_token_after_load_s) is not None]
    totals = [run.total_s for run in runs]
    unfinished = [run for run in runs if run.exit_code != 0]
    if unfinished:
        tail = "\n".join(unfinished[0].output[-15:])
        raise RuntimeError(f"the demo exited with {unfinished[0].exit_code}:\n{tail}")
    if not after_load:
        raise RuntimeError("the demo never showed a token: " + "\n".join(runs[0].output[-15:]))
    question, context = demo_question()
    return [Section(
        key="demo", title=title,
        method=(
            f"`bash scripts/demo.sh` with its default question (\"{question}\" about "
            f"{context.relative_to(REPO_ROOT)}), {count} times one after the other, each on a "
            "pseudo-terminal as a person would run it (the live reply needs one), set-up "
            "already done (`KOWALSKI_SKIP_SETUP=1` skips re-running scripts/setup.sh). Times "
            "are read from the script's own output as it arrives: the model has loaded when "
            "the run's first line (`run …: model …`) shows, which the CLI prints once the "
            "embedded model serves and the local agent answers; the first token is the live "
            f"reply's `{_FIRST_TOKEN.strip()}` line, written with the reply's first piece; "
            "total is the script's start to its exit. Command: "
            f"`{shlex.join(['bash', 'scripts/demo.sh'])}`."),
        tables=[Table(headers=["run", "exit", "model loaded (s)", "first token after load (s)",
                               "total (s)", "stop", f"answer has {ANSWER}"], rows=rows)],
        targets=[
            Target(name="demo first token after model load p50", measured=p50(after_load),
                   limit=FIRST_TOKEN_LIMIT_S, unit="s"),
            Target(name="demo total time max", measured=max(totals), limit=TOTAL_LIMIT_S,
                   unit="s"),
        ],
        notes=[f"{sum(run.has_answer for run in runs)} of {count} runs answered {ANSWER}; "
               f"{sum(run.answered for run in runs)} ended with the model's own answer "
               "(FINAL), the others at a limit (the stop column). Total p50 "
               f"{fmt(p50(totals), 1)} s."],
        raw={"model loaded s": [run.model_loaded_s or 0.0 for run in runs],
             "first token after load s": after_load, "total s": totals},
    )]
