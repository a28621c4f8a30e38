#!/usr/bin/env python3
"""Hide a number in a large generated document and ask a running controller to find it.

The document is the context of one RLM run (POST /v1/runs with "stream": true); each step
is printed as the controller reports it, then the answer. Standard library only:

    python3 examples/needle_in_haystack.py --url http://controller:7080 --lines 1000000

Exit status: 0 the answer holds the hidden number, 1 it does not, 2 no run could be made.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import urllib.error
import urllib.request
from typing import Any

WORDS = ("amber", "basalt", "cedar", "delta", "ember", "fjord", "granite", "harbor", "indigo",
         "juniper", "kestrel", "lagoon", "meadow", "nickel", "orchid", "pewter", "quartz",
         "russet", "saffron", "tundra", "umber", "violet", "willow", "zephyr")
QUERY = ("Somewhere in the context, one line says 'The magic number is N.' "
         "What is the magic number? Answer with the number only.")


def haystack(lines: int, seed: int) -> tuple[str, str]:
    """Lines of random words with one line giving the magic number, and that number."""
    rng = random.Random(seed)
    number = str(rng.randrange(100_000, 1_000_000))
    rows = [" ".join(rng.choices(WORDS, k=8)) for _ in range(lines)]
    rows.insert(rng.randrange(lines + 1), f"The magic number is {number}.")
    return "\n".join(rows) + "\n", number


def show(event: dict[str, Any]) -> None:
    """One streamed event as a line or two of text; sub-runs are indented."""
    indent = "  " * event["depth"]
    kind = event["kind"]
    if kind == "run_started":
        print(f"{indent}run {event['run_id']}: {event['context_chars']:,} characters of "
              f"{event['context_type']}, model {event['model'] or '(default)'}")
    elif kind == "model_replied":
        print(f"{indent}iteration {event['iteration']}: the model replied in "
              f"{event['model_ms']:.0f} ms ({event['tokens']['total_tokens']} tokens)")
    elif kind == "code_executed":
        output = event["output"].strip().splitlines()
        print(f"{indent}  block {event['block']} on {event['device_id']}: {event['status']}"
              f"{', printed: ' + output[0][:100] if output else ''}")
    elif kind == "sub_call":
        print(f"{indent}  sub-call: {event['prompt_chars']} characters asked, "
              f"{event['answer_chars']} answered")
    elif kind == "context_folded":
        print(f"{indent}  folded {event['folded_turns']} older turns "
              f"({event['tokens_before']} -> {event['tokens_after']} tokens)")
    sys.stdout.flush()


def run(url: str, body: dict[str, Any], token: str | None, timeout_s: float) -> dict[str, Any]:
    """POST /v1/runs, print the events as they arrive, and return the result."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url.rstrip("/") + "/v1/runs", method="POST",
                                     data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        for line in response:
            item = json.loads(line)
            if item["kind"] == "result":
                return dict(item["result"])
            if item["kind"] == "error":
                raise RuntimeError(f"the run failed: {item['error']['message']}")
            show(item)
    raise RuntimeError("the controller ended the stream without a result")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:7080", help="the controller")
    parser.add_argument("--lines", type=int, default=200_000,
                        help="lines in the document (about 55 bytes each)")
    parser.add_argument("--seed", type=int, default=7, help="makes the document repeatable")
    parser.add_argument("--model", default="", help="model id (default: the controller's)")
    parser.add_argument("--max-iterations", type=int, help="override rlm.max_iterations")
    parser.add_argument("--token", help="the controller's API token, if it has one")
    parser.add_argument("--timeout", type=float, default=3600.0,
                        help="seconds to wait for the controller without news")
    args = parser.parse_args()

    context, number = haystack(args.lines, args.seed)
    body: dict[str, Any] = {"query": QUERY, "context": context, "model": args.model,
                            "stream": True}
    if args.max_iterations:
        body["max_iterations"] = args.max_iterations
    try:
        result = run(args.url, body, args.token, args.timeout)
    except urllib.error.HTTPError as exc:
        print(f"{args.url} refused the run (HTTP {exc.code}): {exc.read().decode()[:500]}",
              file=sys.stderr)
        return 2
    except (urllib.error.URLError, OSError) as exc:
        print(f"no controller answers at {args.url}: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"\nanswer ({result['stop_reason']}): {result['answer']}")
    print(f"{result['iterations']} iterations, {result['sub_calls']} sub-calls, "
          f"{result['tokens']['total_tokens']} tokens, {result['latency_ms'] / 1000:.1f} s, "
          f"trajectory {result['trajectory_path']}")
    if number in result["answer"]:
        print(f"found the magic number {number}")
        return 0
    print(f"the answer does not hold the magic number {number}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
