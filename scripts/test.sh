#!/usr/bin/env bash
# Sets everything up, then runs ruff, mypy (strict on kowalski.*), import-linter and the
# whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# chromium: the dashboard's browser tests (driven by Playwright, never downloaded);
# prometheus: promtool checks the shipped alerting rules.
KOWALSKI_EXTRA_APT="chromium prometheus" bash scripts/setup.sh "model,test"

.venv/bin/ruff check .
# mypy reads the sources through a tree shaped like the installed namespace.
mkdir -p .dev/kowalski
for part in agent controller common; do ln -sfn "../../$part" ".dev/kowalski/$part"; done
(cd .dev && ../.venv/bin/mypy --config-file ../pyproject.toml \
    -p kowalski.agent -p kowalski.controller -p kowalski.common)
# The layer contracts in pyproject.toml, checked on the same tree.
(cd .dev && ../.venv/bin/lint-imports --no-logo ../pyproject.toml)
# The suite imports the installed package, never the source folders.
.venv/bin/python -m pytest -p no:cacheprovider "$@"
