"""A run's interfaces and reports: what it talks to, its events, its result, its tokens.

A run sends model calls to a `ChatBackend` and code to a `CodeSession`. Observers (the CLI,
the dashboard) receive `RlmEvent`s live; the last one, `RunFinished`, carries the
`RlmResult`. The trajectory file stores its own records (see trajectory.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal, Protocol

import msgspec

from kowalski.common.messages import CellResult, VariableValue, WireError
from kowalski.controller.models.chat_types import ChatMessage, ChatRequest, ChatResult
from kowalski.controller.rlm.folding import CHARS_PER_TOKEN, estimate_tokens

if TYPE_CHECKING:
    from kowalski.controller.rlm.loop import RlmRun

StopReason = Literal[
    "final", "final_var", "max_iterations", "timeout", "token_budget", "error", "cancelled",
    "direct",
]


class TokenCount(msgspec.Struct, frozen=True, kw_only=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    def __add__(self, other: TokenCount) -> TokenCount:
        return TokenCount(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            total_tokens=self.total_tokens + other.total_tokens,
        )


def chat_tokens(result: ChatResult, messages: list[ChatMessage]) -> TokenCount:
    """Tokens a call used, estimated from lengths when the server reports none."""
    if result.usage is not None:
        usage = result.usage
        total = usage.total_tokens or usage.prompt_tokens + usage.completion_tokens
        return TokenCount(prompt_tokens=usage.prompt_tokens,
                          completion_tokens=usage.completion_tokens, total_tokens=total)
    prompt = estimate_tokens(messages)
    completion = len(result.text) // CHARS_PER_TOKEN + 1
    return TokenCount(prompt_tokens=prompt, completion_tokens=completion,
                      total_tokens=prompt + completion)


class Stop(msgspec.Struct, frozen=True, kw_only=True):
    """Why and with what answer a run stopped, before its totals are added."""

    reason: StopReason
    answer: str
    detail: str = ""
    error: WireError | None = None


def budget_stop(used: int, budget: int, last_reply: str) -> Stop | None:
    """The stop once the token budget is spent, else None."""
    if used < budget:
        return None
    return Stop(reason="token_budget", answer=last_reply,
                detail=f"the token budget of {budget} is spent ({used} used); "
                       "the answer is the model's last reply")


def limit_stop(found: Stop | None, reply: str, limit: int) -> Stop:
    """The stop after the iteration limit: the last reply's FINAL, or else its text."""
    if found is not None:
        return Stop(reason="max_iterations", answer=found.answer, detail=(
            f"the iteration limit of {limit} was reached; the model answered with "
            f"{found.reason.upper()} when asked once more"))
    return Stop(reason="max_iterations", answer=reply.strip(), detail=(
        f"the iteration limit of {limit} was reached and the last request got no "
        "usable FINAL; the answer is the model's last reply"))


class StepTiming(msgspec.Struct, frozen=True, kw_only=True):
    iteration: int
    model_ms: float
    code_ms: float


class RlmResult(msgspec.Struct, frozen=True, kw_only=True):
    """How a run ended: the answer, why it stopped, and what it cost."""

    run_id: str
    answer: str
    stop_reason: StopReason
    iterations: int
    sub_calls: int
    # Every call's tokens: root model, folding summaries and sub-calls.
    tokens: TokenCount
    sub_call_tokens: TokenCount
    steps: list[StepTiming]
    latency_ms: float
    # Agents (session device ids) then model endpoints, in order of first use.
    devices: list[str]
    agents: list[str]
    endpoints: list[str]
    trajectory_path: str
    # Why it stopped, for people (empty for a plain FINAL).
    detail: str = ""
    folds: int = 0
    error: WireError | None = None


class RlmEvent(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    """Something that happened in a run, sent to its observer as it happens."""

    run_id: str
    depth: int


class RunStarted(RlmEvent, frozen=True, tag="run_started"):
    query: str
    model: str
    context_type: str
    context_chars: int
    trajectory_path: str
    parent_run_id: str = ""


class IterationStarted(RlmEvent, frozen=True, tag="iteration_started"):
    iteration: int
    phase: str


class ContextFolded(RlmEvent, frozen=True, tag="context_folded"):
    iteration: int
    method: str
    folded_turns: int
    tokens_before: int
    tokens_after: int


class ModelReplied(RlmEvent, frozen=True, tag="model_replied"):
    iteration: int
    phase: str
    text: str
    model_ms: float
    tokens: TokenCount
    endpoint: str


class CodeExecuted(RlmEvent, frozen=True, tag="code_executed"):
    iteration: int
    block: int
    code: str
    status: str
    output: str
    wall_time_ms: float
    device_id: str


class SubCallAnswered(RlmEvent, frozen=True, tag="sub_call"):
    iteration: int
    prompt_chars: int
    answer_chars: int
    latency_ms: float
    tokens: TokenCount
    error: str = ""


class RunFinished(RlmEvent, frozen=True, tag="run_finished"):
    result: RlmResult


AnyRlmEvent = (RunStarted | IterationStarted | ContextFolded | ModelReplied | CodeExecuted
               | SubCallAnswered | RunFinished)


class ChatBackend(Protocol):
    """Where model calls go (the router over exo endpoints, or one client)."""

    async def chat(self, request: ChatRequest, *, operation: str = "llm_inference"
                   ) -> ChatResult: ...


class CodeSession(Protocol):
    """A persistent Python session holding `context`."""

    # Where it runs now; may change after a failover.
    device_id: str

    async def execute(self, code: str, *, timeout_ms: int | None = None) -> CellResult: ...

    async def get_variable(self, name: str, max_chars: int = 100_000) -> VariableValue: ...

    async def close(self) -> None: ...


SessionFactory = Callable[[Any, "RlmRun"], Awaitable[CodeSession]]
Observer = Callable[[RlmEvent], "Awaitable[None] | None"]
