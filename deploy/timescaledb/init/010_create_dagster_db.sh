#!/usr/bin/env bash
# Runs once, when the TimescaleDB container initialises an empty data volume, after the
# image's own 000_install_timescaledb.sh / 001_timescaledb_tune.sh (which create the
# extension in $POSTGRES_DB, the warehouse `IOT_PG_DB`). Creates the database Dagster
# uses for its run/event/schedule storage (dagster.yaml -> IOT_DAGSTER_DB), owned by the
# same role. Mounted as a single file so the image's own init scripts stay in place.
# Safe both executed and sourced by the entrypoint (no `set` changes, no exit on success).

: "${IOT_DAGSTER_DB:?IOT_DAGSTER_DB must be set for the timescaledb service}"

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v dbname="$IOT_DAGSTER_DB" -v owner="$POSTGRES_USER" <<'SQL'
SELECT format('CREATE DATABASE %I OWNER %I', :'dbname', :'owner')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'dbname')
\gexec
SQL
