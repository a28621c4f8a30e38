"""kowalski-ctl's argument conventions: checked numbers, short usage errors, global options."""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

from kowalski.common.code_blocks import normalize_language
from kowalski.common.messages import LANGUAGES
from kowalski.controller.cli.exit_codes import EXIT_USAGE

# Options every command takes, before or after its name.
GLOBAL_OPTIONS = ("config", "url")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def positive_int(text: str) -> int:
    """A count or limit: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def http_url(text: str) -> str:
    """The base URL of an HTTP server."""
    if not text.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"expected an http:// or https:// URL, got {text!r}")
    return text.rstrip("/")


def port_number(text: str) -> int:
    """A TCP port, or 0 for a free one."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be from 0 (a free port) to 65535, got {value}")
    return value


def log_level(text: str) -> str:
    """A logging level name, in any case."""
    if text.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a level; use one of {', '.join(LOG_LEVELS).lower()}")
    return text.upper()


def language_list(text: str) -> list[str]:
    """Comma-separated languages (aliases such as js or rs allowed), in canonical names."""
    names: list[str] = []
    for word in (part.strip() for part in text.split(",")):
        language = normalize_language(word) if word else None
        if language is None:
            raise argparse.ArgumentTypeError(
                f"{word!r} is not a language; use some of {', '.join(LANGUAGES)}")
        if language not in names:
            names.append(language)
    return names


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and a pointer to --help, no usage dump."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: {message}\nSee `{self.prog} --help`.\n")
        sys.exit(EXIT_USAGE)


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction[Any] | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parser's sub-commands by name (empty when it has none)."""
    action = _subparsers(parser)
    return dict(action.choices) if action is not None else {}


def spread_global_options(parser: argparse.ArgumentParser) -> None:
    """Let --config (and --url, where a command has it) follow any sub-command too.

    A sub-command's own default would overwrite the value given before its name, so
    there the options have no default: absent, the top-level value stands.
    """
    action = _subparsers(parser)
    if action is not None and action.metavar is None:
        # "the following arguments are required: COMMAND", not the attribute's name.
        action.metavar = "COMMAND"
    for sub in subcommands(parser).values():
        dests = {action.dest: action for action in sub._actions}
        if "config" not in dests:
            sub.add_argument("-c", "--config", default=argparse.SUPPRESS,
                             help="config file (TOML); may also come before the command")
        for name in GLOBAL_OPTIONS:
            if name in dests:
                dests[name].default = argparse.SUPPRESS
        spread_global_options(sub)
