#!/usr/bin/env python3
"""Run a piece of code in an agent's sandbox through the controller (POST /v1/jobs).

The controller picks the best healthy agent that has the language, and tries another
one if that agent fails. Standard library only:

    python3 examples/submit_job.py --url http://controller:7080
    python3 examples/submit_job.py --url http://controller:7080 --language bash --code 'uname -a'
    python3 examples/submit_job.py --url http://controller:7080 --language rust --file main.rs

Exit status: 0 the code ran and exited 0, 1 it did not, 2 the job could not be submitted.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

DEFAULT_CODE = """\
import platform

primes = [n for n in range(2, 100) if all(n % d for d in range(2, int(n ** 0.5) + 1))]
print(f"{len(primes)} primes below 100, the last {primes[-1]}")
print("python", platform.python_version(), "on", platform.machine())
"""


def submit(url: str, job: dict[str, Any], token: str | None) -> dict[str, Any]:
    """POST the job and return the agent's JobResult as a dict."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url.rstrip("/") + "/v1/jobs", method="POST",
                                     data=json.dumps(job).encode(), headers=headers)
    # The controller answers once the job is done; allow for its time limit and a margin.
    timeout_s = job.get("timeout_ms", 120_000) / 1000 + 60
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return dict(json.load(response))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:7080", help="the controller")
    parser.add_argument("--language", default="python",
                        choices=["python", "bash", "javascript", "rust", "java"])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--code", help="the code itself (default: a small Python program)")
    source.add_argument("--file", type=Path, help="a file holding the code")
    parser.add_argument("--timeout-ms", type=int, help="time limit (default: the agent's)")
    parser.add_argument("--token", help="the controller's API token, if it has one")
    args = parser.parse_args()

    code = args.file.read_text() if args.file else args.code or DEFAULT_CODE
    # The job id is an idempotency key: sending the same id again returns the first result.
    job: dict[str, Any] = {"job_id": f"example-{uuid.uuid4().hex[:16]}",
                           "language": args.language, "code": code}
    if args.timeout_ms:
        job["timeout_ms"] = args.timeout_ms
    try:
        result = submit(args.url, job, args.token)
    except urllib.error.HTTPError as exc:
        print(f"{args.url} refused the job (HTTP {exc.code}): {exc.read().decode()[:500]}",
              file=sys.stderr)
        return 2
    except (urllib.error.URLError, OSError) as exc:
        print(f"no controller answers at {args.url}: {exc}", file=sys.stderr)
        return 2
    print(f"job {result['job_id']} on {result['agent_id']}: {result['status']} "
          f"(exit {result['exit_code']}, {result['wall_time_ms']:.0f} ms)")
    if result["stdout"]:
        print("--- stdout\n" + result["stdout"].rstrip("\n"))
    if result["stderr"]:
        print("--- stderr\n" + result["stderr"].rstrip("\n"))
    if result.get("error"):
        print(f"--- error {result['error']['code']}: {result['error']['message']}")
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
