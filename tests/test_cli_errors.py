"""kowalski-ctl's errors: a line or two naming the problem and the next step, never a traceback."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomli_w
from conftest import ServeExo
from exo_standin import DEFAULT_MODEL

from kowalski.controller.cli.arguments import subcommands
from kowalski.controller.cli.exit_codes import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_INCOMPLETE,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
)
from kowalski.controller.cli.main import build_parser

CTL = Path(sys.executable).parent / "kowalski-ctl"
# The hint of a format error: wrong for a file or run that is simply not there.
FORMAT_HINT = "format"


@dataclass(frozen=True)
class Done:
    code: int
    out: str
    err: str


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """An empty home: no user config, no runs, no secret from the test's environment."""
    folder = tmp_path / "home"
    folder.mkdir()
    return folder


async def ctl(home: Path, *argv: str, stdin: bytes = b"") -> Done:
    """The installed kowalski-ctl, as a user runs it."""
    assert CTL.is_file(), f"kowalski-ctl is not installed next to {sys.executable}"
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("KOWALSKI_") and key != "CREDENTIALS_DIRECTORY"}
    process = await asyncio.create_subprocess_exec(
        str(CTL), *argv, cwd=home, env={**env, "HOME": str(home)},
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(stdin), timeout=60)
    assert process.returncode is not None
    return Done(process.returncode, out.decode(), err.decode())


