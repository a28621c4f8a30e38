"""The documentation cannot drift from the code: reference, links, commands, keys, codes."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import itertools
import pkgutil
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import msgspec
import pytest
from markdown_it import MarkdownIt
from markdown_it.token import Token

from kowalski.common import config as config_module
from kowalski.common.config_docs import render_markdown
from kowalski.common.errors import KowalskiError

ROOT = Path(__file__).resolve().parent.parent
DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md", ROOT / "examples" / "README.md"]
# The guides that name the controller's and agent's endpoints, checked against their routes.
GUIDES = [*(ROOT / "docs" / name for name in ("USER_GUIDE.md", "DEPLOYMENT.md",
                                              "TROUBLESHOOTING.md")),
          ROOT / "examples" / "README.md"]
# Where commands appear outside Markdown.
SCRIPTS = [*sorted((ROOT / "scripts").glob("*.sh")), *sorted((ROOT / "systemd").glob("*"))]
SECTIONS = frozenset(config_module.Config.__struct_fields__)
_SHELL_STOP = frozenset({"|", "||", "&", "&&", ";", ">", ">>", "<", "2>", "2>&1", "/", "\\"})
_markdown = MarkdownIt("commonmark").enable("table")


def _tokens(path: Path) -> list[Token]:
    return _markdown.parse(path.read_text())


def _inline(tokens: list[Token]) -> Iterator[Token]:
    for token in tokens:
        yield from token.children or []


def code_spans(path: Path) -> list[str]:
    return [t.content for t in _inline(_tokens(path)) if t.type == "code_inline"]


def fences(path: Path, *languages: str) -> list[str]:
    return [t.content for t in _tokens(path)
            if t.type == "fence" and (not languages or t.info.strip() in languages)]


def slugs(path: Path) -> set[str]:
    """GitHub's anchors for a file's headings."""
    tokens = _tokens(path)
    found: set[str] = set()
    for opening, inline in itertools.pairwise(tokens):
        if opening.type != "heading_open":
            continue
        text = "".join(child.content for child in inline.children or []
                       if child.type in ("text", "code_inline"))
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        candidate, number = slug, 0
        while candidate in found:
            number += 1
            candidate = f"{slug}-{number}"
        found.add(candidate)
    return found


def links(path: Path) -> list[str]:
    found = []
    for token in _inline(_tokens(path)):
        if token.type == "link_open":
            found.append(str(token.attrs["href"]))
        elif token.type == "image":
            found.append(str(token.attrs["src"]))
    return found


def test_configuration_reference_is_generated_from_the_config_structs() -> None:
    committed = (ROOT / "docs" / "CONFIGURATION.md").read_text()
    assert committed == render_markdown(), (
        "docs/CONFIGURATION.md is stale; regenerate it with: python -c 'from "
        "kowalski.common.config_docs import render_markdown; print(render_markdown(), "
        "end=\"\")' > docs/CONFIGURATION.md")


def test_configuration_reference_has_every_key_with_its_type_and_default() -> None:
    text = render_markdown()
    assert "| `port` | integer, 0 to 65535 | `7070` |" in text
    assert "| `mode` | one of `\"bwrap\"`, `\"none\"`, `\"rlimit\"` | `\"bwrap\"` |" in text
    assert "| `static_agents` | list of strings | `[]` |" in text
    assert "| `fold_threshold` | number, 0 to 1 | `0.8` |" in text
    assert "| `max_body_bytes` | integer > 0 | `67108864` (64 MiB) |" in text
    assert "| `max_queued_jobs` | integer ≥ 0 | `64` |" in text
    for section in SECTIONS:
        fields = msgspec.structs.fields(getattr(config_module.Config(), section))
        table = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
        rows = [line.split("`")[1] for line in table.splitlines() if line.startswith("| `")]
        assert rows == [field.name for field in fields]


def broken_links(doc: Path) -> list[str]:
    """Relative links whose file, or whose heading in a Markdown file, does not exist."""
    broken = []
    for href in links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", href):
            continue
        target, _, anchor = href.partition("#")
        file = (doc.parent / target).resolve() if target else doc
        if not file.exists():
            broken.append(f"{href}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in slugs(file):
            broken.append(f"{href}: no heading #{anchor} in {file.name}")
    return broken


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files_and_headings(doc: Path) -> None:
    assert broken_links(doc) == []


def test_link_check_catches_missing_files_and_headings(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("# Top\n\n## Part two\n\n[a](#part-two) [b](#part-three) [c](gone.md)"
                   " [d](doc.md#top) [e](https://example.org/x.md) ![f](pic.png)\n")
    assert broken_links(doc) == ["#part-three: no heading #part-three in doc.md",
                                 "gone.md: no such file", "pic.png: no such file"]


def test_slugs_follow_github_rules() -> None:
    doc = ROOT / "docs" / "TROUBLESHOOTING.md"
    assert {"nothing-to-run-on-no_devices-no_model", "busy-and-rate-limited-503-429"} <= slugs(doc)


def _command_lines(text: str) -> Iterator[str]:
    """What follows each `kowalski-ctl`/`kowalski-agent` word, one shell line at a time."""
    for line in text.replace("\\\n", " ").splitlines():
        # Not the unit names in `journalctl -u kowalski-agent -f`.
        for match in re.finditer(r"(?:^|(?<=[\s/(]))(?<!-u )(kowalski-ctl|kowalski-agent)"
                                 r"(?=\s|$)", line):
            yield match.group(1) + line[match.end():].split("`")[0]


def _words(line: str) -> list[str]:
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        words = line.split()
    kept = []
    for word in words:
        # A word ends where prose or a drawing goes on: "serve)│───" is "serve".
        word = re.match(r"[\w./:=@~+\-{}\[\],'\"$]*", word).group()  # type: ignore[union-attr]
        if word in _SHELL_STOP or not word or word.startswith((">", "2>", "$(")):
            break
        kept.append(word)
    return kept


def _takes_value(parser: argparse.ArgumentParser, option: str) -> bool | None:
    """None when the parser has no such option."""
    name = option.split("=")[0]
    for action in parser._actions:
        if name in action.option_strings:
            return action.nargs != 0 and "=" not in option
    return None


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return cast(dict[str, argparse.ArgumentParser], action.choices)
    return {}


def command_problems(words: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """Sub-commands and options in words that the parser does not have."""
    problems: list[str] = []
    index = 0
    while index < len(words):
        word = words[index]
        index += 1
        if word.startswith("-") and word != "-":
            takes = _takes_value(parser, word)
            if takes is None:
                problems.append(f"{parser.prog}: no option {word}")
            elif takes:
                index += 1
            continue
        commands = _subcommands(parser)
        if not commands:
            continue
        if word == "...":
            # "kowalski-ctl --config FILE ...": any command.
            return problems
        if "/" in word and not word.startswith("/"):
            # "run/batch/status": a list of sub-commands in prose.
            problems += [f"{parser.prog}: no command {name}" for name in word.split("/")
                         if name not in commands]
            return problems
        if word not in commands:
            return [*problems, f"{parser.prog}: no command {word}"]
        parser = commands[word]
    return problems


def _ctl_parser() -> argparse.ArgumentParser:
    from kowalski.controller.cli.main import build_parser

    return build_parser()


def agent_problems(words: list[str]) -> list[str]:
    """What kowalski-agent's own parser refuses in words (it has no sub-commands)."""
    from kowalski.agent.main import parse_args

    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            parse_args(words)
    except SystemExit:
        return [errors.getvalue().strip().splitlines()[-1]]
    return []


