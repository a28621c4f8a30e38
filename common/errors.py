"""One error tree for agent and controller; errors that cross the wire are data."""

from __future__ import annotations

import functools
from typing import ClassVar

from kowalski.common.messages import WireError


class KowalskiError(Exception):
    """Base of every error Kowalski raises on purpose."""

    code: ClassVar[str] = "internal"
    # Whether the work can go on past the error: the caller (or the model) acts on it.
    is_recoverable: ClassVar[bool] = False
    hint: ClassVar[str] = ""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def is_fatal(self) -> bool:
        """Whether the work must stop here."""
        return not self.is_recoverable

    @property
    def retry_elsewhere(self) -> bool:
        """Whether sending the same work again (to another agent, or later) can help."""
        return bool(self.is_recoverable)

    def user_message(self) -> str:
        """The message plus what a person can do about it."""
        return f"{self.message}. {self.hint}" if self.hint else self.message


class ConfigError(KowalskiError, ValueError):
    code = "config_invalid"
    hint = "Fix the file and check it with `kowalski-ctl config validate PATH`"

    def __init__(self, message: str, *, path: str = "", key: str = "") -> None:
        where = ":".join(part for part in (path, key) if part)
        super().__init__(f"{where}: {message}" if where else message)
        self.path = path
        self.key = key


class ConfigFileError(ConfigError):
    """The config file named cannot be read at all: its content is not at fault."""

    hint = "Check the path given to --config; `kowalski-ctl config init PATH` writes a default"


class MissingSecretError(ConfigError):
    """No shared secret where the daemons look for one: nothing in the file is wrong."""

    hint = ("Make one with `head -c 32 /dev/urandom | base64 > kowalski.secret && chmod 600 "
            "kowalski.secret` and name it in security.secret_file or KOWALSKI_SECRET_FILE "
            "(docs/DEPLOYMENT.md)")


class ParseError(KowalskiError, ValueError):
    code = "parse_error"
    hint = "Check the input's format"


class NotFoundError(KowalskiError, LookupError):
    """A file or run the user named is not there or cannot be read: the format is not at fault."""

    code = "not_found"
    hint = "Check the name or path"

    def __init__(self, message: str, *, next_step: str = "") -> None:
        super().__init__(message)
        # What to do instead, when the caller knows better than the generic hint.
        self.next_step = next_step

    def user_message(self) -> str:
        return f"{self.message}. {self.next_step or self.hint}"


class UnsupportedLanguageError(KowalskiError, ValueError):
    code = "unsupported_language"
    hint = "Use one of the languages the agent advertises"

    def __init__(self, language: str, available: list[str] | tuple[str, ...] = ()) -> None:
        names = ", ".join(sorted(available)) or "none"
        super().__init__(f"language {language!r} is not supported here (available: {names})")
        self.language = language
        self.available = tuple(available)


class ExecutionError(KowalskiError):
    """A job could not be run (sandbox set-up, spawn failure, agent fault)."""

    code = "execution_failed"
    is_recoverable = True
    hint = "The job may succeed on another agent; see the agent's log for the cause"


def seconds_text(milliseconds: float) -> str:
    """A duration in seconds for people: 30000 -> "30 s", 1500 -> "1.5 s"."""
    return f"{milliseconds / 1000:.3f}".rstrip("0").rstrip(".") + " s"


class ReplTimeoutError(ExecutionError, TimeoutError):
    """The code ran past its time limit; the session or run goes on, the code must change."""

    code = "repl_timeout"
    # The model (or person) can make the code faster; the same code elsewhere would time out too.
    is_recoverable = True
    hint = ("make the code faster or do less per call, or raise timeout_ms "
            "(sandbox.timeout_ms_<language> sets the default)")

    def __init__(self, language: str, timeout_ms: int, *, phase: str = "code") -> None:
        what = f"{language} compilation" if phase == "compile" else f"{language} code"
        KowalskiError.__init__(self, f"{what} exceeded the {seconds_text(timeout_ms)} limit")
        self.language = language
        self.timeout_ms = timeout_ms
        self.phase = phase

    @property
    def retry_elsewhere(self) -> bool:
        return False

    def user_message(self) -> str:
        if self.phase == "compile":
            return (f"{self.message}; make the program smaller or raise "
                    f"sandbox.compile_timeout_ms_{self.language}")
        return f"{self.message}; {self.hint}"


