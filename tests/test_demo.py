"""scripts/demo.sh on a terminal: it streams the reply, ends, and says what to run next."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.demo import REPO_ROOT, demo_question, run_demo

pytestmark = pytest.mark.timeout(400)


def _closing(lines: list[str]) -> list[str]:
    for index, line in enumerate(lines):
        if line.startswith("That was SmolLM2-135M"):
            return lines[index:]
    pytest.fail("the demo printed no closing lines:\n" + "\n".join(lines[-20:]))


@pytest.mark.model
def test_demo_streams_the_reply_then_names_the_real_model_commands(tmp_path: Path) -> None:
    run = run_demo()
    assert run.exit_code == 0, "\n".join(run.output[-20:])
    assert run.model_loaded_s is not None
    assert run.first_token_s is not None
    assert run.model_loaded_s < run.first_token_s < run.total_s
    closing = _closing(run.output)
    text = "\n".join(closing)
    assert "a 135M-parameter model shows the machinery" in " ".join(closing)
    question, context = demo_question()
    commands = {label: line.split(":", 1)[1].strip() for line in closing
                for label in ("a GGUF file", "an OpenAI-compatible server", "an exo cluster")
                if line.strip().startswith(label + ":")}
    assert set(commands) == {"a GGUF file", "an OpenAI-compatible server", "an exo cluster"}
    for command in commands.values():
        assert command.startswith('.venv/bin/kowalski-ctl ')
        assert f'run "{question}" --context-file {context.relative_to(REPO_ROOT)}' in command
    assert "--model-file PATH.gguf" in commands["a GGUF file"]
    assert "--endpoint http://" in commands["an OpenAI-compatible server"]
    assert "kowalski-ctl --config kowalski.toml serve" in text
    # The printed line runs as printed: with no file at PATH.gguf it says exactly that.
    gguf = subprocess.run(
        [sys.executable, "-m", "kowalski.controller", "run", question, "--context-file",
         str(context), "--model-file", str(tmp_path / "PATH.gguf")],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert gguf.returncode != 0
    assert "PATH.gguf: no such file" in gguf.stderr, gguf.stderr
