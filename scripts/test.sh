#!/usr/bin/env bash
# README test command: install what is missing (incl. test tools), lint, type-check, check
# the Dagster definitions, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --dev
echo "==> ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "==> mypy"
.venv/bin/mypy
echo "==> dg check defs"
# As a Dagster user's first command from a fresh clone: no DAGSTER_HOME, no IOT_* settings.
env -u DAGSTER_HOME .venv/bin/dg check defs
echo "==> pytest"
# Two worker processes by default (pytest-xdist), a test file per worker at a time: the
# whole-stack tests mostly wait on their stack, so the rest of the suite runs beside them.
# IOT_TEST_WORKERS=0 runs everything in one process; later arguments override these. The
# 30 slowest tests are listed at the end, to see where the suite's time goes.
exec .venv/bin/python -m pytest --numprocesses "${IOT_TEST_WORKERS:-2}" --dist loadfile \
  --durations=30 "$@"
