#!/usr/bin/env bash
# Create .venv and install the package with its test extras (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import deqntk_dist, pytest, ruff, mypy, bokeh, matplotlib, dask_jobqueue" >/dev/null 2>&1 \
   || [ pyproject.toml -nt .venv/.installed ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test,jobqueue,plots]"
  touch .venv/.installed
fi
