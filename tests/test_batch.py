"""Batches against the exo stand-in: order, concurrency, errors, retries, cache, resume."""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession
from exo_standin import DEFAULT_MODEL, ExoStandin, FlakyServer
from hypothesis import given
from hypothesis import strategies as st

import kowalski.controller
from kowalski.common.config import ControllerConfig, ExoConfig
from kowalski.controller.batch.progress import Progress, ProgressBar, render_bar
from kowalski.controller.batch.runner import (
    BatchItem,
    ExoClientBackend,
    ItemFailure,
    ItemResult,
    ItemSuccess,
    decode_result,
    journal_path,
    parse_batch_line,
    read_batch,
    run_batch,
    run_batch_file,
)
from kowalski.controller.circuit import CircuitPolicy
from kowalski.controller.models.cache import CachedBackend, ResultCache
from kowalski.controller.models.exo_client import ExoClient
from kowalski.controller.models.router import LlmRouter
from kowalski.controller.retry import RetryPolicy

CHAT = "/v1/chat/completions"
FAST = RetryPolicy(max_attempts=3, base_delay_ms=1, max_delay_ms=5)
ONCE = RetryPolicy(max_attempts=1, base_delay_ms=1, max_delay_ms=1)
Serve = Callable[..., Awaitable[tuple[ExoStandin, str]]]
MakeBackend = Callable[[str], ExoClientBackend]


def items(*prompts: str, model: str = DEFAULT_MODEL) -> list[BatchItem | ItemFailure]:
    # Temperature 0: only deterministic requests are answered from the cache.
    lines = [json.dumps({"id": f"q{i}", "prompt": text, "model": model, "temperature": 0})
             for i, text in enumerate(prompts)]
    return read_batch("\n".join(lines).encode(), default_model=DEFAULT_MODEL)


def prompt_of(body: dict[str, Any]) -> str:
    return str(body["messages"][-1]["content"])


def ok(result: ItemResult) -> ItemSuccess:
    assert isinstance(result, ItemSuccess), result
    return result


def failed(result: ItemResult) -> ItemFailure:
    assert isinstance(result, ItemFailure), result
    return result


@pytest.fixture
async def backend_for() -> AsyncIterator[MakeBackend]:
    made: list[ExoClient] = []

    def make(url: str) -> ExoClientBackend:
        made.append(ExoClient(url))
        return ExoClientBackend(made[-1])

    yield make
    for client in made:
        await client.close()


class InFlight:
    """A stand-in reply that waits, and records how many requests were in flight at once."""

    def __init__(self, delay_s: Callable[[str], float]) -> None:
        self.delay_s = delay_s
        self.now = 0
        self.most = 0

    async def __call__(self, body: dict[str, Any]) -> str:
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            await asyncio.sleep(self.delay_s(prompt_of(body)))
        finally:
            self.now -= 1
        return f"You said: {prompt_of(body)}"


# --- running against the stand-in -----------------------------------------------------------


async def test_results_keep_input_order_under_random_latencies(
    serve: Serve, backend_for: MakeBackend,
) -> None:
    rng = random.Random(7)
    delays = {f"p{i}": rng.uniform(0.0, 0.03) for i in range(30)}
    _, url = await serve(reply=InFlight(delays.__getitem__))
    landed: list[ItemResult] = []
    run = await run_batch(items(*delays), backend_for(url), concurrency=8, policy=FAST,
                          on_result=landed.append)
    assert [ok(r).text for r in run.results] == [f"You said: p{i}" for i in range(30)]
    assert [r.id for r in run.results] == [f"q{i}" for i in range(30)]
    assert [r.index for r in run.results] == list(range(30))
    # The latencies did reorder completion, so the order above was restored, not luck.
    assert [r.index for r in landed] != list(range(30))
    assert (run.summary.ok, run.summary.failed, run.summary.total) == (30, 0, 30)
    assert run.summary.completion_tokens == sum(ok(r).usage.completion_tokens for r in run.results)


