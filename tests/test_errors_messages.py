"""Errors carry structured fields and advice; wire messages refuse what they do not know."""

from __future__ import annotations

import msgspec
import pytest

from kowalski.common import errors, messages
from kowalski.common.http import error_response


def test_each_error_says_whether_a_retry_helps() -> None:
    assert errors.NetworkError("refused").retry_elsewhere
    assert errors.NoDevicesAvailableError("none discovered").retry_elsewhere
    assert errors.BusyError("queue full").retry_elsewhere
    assert not errors.ReplError("python", "ZeroDivisionError: x", 1).retry_elsewhere
    assert not errors.ReplTimeoutError("python", 30_000).retry_elsewhere
    assert not errors.ContextSizeExceededError(10, 5).retry_elsewhere
    assert errors.ExoApiError(503, "busy").retry_elsewhere
    assert not errors.ExoApiError(404, "No instance found for model x").retry_elsewhere


def test_code_errors_are_recoverable_because_the_code_can_be_fixed() -> None:
    # The run goes on: the model reads the error and changes its code.
    for error in (errors.ReplError("python", "ZeroDivisionError: x", 1),
                  errors.ReplTimeoutError("python", 30_000)):
        assert error.is_recoverable
        assert not error.is_fatal
        # Running the same code on another agent fails the same way.
        assert not error.retry_elsewhere
    assert errors.ConfigError("bad").is_fatal
    assert errors.ContextSizeExceededError(10, 5).is_fatal
    assert not errors.NetworkError("refused").is_fatal


def test_the_timeout_speaks_in_seconds_with_advice() -> None:
    timeout = errors.ReplTimeoutError("python", 30_000)
    assert timeout.message == "python code exceeded the 30 s limit"
    assert timeout.user_message() == (
        "python code exceeded the 30 s limit; make the code faster or do less per call, "
        "or raise timeout_ms (sandbox.timeout_ms_<language> sets the default)")
    assert errors.ReplTimeoutError("bash", 1500).message == "bash code exceeded the 1.5 s limit"
    compile_timeout = errors.ReplTimeoutError("rust", 60_000, phase="compile")
    assert compile_timeout.user_message() == (
        "rust compilation exceeded the 60 s limit; make the program smaller or raise "
        "sandbox.compile_timeout_ms_rust")


def test_a_compile_error_names_the_first_error_not_the_summary() -> None:
    stderr = ("error[E0425]: cannot find value `x` in this scope\n --> main.rs:2:20\n\n"
              "error: aborting due to 1 previous error\n")
    failure = errors.ReplError("rust", stderr, 1, phase="compile")
    assert failure.message == (
        "rust compilation failed: error[E0425]: cannot find value `x` in this scope")
    assert failure.stderr == stderr


def test_errors_keep_structured_fields() -> None:
    timeout = errors.ReplTimeoutError("python", 1500)
    assert (timeout.language, timeout.timeout_ms) == ("python", 1500)
    assert isinstance(timeout, TimeoutError)
    repl = errors.ReplError("bash", "line 1\nboom: not found\n", 127)
    assert repl.exit_code == 127
    assert "boom: not found" in str(repl)
    size = errors.ContextSizeExceededError(200, 100)
    assert (size.actual, size.maximum) == (200, 100)
    exo = errors.ExoApiError(500, "x" * 2000, url="http://e:52415/v1/chat/completions")
    assert exo.body == "x" * 2000
    assert len(str(exo)) < 700


def test_user_message_tells_what_to_do() -> None:
    message = errors.NoDevicesAvailableError("none discovered").user_message()
    assert "none discovered" in message
    assert "kowalski-agent" in message
    assert "timeout_ms" in errors.ReplTimeoutError("python", 10).user_message()
    unsupported = errors.UnsupportedLanguageError("cobol", ["python", "bash"])
    assert "bash, python" in unsupported.user_message()


def test_errors_subclass_the_builtin_they_resemble() -> None:
    assert isinstance(errors.NetworkError("x"), ConnectionError)
    assert isinstance(errors.DeviceNotFoundError("d"), KeyError)
    assert str(errors.DeviceNotFoundError("d")) == "device 'd' is not in the device table"
    assert isinstance(errors.ConfigError("x"), ValueError)


def test_an_error_crosses_the_wire_with_its_code_and_one_retry_flag() -> None:
    busy = error_response(errors.BusyError("agent is full", retry_after_s=2.0))
    assert isinstance(busy.body, bytes)
    wire = messages.decode(busy.body, messages.ErrorBody).error
    received = errors.error_from_wire(wire, status=busy.status,
                                      retry_after_s=float(busy.headers["Retry-After"]))
    assert (received.status, received.remote_code, received.retry_after_s) == (503, "busy", 2.0)
    assert received.is_recoverable
    assert received.message.startswith("agent is full. Retry after")
    refused = error_response(errors.ParseError("bad body"))
    assert isinstance(refused.body, bytes)
    wire = messages.decode(refused.body, messages.ErrorBody).error
    passed_on = errors.error_from_wire(wire, status=refused.status)
    assert not passed_on.is_recoverable
    # Passed on by a middle hop: the caller's own mistake keeps its code and status.
    again = error_response(passed_on)
    assert again.status == 400
    assert isinstance(again.body, bytes)
    assert messages.decode(again.body, messages.ErrorBody).error.code == "parse_error"


def test_job_request_refuses_unknown_fields_and_bad_ids() -> None:
    good = b'{"job_id": "j-1", "language": "python", "code": "print(1)"}'
    assert messages.decode(good, messages.JobRequest).timeout_ms is None
    with pytest.raises(msgspec.ValidationError, match="unknown field `env`"):
        messages.decode(good[:-1] + b', "env": {}}', messages.JobRequest)
    with pytest.raises(msgspec.ValidationError, match=r"\$\.job_id"):
        messages.decode(b'{"job_id": "../x", "language": "python", "code": ""}',
                        messages.JobRequest)
    with pytest.raises(msgspec.ValidationError, match=r"\$\.language"):
        messages.decode(b'{"job_id": "a", "language": "cobol", "code": ""}',
                        messages.JobRequest)
    with pytest.raises(msgspec.ValidationError, match=r"\$\.timeout_ms"):
        messages.decode(b'{"job_id": "a", "language": "bash", "code": "", "timeout_ms": 0}',
                        messages.JobRequest)


def test_heartbeat_round_trips() -> None:
    metrics = messages.Metrics(
        memory_total_bytes=8, memory_available_bytes=4, cpu_percent=1.5, cpu_count=2,
        load_1m=0.1, load_5m=0.2, load_15m=0.3,
    )
    beat = messages.Heartbeat(
        agent_id="a", name="n", version="0.1.0", started_at=1.0, sent_at=2.0, seq=3,
        sandbox_mode="bwrap", languages=["python"], metrics=metrics, jobs_running=0,
        jobs_queued=0, sessions=0,
    )
    assert messages.decode(messages.encode(beat), messages.Heartbeat) == beat
