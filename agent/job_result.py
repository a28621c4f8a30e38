"""What a job's run came to, and the JobResult (status, error code) the caller gets."""

from __future__ import annotations

from dataclasses import dataclass, field

from kowalski.agent.launcher import LAUNCH_FAILED, LAUNCH_MARK
from kowalski.common.config import SandboxConfig
from kowalski.common.errors import ExecutionError, ReplError, ReplTimeoutError
from kowalski.common.messages import JobRequest, JobResult, JobStatus, WireError

# Wire codes for jobs stopped at a resource limit.
MEMORY_LIMIT = "memory_limit"
OUTPUT_LIMIT = "output_limit"


@dataclass
class Outcome:
    returncode: int | None
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    wall_time_ms: float
    timed_out: bool
    # The stream that passed flood_limit, if the job was killed for it.
    flooded: str
    flood_limit: int
    memory_exceeded: bool
    pids_exhausted: bool
    # What the run left in its work dir that the caller asked to keep (compilers' output).
    artifacts: dict[str, bytes] = field(default_factory=dict)

    @property
    def launch_failed(self) -> bool:
        return self.returncode == LAUNCH_FAILED and self.stderr.startswith(LAUNCH_MARK)


def wire_error(error: ExecutionError) -> WireError:
    return WireError(code=error.code, message=error.message, retryable=error.retry_elsewhere)


def job_result(request: JobRequest, outcome: Outcome, timeout_ms: int,
                config: SandboxConfig, *, phase: str = "code") -> JobResult:
    """The job's result from its last step: its run, or a compilation that failed."""
    error: WireError | None = None
    status: JobStatus
    exit_code = outcome.returncode
    process_note = (f"; it reached the limit of {config.pids_limit} processes"
                    if outcome.pids_exhausted else "")
    if outcome.launch_failed:
        status = "failed"
        message = outcome.stderr.decode(errors="replace").strip()
        error = wire_error(ExecutionError(f"the sandbox could not start the job: {message}"))
    elif outcome.flooded:
        status = "killed"
        error = WireError(code=OUTPUT_LIMIT, message=(
            f"output limit exceeded: the job wrote more than {outcome.flood_limit} bytes to "
            f"{outcome.flooded} and was killed"))
    elif outcome.memory_exceeded and exit_code != 0:
        status = "killed"
        error = WireError(code=MEMORY_LIMIT, message=(
            f"memory limit exceeded: the job used more than {config.memory_limit_mb} MB "
            "and was killed"))
    elif outcome.timed_out:
        status = "timeout"
        timeout = ReplTimeoutError(request.language, timeout_ms, phase=phase)
        error = WireError(code=timeout.code, message=timeout.message + process_note)
    elif exit_code == 0 and phase == "code":
        status = "ok"
    else:
        status = "error"
        failure = ReplError(request.language, outcome.stderr.decode(errors="replace"), exit_code,
                            phase=phase)
        error = WireError(code=failure.code, message=failure.message + process_note)
    return JobResult(
        job_id=request.job_id, status=status, exit_code=exit_code,
        stdout=outcome.stdout.decode(errors="replace"),
        stderr=outcome.stderr.decode(errors="replace"),
        stdout_truncated=outcome.stdout_truncated, stderr_truncated=outcome.stderr_truncated,
        wall_time_ms=round(outcome.wall_time_ms, 3), error=error)
