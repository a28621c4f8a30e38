"""kowalski-ctl's exit codes, which scripts can rely on (README, "Using it")."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
# Nothing to run on: no controller, no agents, no model.
EXIT_UNAVAILABLE = 4
# Stopped at a limit without an answer, or a batch with failed items.
EXIT_INCOMPLETE = 5
EXIT_INTERRUPTED = 130
