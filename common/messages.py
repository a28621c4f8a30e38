"""Wire messages between controller and agents, one encoder/decoder per family."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, NewType, TypeVar

import msgspec
from msgspec import Meta

JobId = NewType("JobId", str)
SessionId = NewType("SessionId", str)
DeviceId = NewType("DeviceId", str)

# Ids travel in URLs and file names: keep them to a safe alphabet.
IDENTIFIER = Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
Identifier = Annotated[str, IDENTIFIER]
Language = Literal["python", "bash", "javascript", "rust", "java"]
LANGUAGES: tuple[Language, ...] = ("python", "bash", "javascript", "rust", "java")

T = TypeVar("T")


class Message(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class WireError(Message, frozen=True):
    """An error as data: a stable code, a message for people, and whether to retry."""

    code: str
    message: str
    retryable: bool = False


class ErrorBody(Message, frozen=True):
    error: WireError


# --- jobs -----------------------------------------------------------------------------

JobStatus = Literal["ok", "error", "timeout", "killed", "failed"]


class JobRequest(Message, frozen=True):
    job_id: Annotated[JobId, IDENTIFIER]
    language: Language
    code: str
    # None means the agent's default for the language.
    timeout_ms: Annotated[int, Meta(gt=0, le=24 * 3600 * 1000)] | None = None
    max_output_bytes: Annotated[int, Meta(gt=0)] | None = None
    stdin: str = ""
    # The controller's attempt: a cancel names it, and a cancelled attempt never starts.
    attempt_id: Identifier | None = None
    # Unix time after which the controller no longer waits: the agent does not start it then.
    deadline: float | None = None
    # Answer with NDJSON lines: output while the job runs, then its result (JobStreamLine).
    stream: bool = False
    # A session live on this agent whose context the job finds in its working directory:
    # context.txt for a string, context.json for anything else.
    session_id: Identifier | None = None


class JobResult(Message, frozen=True):
    job_id: JobId
    # ok: exit 0; error: non-zero exit; timeout: killed at the limit;
    # killed: stopped by a resource limit; failed: could not be run at all.
    status: JobStatus
    exit_code: int | None
    stdout: str
    stderr: str
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    wall_time_ms: float = 0.0
    agent_id: str = ""
    error: WireError | None = None


class JobOutput(Message, frozen=True, tag_field="kind", tag="output"):
    """A piece of a running job's or cell's output, within its max_output_bytes."""

    stream: Literal["stdout", "stderr"]
    data: str


class JobStreamResult(Message, frozen=True, tag_field="kind", tag="result"):
    """The line after a streamed job's output: its result (the whole capped output again)."""

    result: JobResult


class JobStreamError(Message, frozen=True, tag_field="kind", tag="error"):
    """The last line of a streamed job that failed in Kowalski after its output began."""

    error: WireError


class JobStreamEnd(Message, frozen=True, tag_field="kind", tag="end"):
    """An agent's last line: its signature over every byte before it ("" without a secret)."""

    signature: str = ""


# One line of POST /v1/jobs with "stream": true.
JobStreamLine = JobOutput | JobStreamResult | JobStreamError | JobStreamEnd


class CancelRequest(Message, frozen=True):
    """Attempts the controller has given to another agent: none of them may start here."""

    attempt_ids: Annotated[list[Identifier], Meta(max_length=10_000)]


class CancelResult(Message, frozen=True):
    # Attempts that were queued or running here and are now stopped.
    stopped: list[str]
    # Attempts this agent will refuse from now on (all of those asked).
    refused: int


# --- persistent Python sessions ---------------------------------------------------------


class LlmCallback(Message, frozen=True):
    """Where a session's llm_query() calls go: the controller that owns the run."""

    url: str
    token: str
    depth: int = 0


class SessionCreate(Message, frozen=True):
    session_id: Annotated[SessionId, IDENTIFIER]
    # Loaded as the variable `context` before the first cell.
    context: Any = None
    llm_callback: LlmCallback | None = None


class SessionCreateRaw(Message, frozen=True):
    """SessionCreate as an agent reads it: the context stays JSON text, never made objects.

    The agent only writes the context into the session's file, so decoding tens of MB into
    objects and encoding them again would be wasted; JSON null is no context.
    """

    session_id: Annotated[SessionId, IDENTIFIER]
    context: msgspec.Raw = msgspec.Raw(b"null")
    llm_callback: LlmCallback | None = None


# How a context sent as a request's own body is to be read: text is a str as UTF-8, json
# any other value as JSON; none sends no body.
ContextFormat = Literal["none", "text", "json"]


