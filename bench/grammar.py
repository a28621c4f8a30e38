"""The demo's first reply with and without the REPL grammar: how often its code parses and runs."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench.demo import demo_question
from bench.report import Section, Table, fmt, p50
from kowalski.common.code_blocks import extract_code_blocks
from kowalski.common.config import ExoConfig, RlmConfig
from kowalski.common.errors import EmbeddedModelError
from kowalski.controller.models.embedded import (
    MODEL_NAME,
    EmbeddedModel,
    locate_weights,
    require_server_package,
)
from kowalski.controller.models.grammar import REPL_GRAMMAR
from kowalski.controller.rlm import prompts
from kowalski.controller.rlm.final import find_final
from kowalski.controller.rlm.subcalls import max_prompt_chars

# The demo's own limit on a reply (scripts/demo.sh sets rlm.max_reply_tokens).
DEMO_REPLY_TOKENS = 256
# A block that runs longer than this on the demo's small file is counted as not running.
CELL_TIMEOUT_S = 10.0
# What the REPL holds besides the code: the context, the answer dict, and llm_query, which
# here answers "" (the sub-model is not what is measured).
_PRELUDE = """\
import json, sys
context = open(sys.argv[1], encoding="utf-8").read()
answer = {"content": "", "ready": False}
def llm_query(prompt, *args, **kwargs):
    return ""
def llm_query_batched(prompts, *args, **kwargs):
    return ["" for _ in prompts]
for block in json.load(open(sys.argv[2], encoding="utf-8")):
    exec(compile(block, "<block>", "exec"))