async def test_concurrency_bound_is_respected(serve: Serve, backend_for: MakeBackend) -> None:
    gauge = InFlight(lambda _prompt: 0.02)
    standin, url = await serve(reply=gauge)
    run = await run_batch(items(*(f"p{i}" for i in range(12))), backend_for(url),
                          concurrency=3, policy=FAST)
    assert run.summary.ok == 12
    assert gauge.most == 3
    assert standin.counts[CHAT] == 12


async def test_a_failing_model_fails_its_items_but_not_the_batch(
    serve: Serve, backend_for: MakeBackend,
) -> None:
    # exo v0 answers 400 for a model it does not serve: nothing a retry can fix.
    standin, url = await serve(flavour="v0")
    batch = items("a", "b", "c", "d")
    batch[1] = parse_batch_line(json.dumps({"id": "q1", "prompt": "b", "model": "no-such-model"}),
                                index=1, line=2, default_model=DEFAULT_MODEL)
    run = await run_batch(batch, backend_for(url), concurrency=2, policy=FAST)
    error = failed(run.results[1]).error
    assert (error.code, error.retryable, failed(run.results[1]).attempts) == \
        ("exo_unknown_model", False, 1)
    assert "no-such-model" in error.message
    assert [ok(run.results[i]).text for i in (0, 2, 3)] == ["You said: a", "You said: c",
                                                            "You said: d"]
    assert (run.summary.ok, run.summary.failed) == (3, 1)
    assert standin.counts[CHAT] == 4


async def test_recoverable_errors_are_retried_until_attempts_run_out(
    serve: Serve, backend_for: MakeBackend,
) -> None:
    # exo v1 with no instance of the model: another try (or endpoint) could help.
    standin, url = await serve(flavour="v1")
    batch = [parse_batch_line('{"prompt": "x", "model": "unplaced"}', index=0, line=1,
                              default_model="")]
    run = await run_batch(batch, backend_for(url), concurrency=1, policy=FAST)
    result = failed(run.results[0])
    assert (result.id, result.error.code, result.error.retryable) == (1, "exo_no_instance", True)
    assert result.attempts == 3
    assert standin.counts[CHAT] == 3
    assert run.summary.retries == 2


async def test_recoverable_errors_are_retried_then_succeed(
    serve: Serve, backend_for: MakeBackend,
) -> None:
    standin, url = await serve()
    standin.fail("http_500", times=2)
    run = await run_batch(items("persist"), backend_for(url), concurrency=1, policy=FAST)
    result = ok(run.results[0])
    assert (result.text, result.attempts, result.cached) == ("You said: persist", 3, False)
    assert standin.counts[CHAT] == 3
    assert run.summary.retries == 2


@pytest.mark.parametrize("concurrency", [1, 4])
async def test_repeated_prompts_are_answered_from_the_cache(
    serve: Serve, backend_for: MakeBackend, concurrency: int,
) -> None:
    standin, url = await serve(reply=InFlight(lambda _prompt: 0.01))
    cache = ResultCache(ttl_s=60.0, max_entries=16)
    backend = CachedBackend(backend_for(url), cache)
    run = await run_batch(items("a", "b", "a", "a"), backend, concurrency=concurrency,
                          policy=FAST)
    assert [ok(r).text for r in run.results] == ["You said: a", "You said: b"] + [
        "You said: a"] * 2
    assert [ok(r).cached for r in run.results] == [False, False, True, True]
    assert standin.counts[CHAT] == 2
    assert run.summary.cached == 2
    fresh = [ok(r) for r in run.results if not ok(r).cached]
    assert run.summary.completion_tokens == sum(r.usage.completion_tokens for r in fresh)
    stats = cache.stats()
    assert stats.hits + stats.shared == 2


async def test_progress_counts_every_item_once(serve: Serve, backend_for: MakeBackend) -> None:
    standin, url = await serve(flavour="v0")
    bad = parse_batch_line("{oops", index=3, line=4, default_model=DEFAULT_MODEL)
    batch = [*items("a", "b", "a"), bad]
    seen: list[Progress] = []
    backend = CachedBackend(backend_for(url), ResultCache(ttl_s=60, max_entries=4))
    await run_batch(batch, backend, concurrency=1, policy=FAST, on_progress=seen.append)
    assert [p.done for p in seen] == [0, 1, 2, 3, 4]
    assert {p.total for p in seen} == {4}
    last = seen[-1]
    assert (last.ok, last.failed, last.cached, last.resumed) == (3, 1, 1, 0)
    assert last.completion_tokens > 0
    assert standin.counts[CHAT] == 2


