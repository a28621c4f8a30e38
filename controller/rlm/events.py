"""A run's interfaces and its one event family: what it talks to, what happened, how it ended.

A run sends model calls to a `ChatBackend` and code to a `CodeSession` (Python cells, and
one-shot jobs in other languages beside it). Every step is an
`RlmEvent`: observers (the CLI, the dashboard) receive them live, and the trajectory file
stores the same events, one JSON line each. The last one, `RunFinished`, carries the
`RlmResult`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Literal, Protocol

import msgspec

from kowalski.common.config import RlmConfig
from kowalski.common.job_stream import TextListener
from kowalski.common.messages import CellResult, JobResult, Language, VariableValue, WireError
from kowalski.controller.models.chat_types import ChatMessage, ChatResult
from kowalski.controller.rlm.folding import CHARS_PER_TOKEN, estimate_tokens

StopReason = Literal[
    "final", "final_var", "max_iterations", "timeout", "token_budget", "error", "cancelled",
    "direct", "answer_dict",
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
    # A reasoning model's thinking costs tokens too, though it is not part of the reply.
    completion = (len(result.text) + len(result.reasoning)) // CHARS_PER_TOKEN + 1
    return TokenCount(prompt_tokens=prompt, completion_tokens=completion,
                      total_tokens=prompt + completion)


class Stop(msgspec.Struct, frozen=True, kw_only=True):
    """Why and with what answer a run stopped, before its totals are added."""

    reason: StopReason
    # Empty when the run stopped without an answer (at a limit, on an error, cancelled).
    answer: str = ""
    detail: str = ""
    error: WireError | None = None


def budget_stop(used: int, budget: int) -> Stop | None:
    """The stop once the token budget is spent, else None."""
    if used < budget:
        return None
    return Stop(reason="token_budget",
                detail=f"the token budget of {budget} is spent ({used} used) before an answer")


def limit_stop(found: Stop | None, limit: int) -> Stop:
    """The stop after the iteration limit: the last reply's FINAL, or else no answer."""
    if found is not None:
        return Stop(reason="max_iterations", answer=found.answer, detail=(
            f"the iteration limit of {limit} was reached; the model answered with "
            f"{found.reason.upper()} when asked once more"))
    return Stop(reason="max_iterations", detail=(
        f"the iteration limit of {limit} was reached and the last request got no "
        "usable FINAL"))


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
    # The root model's last reply, whatever the stop; `answer` is empty when no FINAL came.
    last_reply: str = ""
    # Tokens of answers the cache gave (not spent again, so not in `tokens`).
    cached_tokens: TokenCount = msgspec.field(default_factory=TokenCount)