def assert_short_error(done: Done, code: int, *pieces: str) -> None:
    """The exit code, and one or two lines that say what is wrong and hold each piece."""
    assert done.code == code, done
    assert "Traceback" not in done.err, done.err
    lines = [line for line in done.err.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 2, done.err
    assert lines[0].startswith("kowalski-ctl"), done.err
    for piece in pieces:
        assert piece in done.err, (piece, done.err)


@pytest.fixture
def refused_url() -> str:
    """A URL on which nothing listens: a port bound, then let go."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


USAGE_ERRORS = [
    ([], "the following arguments are required: COMMAND"),
    (["launch"], "invalid choice: 'launch'"),
    (["--colour", "status"], "unrecognized arguments: --colour"),
    (["config"], "required: COMMAND"),
    (["config", "init", "--fast"], "unrecognized arguments: --fast"),
    (["config", "validate", "a.toml", "b.toml"], "unrecognized arguments: b.toml"),
    (["serve", "--port", "-5"], "must be from 0 (a free port) to 65535, got -5"),
    (["serve", "--port", "http"], "not a port number: 'http'"),
    (["serve", "--log-level", "loud"], "'loud' is not a level"),
    (["status", "--fast"], "unrecognized arguments: --fast"),
    (["devices", "--json=yes"], "ignored explicit argument"),
    (["run"], "required: prompt"),
    (["run", "q", "--max-iterations", "0"], "must be at least 1, got 0"),
    (["run", "q", "--max-iterations", "-3"], "must be at least 1, got -3"),
    (["run", "q", "--max-iterations", "many"], "not a whole number: 'many'"),
    (["run", "q", "--local", "--url", "http://127.0.0.1:9"], "not allowed with"),
    (["run", "q", "--endpoint", "localhost:11434"], "expected an http:// or https:// URL"),
    (["run", "q", "--endpoint", "http://127.0.0.1:9", "--model-file", "m.gguf"], "not both"),
    (["run", "q", "--api-key-file", "key"], "--api-key-file goes with --endpoint URL"),
    (["run", "q", "--model-file", "m.gguf", "--url", "http://127.0.0.1:9"],
     "leave out --url"),
    (["--url", "http://127.0.0.1:9", "run", "q", "--local"], "not allowed with"),
    (["run", "q", "--languages", "python,cobol"], "'cobol' is not a language"),
    (["runs"], "required: COMMAND"),
    (["runs", "list", "--limit", "0"], "must be at least 1, got 0"),
    (["runs", "show"], "required: run_id"),
    (["runs", "resume"], "required: run_id"),
    (["runs", "resume", "rlm-x", "--max-iterations", "0"], "must be at least 1, got 0"),
    (["batch"], "required: file"),
    (["batch", "in.jsonl", "--concurrency", "0"], "must be at least 1, got 0"),
    (["batch", "-", "--resume"], "--resume needs an output file"),
    (["--url", "http://127.0.0.1:9", "batch", "in.jsonl"], "--url is for status, devices"),
    (["--url", "http://127.0.0.1:9", "config", "init"], "--url is for status, devices"),
    (["--url", "http://127.0.0.1:9", "runs", "list"], "--url is for status, devices"),
]


@pytest.mark.parametrize(("argv", "complaint"), USAGE_ERRORS,
                         ids=[" ".join(argv) or "(nothing)" for argv, _ in USAGE_ERRORS])
async def test_bad_arguments_are_usage_errors_that_point_at_help(
    argv: list[str], complaint: str, home: Path,
) -> None:
    done = await ctl(home, *argv)
    assert_short_error(done, EXIT_USAGE, complaint, "--help`")
    assert done.out == ""


def test_the_usage_sweep_reaches_every_command_and_sub_command() -> None:
    swept = {tuple(word for word in argv if not word.startswith("-"))[:2]
             for argv, _ in USAGE_ERRORS}
    parser = build_parser()
    for name, command in subcommands(parser).items():
        assert (name,) in swept or any(path[:1] == (name,) for path in swept), name
        for sub in subcommands(command):
            assert (name, sub) in swept, (name, sub)


def _all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for sub in subcommands(parser).values():
        found += _all_parsers(sub)
    return found


def test_every_argument_and_command_has_help_text() -> None:
    missing = []
    for parser in _all_parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helped = {choice.dest for choice in action._choices_actions if choice.help}
                missing += [f"{parser.prog} {name}" for name in action.choices
                            if name not in helped]
            elif not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{parser.prog} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


def test_global_options_go_before_or_after_the_command() -> None:
    parser = build_parser()
    for argv in (["--config", "k.toml", "run", "q"], ["run", "q", "--config", "k.toml"],
                 ["-c", "k.toml", "runs", "list"], ["runs", "list", "-c", "k.toml"],
                 ["runs", "-c", "k.toml", "list"], ["config", "validate", "-c", "k.toml"]):
        assert parser.parse_args(argv).config == "k.toml", argv
    for argv in (["--url", "http://c:7080", "status"], ["status", "--url", "http://c:7080"],
                 ["--url", "http://c:7080", "run", "q"], ["run", "q", "--url", "http://c:7080"]):
        assert parser.parse_args(argv).url == "http://c:7080", argv
    # After the command wins, as it is read last; absent there, the earlier value stands.
    assert parser.parse_args(["-c", "a.toml", "status", "-c", "b.toml"]).config == "b.toml"
    assert parser.parse_args(["--url", "http://a", "devices", "--json"]).url == "http://a"


def _config(home: Path, port: int | None = None, **sections: dict[str, object]) -> Path:
    path = home / "kowalski.toml"
    if port is not None:
        sections["controller"] = {"port": port}
    path.write_text(tomli_w.dumps(sections))
    return path


async def test_no_controller_says_how_to_start_one(home: Path, refused_url: str) -> None:
    for argv in (["status", "--url", refused_url], ["--url", refused_url, "devices"],
                 ["devices", "--json", "--url", refused_url]):
        done = await ctl(home, *argv)
        assert_short_error(done, EXIT_UNAVAILABLE, f"no controller answers at {refused_url}",
                           "kowalski-ctl serve", "--url")
    done = await ctl(home, "run", "q", "--url", refused_url)
    assert_short_error(done, EXIT_UNAVAILABLE, "kowalski-ctl serve", "--local")


async def test_the_config_given_after_the_command_is_the_one_used(
    home: Path, refused_url: str,
) -> None:
    port = int(refused_url.rsplit(":", 1)[1])
    config = _config(home, port=port)
    for argv in (["--config", str(config), "status"], ["status", "--config", str(config)],
                 ["run", "q", "-c", str(config)]):
        done = await ctl(home, *argv)
        assert_short_error(done, EXIT_UNAVAILABLE, f"127.0.0.1:{port}", "kowalski-ctl serve")


async def test_a_missing_config_file_points_at_the_option(home: Path) -> None:
    for argv in (["--config", "gone.toml", "status"], ["status", "--config", "gone.toml"],
                 ["config", "validate", "gone.toml"]):
        done = await ctl(home, *argv)
        assert_short_error(done, EXIT_CONFIG, "gone.toml: cannot read the file",
                           "No such file or directory", "--config", "config init")


async def test_a_bad_config_names_the_key(home: Path) -> None:
    config = _config(home, agent={"port": -1})
    done = await ctl(home, "config", "validate", str(config))
    assert_short_error(done, EXIT_CONFIG, "kowalski.toml:agent.port", "config validate")


async def test_validate_checks_the_secret_that_serve_needs(home: Path) -> None:
    config = _config(home, controller={"port": 0})
    validated = await ctl(home, "config", "validate", str(config))
    assert_short_error(validated, EXIT_CONFIG, "no shared secret",
                       "head -c 32 /dev/urandom", "security.secret_file")
    assert f"{config}: valid" in validated.out
    served = await ctl(home, "--config", str(config), "serve")
    assert_short_error(served, EXIT_CONFIG, "no shared secret", "head -c 32 /dev/urandom")
    # The same command with a secret file made as the message says passes validate.
    secret = home / "kowalski.secret"
    secret.write_text("s" * 44 + "\n")
    secret.chmod(0o600)
    config.write_text(tomli_w.dumps({"security": {"secret_file": str(secret)}}))
    done = await ctl(home, "config", "validate", "-c", str(config))
    assert done.code == 0, done
    assert "ok" in done.out
    secret.chmod(0o644)
    done = await ctl(home, "config", "validate", str(config))
    assert_short_error(done, EXIT_CONFIG, "chmod 600")


async def test_missing_files_and_runs_say_where_to_look_not_to_check_the_format(
    home: Path, refused_url: str,
) -> None:
    done = await ctl(home, "run", "q", "--context-file", "gone.txt", "--url", refused_url)
    assert_short_error(done, EXIT_FAILED, "cannot read the context file gone.txt",
                       "No such file or directory", "--context-file")
    assert FORMAT_HINT not in done.err
    (home / "folder").mkdir()
    done = await ctl(home, "run", "q", "--context-file", "folder", "--url", refused_url)
    assert_short_error(done, EXIT_FAILED, "cannot read the context file folder")
    done = await ctl(home, "runs", "--dir", str(home), "show", "rlm-gone")
    assert_short_error(done, EXIT_FAILED, "no trajectory for 'rlm-gone'", "runs list")
    assert FORMAT_HINT not in done.err
    done = await ctl(home, "config", "init", str(home / "no" / "such" / "k.toml"))
    assert_short_error(done, EXIT_FAILED, "cannot write", "No such file or directory")


async def test_batch_checks_its_input_before_starting_any_model(
    home: Path, serve: ServeExo,
) -> None:
    standin, url = await serve(flavour="v1", models=(DEFAULT_MODEL,))
    config = _config(home, exo={"endpoints": [url], "default_model": DEFAULT_MODEL,
                                "embedded": False})
    good = home / "good.jsonl"
    good.write_text('{"id": "q1", "prompt": "p1"}\n')
    empty = home / "empty.jsonl"
    empty.write_text("\n\n")
    bad = home / "bad.jsonl"
    bad.write_text('{"promt": "p1"}\nnot json\n')
    cases = [
        # Through the router, which would start a controller and ask the endpoint.
        (["-c", str(config), "batch", "/nonexistent.jsonl"],
         ["cannot read the batch input /nonexistent.jsonl", '"-" reads stdin']),
        (["batch", str(empty), "-c", str(config)], ["holds no prompts", "docs/BATCH.md"]),
        (["batch", str(bad), "-c", str(config)],
         ["none of its 2 lines can be used", "line 1:", "promt"]),
        (["batch", "-", "-c", str(config)], ["stdin holds no prompts"]),
        (["batch", str(good), "-o", str(home / "gone" / "out.jsonl"), "-c", str(config)],
         ["no directory", "gone", "-o"]),
        # Against one endpoint.
        (["batch", "/nonexistent.jsonl", "--endpoint", url], ["cannot read the batch input"]),
        (["batch", str(bad), "--endpoint", url, "--model", DEFAULT_MODEL], ["can be used"]),
    ]
    for argv, pieces in cases:
        done = await ctl(home, *argv)
        assert_short_error(done, EXIT_FAILED, *pieces)
        assert "ExceptionGroup" not in done.err
    assert sum(standin.counts.values()) == 0, standin.counts
    assert not list(home.glob("*.out.jsonl"))
    # The same endpoint does hear from a batch that can run.
    done = await ctl(home, "batch", str(good), "-c", str(config), "--quiet")
    assert done.code in (0, EXIT_INCOMPLETE), done
    assert sum(standin.counts.values()) > 0