async def test_concurrency_must_be_positive() -> None:
    async with ExoClient("http://127.0.0.1:9") as client:
        with pytest.raises(ValueError, match="at least 1"):
            await run_batch([], ExoClientBackend(client), concurrency=0)


# --- input lines -----------------------------------------------------------------------------


# A bad line, what its error says, and its id (a usable id on the line, else the line number).
BAD_LINES = [
    ("{not json", "malformed", 9),
    ("[1, 2]", "Expected `object`", 9),
    ('{"id": "x"}', "either `prompt` or `messages`", "x"),
    ('{"prompt": "a", "messages": [{"role": "user", "content": "b"}]}', "either", 9),
    ('{"id": "typed", "prompt": 5}', "Expected `str | null`, got `int`", "typed"),
    ('{"id": 3, "prompt": "a", "temprature": 0.5}', "unknown field `temprature`", 3),
    ('{"id": true, "prompt": "a"}', "`$.id`", 9),
    ('{"messages": []}', "`messages` is empty", 9),
    ('{"messages": [{"role": "wizard", "content": "b"}]}', "$.messages[0].role", 9),
    ('{"prompt": "a", "max_tokens": 0}', "$.max_tokens", 9),
    ('{"messages": [{"role": "user", "content": "b"}], "system": "s"}', "`system` goes with", 9),
]


@pytest.mark.parametrize(("text", "expected", "item_id"), BAD_LINES)
def test_bad_lines_become_failed_items_naming_the_line(
    text: str, expected: str, item_id: str | int,
) -> None:
    result = parse_batch_line(text, index=4, line=9, default_model=DEFAULT_MODEL)
    assert isinstance(result, ItemFailure)
    assert (result.id, result.index, result.line, result.error.code) == (
        item_id, 4, 9, "parse_error")
    assert result.error.message.startswith("line 9: ")
    assert expected in result.error.message
    assert not result.error.retryable


def test_a_line_without_a_model_needs_a_default() -> None:
    result = parse_batch_line('{"prompt": "a"}', index=0, line=1, default_model="")
    assert isinstance(result, ItemFailure)
    assert "no model" in result.error.message


def test_good_lines_become_requests() -> None:
    data = (b'{"id": "a", "prompt": "hi", "system": "be brief", "max_tokens": 5}\n\n   \n'
            b'{"messages": [{"role": "user", "content": "yo"}], "model": "m2", "temperature": 1,'
            b' "stop": ["\\n"], "seed": 4, "top_p": 0.5}\n'
            b'{"id": 17, "prompt": "\xff"}\n')
    first, second, third = read_batch(data, default_model="m1")
    assert isinstance(first, BatchItem)
    assert isinstance(second, BatchItem)
    assert (first.id, first.index, first.line, first.request.model) == ("a", 0, 1, "m1")
    assert [(m.role, m.content) for m in first.request.messages] == [("system", "be brief"),
                                                                     ("user", "hi")]
    assert first.request.max_tokens == 5
    # No id: the line number stands in; blank lines are skipped but still counted.
    assert (second.id, second.index, second.line, second.request.model) == (4, 1, 4, "m2")
    assert (second.request.temperature, second.request.stop, second.request.seed) == (
        1.0, ["\n"], 4)
    assert isinstance(third, ItemFailure)
    assert (third.id, third.line) == (5, 5)
    assert "not UTF-8" in third.error.message


@given(st.binary(max_size=200) | st.text(max_size=200))
def test_parsing_never_raises(text: bytes | str) -> None:
    result = parse_batch_line(text, index=0, line=1, default_model="m")
    assert isinstance(result, BatchItem | ItemFailure)


# --- files and resume ------------------------------------------------------------------------


def read_results(path: Path) -> list[ItemResult]:
    results = [decode_result(line) for line in path.read_bytes().splitlines()]
    assert None not in results
    return results


