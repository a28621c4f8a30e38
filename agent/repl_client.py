"""The agent's side of a session's driver process: start it, send cells, answer llm_query()."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from functools import cache
from pathlib import Path
from typing import Any, Protocol

from kowalski.agent.jail import SandboxedProcess
from kowalski.agent.kept_context import KeptContext
from kowalski.agent.sandbox import Sandbox
from kowalski.common.errors import ExecutionError, ParseError, SessionLostError
from kowalski.common.messages import CellResult, LlmCallback, SessionId, SessionInfo

log = logging.getLogger("kowalski.agent.sessions")


class LlmHandler(Protocol):
    """Answers a session's llm_query calls; model is the one the call named (empty: none)."""

    def __call__(self, callback: LlmCallback, prompts: list[str], model: str = ""
                 ) -> Awaitable[list[str]]: ...


_DRIVER = "repl_driver.py"
# Hears each piece of a streamed cell's output: the stream's name and the text.
OutputListener = Callable[[str, str], None]
# Room on a control line beyond the output it carries: field names, flags, an error text.
CONTROL_BUDGET_BYTES = 64 * 1024
# llm_query() requests a session may have waiting at once; more are refused at once.
_MAX_LLM_IN_FLIGHT = 64
# Why a session was killed when its driver wrote a line over the limit.
OUTPUT_LIMIT_REASON = "its control pipe carried a line over {limit} bytes"


def message_limit(max_output_bytes: int) -> int:
    """The longest line a driver may write: two streams of capped output, plus control."""
    return 2 * max_output_bytes + CONTROL_BUDGET_BYTES


@cache
def _driver_source() -> bytes:
    return Path(__file__).with_name(_DRIVER).read_bytes()


