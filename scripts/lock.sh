#!/usr/bin/env bash
# Re-lock: resolve pyproject.toml's ranges to exact versions, for CPython 3.11 on Linux
# (the venv of scripts/bootstrap.sh, CI and the Dockerfile's python:3.11 image).
#
#   scripts/lock.sh                              # re-resolve, keeping current pins that still fit
#   scripts/lock.sh --upgrade                    # newest versions the ranges allow
#   scripts/lock.sh --upgrade-package polars     # move one package (and what it needs)
#
# Writes requirements/runtime.txt (the dependencies) and requirements/dev.txt (.[dev]: the
# same runtime pins, plus the analyst extra and the test tools). pip-tools runs in a
# throwaway venv, so the lock does not depend on what .venv/ happens to hold.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || { echo "the lock is for Python 3.11 (set PYTHON=...)" >&2; exit 1; }

tools="$(mktemp -d)"
trap 'rm -rf "$tools"' EXIT
"$PYTHON" -m venv "$tools"
"$tools/bin/python" -m pip install -q --disable-pip-version-check "pip-tools==7.6.2"

# The comment at the top of each lock names this script as the command that made it.
export CUSTOM_COMPILE_COMMAND="scripts/lock.sh"
# The dev extra names this project itself (iot-platform[analyst]): treated as "unsafe",
# it is left out of the lock (as a comment), since bootstrap installs it editable.
compile=(
  "$tools/bin/pip-compile" --quiet --strip-extras --unsafe-package iot-platform
  --no-emit-index-url --no-emit-find-links --no-emit-trusted-host
)
"${compile[@]}" --output-file requirements/runtime.txt "$@" pyproject.toml
# Constrained by the runtime lock, so the dev set tests exactly what the image installs.
"${compile[@]}" --extra dev --constraint requirements/runtime.txt \
  --output-file requirements/dev.txt "$@" pyproject.toml
echo "==> requirements/runtime.txt, requirements/dev.txt"
