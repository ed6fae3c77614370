#!/usr/bin/env bash
# Installs everything: Python packages, and the pinned reference llama.cpp tools (built once with cmake,
# cached under ~/.cache/llama-cpp-ref) used by the parity tests and the llama.cpp verify engine.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install -q -r requirements.txt
python3 -m llamacpp.build
# The web UI tests drive Debian's Chromium (never a browser downloaded by a test tool).
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && apt-get install -y -qq chromium >/dev/null
    else
        echo "note: install Debian's 'chromium' to run the web UI tests (they skip without it)" >&2
    fi
fi
