#!/usr/bin/env bash
# The whole suite: lint, types, then pytest (unit, lab, end-to-end). Run via `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff"; ruff check .
echo "== mypy"; mypy
echo "== pytest"
exec python -m pytest -q -p no:cacheprovider "$@"
