"""kowalski-ctl batch: a JSONL file of prompts, through the router or one exo endpoint."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import msgspec

from kowalski.common.config import Config
from kowalski.common.tls import loop_factory
from kowalski.controller.batch.runner import BatchSummary, ExoClientBackend, run_batch_file
from kowalski.controller.cli.exit_codes import EXIT_INCOMPLETE, EXIT_OK, EXIT_USAGE
from kowalski.controller.models.cache import CachedBackend, ResultCache
from kowalski.controller.models.exo_client import ExoClient
from kowalski.controller.retry import RetryPolicy
from kowalski.controller.service import Controller

STDIO = "-"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_command(commands: Any) -> None:
    """The batch sub-command of kowalski-ctl."""
    batch = commands.add_parser("batch", help="run a JSONL file of prompts")
    batch.add_argument("file", help="input JSONL: {\"id\", \"prompt\"} or {\"messages\"} a line "
                                    "(\"-\": stdin)")
    batch.add_argument("-o", "--output", help="output JSONL (default: FILE.out.jsonl, or stdout "
                                              "when FILE is \"-\"; \"-\": stdout)")
    batch.add_argument("--model", help="model for lines that name none (default: "
                                       "exo.default_model, or a ready one through the router)")
    batch.add_argument("--concurrency", type=_positive,
                       help="calls in flight (default: exo.max_concurrency)")
    batch.add_argument("--resume", action="store_true",
                       help="keep what an earlier run of this batch finished")
    batch.add_argument("--endpoint", help="ask this one exo or OpenAI-compatible base URL, "
                                          "without routing or failover")
    batch.add_argument("--quiet", action="store_true", help="no progress on stderr")


async def _ready_model(running: Controller) -> str:
    # Endpoints are probed in the background: the first probes decide which model is ready.
    await running.router.first_probes()
    return running.router.resolve_model("")


async def _through_router(config: Config, args: argparse.Namespace) -> BatchSummary:
    controller = msgspec.structs.replace(config.controller, host="127.0.0.1", port=0,
                                         discover_mdns=False, static_agents=[])
    local = msgspec.structs.replace(config, controller=controller)
    async with Controller(config=local, secret=None) as running:
        backend = CachedBackend(running.router, ResultCache.from_config(config.exo))
        # The router already retries across endpoints; one more round per item is enough.
        policy = msgspec.structs.replace(RetryPolicy.from_config(config.controller),
                                         max_attempts=2)
        return await run_batch_file(
            args.file, args.output, backend,
            concurrency=args.concurrency or config.exo.max_concurrency,
            default_model=args.model or await _ready_model(running), resume=args.resume,
            show_progress=not args.quiet, policy=policy)


async def _through_endpoint(config: Config, args: argparse.Namespace) -> BatchSummary:
    exo = config.exo
    async with ExoClient.from_config(args.endpoint, exo) as client:
        backend = CachedBackend(ExoClientBackend(client), ResultCache.from_config(exo))
        return await run_batch_file(
            args.file, args.output, backend, concurrency=args.concurrency or exo.max_concurrency,
            default_model=args.model or exo.default_model, resume=args.resume,
            show_progress=not args.quiet, policy=RetryPolicy.from_config(config.controller))


def batch_command(args: argparse.Namespace, config: Config) -> int:
    """0 when every item succeeded, 5 when some failed; errors are mapped by main."""
    if args.output is None and args.file == STDIO:
        args.output = STDIO
    elif args.output is None:
        args.output = str(Path(args.file).with_suffix(".out.jsonl"))
    if args.resume and args.output == STDIO:
        print("kowalski-ctl batch: --resume needs an output file (-o FILE)", file=sys.stderr)
        return EXIT_USAGE
    run = _through_endpoint if args.endpoint else _through_router
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        summary = runner.run(run(config, args))
    print(summary.describe(), file=sys.stderr)
    return EXIT_OK if summary.failed == 0 else EXIT_INCOMPLETE