class ReplSession:
    """One driver process: its pipes, the request in flight and its llm_query() calls."""

    def __init__(self, session_id: SessionId, callback: LlmCallback | None, handler: LlmHandler,
                 *, stray_cap: int, memory_limit_mb: int) -> None:
        self.id = session_id
        self.callback = callback
        self.created_at = time.time()
        self.last_used = time.monotonic()
        self.cells: OrderedDict[str, CellResult] = OrderedDict()
        self.cells_run = 0
        # Started ahead of need, without a context, and adopted by this session.
        self.warm = False
        self.lock = asyncio.Lock()
        self.ready = asyncio.Event()
        # Why the session is gone; empty while it lives.
        self.lost = ""
        self._handler = handler
        self._stray_cap = stray_cap
        self._memory_limit_mb = memory_limit_mb
        self._process: SandboxedProcess | None = None
        self._writer: asyncio.WriteTransport | None = None
        self._pending: asyncio.Future[dict[str, Any]] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stray = {"stdout": bytearray(), "stderr": bytearray()}
        self._seq = 0
        # The agent reads no more than this per line: cell code cannot inflate its memory.
        self.message_limit = message_limit(stray_cap)
        self.output_limit_hit = False
        self._llm_in_flight = 0
        # The context for jobs run beside the session, kept on disk, not in memory.
        self._kept = KeptContext()
        self._on_output: OutputListener | None = None

    def info(self, agent_id: str) -> SessionInfo:
        return SessionInfo(session_id=self.id, agent_id=agent_id, cells_run=self.cells_run,
                           created_at=self.created_at, warm=self.warm)

    def check(self) -> None:
        if self.lost:
            raise SessionLostError(f"session {self.id!r} is lost: {self.lost}")

    async def start(self, sandbox: Sandbox, context: Any, timeout_s: float) -> None:
        """Start the driver; context is a value, its JSON (msgspec.Raw) or a received file."""
        toolchain = sandbox.toolchain("python")
        files = {_DRIVER: _driver_source()}
        request_read, request_write = os.pipe()
        reply_read, reply_write = os.pipe()
        pipe = asyncio.subprocess.PIPE
        try:
            self._process = await sandbox.spawn(
                f"session-{self.id}", toolchain,
                [toolchain.inner_executable, "-I", _DRIVER, str(request_read), str(reply_write)],
                files=files, stdin=asyncio.subprocess.DEVNULL, stdout=pipe, stderr=pipe,
                pass_fds=(request_read, reply_write), cpu_limit=False)
        except BaseException:
            os.close(request_write)
            os.close(reply_read)
            raise
        finally:
            os.close(request_read)
            os.close(reply_write)
        loop = asyncio.get_running_loop()
        # The reader buffers at most twice its limit before it stops reading the pipe.
        reader = asyncio.StreamReader(limit=self.message_limit)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                     os.fdopen(reply_read, "rb", buffering=0))
        self._writer, _ = await loop.connect_write_pipe(
            asyncio.Protocol, os.fdopen(request_write, "wb", buffering=0))
        process = self._process.process
        assert process.stdout is not None
        assert process.stderr is not None
        self._spawn(self._read_replies(reader))
        self._spawn(self._collect(process.stdout, "stdout"))
        self._spawn(self._collect(process.stderr, "stderr"))
        # Written after the start, as for a warm session: a received one is only linked.
        await self._init(*await self._kept.place(self._process, context, self.id), timeout_s)

    async def adopt(self, session_id: SessionId, callback: LlmCallback | None, context: Any,
                    timeout_s: float) -> None:
        """Make a warm session (started without a context) this session, as start would."""
        self.check()
        assert self._process is not None
        self.id = session_id
        self.callback = callback
        self.warm = True
        await self._init(*await self._kept.place(self._process, context, session_id), timeout_s)
        self.last_used = time.monotonic()

    async def job_files(self) -> dict[str, bytes]:
        """The context as files for a job beside the session: context.txt or context.json."""
        return await self._kept.files(self.id)

    async def _init(self, context_file: str | None, context_format: str, timeout_s: float
                    ) -> None:
        init = {"op": "init", "llm": self.callback is not None,
                "context_file": context_file, "context_format": context_format,
                "max_message_bytes": self.message_limit - CONTROL_BUDGET_BYTES // 2}
        try:
            reply = await asyncio.wait_for(self._call(init), timeout_s)
        except TimeoutError:
            await self.kill(f"it did not start within {timeout_s:g} s")
            raise ExecutionError(f"session {self.id!r} did not start within {timeout_s:g} s"
                                 ) from None
        except SessionLostError as exc:
            raise ExecutionError(f"session {self.id!r} could not start: {self.lost}") from exc
        if reply.get("bad_context"):
            raise ParseError(f"the context of session {self.id!r} cannot be read as "
                             f"{'UTF-8 text' if context_format == 'text' else 'JSON'}: "
                             f"{reply.get('message')}")
        if reply.get("op") != "ready":
            raise ExecutionError(f"session {self.id!r} could not load its context: "
                                 f"{str(reply.get('message', reply))[:300]}")

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _send(self, message: dict[str, Any]) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(json.dumps(message).encode() + b"\n")

    async def _call(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send a request and wait for its reply; SessionLostError if the process dies."""
        self.check()
        self._pending = asyncio.get_running_loop().create_future()
        self._send(message)
        return await asyncio.shield(self._pending)

    async def run_cell(self, cell_id: str, code: str, *, timeout_s: float, cap: int,
                       grace_s: float, on_output: OutputListener | None = None
                       ) -> tuple[dict[str, Any], bool]:
        """The driver's reply, and whether the session had to be killed at the time limit.

        With on_output the cell's output is passed on while it runs (within cap).
        """
        self.check()
        self._seq += 1
        seq = self._seq
        for buffer in self._stray.values():
            buffer.clear()
        self._on_output = on_output
        reply = asyncio.ensure_future(self._call(
            {"op": "exec", "seq": seq, "cell_id": cell_id, "code": code,
             "max_output_bytes": cap, "stream": on_output is not None}))
        try:
            return await self._await_cell(reply, seq, cap, timeout_s, grace_s)
        finally:
            self._on_output = None

    async def _await_cell(self, reply: asyncio.Future[dict[str, Any]], seq: int, cap: int,
                          timeout_s: float, grace_s: float) -> tuple[dict[str, Any], bool]:
        try:
            done, _ = await asyncio.wait({reply}, timeout=timeout_s)
            if not done:
                self._send({"op": "interrupt", "seq": seq})
                done, _ = await asyncio.wait({reply}, timeout=grace_s)
            if not done:
                await self.kill(f"a cell ran past its time limit and did not stop within "
                                f"{grace_s:g} s of the interrupt")
                with contextlib.suppress(SessionLostError):
                    await reply
                return {"status": "killed", "stdout": "", "stderr": ""}, True
            try:
                result = reply.result()
            except SessionLostError:
                if not self.output_limit_hit:
                    raise
                return {"status": "output_limit", "stdout": "", "stderr": "",
                        "message": self.lost}, True
            if result.get("op") != "result":
                raise ExecutionError(f"session {self.id!r} could not run the cell: "
                                     f"{result.get('message', result)}")
        except asyncio.CancelledError:
            # The driver may still be running the cell: its next reply would be out of step.
            reply.cancel()
            await asyncio.shield(self.kill("a cell's request was cancelled while it ran"))
            raise
        # Output that subprocesses wrote to the driver's own stdout arrives on its own pipe.
        for _ in range(3):
            await asyncio.sleep(0)
        for stream in ("stdout", "stderr"):
            result[stream], clipped = append_output(result[stream], self._stray[stream], cap)
            result[f"{stream}_truncated"] = result.get(f"{stream}_truncated") or clipped
        return result, False

    async def get_variable(self, name: str, max_chars: int, timeout_s: float) -> dict[str, Any]:
        try:
            return await asyncio.wait_for(
                self._call({"op": "get_var", "name": name, "max_chars": max_chars,
                            "max_bytes": self._stray_cap}), timeout_s)
        except TimeoutError:
            await self.kill(f"str() of {name!r} did not return within {timeout_s:g} s")
            self.check()
            raise

    async def _read_replies(self, reader: asyncio.StreamReader) -> None:
        reason = ""
        try:
            while True:
                line = await reader.readuntil(b"\n")
                message = json.loads(line)
                if not isinstance(message, dict):
                    raise ValueError(f"a {type(message).__name__} where an object belongs")
                if message.get("op") == "llm":
                    self._llm_request(message)
                elif message.get("op") == "output":
                    self._output(message)
                elif self._pending is not None and not self._pending.done():
                    self._pending.set_result(message)
        except asyncio.IncompleteReadError:
            pass
        except asyncio.LimitOverrunError:
            self.output_limit_hit = True
            reason = OUTPUT_LIMIT_REASON.format(limit=self.message_limit)
        except ValueError as exc:
            reason = f"its control pipe carried garbage ({str(exc)[:200]})"
        await self._ended(reason)

    def _output(self, message: dict[str, Any]) -> None:
        listener = self._on_output
        stream, data = message.get("stream"), message.get("data")
        if (listener is not None and message.get("seq") == self._seq
                and stream in ("stdout", "stderr") and isinstance(data, str)):
            listener(stream, data)

    def _llm_request(self, message: dict[str, Any]) -> None:
        if self._llm_in_flight >= _MAX_LLM_IN_FLIGHT:
            self._send({"op": "llm_reply", "id": message.get("id"), "error": (
                f"more than {_MAX_LLM_IN_FLIGHT} llm_query calls are waiting at once; "
                "wait for some to return")})
            return
        self._llm_in_flight += 1
        self._spawn(self._answer(message))

    async def _collect(self, stream: asyncio.StreamReader, name: str) -> None:
        """Keep what the driver process writes to fd 1/2 outside sys.stdout, up to the cap."""
        buffer = self._stray[name]
        while chunk := await stream.read(1 << 16):
            buffer += chunk[: max(0, self._stray_cap - len(buffer))]

    async def _answer(self, message: dict[str, Any]) -> None:
        request_id, prompts = message.get("id"), message.get("prompts")
        model = message.get("model", "")
        try:
            if self.callback is None:
                raise RuntimeError("the session has no llm_callback")
            if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
                raise TypeError("prompts must be a list of strings")
            if not isinstance(model, str):
                raise TypeError("model must be a string")
            answers = await (self._handler(self.callback, prompts, model=model) if model
                             else self._handler(self.callback, prompts))
            if len(answers) != len(prompts):
                raise RuntimeError(f"{len(answers)} answers for {len(prompts)} prompts")
            self._send({"op": "llm_reply", "id": request_id, "answers": list(answers)})
        except Exception as exc:
            self._send({"op": "llm_reply", "id": request_id, "error": str(exc) or repr(exc)})
        finally:
            self._llm_in_flight -= 1

    async def _ended(self, reason: str) -> None:
        """The driver's pipe closed: find out why, then free everything."""
        process = self._process
        if not reason and process is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait_exit(), 2.0)
            if process.memory_exceeded():
                reason = (f"it exceeded its memory limit of {self._memory_limit_mb} MB and was "
                          "killed")
            elif process.returncode is not None:
                tail = bytes(self._stray["stderr"]).decode(errors="replace").strip()
                last = tail.splitlines()[-1] if tail else ""
                reason = f"its process exited with code {process.returncode}" + (
                    f" ({last})" if last else "")
            else:
                reason = "its control pipe closed"
        await self.kill(reason)

    async def kill(self, reason: str = "it was deleted") -> None:
        """End the process and everything it started; the session is lost from now on."""
        if not self.lost:
            self.lost = reason
            log.info("session %s ended: %s", self.id, reason)
        if self._writer is not None:
            self._writer.close()
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        if self._process is not None:
            await self._process.release()
            await self._kept.drop()
        # Only now: whoever waits for the reply learns of the loss once nothing is left.
        if self._pending is not None and not self._pending.done():
            self._pending.set_exception(
                SessionLostError(f"session {self.id!r} is lost: {self.lost}"))
            # Nobody may be waiting (a timed-out start); do not log it as unretrieved.
            self._pending.exception()


def append_output(text: str, stray: bytearray, cap: int) -> tuple[str, bool]:
    if not stray:
        return text, False
    room = cap - len(text.encode())
    extra = bytes(stray[: max(0, room)]).decode(errors="replace")
    return text + extra, len(stray) > room