def _documented_commands() -> Iterator[tuple[str, str]]:
    for doc in DOCS:
        for text in [*code_spans(doc), *fences(doc)]:
            for line in _command_lines(text):
                yield str(doc.relative_to(ROOT)), line
    for script in SCRIPTS:
        for line in _command_lines(script.read_text()):
            yield str(script.relative_to(ROOT)), line


def test_every_documented_command_and_option_exists() -> None:
    parser = _ctl_parser()
    seen: set[str] = set()
    problems = []
    for where, line in _documented_commands():
        program, *words = _words(line)
        if program == "kowalski-agent":
            # It takes options only: "kowalski-agent on a node" is prose, not a command.
            found = agent_problems(words) if words[:1] and words[0].startswith("-") else []
        else:
            seen.update(words[:1])
            found = command_problems(words, parser)
        problems += [f"{where}: {line.strip()!r}: {problem}" for problem in found]
    assert not problems, "\n".join(problems)
    # The scan finds what it should: every top-level command is documented somewhere.
    assert set(_subcommands(parser)) <= seen


def test_command_check_catches_unknown_commands_and_options() -> None:
    parser = _ctl_parser()
    assert command_problems(_words("runs --dir d show RUN_ID"), parser) == []
    assert command_problems(_words('--config k.toml run "q" --local --json'), parser) == []
    assert command_problems(_words("run/batch/status"), parser) == []
    assert command_problems(_words("launch x"), parser) == ["kowalski-ctl: no command launch"]
    assert command_problems(_words("run q --fast"), parser) == [
        "kowalski-ctl run: no option --fast"]
    assert command_problems(_words("runs delete ID"), parser) == [
        "kowalski-ctl runs: no command delete"]
    assert command_problems(_words("run/fly"), parser) == ["kowalski-ctl: no command fly"]
    assert command_problems(_words('run "..." --fast'), parser) == [
        "kowalski-ctl run: no option --fast"]
    assert command_problems(_words("--config FILE ..."), parser) == []
    assert list(_command_lines("see `kowalski-ctl: oops` and .venv/bin/kowalski-ctl status")
                ) == ["kowalski-ctl status"]
    assert agent_problems(["--config", "k.toml", "--no-mdns"]) == []
    assert agent_problems(["--colour"]) == ["kowalski-agent: error: unrecognized arguments: "
                                            "--colour"]


