"""The process behind a Python session: keeps one namespace and runs cells sent by the agent.

Started as `python3 -I repl_driver.py IN_FD OUT_FD` inside the sandbox by a system Python,
so it uses the standard library only. Requests arrive as JSON lines on IN_FD and replies
leave on OUT_FD; the cell's own output is captured in memory, so user prints never mix
with the protocol. A reader thread takes every request off the pipe: "interrupt" raises
KeyboardInterrupt in the running cell, "llm_reply" wakes the llm_query() waiting for it,
and everything else queues for the main thread.

The namespace also holds `answer`, a dict: a cell that leaves `answer["ready"]` true ends
the run with `answer["content"]`, which the cell's result carries back.
"""

from __future__ import annotations

import ast
import builtins
import io
import itertools
import json
import linecache
import mmap
import os
import queue
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

_HERE = os.path.abspath(__file__)


def _read_text(path: str) -> str:
    """A file of UTF-8 text: one decode, no JSON, and no copy of its bytes (mapped)."""
    with open(path, "rb") as raw:
        if os.fstat(raw.fileno()).st_size == 0:
            return ""
        with mmap.mmap(raw.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return str(mapped, "utf-8")


class CappedText(io.TextIOBase):
    """A text stream that keeps its first cap bytes (UTF-8) and counts the rest."""

    encoding = "utf-8"

    def __init__(self, cap: int, on_piece: Callable[[str], None] | None = None) -> None:
        super().__init__()
        self._cap = cap
        # Hears each kept piece as it is written, for a cell whose output streams.
        self._on_piece = on_piece
        self._parts: list[bytes] = []
        self._size = 0
        self.truncated = False
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        with self._lock:
            if self._size >= self._cap:
                self.truncated = self.truncated or bool(text)
                return len(text)
            data = text.encode("utf-8", "backslashreplace")
            room = self._cap - self._size
            if len(data) > room:
                data = data[:room]
                self.truncated = True
            self._parts.append(data)
            self._size += len(data)
        if self._on_piece is not None and data:
            self._on_piece(data.decode("utf-8", "replace"))
        return len(text)

    def getvalue(self) -> str:
        return b"".join(self._parts).decode("utf-8", "replace")


def fit(text: str, limit: int) -> tuple[str, bool]:
    """Text cut so that its JSON form takes at most limit bytes, and whether it was cut."""
    def size(end: int) -> int:
        # The escaped text between the quotes: a character takes 1 to 12 bytes of it.
        return len(json.dumps(text[:end])) - 2

    if size(len(text)) <= limit:
        return text, False
    low, high = 0, min(len(text), limit)
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if size(middle) <= limit else (low, middle - 1)
    return text[:low], True


class _Channel:
    """JSON lines over two pipes; writes may come from several threads."""

    def __init__(self, in_fd: int, out_fd: int) -> None:
        self._in = os.fdopen(in_fd, "rb")
        self._out = os.fdopen(out_fd, "wb")
        self._lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        data = json.dumps(message).encode() + b"\n"
        with self._lock:
            self._out.write(data)
            self._out.flush()

    def receive(self) -> dict[str, Any] | None:
        line = self._in.readline()
        if not line:
            return None
        message: dict[str, Any] = json.loads(line)
        return message


class _Waiter:
    def __init__(self) -> None:
        self.event = threading.Event()
        self.reply: dict[str, Any] = {}


class Driver:
    """One session's namespace, its cells and its llm_query() calls."""

    def __init__(self, channel: _Channel) -> None:
        self._channel = channel
        self._requests: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._main = threading.main_thread().ident
        self._state_lock = threading.Lock()
        # The cell running now (0: none) and whether the agent interrupted it.
        self._running = 0
        self._interrupted = False
        self._llm_ids = itertools.count(1)
        self._llm_waiters: dict[int, _Waiter] = {}
        self._llm_enabled = False
        # The agent kills the session over a longer line; set by init.
        self._max_message_bytes = 1 << 20
        self.namespace: dict[str, Any] = {
            "__name__": "__main__", "__builtins__": builtins, "context": None,
            "llm_query": self.llm_query, "llm_query_batched": self.llm_query_batched,
            "answer": {"content": "", "ready": False},
        }

    # --- the reader thread ------------------------------------------------------------

    def read_forever(self) -> None:
        while True:
            message = self._channel.receive()
            if message is None:
                self._requests.put(None)
                return
            op = message.get("op")
            if op == "interrupt":
                self._interrupt(int(message.get("seq", 0)))
            elif op == "llm_reply":
                waiter = self._llm_waiters.pop(int(message["id"]), None)
                if waiter is not None:
                    waiter.reply = message
                    waiter.event.set()
            else:
                self._requests.put(message)

    def _interrupt(self, seq: int) -> None:
        with self._state_lock:
            if not self._running or self._running != seq or self._main is None:
                return
            self._interrupted = True
        # A real signal, not interrupt_main(): it also breaks a blocking sleep or wait.
        signal.pthread_kill(self._main, signal.SIGINT)

    def _on_sigint(self, signum: int, frame: object) -> None:
        # Between cells an interrupt that arrived late is ignored.
        if self._running:
            raise KeyboardInterrupt

    # --- the main thread ----------------------------------------------------------------

    def serve(self) -> None:
        signal.signal(signal.SIGINT, self._on_sigint)
        while True:
            message = self._requests.get()
            if message is None:
                return
            op = message.get("op")
            try:
                if op == "init":
                    reply = self._init(message)
                elif op == "exec":
                    reply = self._exec(message)
                elif op == "get_var":
                    reply = self._get_var(message)
                else:
                    reply = {"op": "error", "message": f"unknown request {op!r}"}
            except Exception as exc:
                reply = {"op": "error", "message": f"{type(exc).__name__}: {exc}"}
            self._channel.send(reply)

    def _init(self, message: dict[str, Any]) -> dict[str, Any]:
        # Sent twice to a warm session: once when it starts, again with its run's context.
        self._llm_enabled = bool(message.get("llm"))
        self._max_message_bytes = int(message.get("max_message_bytes", self._max_message_bytes))
        path = message.get("context_file")
        if path:
            try:
                if message.get("context_format") == "text":
                    self.namespace["context"] = _read_text(path)
                else:
                    with open(path, encoding="utf-8") as file:
                        self.namespace["context"] = json.load(file)
            except ValueError as exc:
                # Not UTF-8, or not JSON: the sender's fault, told apart from a failure here.
                return {"op": "error", "bad_context": True, "message": str(exc)[:300]}
            finally:
                os.unlink(path)
        return {"op": "ready", "python": sys.version.split()[0]}

    def _exec(self, message: dict[str, Any]) -> dict[str, Any]:
        seq = int(message["seq"])
        cap = int(message["max_output_bytes"])
        stream = bool(message.get("stream"))
        out = CappedText(cap, self._streamer(seq, "stdout", cap) if stream else None)
        err = CappedText(cap, self._streamer(seq, "stderr", cap) if stream else None)
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out, err
        status = "ok"
        # The agent interrupts at most once per cell, so one KeyboardInterrupt at most; it
        # may land anywhere up to the reset of _running, all inside the outer try.
        try:
            with self._state_lock:
                self._running, self._interrupted = seq, False
            try:
                self._run_cell(message["code"], f"<cell {message.get('cell_id', seq)}>")
            finally:
                self._running = 0
        except KeyboardInterrupt as exc:
            status = "interrupted" if self._interrupted else "error"
            err.write(_format_exception(exc))
        except SystemExit as exc:
            status = "error"
            err.write(f"SystemExit({exc.code!r}) ignored: the session keeps running\n")
        except BaseException as exc:
            status = "error"
            err.write(_format_exception(exc))
        finally:
            self._running = 0
            sys.stdout, sys.stderr = saved
        # Escaped as JSON, text can grow sixfold: the cap holds for the line the agent reads.
        stdout, stdout_cut = fit(out.getvalue(), cap)
        stderr, stderr_cut = fit(err.getvalue(), cap)
        reply = {"op": "result", "seq": seq, "status": status, "stdout": stdout,
                 "stderr": stderr, "stdout_truncated": out.truncated or stdout_cut,
                 "stderr_truncated": err.truncated or stderr_cut}
        content = self._ready_answer()
        if content is not None:
            # The answer takes what room the output left on the line the agent reads.
            room = self._max_message_bytes - len(json.dumps(reply)) - 256
            reply["answer"], reply["answer_truncated"] = fit(content, max(room, 0))
        return reply

    def _streamer(self, seq: int, name: str, cap: int) -> Callable[[str], None]:
        """Sends each piece of a cell's output to the agent as it is written."""
        def send(piece: str) -> None:
            # The result carries the whole output; a piece only has to fit on its line.
            data, _ = fit(piece, cap)
            self._channel.send({"op": "output", "seq": seq, "stream": name, "data": data})
        return send

    def _ready_answer(self) -> str | None:
        """str() of answer["content"] once a cell set answer["ready"], else None."""
        answer = self.namespace.get("answer")
        if not isinstance(answer, dict):
            return None
        try:
            ready = bool(answer.get("ready"))
        except Exception:
            return None
        if not ready:
            return None
        try:
            text = str(answer.get("content", ""))
        except Exception as exc:
            text = f"<str() failed: {type(exc).__name__}: {exc}>"
        # Lone surrogates would not survive the trip to JSON and back.
        return text.encode("utf-8", "backslashreplace").decode("utf-8")

    def _run_cell(self, code: str, filename: str) -> None:
        """Run the cell; a last bare expression is echoed, as in an interactive shell."""
        # Registered so tracebacks can quote the cell's lines.
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        tree = ast.parse(code, filename, "exec")
        last: ast.Expression | None = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body[-1].value)
            del tree.body[-1]
        exec(compile(tree, filename, "exec"), self.namespace)
        if last is not None:
            value = eval(compile(last, filename, "eval"), self.namespace)
            if value is not None:
                print(repr(value))

    def _get_var(self, message: dict[str, Any]) -> dict[str, Any]:
        name, limit = str(message["name"]), int(message["max_chars"])
        max_bytes = int(message.get("max_bytes", self._max_message_bytes // 2))
        if name not in self.namespace:
            return {"op": "var", "found": False, "value": "", "truncated": False}
        try:
            text = str(self.namespace[name])
        except Exception as exc:
            text = f"<str() failed: {type(exc).__name__}: {exc}>"
        # Lone surrogates would not survive the trip to JSON and back.
        value = text[:limit].encode("utf-8", "backslashreplace").decode("utf-8")
        value, cut = fit(value, max_bytes)
        return {"op": "var", "found": True, "value": value,
                "truncated": len(text) > limit or cut}

    # --- llm sub-calls, from any thread -------------------------------------------------

    def llm_query(self, prompt: str, model: str | None = None) -> str:
        """Ask the run's sub model (or the served model named) one prompt; returns its answer."""
        return self.llm_query_batched([prompt], model=model)[0]

    def llm_query_batched(self, prompts: list[str], model: str | None = None) -> list[str]:
        """Ask several prompts at once; answers come back in the same order."""
        if not self._llm_enabled:
            raise RuntimeError("llm_query is not available: this session was created without "
                               "an llm_callback")
        # Cell code is untyped: check what the annotation promises.
        items: object = prompts
        if isinstance(items, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("llm_query_batched() takes a list of strings")
        if model is not None and not isinstance(model, str):
            raise TypeError("model= takes the name of a served model, as a string")
        prompts = list(prompts)
        if not prompts:
            return []
        request_id = next(self._llm_ids)
        request: dict[str, Any] = {"op": "llm", "id": request_id, "prompts": prompts}
        if model:
            request["model"] = model
        size = len(json.dumps(request))
        if size > self._max_message_bytes:
            raise ValueError(f"the prompts take {size} bytes as JSON, over the session's limit "
                             f"of {self._max_message_bytes}; send fewer or shorter prompts")
        waiter = _Waiter()
        self._llm_waiters[request_id] = waiter
        try:
            self._channel.send(request)
            waiter.event.wait()
        finally:
            self._llm_waiters.pop(request_id, None)
        if "error" in waiter.reply:
            raise RuntimeError(f"llm_query failed: {waiter.reply['error']}")
        answers: list[str] = waiter.reply["answers"]
        return answers


def _format_exception(exc: BaseException) -> str:
    report = traceback.TracebackException.from_exception(exc)
    seen: set[int] = set()
    pending = [report]
    # The driver's own frames (the exec call, llm_query's insides) are noise to the cell's
    # author; drop them from every exception in the chain.
    while pending:
        item = pending.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        item.stack = traceback.StackSummary.from_list(
            [frame for frame in item.stack if os.path.abspath(frame.filename) != _HERE])
        pending += [linked for linked in (item.__cause__, item.__context__) if linked]
    return "".join(report.format())


def main(argv: list[str]) -> None:
    channel = _Channel(int(argv[1]), int(argv[2]))
    driver = Driver(channel)
    threading.Thread(target=driver.read_forever, name="control", daemon=True).start()
    driver.serve()
    # The agent closed the pipe: the session is over.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv)
