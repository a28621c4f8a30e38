"""kowalski-ctl run / runs: one RLM job, and past runs."""

from __future__ import annotations

import argparse
import asyncio
import signal
import ssl as ssl_module
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import msgspec

from kowalski.common.config import Config, EndpointConfig, read_api_token
from kowalski.common.errors import KowalskiError, NetworkError, NotFoundError, RemoteError
from kowalski.common.messages import ErrorBody
from kowalski.common.tls import client_ssl_context, loop_factory
from kowalski.controller.cli.arguments import http_url, language_list, positive_int
from kowalski.controller.cli.exit_codes import (
    EXIT_FAILED,
    EXIT_INCOMPLETE,
    EXIT_INTERRUPTED,
    EXIT_OK,
)
from kowalski.controller.cli.live import CellEcho, LiveReply
from kowalski.controller.cli.status import no_controller
from kowalski.controller.rlm.call_tree import render_call_tree
from kowalski.controller.rlm.events import (
    CellOutput,
    CodeExecuted,
    ContextFolded,
    ModelReplied,
    RlmEvent,
    RlmResult,
    RunFinished,
    RunResumed,
    RunStarted,
    SessionOpened,
    SubCallAnswered,
    TokenCount,
)
from kowalski.controller.rlm.resume import ResumeRequest
from kowalski.controller.rlm.runs import (
    RunRequest,
    RunStreamError,
    RunStreamLine,
    RunStreamResult,
)
from kowalski.controller.rlm.trajectory import (
    list_runs,
    read_trajectory,
    render_trajectory,
    resumed_line,
)

# Stop reasons that mean the model gave its answer.
ANSWERED = frozenset({"final", "final_var", "answer_dict", "direct"})
_SHOWN_CHARS = 1500
_stream_decoder = msgspec.json.Decoder(RunStreamLine)


def _cut(text: str, limit: int = _SHOWN_CHARS) -> str:
    text = text.rstrip()
    return text if len(text) <= limit else f"{text[:limit]}… [{len(text) - limit} more chars]"


def print_event(event: RlmEvent, out: TextIO, echo: CellEcho | None = None) -> None:
    """One event, as a person watching the run wants to read it (code output live with echo)."""
    indent = "  " * event.depth
    if isinstance(event, RunStarted):
        out.write(f"{indent}run {event.run_id}: model {event.model or '(default)'}, context "
                  f"{event.context_type} of {event.context_chars} chars\n")
    elif isinstance(event, ModelReplied):
        out.write(f"{indent}── iteration {event.iteration} · model {event.model_ms:.0f} ms · "
                  f"{event.tokens.total_tokens} tokens\n")
        if event.reasoning.strip():
            # A reasoning model's thinking, apart from the reply: never read for code or FINAL.
            out.write(_indent(_cut(event.reasoning, 800), indent + "┆ ") + "\n")
        out.write(f"{_indent(_cut(event.text), indent)}\n")
    elif isinstance(event, CellOutput):
        if echo is not None:
            echo.output(event, out)
    elif isinstance(event, CodeExecuted):
        streamed = echo is not None and echo.shown(event, out)
        language = f" ({event.ran_as})" if event.ran_as != "python" else ""
        out.write(f"{indent}▶ block {event.block}{language} on {event.device_id or '?'}: "
                  f"{event.status} ({event.wall_time_ms:.0f} ms)\n")
        # Output printed as it ran is not repeated; a failure's note still is.
        lines = event.output.strip().splitlines()
        shown = (lines[-1:] if event.status != "ok" else []) if streamed else lines
        if shown:
            out.write(_indent(_cut("\n".join(shown), 800), indent + "│ ") + "\n")
    elif isinstance(event, SubCallAnswered):
        out.write(f"{indent}  sub-call: {event.prompt_chars} chars → {event.answer_chars} chars"
                  f" ({event.latency_ms:.0f} ms){' error: ' + event.error if event.error else ''}"
                  "\n")
    elif isinstance(event, RunResumed):
        out.write(f"{indent}{resumed_line(event)}\n")
    elif isinstance(event, SessionOpened):
        out.write(f"{indent}  session on {event.device_id} ({event.open_ms:.0f} ms)\n")
    elif isinstance(event, ContextFolded):
        out.write(f"{indent}  folded {event.folded_turns} turns ({event.method}): "
                  f"{event.tokens_before} → {event.tokens_after} tokens\n")
    out.flush()


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def print_result(result: RlmResult, out: TextIO) -> None:
    why = f"{result.stop_reason}{': ' + result.detail if result.detail else ''}"
    if result.answer or result.stop_reason in ANSWERED:
        out.write(f"\n=== answer ({why}) ===\n{result.answer}\n")
    else:
        out.write(f"\n=== no answer ({why}) ===\n")
        if result.last_reply.strip():
            out.write(f"no answer; the model's last reply was:\n"
                      f"{_indent(_cut(result.last_reply), '  ')}\n")
    cached = result.cached_tokens.total_tokens
    out.write(f"--- {result.iterations} iterations, {result.sub_calls} sub-calls, "
              f"{result.tokens.total_tokens} tokens"
              f"{f' (+{cached} from the cache)' if cached else ''}, "
              f"{result.latency_ms / 1000:.1f} s, "
              f"devices: {', '.join(result.devices) or '-'}\n"
              f"--- trajectory: {result.trajectory_path}\n")


