"""The REPL grammar: llama.cpp accepts it, and the embedded model's replies take its shape."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import pytest_asyncio
import tomli_w

from kowalski.common.config import loads
from kowalski.controller.models.chat_types import ChatMessage, ChatRequest, encode_request
from kowalski.controller.models.embedded import MODEL_NAME, EmbeddedModel
from kowalski.controller.models.grammar import REPL_GRAMMAR, reply_grammar
from kowalski.controller.rlm import prompts
from kowalski.controller.rlm.events import ModelReplied
from kowalski.controller.rlm.runs import RunRequest
from kowalski.controller.rlm.trajectory import read_trajectory

module_loop = pytest.mark.asyncio(loop_scope="module")
CONTEXT = "W1, Oslo, 12\nW2, Tampere, 950\nW3, Graz, 40\n"
QUESTION = "Which city has the most crates?"
# The grammar's shape, written again as a regular expression: at most two lines of prose,
# then one ```repl/```python block or one FINAL line, and nothing after it.
SHAPE = re.compile(r"(?:[^`\n][^\n]*\n){0,2}"
                   r"(?:```(?:repl|python)\n(?:[^\n]*\n)+```"
                   r"|FINAL\([^\n)]+\)|FINAL_VAR\([A-Za-z_]\w*\))\Z")


def test_the_config_names_the_grammar_and_only_a_set_grammar_is_sent() -> None:
    assert reply_grammar("repl") == REPL_GRAMMAR
    assert reply_grammar("") is None
    assert loads("").exo.embedded_grammar == ""
    plain = ChatRequest(model="m", messages=[ChatMessage(role="user", content="hi")])
    assert "grammar" not in msgspec.json.decode(encode_request(plain, stream=False))
    held = msgspec.structs.replace(plain, grammar=REPL_GRAMMAR)
    assert msgspec.json.decode(encode_request(held, stream=True))["grammar"] == REPL_GRAMMAR


def test_a_grammar_the_config_does_not_know_is_refused_naming_the_key() -> None:
    with pytest.raises(Exception, match="embedded_grammar"):
        loads('[exo]\nembedded_grammar = "json"\n')


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def model() -> AsyncIterator[EmbeddedModel]:
    async with EmbeddedModel(context_tokens=4096, startup_timeout_s=60) as running:
        yield running


async def _chat(model: EmbeddedModel, body: dict[str, Any]) -> tuple[int, Any]:
    body = {"model": MODEL_NAME, **body}
    async with aiohttp.ClientSession() as session, session.post(
            f"{model.base_url}/v1/chat/completions", json=body) as response:
        return response.status, await response.json()


@pytest.mark.model
@pytest.mark.timeout(300)
@module_loop
async def test_llama_cpp_accepts_the_grammar_and_refuses_a_broken_one(
        model: EmbeddedModel) -> None:
    messages = [{"role": "user", "content": "Say hi."}]
    status, answer = await _chat(model, {"messages": messages, "max_tokens": 4,
                                         "grammar": REPL_GRAMMAR})
    assert status == 200, answer
    # The server reads the field: a grammar it cannot parse is an error, not ignored.
    status, answer = await _chat(model, {"messages": messages, "max_tokens": 4,
                                         "grammar": REPL_GRAMMAR + "\nbroken ::= ("})
    assert status == 400
    assert "grammar" in answer["error"]["message"]


@pytest.mark.model
@pytest.mark.timeout(600)
@module_loop
async def test_a_constrained_reply_to_the_loop_s_first_prompt_has_the_protocol_s_shape(
        model: EmbeddedModel) -> None:
    system = prompts.system_prompt(prompts.describe_context(CONTEXT), output_chars=2000,
                                   sub_chars=4000, recursive_sub_calls=False)
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": prompts.task_prompt(QUESTION)}]
    for seed in (1, 2):
        status, answer = await _chat(model, {"messages": messages, "max_tokens": 1024,
                                             "seed": seed, "grammar": REPL_GRAMMAR})
        assert status == 200, answer
        choice = answer["choices"][0]
        # The grammar bounds every part, so the reply ends well inside 1024 tokens.
        assert choice["finish_reason"] == "stop", choice
        assert SHAPE.match(choice["message"]["content"]), choice["message"]["content"]


@pytest.mark.model
@pytest.mark.timeout(600)
async def test_the_embedded_model_s_run_replies_follow_the_grammar(tmp_path: Path) -> None:
    from kowalski.controller.cli.local import local_cluster

    config = loads(tomli_w.dumps({
        "rlm": {"trajectory_dir": str(tmp_path / "runs"), "max_iterations": 1,
                "context_window_tokens": 4096, "max_reply_tokens": 1024, "run_timeout_s": 400},
        "sandbox": {"memory_limit_mb": 256}, "exo": {"embedded_grammar": "repl"},
    }))
    async with local_cluster(config) as running:
        result = await running.state.runs.run(RunRequest(query=QUESTION, context=CONTEXT))
    replies = [event for event in read_trajectory(result.trajectory_path).events
               if isinstance(event, ModelReplied)]
    assert replies
    for reply in replies:
        assert reply.finish_reason == "stop", reply.text
        assert SHAPE.match(reply.text), reply.text