"""


@dataclass(frozen=True)
class Reply:
    """One reply and what became of its code."""

    blocks: int
    parses: bool
    runs: bool
    final: bool
    tokens: int
    seconds: float


def demo_messages(context: str, question: str) -> list[dict[str, str]]:
    """The first request of the demo's run: the loop's system prompt and task prompt."""
    config = RlmConfig(context_window_tokens=4096, max_reply_tokens=DEMO_REPLY_TOKENS)
    system = prompts.system_prompt(
        prompts.describe_context(context), output_chars=config.max_output_chars,
        sub_chars=max_prompt_chars(config), recursive_sub_calls=config.max_depth > 1,
        protocol=config.final_protocol)
    return [{"role": "system", "content": system},
            {"role": "user", "content": prompts.task_prompt(question)}]


def judge(text: str, context_file: Path, work: Path) -> tuple[int, bool, bool, bool]:
    """(python blocks, all parse, all run in order, a FINAL line) for one reply."""
    blocks = extract_code_blocks(text)
    code = [block.code for block in blocks if block.fenced and block.language == "python"]
    final = find_final(text, blocks) is not None
    if not code:
        return 0, False, False, final
    try:
        for source in code:
            ast.parse(source)
    except SyntaxError:
        return len(code), False, False, final
    (work / "blocks.json").write_text(json.dumps(code))
    (work / "run.py").write_text(_PRELUDE)
    try:
        done = subprocess.run(
            [sys.executable, "-I", str(work / "run.py"), str(context_file),
             str(work / "blocks.json")], cwd=work, capture_output=True, timeout=CELL_TIMEOUT_S,
            check=False)
    except subprocess.TimeoutExpired:
        return len(code), True, False, final
    return len(code), True, done.returncode == 0, final


async def _ask(session: aiohttp.ClientSession, url: str, messages: list[dict[str, str]],
               seed: int, grammar: str | None) -> tuple[str, int, float]:
    # No temperature: the demo leaves sampling to the server's defaults, as here.
    body: dict[str, Any] = {"model": MODEL_NAME, "messages": messages,
                            "max_tokens": DEMO_REPLY_TOKENS, "seed": seed}
    if grammar is not None:
        body["grammar"] = grammar
    started = time.perf_counter()
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        answer = await response.json()
    text = answer["choices"][0]["message"]["content"] or ""
    return text, int(answer["usage"]["completion_tokens"]), time.perf_counter() - started


def _row(name: str, replies: list[Reply]) -> list[str]:
    count = len(replies)
    runnable = sum(reply.runs for reply in replies)
    return [name, f"{runnable}/{count}", f"{sum(r.blocks > 0 for r in replies)}/{count}",
            f"{sum(r.parses for r in replies)}/{count}",
            f"{sum(r.final and not r.blocks for r in replies)}/{count}",
            f"{sum(r.runs or (r.final and not r.blocks) for r in replies)}/{count}",
            fmt(p50([r.tokens for r in replies]), 0), fmt(p50([r.seconds for r in replies]), 1)]


async def measure(tmp: Path, quick: bool) -> list[Section]:
    title = "The demo's replies with and without the REPL grammar"
    try:
        require_server_package()
        locate_weights()
    except EmbeddedModelError as exc:
        return [Section(key="grammar", title=title, method="", skipped=exc.message)]
    runs = 1 if quick else 10
    question, context_file = demo_question()
    messages = demo_messages(context_file.read_text(), question)
    free: list[Reply] = []
    held: list[Reply] = []
    exo = ExoConfig()
    async with EmbeddedModel(threads=exo.embedded_threads,
                             context_tokens=exo.embedded_context_tokens) as model, \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        # Alternated, so that the machine's load falls on both sides alike.
        for seed in range(1, runs + 1):
            for grammar, replies in ((None, free), (REPL_GRAMMAR, held)):
                text, tokens, seconds = await _ask(session, model.base_url, messages, seed,
                                                   grammar)
                blocks, parses, ran, final = judge(text, context_file, tmp)
                replies.append(Reply(blocks=blocks, parses=parses, runs=ran, final=final,
                                     tokens=tokens, seconds=seconds))
                # One line per reply: on a busy machine a run this long is worth following.
                print(f"bench:   grammar seed {seed} {'held' if grammar else 'free'}: "
                      f"{blocks} blocks, parses {parses}, runs {ran}, final {final}, "
                      f"{tokens} tokens in {seconds:.1f} s", file=sys.stderr, flush=True)
    free_rate = sum(r.runs for r in free) / runs
    held_rate = sum(r.runs for r in held) / runs
    return [Section(
        key="grammar", title=title,
        method=(
            f"The embedded {MODEL_NAME} (llama.cpp server, the shipped settings) answers the "
            "first request of the demo's run — the loop's system prompt and task prompt for "
            "the demo's question about examples/warehouses.txt — at the server's default "
            f"sampling, as the demo does, with at most {DEMO_REPLY_TOKENS} tokens, seeds "
            f"1-{runs}, once free and once under the REPL grammar "
            "(`controller/models/grammar.py`, sent as llama.cpp's `grammar`), alternately. A "
            "reply is runnable when it has a ```repl/```python block, every such block passes "
            "`ast.parse`, and the blocks run in order in a fresh Python process holding "
            f"`context` without an exception within {CELL_TIMEOUT_S:g} s (llm_query answers "
            "\"\" there). A reply the loop can act on is a runnable one or one with only a "
            "FINAL line."),
        tables=[Table(headers=["replies", "runnable", "with a block", "blocks parse",
                               "FINAL only", "usable", "tokens p50", "seconds p50"], rows=[
            _row("free (no grammar, the baseline)", free),
            _row("REPL grammar", held),
        ])],
        notes=[f"Runnable replies: {fmt(free_rate * 100, 0)} % free, "
               f"{fmt(held_rate * 100, 0)} % under the grammar, over {runs} seeds each."],
        raw={"free runnable (0/1)": [float(r.runs) for r in free],
             "grammar runnable (0/1)": [float(r.runs) for r in held],
             "free seconds": [r.seconds for r in free],
             "grammar seconds": [r.seconds for r in held]},
    )]
