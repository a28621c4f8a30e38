"""Runs the reference rlm (`rlms` from PyPI) for bench/peer.py, in the reference's own venv.

`python peer_driver.py BASE_URL MODEL`, then one JSON job per stdin line
({"query", "context_file"}); each answer is one stdout line starting with RESULT_PREFIX.
Only the standard library and `rlm` are imported: this file never sees the project.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

RESULT_PREFIX = "peer-result "


def main() -> int:
    from rlm import RLM

    base_url, model = sys.argv[1], sys.argv[2]
    for line in sys.stdin:
        job = json.loads(line)
        context = Path(job["context_file"]).read_text()
        iterations: list[float] = []
        # The reference's defaults: the in-process `local` REPL, 16 sub-calls at a time.
        reference = RLM(backend="openai",
                        backend_kwargs={"model_name": model, "base_url": base_url,
                                        "api_key": "unused"},
                        environment="local", max_iterations=30,
                        on_iteration_complete=lambda _depth, _number, seconds, into=iterations:
                        into.append(seconds))
        started = time.perf_counter()
        completion = reference.completion(context, root_prompt=job["query"])
        wall_s = time.perf_counter() - started
        print(RESULT_PREFIX + json.dumps({"wall_s": wall_s, "answer": completion.response,
                                          "iteration_s": iterations}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
