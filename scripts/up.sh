#!/usr/bin/env bash
# README run command: install what is missing, then run the embedded stack until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/iot-platform up "$@"
