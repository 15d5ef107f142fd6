#!/usr/bin/env bash
# Sets up this machine (CPU torch if none is installed, the requirements) and runs lint and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || pip install --quiet torch==2.13.0
pip install --quiet -r requirements.txt -r requirements-gptq.txt -r requirements-dev.txt
# The web demo's test drives Debian's chromium with Playwright (which cannot download its own browsers here).
if ! command -v chromium >/dev/null; then
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null; } ||
        echo "chromium could not be installed: the web demo's browser test will be skipped" >&2
fi
ruff check .
python -m pytest -q "$@"