class RunWatch:
    """Follows a run's events (printing them when asked) so a stopped run still has a result."""

    def __init__(self, out: TextIO | None, live: LiveReply | None = None) -> None:
        self._out = out
        self.live = live
        self._started = time.monotonic()
        self.run_id = self.trajectory_path = self.last_reply = ""
        self.iterations = 0
        self.tokens = TokenCount()
        self.result: RlmResult | None = None
        self._echo = CellEcho()

    def __call__(self, event: RlmEvent) -> None:
        if self.live is None or not self.live.handle(event):
            if self.live is not None:
                self.live.clear()
            if self._out is not None:
                print_event(event, self._out, self._echo)
            if self.live is not None:
                self.live.draw()
        if event.depth != 0:
            return
        if isinstance(event, RunStarted):
            self.run_id, self.trajectory_path = event.run_id, event.trajectory_path
        elif isinstance(event, RunResumed):
            self.run_id = event.run_id
        elif isinstance(event, ModelReplied):
            self.iterations = max(self.iterations, event.iteration)
            self.last_reply, self.tokens = event.text, self.tokens + event.tokens
        elif isinstance(event, RunFinished):
            self.result = event.result

    def stopped(self) -> RlmResult | None:
        """The run's own result, or one pieced together from its events (None before it began)."""
        if self.result is not None or not self.run_id:
            return self.result
        return RlmResult(
            run_id=self.run_id, answer="", stop_reason="cancelled",
            detail="stopped from kowalski-ctl before the controller sent the run's result",
            iterations=self.iterations, sub_calls=0, tokens=self.tokens,
            sub_call_tokens=TokenCount(), steps=[],
            latency_ms=(time.monotonic() - self._started) * 1000, devices=[], agents=[],
            endpoints=[], trajectory_path=self.trajectory_path, last_reply=self.last_reply)


async def _until_stopped(run: Any, live: LiveReply | None = None) -> RlmResult:
    """Await the run; SIGTERM cancels it as Ctrl-C does, so it ends cleanly either way."""
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    assert task is not None
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    ticker = asyncio.create_task(live.tick()) if live is not None else None
    try:
        result: RlmResult = await run
        return result
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        if live is not None and ticker is not None:
            ticker.cancel()
            live.clear()


def exit_code(result: RlmResult) -> int:
    if result.stop_reason in ANSWERED:
        return EXIT_OK
    return EXIT_FAILED if result.stop_reason == "error" else EXIT_INCOMPLETE


def _request(args: argparse.Namespace) -> RunRequest:
    context: Any = ""
    if args.context_file:
        path = Path(args.context_file)
        try:
            context = path.read_text(errors="replace")
        except OSError as exc:
            raise NotFoundError(f"cannot read the context file {path}: {exc.strerror}",
                                next_step="Check the path given to --context-file") from None
    return RunRequest(query=args.prompt, context=context, model=args.model or "",
                      sub_model=args.sub_model or "", max_iterations=args.max_iterations,
                      languages=args.languages or [], stream=True)