async def test_file_batch_writes_every_line_in_input_order(
    serve: Serve, backend_for: MakeBackend, tmp_path: Path,
) -> None:
    standin, url = await serve(reply=InFlight(lambda prompt: 0.02 if prompt == "slow" else 0))
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": "s", "prompt": "slow"}\n{"prompt": "fast", "temperature": 0}\n'
                      'not json\n{"prompt": "fast", "temperature": 0}\n')
    output = tmp_path / "out.jsonl"
    backend = CachedBackend(backend_for(url), ResultCache(ttl_s=60, max_entries=8))
    summary = await run_batch_file(source, output, backend, concurrency=4,
                                   default_model=DEFAULT_MODEL, policy=FAST)
    results = read_results(output)
    assert [(r.id, r.index, r.ok) for r in results] == [("s", 0, True), (2, 1, True),
                                                        (3, 2, False), (4, 3, True)]
    assert [ok(results[i]).cached for i in (0, 1, 3)] == [False, False, True]
    assert (summary.total, summary.ok, summary.failed, summary.cached) == (4, 3, 1, 1)
    assert summary.wall_s > 0
    assert "4 items: 3 ok, 1 failed, 1 cached" in summary.describe()
    assert not journal_path(output).exists()
    assert standin.counts[CHAT] == 2


async def test_resume_keeps_finished_items_and_retries_recoverable_failures(
    serve: Serve, backend_for: MakeBackend, tmp_path: Path,
) -> None:
    standin, url = await serve(flavour="v0")
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "p0"}\n{"prompt": "p1"}\n{"prompt": "p2", "model": "gone"}\n')
    output = tmp_path / "out.jsonl"
    standin.fail("http_500", times=1)
    first = await run_batch_file(source, output, backend_for(url), concurrency=1,
                                 default_model=DEFAULT_MODEL, policy=ONCE)
    assert (first.ok, first.failed) == (1, 2)
    assert failed(read_results(output)[0]).error.retryable
    second = await run_batch_file(source, output, backend_for(url), concurrency=1,
                                  default_model=DEFAULT_MODEL, policy=ONCE, resume=True)
    # Only p0, whose failure a retry could fix, was asked again.
    assert [prompt_of(body) for body in standin.chat_requests] == ["p0", "p1", "p2", "p0"]
    assert (second.resumed, second.ok, second.failed) == (2, 2, 1)
    results = read_results(output)
    assert [r.ok for r in results] == [True, True, False]
    assert failed(results[2]).error.code == "exo_unknown_model"


async def test_resume_redoes_items_whose_line_changed(
    serve: Serve, backend_for: MakeBackend, tmp_path: Path,
) -> None:
    standin, url = await serve()
    source = tmp_path / "in.jsonl"
    output = tmp_path / "out.jsonl"
    source.write_text('{"id": "a", "prompt": "p0"}\n{"id": "b", "prompt": "p1"}\n')
    await run_batch_file(source, output, backend_for(url), concurrency=1,
                         default_model=DEFAULT_MODEL, policy=ONCE)
    source.write_text('{"id": "a", "prompt": "p0"}\n{"id": "c", "prompt": "p2"}\n'
                      '{"id": "d", "prompt": "p3"}\n')
    summary = await run_batch_file(source, output, backend_for(url), concurrency=1,
                                   default_model=DEFAULT_MODEL, policy=ONCE, resume=True)
    assert [prompt_of(body) for body in standin.chat_requests] == ["p0", "p1", "p2", "p3"]
    assert summary.resumed == 1
    assert [r.id for r in read_results(output)] == ["a", "c", "d"]


