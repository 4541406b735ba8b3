"""Dagster's storage as the platform configures it (deploy/dagster/dagster.yaml) on a real
PostgreSQL: storage calls reuse a kept connection instead of opening one each, and a
PostgreSQL restart costs a reconnect, not a failed call."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import psycopg
import pytest

from iot_platform.services.postgres import PostgresServer
from tests.fixtures.services import running_postgres

pytestmark = pytest.mark.integration

DAGSTER_YAML = Path(__file__).resolve().parents[2] / "deploy" / "dagster" / "dagster.yaml"
CALLS = 40


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A server of this test's own: the test restarts it."""
    with running_postgres() as server:
        server.ensure_database("dagster")
        yield server


@pytest.fixture
def instance(
    own_postgres: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dg.DagsterInstance]:
    """The instance every Dagster process of the stack builds from the shipped config."""
    info = psycopg.conninfo.conninfo_to_dict(own_postgres.conninfo("dagster"))
    monkeypatch.setenv("IOT_PG_HOST", str(info["host"]))
    monkeypatch.setenv("IOT_PG_PORT", str(info["port"]))
    monkeypatch.setenv("IOT_PG_USER", str(info["user"]))
    monkeypatch.setenv("IOT_PG_PASSWORD", str(info["password"]))
    monkeypatch.setenv("IOT_DAGSTER_DB", "dagster")
    shutil.copyfile(DAGSTER_YAML, tmp_path / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(tmp_path)) as built:
        yield built


def _sessions(server: PostgresServer) -> int:
    """Connections ever opened to the Dagster database (pg_stat_database.sessions)."""
    with psycopg.connect(server.conninfo("postgres")) as conn:
        row = conn.execute(
            "SELECT sessions FROM pg_stat_database WHERE datname = 'dagster'"
        ).fetchone()
    assert row is not None
    return int(row[0])


def _storage_calls(instance: dg.DagsterInstance) -> None:
    """Run, event log and schedule storage reads, as the daemon's loops make them."""
    for _ in range(CALLS):
        instance.get_runs(limit=1)
        instance.get_latest_materialization_event(dg.AssetKey("raw_batches"))
        instance.all_instigator_state()


def test_storage_calls_reuse_kept_connections(
    instance: dg.DagsterInstance, own_postgres: PostgresServer
) -> None:
    _storage_calls(instance)  # the kept connections open here
    before = _sessions(own_postgres)
    _storage_calls(instance)
    opened = _sessions(own_postgres) - before - 1  # minus _sessions' own connection
    # dagster_postgres' default opens one per call: 3 * CALLS here.
    assert opened <= 3, f"{opened} connections opened for {3 * CALLS} storage calls"


def test_storage_survives_a_postgres_restart(
    instance: dg.DagsterInstance, own_postgres: PostgresServer
) -> None:
    _storage_calls(instance)
    own_postgres.stop()
    own_postgres.start()
    # The kept connections died with the server: each call replaces its connection.
    _storage_calls(instance)
    assert instance.get_runs(limit=1) == []