async def _run_local(config: Config, request: RunRequest, watch: RunWatch, show: bool
                     ) -> RlmResult:
    from kowalski.controller.cli.local import local_cluster

    if show:
        print("starting a local agent, controller and model…", file=sys.stderr, flush=True)
    async with local_cluster(config) as running:
        return await running.state.runs.run(request, observer=watch)


def refused(where: str, status: int, body: bytes) -> KowalskiError:
    """The error a controller answered with, in its own words; a body not ours, as it came."""
    try:
        wire = msgspec.json.decode(body, type=ErrorBody).error
    except msgspec.MsgspecError:
        return NetworkError(f"{where} answered {status}: {body[:500].decode(errors='replace')}")
    return RemoteError(status=status, code=wire.code, message=wire.message,
                       retryable=wire.retryable)


async def _run_remote(url: str, request: RunRequest | ResumeRequest, watch: RunWatch,
                      token: str | None, ssl: ssl_module.SSLContext | None, *,
                      path: str = "/v1/runs") -> RlmResult:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session, session.post(
            url.rstrip("/") + path, data=msgspec.json.encode(request),
            headers={"Content-Type": "application/json", **headers}, ssl=ssl or True,
        ) as response:
            if response.status != 200:
                raise refused(f"{url}{path}", response.status, await response.read())
            async for line in response.content:
                item = _stream_decoder.decode(line)
                if isinstance(item, RunStreamResult):
                    return item.result
                if isinstance(item, RunStreamError):
                    raise NetworkError(f"the run failed: {item.error.message}")
                watch(item)
    except aiohttp.ClientError as exc:
        raise no_controller(url, exc) from None
    raise NetworkError(f"{url} ended the run's stream without a result")


def with_model_flags(args: argparse.Namespace, config: Config) -> Config:
    """--endpoint or --model-file: the run's model, given on the command line, runs locally."""
    if not (args.endpoint or args.model_file):
        return config
    if args.model_file:
        path = Path(args.model_file).expanduser()
        if not path.is_file():
            raise NotFoundError(f"--model-file {path}: no such file",
                                next_step="Give the path of a .gguf model file")
        exo = msgspec.structs.replace(config.exo, endpoints=[], embedded=True,
                                      embedded_model_file=str(path), default_model="")
    else:
        endpoint = EndpointConfig(url=args.endpoint, api_key_file=args.api_key_file or "")
        exo = msgspec.structs.replace(config.exo, endpoints=[endpoint],
                                      default_model=args.model or "")
    args.local = True
    return msgspec.structs.replace(config, exo=exo)


def run_command(args: argparse.Namespace, config: Config, url: str) -> int:
    config = with_model_flags(args, config)
    request = _request(args)
    show = not args.json
    # A terminal sees the reply as it is generated; a pipe gets one block per reply.
    watch = RunWatch(sys.stdout if show else None,
                     LiveReply(sys.stdout) if show and sys.stdout.isatty() else None)
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            if args.local:
                run = _run_local(config, request, watch, show)
            else:
                token = read_api_token(config.security)
                run = _run_remote(url, request, watch, token.decode() if token else None,
                                  client_ssl_context(config.security))
            result = runner.run(_until_stopped(run, watch.live))
    except (KeyboardInterrupt, asyncio.CancelledError):
        stopped = watch.stopped()
        if stopped is None:
            print("kowalski-ctl: stopped before the run began", file=sys.stderr)
        else:
            _show(stopped, as_json=args.json)
        return EXIT_INTERRUPTED
    _show(result, as_json=args.json)
    return exit_code(result)


def _show(result: RlmResult, *, as_json: bool) -> None:
    """A run's result on stdout: as JSON, or as the text a person reads."""
    if as_json:
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(result)).decode() + "\n")
    else:
        print_result(result, sys.stdout)


def _resume(args: argparse.Namespace, config: Config, url: str) -> int:
    """runs resume: the controller at url goes on with the run; its events are shown here."""
    request = ResumeRequest(max_iterations=args.max_iterations, stream=True)
    show = not args.json
    watch = RunWatch(sys.stdout if show else None,
                     LiveReply(sys.stdout) if show and sys.stdout.isatty() else None)
    token = read_api_token(config.security)
    run = _run_remote(url, request, watch, token.decode() if token else None,
                      client_ssl_context(config.security),
                      path=f"/v1/runs/{args.run_id}/resume")
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            result = runner.run(_until_stopped(run, watch.live))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"kowalski-ctl: stopped watching; run {args.run_id} is cancelled",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    _show(result, as_json=args.json)
    return exit_code(result)


