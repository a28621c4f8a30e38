#!/usr/bin/env python3
"""Send a JSONL file of prompts through a running controller, answers in input order.

The input is the format `kowalski-ctl batch` reads (see docs/BATCH.md): one JSON object a
line with an "id" and either "prompt" (and maybe "system") or "messages", and optionally
"model", "max_tokens", "temperature", "top_p", "stop", "seed". Each item is one call to
the controller's OpenAI-compatible /v1/chat/completions, which caches identical calls.
Standard library only:

    python3 examples/run_batch.py --url http://controller:7080 --output answers.jsonl

Exit status: 0 every item answered, 1 some failed, 2 the batch could not start.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PASSED_ON = ("max_tokens", "temperature", "top_p", "stop", "seed")


def call(url: str, path: str, body: dict[str, Any] | None, token: str | None) -> Any:
    """GET (no body) or POST JSON to the controller and return the decoded answer."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url.rstrip("/") + path, data=data, headers=headers)
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.load(response)


def chat_body(item: dict[str, Any], model: str | None) -> dict[str, Any]:
    """The /v1/chat/completions body for one input line."""
    messages = item.get("messages") or [
        *([{"role": "system", "content": item["system"]}] if "system" in item else []),
        {"role": "user", "content": item["prompt"]},
    ]
    body = {"model": item.get("model") or model, "messages": messages}
    body.update({key: item[key] for key in PASSED_ON if key in item})
    return body


def answer(url: str, item: dict[str, Any], model: str | None, token: str | None) -> dict[str, Any]:
    """One output line: the text, or the error the controller gave."""
    try:
        reply = call(url, "/v1/chat/completions", chat_body(item, model), token)
    except urllib.error.HTTPError as exc:
        try:
            error = json.loads(exc.read())["error"]
        except (ValueError, KeyError):
            error = {"code": f"http_{exc.code}", "message": str(exc)}
        return {"id": item["id"], "ok": False, "error": error}
    except (urllib.error.URLError, OSError) as exc:
        return {"id": item["id"], "ok": False, "error": {"code": "network", "message": str(exc)}}
    return {"id": item["id"], "ok": True, "text": reply["choices"][0]["message"]["content"],
            "usage": reply.get("usage")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:7080", help="the controller")
    parser.add_argument("--input", type=Path, default=HERE / "batch_prompts.jsonl")
    parser.add_argument("--output", default="-", help="output JSONL (default: stdout)")
    parser.add_argument("--model", help="for lines naming none (default: the first ready)")
    parser.add_argument("--concurrency", type=int, default=4, help="calls in flight")
    parser.add_argument("--token", help="the controller's API token, if it has one")
    args = parser.parse_args()

    items = []
    for number, line in enumerate(args.input.read_text().splitlines(), start=1):
        if line.strip():
            item = json.loads(line)
            item.setdefault("id", number)
            items.append(item)
    model = args.model
    if not model and not all(item.get("model") for item in items):
        try:
            listed = call(args.url, "/v1/models", None, args.token)["data"]
        except (urllib.error.URLError, OSError) as exc:
            print(f"no controller answers at {args.url}: {exc}", file=sys.stderr)
            return 2
        model = next((m["id"] for m in listed if not m["id"].startswith("rlm:")), None)
        if model is None:
            print("no model is ready: check `kowalski-ctl status`", file=sys.stderr)
            return 2
    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        # map() keeps input order whatever order the answers come back in.
        results = list(pool.map(lambda item: answer(args.url, item, model, args.token), items))
    text = "".join(json.dumps(result) + "\n" for result in results)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
    failed = sum(not result["ok"] for result in results)
    print(f"{len(results)} items: {len(results) - failed} ok, {failed} failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
