"""The batch benchmark's model server as a process of its own: `python -m bench.standin`.

The scripted model's lean serving (bench/scripted_model.py): an OpenAI-compatible server
answering each chat after `--latency-ms` with a short answer naming its prompt.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from exo_standin import DEFAULT_MODEL

from bench import scripted_model, serving

MODEL = DEFAULT_MODEL


def reply(body: dict[str, Any]) -> str:
    """A short answer naming the prompt, so that each prompt gets its own."""
    messages = body.get("messages") or [{}]
    return f"An answer to: {str(messages[-1].get('content', ''))[:80]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.standin", description=__doc__)
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--latency-ms", type=float, default=0.0,
                        help="delay before each chat answer")
    args = parser.parse_args(argv)
    latency_s = args.latency_ms / 1000

    async def script(body: dict[str, Any]) -> str:
        await asyncio.sleep(latency_s)
        return reply(body)

    return serving.run(lambda: scripted_model.serve(MODEL, script, args.port_file))


if __name__ == "__main__":
    sys.exit(main())