def runs_command(args: argparse.Namespace, config: Config, url: str = "") -> int:
    if args.runs_command == "resume":
        return _resume(args, config, url)
    directory = args.dir or config.rlm.trajectory_dir
    if args.runs_command == "list":
        for summary in list_runs(directory)[: args.limit]:
            count = summary.child_runs
            children = f"  ({count} child run{'' if count == 1 else 's'})" if count else ""
            print(f"{summary.run_id}  {summary.stop_reason or 'unfinished':<14} "
                  f"{summary.iterations if summary.iterations is not None else '-':>3} it  "
                  f"{summary.query[:60]!r}{children}")
        return EXIT_OK
    if args.tree:
        trajectory = read_trajectory(args.run_id, directory, descendants=True)
        print(render_call_tree(trajectory), end="")
        return EXIT_OK
    print(render_trajectory(read_trajectory(args.run_id, directory)))
    return EXIT_OK


def add_commands(commands: Any) -> None:
    """The run and runs sub-commands of kowalski-ctl."""
    run = commands.add_parser("run", help="run one RLM job and stream its iterations")
    run.add_argument("prompt", help="the question or task")
    run.add_argument("--context-file", help="a (large) text file the model works on")
    run.add_argument("--model", help="model id (default: exo.default_model or a ready one)")
    run.add_argument("--sub-model", help="model for llm_query sub-calls (default: "
                                         "rlm.sub_model, else --model)")
    run.add_argument("--max-iterations", type=positive_int,
                     help="override rlm.max_iterations (at least 1)")
    run.add_argument("--languages", type=language_list, metavar="LIST",
                     help="comma-separated languages whose blocks run, e.g. python,rust "
                          "(default: rlm.languages, all five)")
    run.add_argument("--json", action="store_true", help="print only the result, as JSON")
    where = run.add_mutually_exclusive_group()
    where.add_argument("--url", help="a running controller (default: from the config)")
    where.add_argument("--local", action="store_true",
                       help="start a local agent and controller (and the embedded model when "
                            "no exo endpoint is configured) for this run")
    run.add_argument("--endpoint", metavar="URL", type=http_url,
                     help="run locally against this OpenAI-compatible server (Ollama, LM Studio, "
                          "llama-server, exo...), no config needed")
    run.add_argument("--api-key-file", metavar="FILE", help="the --endpoint's API key")
    run.add_argument("--model-file", metavar="PATH.gguf",
                     help="run locally on this GGUF model, served by the embedded llama.cpp")
    runs = commands.add_parser("runs", help="past RLM runs (trajectory files)")
    runs.add_argument("--dir", help="trajectory directory (default: rlm.trajectory_dir)")
    runs_commands = runs.add_subparsers(dest="runs_command", required=True)
    listing = runs_commands.add_parser("list", help="newest first")
    listing.add_argument("--limit", type=positive_int, default=20,
                         help="show at most this many runs (default: 20)")
    show = runs_commands.add_parser("show", help="print one run's trajectory")
    show.add_argument("run_id", help="a run id from `runs list`, or a trajectory file's path")
    show.add_argument("--tree", action="store_true",
                      help="print the run and its child runs as a call tree: iterations, "
                           "cells, sub-calls, with where and how long each took")
    resume = runs_commands.add_parser(
        "resume", help="go on with a run that stopped unfinished or at its iteration limit",
        description="A running controller rebuilds the run's session from its trajectory "
                    "(context reloaded, cells replayed with their recorded sub-call answers, no "
                    "model calls for what is done) and goes on from the next iteration.")
    resume.add_argument("run_id", help="a run id from `runs list`")
    resume.add_argument("--max-iterations", type=positive_int,
                        help="a new iteration limit: needed (above the old one) for a run that "
                             "stopped at its limit")
    resume.add_argument("--json", action="store_true", help="print only the result, as JSON")
    resume.add_argument("--url", help="a running controller (default: from the config)")