class RlmEvent(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    """Something that happened in a run: sent to its observer and stored in its trajectory."""

    run_id: str
    depth: int


class RunStarted(RlmEvent, frozen=True, tag="run_started"):
    query: str
    model: str
    context_type: str
    context_chars: int
    trajectory_path: str
    # Pieces of a list or dict context (1 for a string).
    context_chunks: int
    started_at: float
    config: RlmConfig
    parent_run_id: str = ""
    # The parent's cell whose llm_query started this run (0: not a sub-call, or unknown).
    parent_iteration: int = 0
    parent_block: int = 0
    # The first two messages of the conversation, so the file can rebuild it.
    system_prompt: str = ""
    task: str = ""
    # A copy of the context beside the trajectory (a name in its directory), so the run
    # can be resumed; empty for sub-call runs, whose context is their parent's prompt.
    context_file: str = ""


class IterationStarted(RlmEvent, frozen=True, tag="iteration_started"):
    iteration: int
    # "turn": a normal step; "final_request": the extra request at the iteration limit.
    phase: str
    started_at: float


class SessionOpened(RlmEvent, frozen=True, tag="session_opened"):
    """The run's session holds the context; opened beside the first model call."""

    # The iteration under way when it was ready (its code waits for it).
    iteration: int
    device_id: str
    # When the opening began, and how long it took (the context's trip included).
    started_at: float
    open_ms: float


class ContextFolded(RlmEvent, frozen=True, tag="context_folded"):
    iteration: int
    method: str
    folded_turns: int
    tokens_before: int
    tokens_after: int
    summary: str = ""
    error: str = ""


class ModelReplied(RlmEvent, frozen=True, tag="model_replied"):
    iteration: int
    phase: str
    text: str
    model_ms: float
    tokens: TokenCount
    endpoint: str
    # The request: how many messages, and their characters.
    messages_sent: int
    prompt_chars: int
    finish_reason: str | None = None
    # Answered by the cache: `tokens` is then zero and `cached_tokens` what it once cost.
    cached: bool = False
    cached_tokens: TokenCount = msgspec.field(default_factory=TokenCount)
    # A reasoning model's thinking: shown, but never read for code blocks or FINAL; its
    # tokens are in `tokens.completion_tokens`.
    reasoning: str = ""


class ReplyDelta(RlmEvent, frozen=True, tag="reply_delta"):
    """Text of a model reply as it streams; live only, the trajectory keeps `ModelReplied`."""

    iteration: int
    text: str
    # Pieces (about one token each) of this reply so far, and seconds since it was asked for.
    pieces: int
    elapsed_s: float


class CellOutput(RlmEvent, frozen=True, tag="cell_output"):
    """Output of a running block as it comes; live only, `CodeExecuted` keeps the whole."""

    iteration: int
    block: int
    language: str
    stream: str
    text: str


class CodeSkipped(RlmEvent, frozen=True, tag="code_skipped"):
    """A block of the reply that was not run (not fenced, or not in an enabled language)."""

    iteration: int
    block: int
    language: str
    code: str


class CodeExecuted(RlmEvent, frozen=True, tag="code_executed"):
    iteration: int
    block: int
    code: str
    status: str
    # The output as the model saw it (cut at rlm.max_output_chars).
    output: str
    wall_time_ms: float
    device_id: str
    # As written in the fence (```repl, ```rs ...), and the language it ran as.
    language: str
    ran_as: str = "python"


class SubCallAnswered(RlmEvent, frozen=True, tag="sub_call"):
    iteration: int
    prompt_chars: int
    answer_chars: int
    latency_ms: float
    tokens: TokenCount
    error: str = ""
    # The prompt cut to SUB_CALL_CHARS, and the whole answer (a resume replays it).
    prompt: str = ""
    answer: str = ""
    endpoint: str = ""
    # Set when the sub-call was itself an RLM run (depth below max_depth).
    child_run_id: str = ""
    # Answered by the cache (in part, for a child run): not counted in `tokens`.
    cached_tokens: TokenCount = msgspec.field(default_factory=TokenCount)
    # The code block (of `iteration`) whose llm_query asked; 0 in files that predate it.
    block: int = 0


class IterationFinished(RlmEvent, frozen=True, tag="iteration_finished"):
    """The end of an iteration: its code time, the FINAL marker found, the reply sent back."""

    iteration: int
    phase: str
    code_ms: float
    # FINAL / FINAL_VAR as found in the reply, and why it did not end the run (if it did not).
    final_kind: str = ""
    final_value: str = ""
    final_note: str = ""
    # The user message sent back (REPL output and notes); empty when the run ended here.
    feedback: str = ""


class RunResumed(RlmEvent, frozen=True, tag="resumed"):
    """The seam of a resumed run: what was replayed, and the iteration the loop goes on at."""

    iteration: int
    # "controller restart" or "by hand".
    reason: str
    replayed_cells: int
    replayed_sub_calls: int
    resumed_at: float
    max_iterations: int


class RunFinished(RlmEvent, frozen=True, tag="run_finished"):
    result: RlmResult
    finished_at: float


AnyRlmEvent = (RunStarted | IterationStarted | SessionOpened | ContextFolded | ReplyDelta
               | ModelReplied | CellOutput | CodeSkipped | CodeExecuted | SubCallAnswered
               | IterationFinished | RunResumed | RunFinished)
# Events sent to observers only: the trajectory keeps what they add up to.
LIVE_ONLY = (ReplyDelta, CellOutput)
# Sub-call prompts and answers are stored cut to this many characters.
SUB_CALL_CHARS = 2000


class CodeSession(Protocol):
    """A persistent Python session holding `context`, and jobs run beside it."""

    # Where it runs now; may change after a failover.
    device_id: str

    async def execute(self, code: str, *, timeout_ms: int | None = None,
                      on_output: TextListener | None = None) -> CellResult: ...

    async def run_job(self, language: Language, code: str, *, timeout_ms: int | None = None,
                      on_output: TextListener | None = None) -> JobResult: ...

    async def get_variable(self, name: str, max_chars: int = 100_000) -> VariableValue: ...

    async def close(self) -> None: ...


class RunHandle(Protocol):
    """What a session factory needs from its run: who it is, and where llm_query goes."""

    @property
    def run_id(self) -> str: ...

    @property
    def depth(self) -> int: ...

    async def answer_sub_calls(self, prompts: list[str], *, model: str = "") -> list[str]: ...


SessionFactory = Callable[[Any, RunHandle], Awaitable[CodeSession]]
Observer = Callable[[RlmEvent], "Awaitable[None] | None"]
