#!/usr/bin/env bash
# README test command: install what is missing (incl. test tools), lint, type-check, run
# every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --dev
echo "==> ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "==> mypy"
.venv/bin/mypy
echo "==> pytest"
exec .venv/bin/python -m pytest "$@"
