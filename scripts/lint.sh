#!/usr/bin/env bash
# What CI checks before the tests: `make lint` runs exactly this, and scripts/test.sh calls it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff check"; ruff check .
echo "== ruff format"; ruff format --check .
echo "== mypy"; mypy