class ReplError(ExecutionError):
    """The code ran and failed: a non-zero exit, an exception, or a compile error."""

    code = "repl_error"
    # The model reads the error and fixes its code; another agent would fail the same way.
    is_recoverable = True
    hint = "Read stderr: the error is in the code, not in Kowalski"

    @property
    def retry_elsewhere(self) -> bool:
        return False

    def __init__(self, language: str, stderr: str, exit_code: int | None, *,
                 phase: str = "code") -> None:
        lines = stderr.strip().splitlines()
        if phase == "compile":
            # Compilers end with a summary ("aborting due to 1 previous error"); the first
            # error line says what is wrong.
            first = next((line for line in lines if "error" in line.lower()), None)
            detail = (first or (lines[0] if lines else "no compiler output")).strip()
            message = f"{language} compilation failed: {detail}"
        else:
            tail = lines[-1] if lines else "no stderr"
            message = f"{language} code failed (exit {exit_code}): {tail}"
        KowalskiError.__init__(self, message)
        self.language = language
        self.stderr = stderr
        self.exit_code = exit_code
        self.phase = phase


class ContextSizeExceededError(KowalskiError, ValueError):
    code = "context_too_large"
    hint = "Split the input or raise rlm.max_context_length"

    def __init__(self, actual: int, maximum: int, what: str = "context") -> None:
        super().__init__(f"{what} is {actual} characters, over the limit of {maximum}")
        self.actual = actual
        self.maximum = maximum


class BodyTooLargeError(ContextSizeExceededError):
    """A request body over the receiver's limit, counted in bytes as it arrived."""

    hint = "Send a smaller one, or raise agent.max_body_bytes on the agent"

    def __init__(self, actual: int, maximum: int, what: str = "the body") -> None:
        super().__init__(actual, maximum, what)
        self.message = f"{what} is over {maximum} bytes (at least {actual})"
        self.args = (self.message,)


class NoDevicesAvailableError(KowalskiError):
    code = "no_devices"
    is_recoverable = True
    hint = "Start kowalski-agent on a node, or list agents under controller.static_agents"

    def __init__(self, reason: str) -> None:
        super().__init__(f"no devices available: {reason}")
        self.reason = reason


class NoModelAvailableError(NoDevicesAvailableError):
    """No exo endpoint can answer for the model: the inference side of no_devices."""

    code = "no_model"
    hint = ("Check exo.endpoints and that exo runs with the model's instance Ready "
            "(`kowalski-ctl status` lists ready models); exo.place_instances = true "
            "lets Kowalski place one")

    def __init__(self, reason: str) -> None:
        KowalskiError.__init__(self, f"no model available: {reason}")
        self.reason = reason


class ModelNotYetAvailableError(NoModelAvailableError):
    """No endpoint can take the call now, but one may soon: wait_s says when to look again."""

    def __init__(self, reason: str, *, wait_s: float, probe_pending: bool = False) -> None:
        super().__init__(reason)
        # Until an open circuit half-opens, or the next health check; 0 with a probe out.
        self.wait_s = wait_s
        # A half-open circuit's one probe is in flight: its outcome decides, not the clock.
        self.probe_pending = probe_pending


class DeviceNotFoundError(KowalskiError, KeyError):
    code = "device_not_found"
    hint = "List devices with `kowalski-ctl devices`"

    def __init__(self, device_id: str) -> None:
        super().__init__(f"device {device_id!r} is not in the device table")
        self.device_id = device_id

    def __str__(self) -> str:
        return self.message


class SessionNotFoundError(KowalskiError, KeyError):
    code = "session_not_found"
    hint = "Create the session first; sessions end when idle or when their agent restarts"

    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id!r} does not exist on this agent")
        self.session_id = session_id

    def __str__(self) -> str:
        return self.message


class SessionLostError(KowalskiError):
    """The session's process died (killed at a limit, agent lost); its variables are gone."""

    code = "session_lost"
    is_recoverable = True
    hint = "Start a new session; the controller rebuilds RLM sessions by replaying their cells"