def batch_env() -> dict[str, str]:
    # The package's parent directory, so the child imports the same kowalski as the tests.
    package_root = Path(os.path.abspath(kowalski.controller.__file__)).parents[2]
    paths = [str(package_root), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


async def start_batch(url: str, source: Path | str, *args: str, config: Path | None = None,
                      ) -> asyncio.subprocess.Process:
    """kowalski-ctl batch against one endpoint, without the router."""
    config_args = ("--config", str(config)) if config else ()
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kowalski.controller", *config_args, "batch", str(source),
        "--endpoint", url, "--model", DEFAULT_MODEL, *args, env=batch_env(),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


def finished_in(journal: Path) -> list[ItemResult]:
    # The line being written when the process died may be torn; it does not count.
    lines = journal.read_bytes().splitlines() if journal.exists() else []
    return [r for r in map(decode_result, lines) if r is not None]


async def test_killed_batch_resumes_without_asking_finished_items_again(
    serve: Serve, tmp_path: Path,
) -> None:
    total, finish_first, concurrency = 30, 10, 3
    gate = asyncio.Event()

    async def reply(body: dict[str, Any]) -> str:
        # The first items answer at once; the rest hang until the gate opens, so the
        # kill lands at a known point with calls in flight.
        prompt = prompt_of(body)
        if int(prompt[1:]) >= finish_first:
            await gate.wait()
        return f"You said: {prompt}"

    standin, url = await serve(reply=reply)
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"p{i}"}) + "\n"
                              for i in range(total)))
    output = tmp_path / "out.jsonl"
    journal = journal_path(output)
    args = ("-o", str(output), "--concurrency", str(concurrency), "--quiet")
    process = await start_batch(url, source, *args)
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while len(finished_in(journal)) < finish_first or len(standin.chat_requests) < (
                finish_first + concurrency):
            assert process.returncode is None, await process.communicate()
            assert asyncio.get_running_loop().time() < deadline, "the batch made no progress"
            await asyncio.sleep(0.01)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGKILL)
        await process.communicate()
    assert process.returncode == -signal.SIGKILL
    done_before = [r.id for r in finished_in(journal)]
    assert sorted(done_before) == sorted(f"q{i}" for i in range(finish_first))
    assert not output.exists()

    gate.set()
    process = await start_batch(url, source, *args, "--resume")
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0, stderr.decode()
    assert f"{total} items: {total} ok" in stderr.decode()
    assert f"{finish_first} resumed" in stderr.decode()
    results = read_results(output)
    assert [r.id for r in results] == [f"q{i}" for i in range(total)]
    assert [ok(r).text for r in results] == [f"You said: p{i}" for i in range(total)]
    asked = Counter(prompt_of(body) for body in standin.chat_requests)
    assert [asked[f"p{i}"] for i in range(finish_first)] == [1] * finish_first
    # Only the calls in flight at the kill were made twice.
    assert sorted(asked.values()) == [1] * (total - concurrency) + [2] * concurrency
    assert not journal.exists()


async def test_endpoint_batch_from_stdin_streams_results_to_stdout_in_order(
    serve: Serve, tmp_path: Path,
) -> None:
    _, url = await serve(reply=InFlight(lambda prompt: 0.03 if prompt == "p0" else 0))
    lines = b'{"prompt": "p0"}\n{"prompt": "p1", "model": "gone"}\n{"prompt": "p2"}\n'
    process = await start_batch(url, "-", "--concurrency", "3", "--quiet",
                                config=write_config(tmp_path))
    stdout, stderr = await asyncio.wait_for(process.communicate(lines), timeout=30)
    # 5: the batch ran, and some items failed.
    assert process.returncode == 5, stderr.decode()
    results = [decode_result(line) for line in stdout.splitlines()]
    assert [(r.line, r.ok) for r in results] == [(1, True), (2, False), (3, True)]
    assert "3 items: 2 ok, 1 failed" in stderr.decode()


@pytest.mark.parametrize(("args", "complaint"), [
    (["-o", "-", "--resume"], "--resume needs an output file"),
    (["-", "--resume"], "--resume needs an output file"),
    (["--concurrency", "0"], "must be at least 1"),
    (["--concurrency", "many"], "not a whole number"),
])
def test_batch_usage_errors_exit_2_and_say_what_is_wrong(
    args: list[str], complaint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    from kowalski.controller.cli.main import main

    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "p0"}\n')
    argv = ["batch", *(args if args[0] == "-" else [str(source), *args]),
            "--endpoint", "http://127.0.0.1:9"]
    try:
        code = main(argv)
    except SystemExit as exit:
        code = exit.code
    assert code == 2
    err = capsys.readouterr().err
    assert complaint in err
    assert "Traceback" not in err
    assert not source.with_suffix(".out.jsonl").exists()