class SessionOpen(Message, frozen=True):
    """PUT /v1/sessions/{id}: what goes with a context sent as the body, as it is.

    Sent as the signed X-Kowalski-Meta header (base64url of this JSON), so the context
    itself is neither JSON-encoded nor decoded on the way, and the agent writes it to the
    session's file while it arrives.
    """

    # The layout of this request; an agent refuses one it does not know.
    version: Literal[1] = 1
    context: ContextFormat = "none"
    llm_callback: LlmCallback | None = None


class SessionInfo(Message, frozen=True):
    session_id: SessionId
    agent_id: str
    cells_run: int
    # When the session's process started: before the create call when it was warm.
    created_at: float
    # Whether the agent handed out a session it had started ahead of need.
    warm: bool = False


class CellRequest(Message, frozen=True):
    # Cells are idempotent by id, like jobs.
    cell_id: Identifier
    code: str
    timeout_ms: Annotated[int, Meta(gt=0, le=24 * 3600 * 1000)] | None = None
    max_output_bytes: Annotated[int, Meta(gt=0)] | None = None
    attempt_id: Identifier | None = None
    deadline: float | None = None
    # Answer with NDJSON lines: output while the cell runs, then its result (CellStreamLine).
    stream: bool = False


class CellResult(Message, frozen=True):
    cell_id: str
    session_id: SessionId
    status: JobStatus
    stdout: str
    stderr: str
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    wall_time_ms: float = 0.0
    agent_id: str = ""
    error: WireError | None = None
    # str() of the session's answer["content"] when the cell left answer["ready"] set.
    answer: str | None = None
    answer_truncated: bool = False


class CellStreamResult(Message, frozen=True, tag_field="kind", tag="cell_result"):
    """The line after a streamed cell's output: its result (the whole capped output again)."""

    result: CellResult


# One line of POST /v1/sessions/{id}/exec with "stream": true.
CellStreamLine = JobOutput | CellStreamResult | JobStreamError | JobStreamEnd


class SessionDeleted(Message, frozen=True):
    # False when the agent had no such session (already ended, or never made).
    deleted: bool


class VariableValue(Message, frozen=True):
    name: str
    found: bool
    # str() of the value, cut at the request's limit.
    value: str = ""
    truncated: bool = False


# --- heartbeats -------------------------------------------------------------------------


class Metrics(Message, frozen=True):
    memory_total_bytes: int
    memory_available_bytes: int
    cpu_percent: float
    cpu_count: int
    load_1m: float
    load_5m: float
    load_15m: float


# What an agent can do beyond the first protocol, listed in its heartbeat; a controller
# uses a newer request only with agents that list it.
# PUT /v1/sessions/{id}: the session's context as the request body.
FEATURE_CONTEXT_BODY = "context_body"
FEATURES = (FEATURE_CONTEXT_BODY,)


class Heartbeat(Message, frozen=True, forbid_unknown_fields=False):
    """What an agent says of itself; fields a newer agent adds are ignored, not refused."""

    agent_id: str
    name: str
    version: str
    started_at: float
    sent_at: float
    seq: int
    sandbox_mode: str
    languages: list[str]
    metrics: Metrics
    jobs_running: int
    jobs_queued: int
    sessions: int
    # Job ids running now, so a controller can tell which of its jobs are alive.
    running_job_ids: list[JobId] = msgspec.field(default_factory=list)
    # Sessions started ahead of need and not yet handed out; counted apart from `sessions`.
    warm_sessions: int = 0
    # Ready sandboxes the agent aims to keep (sandbox.pool_size per pooled language) and
    # how many are ready now; a job finding none starts its own.
    pool_size: int = 0
    pool_ready: int = 0
    # FEATURES this agent serves; an older agent lists none.
    features: list[str] = msgspec.field(default_factory=list)


# --- llm sub-calls from a session to the controller ---------------------------------------


class LlmQuery(Message, frozen=True):
    token: str
    prompts: list[str]
    model: str = ""


class LlmAnswer(Message, frozen=True):
    answers: list[str]
    error: WireError | None = None


_encoder = msgspec.json.Encoder()


def encode(message: Any) -> bytes:
    """Encode any wire message as JSON."""
    return _encoder.encode(message)


class Decoders:
    """One cached decoder per message type."""

    _cache: ClassVar[dict[type[Any], msgspec.json.Decoder[Any]]] = {}

    @classmethod
    def get(cls, kind: type[T]) -> msgspec.json.Decoder[T]:
        decoder = cls._cache.get(kind)
        if decoder is None:
            decoder = cls._cache[kind] = msgspec.json.Decoder(kind)
        return decoder


def decode(data: bytes | str, kind: type[T]) -> T:
    """Decode JSON into a message type; raises msgspec.ValidationError/DecodeError."""
    return Decoders.get(kind).decode(data)
