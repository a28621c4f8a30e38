#!/usr/bin/env bash
# Sets Kowalski up and runs its main job on this one machine: a local agent, an in-process
# controller and the embedded SmolLM2-135M model answer a question about a document.
# Usage: scripts/demo.sh ["QUESTION"] [CONTEXT_FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh model
question="${1:-Which city is the warehouse with the most crates in? Answer with the city name.}"
context="${2:-examples/warehouses.txt}"
# A 4096-token window keeps the small model's replies short enough to watch.
config=$(mktemp --suffix=.toml)
trap 'rm -f "$config"' EXIT
printf '[rlm]\ncontext_window_tokens = 4096\n' > "$config"
status=0
.venv/bin/kowalski-ctl --config "$config" run "$question" --context-file "$context" --local \
    --max-iterations 3 || status=$?
# 0: the model gave a FINAL answer; 5: it stopped at a limit with its partial answer, which a
# 135M-parameter model often does. Anything else is a failure.
if [[ $status -ne 0 && $status -ne 5 ]]; then
    exit "$status"
fi
