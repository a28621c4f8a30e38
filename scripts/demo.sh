#!/usr/bin/env bash
# Sets Kowalski up and runs its main job on this one machine: a local agent, an in-process
# controller and the embedded SmolLM2-135M model answer a question about a document.
# Usage: scripts/demo.sh ["QUESTION"] [CONTEXT_FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh model
question="${1:-Which city is the warehouse with the most crates in? Answer with the city name.}"
context="${2:-examples/warehouses.txt}"
status=0
.venv/bin/kowalski-ctl run "$question" --context-file "$context" --local --max-iterations 3 \
    || status=$?
# 0: the model gave a FINAL answer; 5: it stopped at a limit with its partial answer, which a
# 135M-parameter model often does. Anything else is a failure.
if [[ $status -ne 0 && $status -ne 5 ]]; then
    exit "$status"
fi
