"""kowalski-ctl: the controller's command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kowalski.common import config as config_module
from kowalski.common.config_docs import render_commented
from kowalski.common.errors import ConfigError, KowalskiError, NotFoundError
from kowalski.common.tls import client_ssl_context, server_ssl_context
from kowalski.controller.cli.arguments import (
    Parser,
    log_level,
    port_number,
    spread_global_options,
    subcommands,
)
from kowalski.controller.cli.exit_codes import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
)


def _config_init(args: argparse.Namespace) -> int:
    text = render_commented()
    if args.path in (None, "-"):
        sys.stdout.write(text)
        return EXIT_OK
    path = Path(args.path)
    if path.exists() and not args.force:
        print(f"kowalski-ctl: {path} exists; pass --force to overwrite", file=sys.stderr)
        return EXIT_USAGE
    try:
        path.write_text(text)
    except OSError as exc:
        raise NotFoundError(f"cannot write {path}: {exc.strerror}",
                            next_step="Name a file in a directory you can write to") from None
    print(f"wrote {path}")
    return EXIT_OK


def _serve_checks(config: config_module.Config) -> bytes | None:
    """What `serve` reads before it starts: the secret, the API token, the TLS files."""
    secret = config_module.required_secret(config.security)
    config_module.read_api_token(config.security)
    server_ssl_context(config.security)
    client_ssl_context(config.security)
    return secret


def _config_validate(args: argparse.Namespace) -> int:
    path = args.path or getattr(args, "config", None)
    config = config_module.load(path)
    print(f"{path or 'the default config'}: valid")
    secret = _serve_checks(config)
    signing = "a shared secret" if secret is not None else "no secret: allow_unsigned is set"
    print(f"what serve reads in this environment: ok ({signing}; API token and TLS files "
          "readable)")
    return EXIT_OK


def _load(args: argparse.Namespace) -> config_module.Config:
    return config_module.load(args.config)


def _default_url(args: argparse.Namespace) -> str:
    if getattr(args, "url", None):
        return str(args.url)
    config = _load(args)
    settings = config.controller
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "") else settings.host
    scheme = "https" if config.security.tls_cert_file else "http"
    return f"{scheme}://{host}:{settings.port}"


def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal

    from kowalski.common.tls import loop_factory
    from kowalski.controller.service import serve

    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = _load(args)
    if args.port is not None:
        import msgspec

        config = msgspec.structs.replace(
            config, controller=msgspec.structs.replace(config.controller, port=args.port))
    secret = _serve_checks(config)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await serve(config, secret=secret, stop=stop, port_file=args.port_file)

    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(main())
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    from kowalski.controller.cli.status import run_status

    args.url = _default_url(args)
    return run_status(args, devices_only=args.command == "devices",
                      ssl=client_ssl_context(_load(args).security))


def _run(args: argparse.Namespace) -> int:
    from kowalski.controller.cli.run import run_command

    url = "" if args.local else _default_url(args)
    return run_command(args, _load(args), url)


def _batch(args: argparse.Namespace) -> int:
    from kowalski.controller.cli.batch import batch_command

    return batch_command(args, _load(args))


def _runs(args: argparse.Namespace) -> int:
    from kowalski.controller.cli.run import runs_command

    url = _default_url(args) if args.runs_command == "resume" else ""
    return runs_command(args, _load(args), url)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="kowalski-ctl", description=__doc__)
    parser.add_argument("-c", "--config", help="config file (TOML); may also follow the command")
    parser.add_argument("--url", help="a running controller, for status, devices, run and "
                                      "runs resume (default: from the config); may also follow "
                                      "the command")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config_parser = commands.add_parser("config", help="write or check a config file")
    config_commands = config_parser.add_subparsers(dest="config_command", required=True,
                                                   metavar="COMMAND")
    init = config_commands.add_parser("init", help="write the commented default config")
    init.add_argument("path", nargs="?", help="file to write (default: stdout)")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.set_defaults(handler=_config_init)
    validate = config_commands.add_parser(
        "validate", help="check a config file, and the secret, token and TLS files serve reads")
    validate.add_argument("path", nargs="?",
                          help="config file to check (default: --config, else the defaults)")
    validate.set_defaults(handler=_config_validate)

    serve = commands.add_parser("serve", help="run the controller daemon")
    serve.add_argument("--port", type=port_number,
                       help="override controller.port (0: a free one)")
    serve.add_argument("--port-file", type=Path, help="write the bound port here when ready")
    serve.add_argument("--log-level", type=log_level, default="INFO",
                       help="debug, info, warning or error (default: info)")
    serve.set_defaults(handler=_serve)

    for name, text in (("status", "the cluster: devices, exo endpoints, jobs, runs"),
                       ("devices", "the scored device table")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--url", help="controller URL (default: from the config)")
        sub.add_argument("--json", action="store_true", help="print JSON for scripts")
        sub.set_defaults(handler=_status)

    # Imported here, not at the top: they pull in aiohttp and the RLM loop, which
    # `config` and `status` do not need.
    from kowalski.controller.cli.batch import add_command as add_batch
    from kowalski.controller.cli.run import add_commands

    add_commands(commands)
    add_batch(commands)
    for name, handler in (("run", _run), ("batch", _batch), ("runs", _runs)):
        commands.choices[name].set_defaults(handler=handler)
    spread_global_options(parser)
    return parser


def _check_globals(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A global option given before a command that cannot use it is a usage error."""
    if getattr(args, "url", None) is None:
        return
    command = subcommands(parser)[args.command]
    # A command's own sub-command (runs resume) may take --url where its siblings do not.
    command = subcommands(command).get(getattr(args, f"{args.command}_command", ""), command)
    if not any(action.dest == "url" for action in command._actions):
        command.error("--url is for status, devices, run and runs resume; this command does "
                      "not use it")
    if getattr(args, "local", False):
        command.error("argument --local: not allowed with argument --url")


