"""kowalski-ctl: the controller's command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kowalski.common import config as config_module
from kowalski.common.config_docs import render_commented
from kowalski.common.errors import ConfigError, KowalskiError

# Exit codes scripts can rely on.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_UNAVAILABLE = 4
EXIT_INCOMPLETE = 5


def _config_init(args: argparse.Namespace) -> int:
    text = render_commented()
    if args.path in (None, "-"):
        sys.stdout.write(text)
        return EXIT_OK
    path = Path(args.path)
    if path.exists() and not args.force:
        print(f"kowalski-ctl: {path} exists; pass --force to overwrite", file=sys.stderr)
        return EXIT_USAGE
    path.write_text(text)
    print(f"wrote {path}")
    return EXIT_OK


def _config_validate(args: argparse.Namespace) -> int:
    config_module.load(args.path)
    print(f"{args.path}: ok")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kowalski-ctl", description=__doc__)
    parser.add_argument("-c", "--config", help="config file (TOML)")
    commands = parser.add_subparsers(dest="command", required=True)

    config_parser = commands.add_parser("config", help="write or check a config file")
    config_commands = config_parser.add_subparsers(dest="config_command", required=True)
    init = config_commands.add_parser("init", help="write the commented default config")
    init.add_argument("path", nargs="?", help="file to write (default: stdout)")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.set_defaults(handler=_config_init)
    validate = config_commands.add_parser("validate", help="check a config file")
    validate.add_argument("path")
    validate.set_defaults(handler=_config_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
    except ConfigError as exc:
        print(f"kowalski-ctl: {exc.user_message()}", file=sys.stderr)
        return EXIT_CONFIG
    except KowalskiError as exc:
        print(f"kowalski-ctl: {exc.user_message()}", file=sys.stderr)
        return EXIT_UNAVAILABLE if exc.is_recoverable else EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
