#!/usr/bin/env bash
# Sets up this machine (CPU torch if none is installed, the requirements) and runs lint and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || pip install --quiet torch==2.13.0
pip install --quiet -r requirements.txt -r requirements-dev.txt
ruff check .
python -m pytest -q "$@"