def _check_model_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """run's --endpoint, --model-file and --api-key-file go together only one way."""
    if args.command != "run":
        return
    command = subcommands(parser)["run"]
    if args.endpoint and args.model_file:
        command.error("give --endpoint URL or --model-file PATH.gguf, not both")
    if args.api_key_file and not args.endpoint:
        command.error("--api-key-file goes with --endpoint URL")
    if (args.endpoint or args.model_file) and getattr(args, "url", None):
        command.error("--endpoint and --model-file run here, on this machine: leave out --url")


def _innermost(error: BaseException) -> BaseException:
    """The one error inside task-group wrappers, so it is reported like any other."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    if isinstance(error, BaseExceptionGroup):
        # Several at once: the first of ours says the most.
        ours = [e for e in error.exceptions if isinstance(_innermost(e), KowalskiError)]
        return _innermost(ours[0]) if ours else error
    return error


def _report(error: BaseException) -> int:
    if isinstance(error, ConfigError):
        print(f"kowalski-ctl: {error.user_message()}", file=sys.stderr)
        return EXIT_CONFIG
    if isinstance(error, KowalskiError):
        print(f"kowalski-ctl: {error.user_message()}", file=sys.stderr)
        return EXIT_UNAVAILABLE if error.retry_elsewhere else EXIT_FAILED
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(error, OSError):
        print(f"kowalski-ctl: {error.strerror or error}"
              f"{': ' + str(error.filename) if error.filename else ''}", file=sys.stderr)
        return EXIT_FAILED
    raise error


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_globals(parser, args)
    _check_model_flags(parser, args)
    try:
        code: int = args.handler(args)
    except (KowalskiError, KeyboardInterrupt, OSError, BaseExceptionGroup) as exc:
        return _report(_innermost(exc))
    return code


if __name__ == "__main__":
    sys.exit(main())