def unknown_keys(doc: Path) -> list[str]:
    """Code spans naming a `section.key` that the config does not have."""
    unknown = []
    for span in code_spans(doc):
        match = re.fullmatch(r"(\w+)\.(\w+)(?:\s*=.*)?", span)
        if match and match.group(1) in SECTIONS:
            section = getattr(config_module.Config(), match.group(1))
            if match.group(2) not in section.__struct_fields__:
                unknown.append(span)
    return unknown


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_keys_named_in_the_docs_exist(doc: Path) -> None:
    assert unknown_keys(doc) == []


def test_key_check_catches_unknown_keys(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("`rlm.max_iterations` `rlm.max_turns = 3` `agent.port = 7070` "
                   "`kowalski.controller` `exo.endpoint`\n")
    assert unknown_keys(doc) == ["rlm.max_turns = 3", "exo.endpoint"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_toml_examples_in_the_docs_are_valid_configs(doc: Path) -> None:
    for text in fences(doc, "toml"):
        config_module.loads(text, source=f"{doc.name} example")


def _routes() -> list[tuple[str, re.Pattern[str]]]:
    from kowalski.agent.app import make_app as agent_app
    from kowalski.controller.api.app import make_app as controller_app

    routes = []
    # The route tables only: no handler runs, so the apps need no real state.
    for app in (controller_app(cast(Any, None), max_body_bytes=1),
                agent_app(cast(Any, None), verifier=None, max_body_bytes=1)):
        for route in app.router.routes():
            canonical = route.resource.canonical if route.resource is not None else ""
            pattern = re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(canonical))
            routes.append((route.method, re.compile(pattern)))
    return routes


def unknown_endpoints(doc: Path) -> list[str]:
    """Code spans naming a controller or agent path (with or without a method) no route has."""
    routes = _routes()
    unknown = []
    for span in code_spans(doc):
        for method, path in re.findall(r"(?:^|, )(?:(GET|POST|DELETE) )?(/(?:v1|metrics|healthz)"
                                       r"[^\s,]*)", span):
            if not any((not method or method == allowed) and pattern.fullmatch(path)
                       for allowed, pattern in routes):
                unknown.append(span)
    return unknown


@pytest.mark.parametrize("doc", GUIDES, ids=lambda p: str(p.relative_to(ROOT)))
def test_endpoints_named_in_the_guides_exist(doc: Path) -> None:
    assert unknown_endpoints(doc) == []


def test_endpoint_check_catches_unknown_paths_and_methods(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("`GET /v1/runs/rlm-1` `/metrics` `POST /v1/jobs` `/healthz` `GET /v1/nope` "
                   "`POST /v1/status` `/v1/runs/a/b`\n")
    assert unknown_endpoints(doc) == ["GET /v1/nope", "POST /v1/status", "/v1/runs/a/b"]


def _error_codes() -> set[str]:
    import kowalski

    for module in pkgutil.walk_packages(kowalski.__path__, "kowalski."):
        if not module.name.endswith(("__main__", "repl_driver")):
            importlib.import_module(module.name)
    codes: set[str] = set()
    pending: list[type[KowalskiError]] = [KowalskiError]
    while pending:
        cls = pending.pop()
        codes.add(cls.code)
        pending += cls.__subclasses__()
    from kowalski.agent.job_result import MEMORY_LIMIT, OUTPUT_LIMIT

    return codes | {MEMORY_LIMIT, OUTPUT_LIMIT}


def test_troubleshooting_covers_every_error_code() -> None:
    codes = _error_codes()
    assert {"no_devices", "exo_no_instance", "device_failed", "memory_limit"} <= codes
    spans = set(code_spans(ROOT / "docs" / "TROUBLESHOOTING.md"))
    assert sorted(codes - spans) == []
