#!/usr/bin/env bash
# Install everything the platform needs on a fresh Debian 12 machine, idempotently:
# apt packages (mosquitto, postgresql), the Python venv at .venv/ from the lock in
# requirements/ (runtime.txt; dev.txt with --dev, which adds the test tools), and — with
# --dev — the TimescaleDB test double's node packages.
set -euo pipefail
cd "$(dirname "$0")/.."

DEV=0
[[ "${1:-}" == "--dev" ]] && DEV=1

as_root() { if [[ $EUID -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [[ -x /usr/sbin/mosquitto ]] || need_apt+=(mosquitto)
command -v mosquitto_sub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || need_apt+=(postgresql)
if (( DEV )); then
  command -v node >/dev/null 2>&1 || need_apt+=(nodejs npm)
  # The authenticating proxy in front of the Dagster UI (tests/integration/test_ui_auth.py
  # runs deploy/ui-auth/nginx.conf.template); the package's own service is not used.
  [[ -x /usr/sbin/nginx ]] || need_apt+=(nginx)
  # promtool checks and unit-tests the alert rules (tests/unit/test_prometheus_rules.py),
  # and tests/integration/test_prometheus_scrape.py runs the binary as its own child; the
  # package's system service is not used.
  command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
fi
if (( ${#need_apt[@]} )); then
  echo "==> apt-get install ${need_apt[*]}"
  as_root apt-get update -qq
  # The postgresql package would start its own cluster on 5432; we run ours as children.
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

PYTHON="${PYTHON:-python3}"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "Python >= 3.11 required (set PYTHON=...)" >&2; exit 1; }
if [[ ! -x .venv/bin/python ]]; then
  echo "==> creating .venv"
  "$PYTHON" -m venv .venv
fi
# The locked set first (scripts/lock.sh makes it from pyproject.toml), then the project
# itself without dependencies, so nothing unlocked sneaks in; pip check then fails if the
# lock no longer satisfies pyproject.toml (a range changed without re-locking).
lock=requirements/runtime.txt
(( DEV )) && lock=requirements/dev.txt
pip=(.venv/bin/python -m pip --disable-pip-version-check)
echo "==> pip install -r ${lock}"
"${pip[@]}" install -q -r "$lock"
echo "==> pip install --no-deps -e ."
"${pip[@]}" install -q --no-deps -e .
"${pip[@]}" check

# The dbt manifest the Dagster code location loads (iot_platform/analytics_definitions.py) is
# made here, at setup time, never while the code location loads. No database needed.
echo "==> dbt parse (dbt_models/target/manifest.json)"
.venv/bin/dbt parse --quiet --project-dir dbt_models --profiles-dir dbt_models

if (( DEV )); then
  echo "==> npm ci (TimescaleDB test double, Compose Specification schema)"
  npm ci --silent --no-audit --no-fund --legacy-peer-deps --prefix tests/timescale_double
  npm ci --silent --no-audit --no-fund --prefix tests/compose_schema
fi