def write_config(tmp_path: Path) -> Path:
    # Few, fast retries: exo v1 calls a missing instance recoverable.
    path = tmp_path / "kowalski.toml"
    path.write_text("[controller]\nretry_max_attempts = 2\nretry_base_delay_ms = 1\n"
                    "retry_max_delay_ms = 2\n")
    return path


# --- progress display ------------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_bar_redraws_in_place_and_ends_its_line() -> None:
    screen = Terminal()
    bar = ProgressBar(screen, columns=90, min_interval_s=0.0)
    for done in range(11):
        bar.update(Progress(total=10, done=done, ok=done, elapsed_s=done * 0.5))
    bar.close()
    bar.close()
    text = screen.getvalue()
    frames = text.split("\r")[1:]
    assert len(frames) == 11
    assert frames[-1].startswith("[" + "#" * 30 + "] 10/10 (100%)")
    assert frames[5].startswith("[" + "#" * 15 + "." * 15 + "]")
    assert "10/10 (100%)" in frames[-1]
    assert text.endswith("\n")
    assert text.count("\n") == 1
    assert all(len(frame.split("\x1b")[0]) <= 89 for frame in frames)


def test_terminal_bar_is_throttled_but_shows_the_end() -> None:
    clock = iter([0.0, 0.01, 0.02, 0.2, 0.21]).__next__
    screen = Terminal()
    bar = ProgressBar(screen, columns=80, min_interval_s=0.1, clock=clock)
    for done in range(1, 6):
        bar.update(Progress(total=5, done=done, ok=done, elapsed_s=1.0))
    # Drawn at 0.0 and 0.2, and for the last item although it came soon after.
    assert screen.getvalue().count("\r") == 3
    assert "5/5" in screen.getvalue()


def test_plain_progress_writes_an_occasional_line_or_nothing() -> None:
    ticks = iter(range(0, 30)).__next__
    log = io.StringIO()
    bar = ProgressBar(log, plain_interval_s=10.0, clock=lambda: float(ticks()))
    for done in range(25):
        bar.update(Progress(total=100, done=done, ok=done, failed=0, elapsed_s=done))
    bar.close()
    lines = log.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["10/100", "20/100"]
    assert all(line.startswith("batch: ") and "\r" not in line for line in lines)
    silent = io.StringIO()
    quiet = ProgressBar(silent, plain_interval_s=0)
    quiet.update(Progress(total=1, done=1, ok=1))
    quiet.close()
    assert silent.getvalue() == ""


def test_narrow_terminal_drops_the_bar() -> None:
    progress = Progress(total=3, done=1, ok=1, cached=1, failed=0, elapsed_s=2.0)
    assert render_bar(progress, 30).startswith("1/3")
    assert render_bar(progress, 120).startswith("[")
    assert "ETA 0:04" in render_bar(progress, 120)


# --- outages and signals ---------------------------------------------------------------------


async def test_a_three_second_outage_fails_no_item_of_a_500_item_batch() -> None:
    total, outage_s = 500, 3.0
    done = [0]
    fifth_done = asyncio.Event()

    async def reply(body: dict[str, Any]) -> str:
        await asyncio.sleep(0.02)
        done[0] += 1
        if done[0] >= total // 5:
            fifth_done.set()
        return f"You said: {prompt_of(body)}"

    standin = ExoStandin(reply=reply)
    standin.set_model(DEFAULT_MODEL)
    server = FlakyServer(standin)
    await server.up()
    url = f"http://127.0.0.1:{server.port}"
    settings = ControllerConfig(circuit_reset_s=2.0)
    async with ClientSession() as http:
        router = LlmRouter(config=ExoConfig(endpoints=[url], poll_interval_s=0.5), urls=[url],
                           session=http, policy=RetryPolicy.from_config(settings),
                           circuit_policy=CircuitPolicy.from_config(settings),
                           load_penalty=settings.load_penalty)
        refresher = asyncio.create_task(router.run())
        outage: list[float] = []

        async def go_down_and_back() -> None:
            await fifth_done.wait()
            outage.append(asyncio.get_running_loop().time())
            await server.down()
            await asyncio.sleep(outage_s)
            await server.up()
            outage.append(asyncio.get_running_loop().time())

        flaky = asyncio.create_task(go_down_and_back())
        try:
            await router.refresh()
            run = await run_batch(items(*(f"p{i}" for i in range(total))), router,
                                  concurrency=16, policy=RetryPolicy.from_config(settings))
            await flaky
        finally:
            refresher.cancel()
            await asyncio.gather(refresher, return_exceptions=True)
            await router.close()
            await server.down()
    assert len(outage) == 2
    assert run.summary.failed == 0, [r for r in run.results if not r.ok][:3]
    assert [ok(r).text for r in run.results] == [f"You said: p{i}" for i in range(total)]
    assert run.summary.retries > 0
    # Each item waited for the circuit instead of spending its attempts while it was open.
    assert max(ok(r).attempts for r in run.results) <= settings.retry_max_attempts * 4


