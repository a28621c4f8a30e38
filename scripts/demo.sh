#!/usr/bin/env bash
# Sets Kowalski up and runs its main job on this one machine: a local agent, an in-process
# controller and the embedded SmolLM2-135M model answer a question about a document.
# Usage: scripts/demo.sh ["QUESTION"] [CONTEXT_FILE]
set -euo pipefail
set -euo pipefail
cd "$(dirname "$0")/.."
# KOWALSKI_SKIP_SETUP=1 skips the set-up when it is done already (the benchmark times the
# demo itself).
if [[ ${KOWALSKI_SKIP_SETUP:-0} != 1 ]]; then
    bash scripts/setup.sh model
fi
question="${1:-Which city is the warehouse with the most crates in? Answer with the city name.}"
context="${2:-examples/warehouses.txt}"
echo "This demo runs SmolLM2-135M on this machine: a 135M-parameter model shows the machinery"
echo "(the REPL, the iterations, the trajectory); it is too small to be trusted with the answer."
# Short replies, a small window and a time limit keep the demo to about a minute and a half.
config=$(mktemp --suffix=.toml)
trap 'rm -f "$config"' EXIT
printf '[rlm]\ncontext_window_tokens = 4096\nmax_reply_tokens = 256\nrun_timeout_s = 75\n' > "$config"
status=0
.venv/bin/kowalski-ctl --config "$config" run "$question" --context-file "$context" --local \
    --max-iterations 3 || status=$?
# 0: the model gave a FINAL answer; 5: it stopped at a limit with its partial answer, which a
# 135M-parameter model often does. Anything else is a failure.
if [[ $status -ne 0 && $status -ne 5 ]]; then
    exit "$status"
fi
cat <<EOF

That was SmolLM2-135M: a 135M-parameter model shows the machinery (the REPL, the iterations,
the trajectory); its answer is not to be trusted. The same question on a real model, one line:
  a GGUF file:                 .venv/bin/kowalski-ctl run "$question" --context-file $context --model-file PATH.gguf
  an OpenAI-compatible server: .venv/bin/kowalski-ctl run "$question" --context-file $context --endpoint http://127.0.0.1:11434 --model MODEL
  an exo cluster:              .venv/bin/kowalski-ctl --config kowalski.toml run "$question" --context-file $context
    with exo.endpoints in kowalski.toml and a controller started by
    .venv/bin/kowalski-ctl --config kowalski.toml serve   (docs/USER_GUIDE.md, "Running a controller")
EOF
