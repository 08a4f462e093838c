#!/usr/bin/env bash
# Set up a virtual environment (if needed) and run lint, format check, mypy and the whole
# test suite.
# Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check deqntk_dist tests scripts
.venv/bin/ruff format --check deqntk_dist tests scripts
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