class NetworkError(KowalskiError, ConnectionError):
    code = "network"
    is_recoverable = True
    hint = "Check that the peer is running and reachable"


class NoControllerError(NetworkError):
    """No controller answers at the URL a command was sent to."""

    hint = ("Start one with `kowalski-ctl serve`, or pass --url (or --config) naming a running "
            "one; `kowalski-ctl run ... --local` needs none")


class UnverifiedAnswerError(NetworkError):
    """A peer's answer did not carry a valid signature: another secret, or an impostor."""

    code = "unverified_answer"
    hint = ("Give the controller and every agent the same secret; if they share it, "
            "something else answers at that address")


class ExoApiError(KowalskiError):
    code = "exo_api"
    hint = "Check the exo node's log and that the model has a Ready instance"

    def __init__(self, status: int, body: str, *, url: str = "") -> None:
        where = f" from {url}" if url else ""
        super().__init__(f"exo answered HTTP {status}{where}: {body[:500]}")
        self.status = status
        self.body = body
        self.url = url

    @property
    def is_recoverable(self) -> bool:  # type: ignore[override]
        # Server-side and overload failures may pass; a bad request will not.
        return self.status >= 500 or self.status in (408, 429)


class EmbeddedModelError(KowalskiError, RuntimeError):
    """The local model server (used when no exo endpoint is set) could not start or run."""

    code = "embedded_model"
    hint = "Install what the message names, or set exo.endpoints to use an exo cluster"


class AuthError(KowalskiError, PermissionError):
    code = "unauthorized"
    hint = "Give controller and agents the same secret (security.secret_file)"


class RateLimitedError(KowalskiError):
    code = "rate_limited"
    is_recoverable = True
    hint = "Slow down and retry after the time given"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BusyError(KowalskiError):
    """The server is at its limit of concurrent work; come back later."""

    code = "busy"
    is_recoverable = True
    hint = "Retry after the time given, or send the work to another agent"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ConflictError(KowalskiError, ValueError):
    code = "conflict"
    hint = "Use a new id for new work; ids are idempotency keys"


class RunNotResumableError(ConflictError):
    """A run that cannot go on: it has finished, or its record lacks what a resume needs."""

    code = "not_resumable"
    hint = "Start it again as a new run with `kowalski-ctl run`"


class BudgetExceededError(KowalskiError):
    code = "budget_exceeded"
    hint = "Raise rlm.token_budget or rlm.run_timeout_s, or ask a narrower question"


class CancelledJobError(KowalskiError):
    code = "cancelled"
    hint = "The job was cancelled before it finished"


class RemoteError(KowalskiError):
    """An error a peer reported as data, kept with the HTTP status it came with."""

    def __init__(self, *, status: int, code: str, message: str, retryable: bool,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        # The peer's own code: stable across versions, so callers branch on it.
        self.remote_code = code
        self._retryable = retryable
        # The peer's Retry-After (429, 503): retry() waits at least this long.
        self.retry_after_s = retry_after_s

    @property
    def retry_elsewhere(self) -> bool:
        # The peer knows whether sending the work again may help; the wire carries that flag.
        return self._retryable

    @property
    def is_recoverable(self) -> bool:  # type: ignore[override]
        # Whether the work can go on is a property of the kind of error: a code failure
        # reported by an agent (REPL error, timeout) is as recoverable as a local one.
        kind = _by_code().get(self.remote_code)
        return bool(kind.is_recoverable) if kind is not None else self._retryable


@functools.cache
def _by_code() -> dict[str, type[KowalskiError]]:
    """Every error class with a code of its own and a fixed is_recoverable, by code."""
    found: dict[str, type[KowalskiError]] = {}
    pending: list[type[KowalskiError]] = [KowalskiError]
    while pending:
        kind = pending.pop(0)
        if "code" in kind.__dict__ and isinstance(kind.is_recoverable, bool):
            found.setdefault(kind.code, kind)
        pending.extend(kind.__subclasses__())
    return found


def error_from_wire(wire: WireError, *, status: int, retry_after_s: float | None = None
                    ) -> RemoteError:
    """The error a peer's JSON error body stands for, on this side of the wire."""
    return RemoteError(status=status, code=wire.code, message=wire.message,
                       retryable=wire.retryable, retry_after_s=retry_after_s)
