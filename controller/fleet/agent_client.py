"""The agent's HTTP API as typed calls: the one place the controller spells an agent URL."""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import quote

import msgspec

from kowalski.common.client import SignedClient
from kowalski.common.errors import ParseError, error_from_wire
from kowalski.common.job_stream import TextListener
from kowalski.common.messages import (
    CancelRequest,
    CancelResult,
    CellRequest,
    CellResult,
    CellStreamLine,
    CellStreamResult,
    Heartbeat,
    JobOutput,
    JobRequest,
    JobResult,
    JobStreamError,
    JobStreamLine,
    JobStreamResult,
    LlmCallback,
    Metrics,
    SessionCreate,
    SessionDeleted,
    SessionId,
    SessionInfo,
    SessionOpen,
    VariableValue,
    encode,
)
from kowalski.controller.fleet.context_body import ContextBody

_job_lines = msgspec.json.Decoder(JobStreamLine)
_cell_lines = msgspec.json.Decoder(CellStreamLine)


class AgentClient:
    """Signed calls to any agent, addressed by its base URL (``scheme://host:port``).

    Each call raises what SignedClient raises: NetworkError when the agent cannot be
    reached, RemoteError when it answers with an error, ParseError on a bad answer.
    """

    def __init__(self, client: SignedClient) -> None:
        self._client = client

    async def heartbeat(self, agent_url: str, *, timeout_s: float) -> Heartbeat:
        return await self._client.call("GET", f"{agent_url}/v1/heartbeat", Heartbeat,
                                       timeout_s=timeout_s)

    async def metrics(self, agent_url: str, *, timeout_s: float) -> Metrics:
        return await self._client.call("GET", f"{agent_url}/v1/metrics", Metrics,
                                       timeout_s=timeout_s)

    async def run_job(self, agent_url: str, job: JobRequest, *, timeout_s: float) -> JobResult:
        """Run a job to its end; the same job id answers with the same result."""
        return await self._client.call("POST", f"{agent_url}/v1/jobs", JobResult, job,
                                       timeout_s=timeout_s)

    async def run_job_streamed(self, agent_url: str, job: JobRequest, *,
                               on_output: TextListener, timeout_s: float) -> JobResult:
        """Run a job, passing its output on as it comes; its result when it ends."""
        result: JobResult = await self._streamed(
            f"{agent_url}/v1/jobs", msgspec.structs.replace(job, stream=True), _job_lines,
            on_output=on_output, timeout_s=timeout_s, what="job")
        return result

    async def _streamed(self, url: str, body: msgspec.Struct, decoder: msgspec.json.Decoder[Any],
                        *, on_output: TextListener, timeout_s: float, what: str) -> Any:
        """POST body for an NDJSON answer: output lines to on_output, then the result."""
        result: Any = None
        failure: JobStreamError | None = None

        def on_line(line: bytes) -> None:
            nonlocal result, failure
            item = decoder.decode(line)
            if isinstance(item, JobOutput):
                on_output(item.stream, item.data)
            elif isinstance(item, JobStreamResult | CellStreamResult):
                result = item.result
            elif isinstance(item, JobStreamError):
                failure = item

        await self._client.stream("POST", url, body, timeout_s=timeout_s, on_line=on_line)
        if failure is not None:
            raise error_from_wire(failure.error, status=500)
        if result is None:
            raise ParseError(f"{url} ended the {what}'s stream without a result")
        return result

    async def cancel(self, agent_url: str, attempt_ids: list[str], *,
                     timeout_s: float) -> CancelResult:
        """Stop these job and cell attempts there, and refuse them from now on."""
        return await self._client.call("POST", f"{agent_url}/v1/cancel", CancelResult,
                                       CancelRequest(attempt_ids=attempt_ids),
                                       timeout_s=timeout_s)

    async def create_session(self, agent_url: str, create: SessionCreate, *,
                             timeout_s: float) -> SessionInfo:
        return await self._client.call("POST", f"{agent_url}/v1/sessions", SessionInfo, create,
                                       timeout_s=timeout_s)

    async def open_session(self, agent_url: str, session_id: SessionId, context: ContextBody,
                           llm_callback: LlmCallback | None, *, timeout_s: float
                           ) -> SessionInfo:
        """Start a session whose context goes as the body, as it is: no JSON on the way."""
        meta = encode(SessionOpen(context=context.format, llm_callback=llm_callback))
        return await self._client.call_raw(
            "PUT", _session(agent_url, session_id), SessionInfo, context.data,
            content_type=context.content_type, timeout_s=timeout_s,
            meta=base64.urlsafe_b64encode(meta).decode(),
            body_hash=await context.digest() if self._client.signs else None)

    async def execute(self, agent_url: str, session_id: SessionId, cell: CellRequest, *,
                      timeout_s: float) -> CellResult:
        """Run one cell in a session; the same cell id is not run twice."""
        return await self._client.call("POST", f"{_session(agent_url, session_id)}/exec",
                                       CellResult, cell, timeout_s=timeout_s)

    async def execute_streamed(self, agent_url: str, session_id: SessionId, cell: CellRequest,
                               *, on_output: TextListener, timeout_s: float) -> CellResult:
        """Run one cell, passing its output on as it comes; its result when it ends."""
        result: CellResult = await self._streamed(
            f"{_session(agent_url, session_id)}/exec", msgspec.structs.replace(cell, stream=True),
            _cell_lines, on_output=on_output, timeout_s=timeout_s, what="cell")
        return result

    async def get_variable(self, agent_url: str, session_id: SessionId, name: str, *,
                           max_chars: int, timeout_s: float) -> VariableValue:
        """str() of a session variable, cut at max_chars characters."""
        url = (f"{_session(agent_url, session_id)}/vars/{quote(name, safe='')}"
               f"?max_chars={max_chars}")
        return await self._client.call("GET", url, VariableValue, timeout_s=timeout_s)

    async def delete_session(self, agent_url: str, session_id: SessionId, *,
                             timeout_s: float) -> bool:
        """End a session; False if the agent did not have it."""
        answer = await self._client.call("DELETE", _session(agent_url, session_id),
                                         SessionDeleted, timeout_s=timeout_s)
        return answer.deleted


def _session(agent_url: str, session_id: SessionId) -> str:
    # Session ids are Identifiers (a URL-safe alphabet): no quoting needed.
    return f"{agent_url}/v1/sessions/{session_id}"
