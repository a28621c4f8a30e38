#!/usr/bin/env python3
"""The controller's OpenAI-compatible API with the `openai` package: models, chat, RLM.

A model named `rlm:<model>` runs an RLM job: the last user message is the question and
the earlier user messages are the document. Other model names are plain chat calls,
passed through to exo (and cached). Needs `pip install openai`:

    python3 examples/openai_client.py --url http://controller:7080
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import openai
from openai import OpenAI

HERE = Path(__file__).resolve().parent
QUESTION = "Which city is the warehouse with the most crates in? Answer with the city name."


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:7080", help="the controller")
    parser.add_argument("--model", help="model id (default: the first one the controller lists)")
    parser.add_argument("--context-file", type=Path, default=HERE / "warehouses.txt",
                        help="the document the RLM question is about")
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--token", help="the controller's API token, if it has one")
    args = parser.parse_args()

    # The API key is only checked when the controller has an API token.
    client = OpenAI(base_url=args.url.rstrip("/") + "/v1", api_key=args.token or "unused",
                    timeout=3600.0)
    try:
        models = [model.id for model in client.models.list()]
        print("models:", ", ".join(models) or "none ready")
        model = args.model or next((m for m in models if not m.startswith("rlm:")), None)
        if model is None:
            print("no model is ready: check `kowalski-ctl status`", file=sys.stderr)
            return 1

        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Say hello in five words."}],
            max_tokens=32)
        print(f"plain chat ({model}): {reply.choices[0].message.content}")

        print("streamed: ", end="", flush=True)
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Count from one to five."}],
            max_tokens=32, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
        print()

        # The document could instead go in extra_body={"context": ...}, which also takes
        # a list or a dict; the model then sees it as the variable `context`.
        answer = client.chat.completions.create(
            model=f"rlm:{model}",
            messages=[{"role": "user", "content": args.context_file.read_text()},
                      {"role": "user", "content": args.question}])
        usage = answer.usage.total_tokens if answer.usage else 0
        print(f"rlm:{model} ({answer.choices[0].finish_reason}, {usage} tokens, run "
              f"{answer.id}): {answer.choices[0].message.content}")
    except openai.APIConnectionError:
        print(f"no controller answers at {args.url}", file=sys.stderr)
        return 1
    except openai.APIStatusError as exc:
        print(f"the controller answered HTTP {exc.status_code}: {exc.response.text[:500]}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
