"""The exo stand-in as a process of its own: `python -m bench.standin --port-file F`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from exo_standin import DEFAULT_MODEL, make_exo_app

from bench import serving

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
    app = make_exo_app(flavour="v1", models=(MODEL,), reply=reply,
                       latency_s=args.latency_ms / 1000)
    return serving.run(lambda: serving.serve_sites(app, 1, args.port_file))


if __name__ == "__main__":
    sys.exit(main())