async def test_batch_with_one_endpoint_rides_out_its_outage_behind_a_circuit(
    tmp_path: Path,
) -> None:
    total, outage_s = 200, 2.0
    done = [0]
    tenth_done = asyncio.Event()

    async def reply(body: dict[str, Any]) -> str:
        await asyncio.sleep(0.02)
        done[0] += 1
        if done[0] >= total // 10:
            tenth_done.set()
        return f"You said: {prompt_of(body)}"

    standin = ExoStandin(reply=reply)
    standin.set_model(DEFAULT_MODEL)
    server = FlakyServer(standin)
    await server.up()
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps({"id": f"i{n}", "prompt": f"p{n}"}) + "\n"
                              for n in range(total)))
    config = tmp_path / "config.toml"
    # Attempts alone (three, a few hundred ms apart) cannot span the outage; the circuit can.
    # Its first probe comes after the outage: a probe that met the server still down would
    # spend the probing item's attempts, and under load that made the test flaky.
    config.write_text("[controller]\ncircuit_reset_s = 4.0\nretry_max_attempts = 3\n"
                      "retry_max_delay_ms = 200\n[exo]\npoll_interval_s = 0.5\n")
    process = await start_batch(f"http://127.0.0.1:{server.port}", source, "-o", str(output),
                                "--concurrency", "8", "--quiet", config=config)
    try:
        await tenth_done.wait()
        await server.down()
        await asyncio.sleep(outage_s)
        await server.up()
        _, err = await asyncio.wait_for(process.communicate(), 90)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await server.down()
    assert process.returncode == 0, err.decode()
    results = read_results(output)
    assert [ok(r).text for r in results] == [f"You said: p{n}" for n in range(total)]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_stops_a_batch_with_its_journal_and_a_summary(
    serve: Serve, tmp_path: Path, signum: signal.Signals,
) -> None:
    total, finish_first = 20, 6
    gate = asyncio.Event()

    async def reply(body: dict[str, Any]) -> str:
        if int(prompt_of(body)[1:]) >= finish_first:
            await gate.wait()
        return f"You said: {prompt_of(body)}"

    _, url = await serve(reply=reply)
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"p{i}"}) + "\n"
                              for i in range(total)))
    output = tmp_path / "out.jsonl"
    journal = journal_path(output)
    args = ("-o", str(output), "--concurrency", "2", "--quiet")
    process = await start_batch(url, source, *args)
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while len(finished_in(journal)) < finish_first:
            assert process.returncode is None, await process.communicate()
            assert asyncio.get_running_loop().time() < deadline, "the batch made no progress"
            await asyncio.sleep(0.01)
        process.send_signal(signum)
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.communicate()
    text = stderr.decode()
    # 130: stopped by a signal; the summary and the way to finish are printed.
    assert process.returncode == 130, text
    assert f"{total} items: {finish_first} ok, 0 failed" in text
    assert f"{total - finish_first} not done (stopped)" in text
    assert "--resume" in text
    assert "Traceback" not in text
    assert sorted(r.id for r in finished_in(journal)) == [f"q{i}" for i in range(finish_first)]
    assert not output.exists()
    gate.set()
    process = await start_batch(url, source, *args, "--resume")
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0, stderr.decode()
    assert f"{total} items: {total} ok" in stderr.decode()
