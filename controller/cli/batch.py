"""kowalski-ctl batch: a JSONL file of prompts through the router (config endpoints or one)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import msgspec

from kowalski.common.config import Config, EndpointConfig
from kowalski.common.errors import NotFoundError, ParseError
from kowalski.common.tls import loop_factory
from kowalski.controller.batch.files import ItemFailure, read_batch, read_input
from kowalski.controller.batch.runner import BatchSummary, run_batch_file
from kowalski.controller.cli.arguments import http_url, positive_int
from kowalski.controller.cli.exit_codes import (
    EXIT_INCOMPLETE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
)
from kowalski.controller.models.cache import CachedBackend, ResultCache
from kowalski.controller.retry import RetryPolicy
from kowalski.controller.service import Controller

STDIO = "-"
# Stands in for the model the router will pick, so lines without one pass the check.
_ROUTER_PICKS = "(the router's choice)"


def add_command(commands: Any) -> None:
    """The batch sub-command of kowalski-ctl."""
    batch = commands.add_parser("batch", help="run a JSONL file of prompts")
    batch.add_argument("file", help="input JSONL: {\"id\", \"prompt\"} or {\"messages\"} a line "
                                    "(\"-\": stdin)")
    batch.add_argument("-o", "--output", help="output JSONL (default: FILE.out.jsonl, or stdout "
                                              "when FILE is \"-\"; \"-\": stdout)")
    batch.add_argument("--model", help="model for lines that name none (default: "
                                       "exo.default_model, or a ready one through the router)")
    batch.add_argument("--concurrency", type=positive_int,
                       help="calls in flight (default: exo.max_concurrency)")
    batch.add_argument("--resume", action="store_true",
                       help="keep what an earlier run of this batch finished")
    batch.add_argument("--endpoint", type=http_url,
                       help="ask this one exo or OpenAI-compatible base URL instead of the "
                            "config's endpoints (it still gets retries and a circuit)")
    batch.add_argument("--api-key-file",
                       help="a file holding the --endpoint's API key (sent as a Bearer token)")
    batch.add_argument("--quiet", action="store_true", help="no progress on stderr")


def _checked_input(args: argparse.Namespace, config: Config) -> bytes:
    """The whole input, read and checked before any model starts, and a writable output."""
    try:
        data = read_input(args.file)
    except OSError as exc:
        raise NotFoundError(f"cannot read the batch input {args.file}: {exc.strerror}",
                            next_step='Check the path; "-" reads stdin') from None
    default_model = args.model or config.exo.default_model
    items = read_batch(data, default_model=default_model or _ROUTER_PICKS)
    source = "stdin" if args.file == STDIO else args.file
    if not items:
        raise ParseError(f"{source} holds no prompts: it should have one JSON object a line, "
                         'like {"id": "q1", "prompt": "..."} (docs/BATCH.md)')
    failures = [item for item in items if isinstance(item, ItemFailure)]
    if len(failures) == len(items):
        raise ParseError(f"{source}: none of its {len(items)} lines can be used; the first: "
                         f"{failures[0].error.message}")
    if args.output != STDIO:
        folder = Path(args.output).parent
        if not folder.is_dir():
            raise NotFoundError(f"no directory {folder} for the output {args.output}",
                                next_step="Create it, or pass -o with another path")
        if not os.access(folder, os.W_OK):
            raise NotFoundError(f"cannot write the output {args.output} in {folder}",
                                next_step="Pass -o with a path you can write to")
    return data


async def _ready_model(running: Controller) -> str:
    # Endpoints are probed in the background: the first probes decide which model is ready.
    await running.router.first_probes()
    return running.router.resolve_model("")


async def _through_router(config: Config, args: argparse.Namespace, data: bytes,
                          stop: asyncio.Event) -> BatchSummary:
    controller = msgspec.structs.replace(config.controller, host="127.0.0.1", port=0,
                                         discover_mdns=False, static_agents=[])
    local = msgspec.structs.replace(config, controller=controller)
    async with Controller(config=local, secret=None) as running:
        backend = CachedBackend(running.router, ResultCache.from_config(config.exo))
        return await run_batch_file(
            args.file, args.output, backend,
            concurrency=args.concurrency or config.exo.max_concurrency,
            default_model=args.model or await _ready_model(running), resume=args.resume,
            show_progress=not args.quiet, policy=RetryPolicy.from_config(config.controller),
            input_data=data, stop=stop)


def batch_command(args: argparse.Namespace, config: Config) -> int:
    """0 when every item succeeded, 5 when some failed, 130 when stopped; errors by main."""
    if args.output is None and args.file == STDIO:
        args.output = STDIO
    elif args.output is None:
        args.output = str(Path(args.file).with_suffix(".out.jsonl"))
    if args.resume and args.output == STDIO:
        print("kowalski-ctl batch: --resume needs an output file (-o FILE)\n"
              "See `kowalski-ctl batch --help`.", file=sys.stderr)
        return EXIT_USAGE
    if args.api_key_file and not args.endpoint:
        print("kowalski-ctl batch: --api-key-file goes with --endpoint URL\n"
              "See `kowalski-ctl batch --help`.", file=sys.stderr)
        return EXIT_USAGE
    if args.endpoint:
        # One endpoint of its own, through the router like any: a short outage is ridden
        # out behind its circuit instead of spending every item's attempts.
        endpoint = EndpointConfig(url=args.endpoint, api_key_file=args.api_key_file or "")
        config = msgspec.structs.replace(config, exo=msgspec.structs.replace(
            config.exo, endpoints=[endpoint], embedded=False))
    data = _checked_input(args, config)

    async def stoppable() -> BatchSummary:
        # SIGTERM and Ctrl-C stop the batch, not the process: the journal keeps what
        # finished and the summary is still printed.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        try:
            return await _through_router(config, args, data, stop)
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)

    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        summary = runner.run(stoppable())
    print(summary.describe(), file=sys.stderr)
    if summary.stopped:
        resume = "" if args.output == STDIO else "; run it again with --resume to finish it"
        print(f"kowalski-ctl batch: stopped by a signal{resume}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK if summary.failed == 0 else EXIT_INCOMPLETE
